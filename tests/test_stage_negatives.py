"""Negative hallucination: prompts, checks, accumulation across rounds, tiny-model plumbing.

Test doubles of component contracts: ``RoundCompleter`` answers through the
``TextGenerator.generate`` contract from a per-round script; ``TableScorer`` returns given NLI
probabilities through ``score(pairs)`` (a random tiny model cannot be steered to contradict).
"""

from __future__ import annotations

import json

import numpy as np

from hierarcaps.generation import TextGenerator
from hierarcaps.models import ModelSpec, load_nli, load_seq2seq_lm
from hierarcaps.nli import NLIScorer, NLIScores
from hierarcaps.stages.completer import add_delimiter_tokens
from hierarcaps.stages.negatives import NegativeSettings, hallucinate_negatives, negative_prompts

GOAT = ["animal", "goat", "goat on island", "a goat eating leaves of a lemon tree on the island"]
PIE = ["dessert", "pie", "decorated pie", "pie with candles and gifts in boxes on a white background"]
P1, P2, P3 = "→", "animal →", "animal → goat →"
P4 = "animal → goat → goat on island →"
SCRIPT = [  # per round: prompt -> completer output (read up to the next →)
    {P1: "portrait → frog → x", P2: "", P3: "goat in a field", P4: "goat on island with flowers"},
    {P2: "frog → frogs on a leaf", P3: "goats graze at snowy night", P4: "goat on island with flowers"},
    {P4: "goat on island at night"},
]
CONTRADICTING = {  # (positive tier, hallucinated tier), premise first
    ("animal", "portrait"), ("goat", "frog"), ("goat on island", "goats graze at snowy night"),
    (GOAT[3], "goat on island with flowers"), (GOAT[3], "goat on island at night"),
}
ENTAILED = {  # (general, specific): the specific text entails the general one
    ("animal", "frog"), ("goat", "goats graze at snowy night"), ("goat on island", "goat on island at night"),
}


class RoundCompleter:
    """Test double of TextGenerator: call r answers from SCRIPT[r]; unscripted prompts get ''."""

    model_id = "scripted-completer"

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.generate_calls = 0

    def generate(self, prompts, **kwargs):
        script = SCRIPT[self.generate_calls] if self.generate_calls < len(SCRIPT) else {}
        self.calls.append({"prompts": list(prompts), **kwargs})
        self.generate_calls += 1
        return [[script.get(p, "")] for p in prompts]


class TableScorer:
    """Test double of NLIScorer with p_c and p_e given by the CONTRADICTING / ENTAILED tables."""

    model_id = "table-nli"

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []
        self.pairs_scored = 0

    def score(self, pairs):
        self.calls.append(list(pairs))
        self.pairs_scored += len(pairs)
        c = np.array([0.8 if pair in CONTRADICTING else 0.1 for pair in pairs])
        e = np.array([0.9 if (h, p) in ENTAILED else 0.05 for p, h in pairs])
        return NLIScores(entailment=e, neutral=1 - e - c, contradiction=c)


def test_forward_prompts_have_the_bare_delimiter_and_no_typo() -> None:
    assert negative_prompts(GOAT) == [P1, P2, P3, P4]


