"""Positive completion: acceptance order, every rejection reason, NLI batching, tiny-model plumbing.

Test doubles of component contracts (a random tiny completer never writes a valid hierarchy):
``CandidateCompleter`` returns given candidates through the ``TextGenerator.generate``
contract; ``TableScorer`` returns given NLI probabilities through ``score(pairs)``.
"""

from __future__ import annotations

import json

import datasets
import numpy as np

from hierarcaps.generation import TextGenerator
from hierarcaps.models import ModelSpec, load_nli, load_seq2seq_lm
from hierarcaps.nli import NLIScorer, NLIScores
from hierarcaps.stages.complete import CompleteSettings, complete_positives
from hierarcaps.stages.completer import add_delimiter_tokens

GOAT = "a goat eating leaves of a lemon tree on the island"  # 11 words, 50 characters
PIE = "pie with candles and gifts in boxes on a white background"
BOYS = "teenage boys pitching a tent at the lake in forest"
CANDIDATES = {
    GOAT: [
        "goat on island ← goat",  # wrong_tier_count
        "goat on island ←  ← animal",  # empty_tier
        "goat on island ← goat ← goat",  # identical_adjacent_tiers
        "a goat eating leaves of a lemon tree on island ← goat ← animal",  # 10 words > 11 - 2
        "goat eating leaves of lemon tree on island ← goat ← animal",  # 42 chars > 50 - 10
        "goat on island ← goat ← plant",  # passes structure, fails NLI (plant, goat)
        "goat on island ← goat ← animal",  # the first valid one
        "goat on island ← goats ← animal",  # valid too, but later
    ],
    PIE: ["decorated pie", "pie", "decorated pie ← pie"],
    BOYS: ["boys by a lake ← boys ← furniture", "boys by a lake ← boys ← furniture"],
}
GOOD = {  # (general, specific) pairs that pass the entailment test
    ("animal", "goat"), ("goat", "goat on island"), ("goat on island", GOAT),
    ("animal", "goats"), ("goats", "goat on island"), ("boys", "boys by a lake"), ("boys by a lake", BOYS),
}


class CandidateCompleter:
    """Test double of TextGenerator: for prompt ``C ←`` returns CANDIDATES[C] padded with junk."""

    model_id = "scripted-completer"

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.generate_calls = 0

    def generate(self, prompts, num_return_sequences=1, **kwargs):
        self.calls.append({"prompts": list(prompts), "num_return_sequences": num_return_sequences, **kwargs})
        self.generate_calls += 1
        out = []
        for prompt in prompts:
            given = CANDIDATES[prompt.removesuffix(" ←")][:num_return_sequences]
            out.append(given + ["junk"] * (num_return_sequences - len(given)))
        return out


class TableScorer:
    """Test double of NLIScorer: p_e(specific ⇒ general) = 0.9 for GOOD pairs, everything else 0.2."""

    model_id = "table-nli"

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []
        self.pairs_scored = 0

    def score(self, pairs):
        self.calls.append(list(pairs))
        self.pairs_scored += len(pairs)
        e = np.array([0.9 if (h, p) in GOOD else 0.2 for p, h in pairs])
        return NLIScores(entailment=e, neutral=1 - e, contradiction=np.zeros(len(pairs)))


def _rows(*captions):
    return [{"caption": c, "image_ref": f"img{i}", "source": "test", "provenance": '{"captions": {"line": 1}}'}
            for i, c in enumerate(captions)]


def test_first_valid_candidate_in_sample_order_and_every_reason() -> None:
    completer, scorer = CandidateCompleter(), TableScorer()
    rows, stats = complete_positives(_rows(GOAT, PIE, BOYS), completer, scorer, CompleteSettings(batch_size=2))

    assert len(rows) == 1
    assert rows[0]["positive"] == ["animal", "goat", "goat on island", GOAT]
    assert rows[0]["image_ref"] == "img0" and rows[0]["source"] == "test"
    provenance = json.loads(rows[0]["provenance"])
    assert provenance["captions"] == {"line": 1}  # upstream provenance kept
    assert provenance["complete"]["candidate_index"] == 6
    assert provenance["complete"]["nli"]["p_specific_entails_general"] == [0.9, 0.9, 0.9]
    assert provenance["complete"]["nli"]["p_general_entails_specific"] == [0.2, 0.2, 0.2]

    assert stats.items_in == 3 and stats.kept == 1
    # PIE: no candidate with three tiers; BOYS: candidates pass structure but fail NLI
    assert dict(stats.rejected) == {"wrong_tier_count": 1, "not_entailed": 1}
    assert stats.extra["candidates_wrong_tier_count"] == (1 + 56) + 64 + 62  # GOAT: 1 + 56 junk; PIE: 64; BOYS: 62 junk
    for reason in ("empty_tier", "identical_adjacent_tiers", "t3_not_two_words_shorter", "t3_not_ten_chars_shorter"):
        assert stats.extra[f"candidates_{reason}"] == 1