def test_negatives_accumulate_across_rounds_and_only_missing_tiers_are_prompted() -> None:
    rows = [{"id": "a", "positive": GOAT, "provenance": '{"complete": {"candidate_index": 3}}'},
            {"id": "b", "positive": PIE}]
    completer, scorer = RoundCompleter(), TableScorer()
    out, stats = hallucinate_negatives(rows, completer, scorer, NegativeSettings(rounds=3))

    assert [r["id"] for r in out] == ["a"]
    assert out[0]["negative"] == ["portrait", "frog", "goats graze at snowy night", "goat on island at night"]
    provenance = json.loads(out[0]["provenance"])
    assert provenance["complete"] == {"candidate_index": 3}
    assert provenance["negatives"]["rounds"] == [0, 1, 1, 2]
    assert provenance["negatives"]["p_contradiction"] == [0.8] * 4
    assert provenance["negatives"]["p_negative_entails_parent"] == [None, 0.9, 0.9, 0.9]

    pie_prompts = negative_prompts(PIE)
    assert completer.calls[0]["prompts"] == [P1, P2, P3, P4, *pie_prompts]  # ONE call per round
    assert completer.calls[1]["prompts"] == [P2, P3, P4, *pie_prompts]  # T'1 was found in round 0
    assert completer.calls[2]["prompts"] == [P4, *pie_prompts]
    assert all(c["stop_strings"] == ["→"] and c["num_return_sequences"] == 1 for c in completer.calls)
    assert len({c["seed"] for c in completer.calls}) == 3

    assert stats.items_in == 2 and stats.kept == 1
    assert dict(stats.rejected) == {"incomplete_negative_chain": 1}
    # GOAT: "" once, "goat in a field" not contradicting, "... with flowers" not a child twice.
    # PIE: 11 empties and, in round 0, "portrait" (the answer to the shared prompt "→") not contradicting "dessert".
    assert stats.extra["candidates_empty_tier"] == 1 + 11
    assert stats.extra["candidates_not_contradicting"] == 1 + 1
    assert stats.extra["candidates_not_entailed"] == 2
    assert stats.extra["generate_calls"] == 3


def test_nli_checks_use_the_right_pairs_and_skip_empty_outputs() -> None:
    scorer = TableScorer()
    hallucinate_negatives([{"positive": GOAT}], RoundCompleter(), scorer, NegativeSettings(rounds=1))
    asked = [pair for call in scorer.calls for pair in call]
    # contradiction: (T_i, T'_i) with the positive tier as premise; nothing asked for the empty T'2
    assert ("animal", "portrait") in asked and ("goat", "") not in asked
    # the child test of T'1 does not exist; for i > 1 both directions against T_(i-1)
    assert not any(t == "portrait" for pair in asked for t in pair if pair != ("animal", "portrait"))
    assert ("goat on island with flowers", "goat on island") in asked
    assert ("goat on island", "goat on island with flowers") in asked
    # the non-contradicting T'3 never reaches the entailment test
    assert ("goat in a field", "goat") not in asked


def test_round_limit_and_early_stop() -> None:
    completer = RoundCompleter()
    out, stats = hallucinate_negatives([{"positive": GOAT}], completer, TableScorer(), NegativeSettings(rounds=2))
    assert out == [] and dict(stats.rejected) == {"incomplete_negative_chain": 1} and completer.generate_calls == 2
    completer = RoundCompleter()
    out, _ = hallucinate_negatives([{"positive": GOAT}], completer, TableScorer(), NegativeSettings(rounds=8))
    assert len(out) == 1 and completer.generate_calls == 3  # stops once every tier is found


def test_tiny_completer_plumbing(tiny_seq2seq_dir, tiny_nli_dir) -> None:
    """Real T5 + BART (random): batching and counting only; decisions are random."""
    cpu = dict(device="cpu", dtype="float32")
    model, tokenizer = load_seq2seq_lm(ModelSpec(str(tiny_seq2seq_dir), **cpu))
    add_delimiter_tokens(tokenizer, model)
    completer = TextGenerator(model, tokenizer)
    scorer = NLIScorer(*load_nli(ModelSpec(str(tiny_nli_dir), **cpu)))
    rows = [{"positive": GOAT}, {"positive": PIE}, {"positive": GOAT[::-1]}]
    out, stats = hallucinate_negatives(rows, completer, scorer, NegativeSettings(rounds=2, max_new_tokens=8, batch_size=2))
    assert completer.generate_calls <= 2 * 2 and stats.extra["generate_calls"] == completer.generate_calls
    assert stats.kept + sum(stats.rejected.values()) == 3
    assert all(len(r["negative"]) == 4 and "→" not in "".join(r["negative"]) for r in out)