def test_one_generate_call_per_batch_of_captions_with_64_samples() -> None:
    completer = CandidateCompleter()
    _, stats = complete_positives(_rows(GOAT, PIE, BOYS), completer, TableScorer(), CompleteSettings(batch_size=2))
    assert [c["prompts"] for c in completer.calls] == [[f"{GOAT} ←", f"{PIE} ←"], [f"{BOYS} ←"]]
    assert all(c["num_return_sequences"] == 64 and c["temperature"] == 1.0 for c in completer.calls)
    assert completer.calls[0]["seed"] != completer.calls[1]["seed"]
    assert stats.extra["generate_calls"] == 2


def test_structural_checks_run_before_nli_and_nli_pairs_are_unique() -> None:
    scorer = TableScorer()
    complete_positives(_rows(PIE), CandidateCompleter(), scorer, CompleteSettings())
    assert scorer.calls == []  # nothing survived the structural checks: no NLI at all

    scorer = TableScorer()
    complete_positives(_rows(GOAT, BOYS), CandidateCompleter(), scorer, CompleteSettings())
    seen = [pair for call in scorer.calls for pair in call]
    assert all(len(set(call)) == len(call) for call in scorer.calls)  # BOYS' duplicate candidate scored once
    assert not any("lemon tree on island" in text for pair in seen for text in pair)  # rejected structurally


def test_nli_waves_accept_the_same_candidate_with_fewer_pairs() -> None:
    results = {}
    for wave in (1, 2, 64):
        scorer = TableScorer()
        rows, stats = complete_positives(_rows(GOAT, BOYS), CandidateCompleter(), scorer, CompleteSettings(nli_wave=wave))
        results[wave] = (rows, dict(stats.rejected), stats.extra["nli_pairs_scored"], len(scorer.calls))
    assert results[1][:2] == results[2][:2] == results[64][:2]
    assert results[64][3] == 1  # all survivors of the batch in one call
    assert results[1][2] < results[64][2]


def test_accepts_a_datasets_dataset() -> None:
    table = datasets.Dataset.from_list(_rows(GOAT, PIE))
    rows, _ = complete_positives(table, CandidateCompleter(), TableScorer(), CompleteSettings())
    assert [r["positive"][0] for r in rows] == ["animal"]


def test_tiny_completer_plumbing(tiny_seq2seq_dir, tiny_nli_dir) -> None:
    """Real T5 + BART (random): batching and counting only; decisions are random."""
    cpu = dict(device="cpu", dtype="float32")
    model, tokenizer = load_seq2seq_lm(ModelSpec(str(tiny_seq2seq_dir), **cpu))
    add_delimiter_tokens(tokenizer, model)
    completer = TextGenerator(model, tokenizer)
    scorer = NLIScorer(*load_nli(ModelSpec(str(tiny_nli_dir), **cpu)))
    settings = CompleteSettings(num_candidates=8, max_new_tokens=12, batch_size=2)
    rows, stats = complete_positives(_rows(GOAT, PIE, BOYS), completer, scorer, settings)
    assert completer.generate_calls == 2 and completer.sequences_generated == 3 * 8
    assert stats.kept + sum(stats.rejected.values()) == 3
    assert sum(v for k, v in stats.extra.items() if k.startswith("candidates_")) <= 3 * 8
    again, _ = complete_positives(_rows(GOAT, PIE, BOYS), TextGenerator(model, tokenizer), scorer, settings)
    assert again == rows


def test_a_trailing_delimiter_is_not_three_tiers() -> None:
    """``T3 ← T2 ← T1 ←`` (the completer went on to a fourth tier) is rejected, not taken as T3, T2, T1."""
    from collections import Counter

    from hierarcaps.stages.complete import structural_survivors

    caption = "a goat eating leaves of a lemon tree on the island"
    rejected: Counter[str] = Counter()
    survivors = structural_survivors(
        caption, [" goat on island ← goat ← animal ←", " goat on island ← goat ← animal"], rejected
    )
    assert survivors == [(1, ["animal", "goat", "goat on island", caption])]
    assert rejected == Counter({"wrong_tier_count": 1})
