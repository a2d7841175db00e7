"""Seed generation: answer parsing, decision logic with test doubles, plumbing with tiny models.

Test doubles (component contracts, because a random tiny model makes random decisions):
``ScriptedGenerator`` honours the ``TextGenerator.generate`` contract and answers from a
script; ``TableScorer`` honours the NLI scorer contract (``score(pairs) -> NLIScores``) with
given probabilities.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from hierarcaps.models import ModelSpec, load_causal_lm, load_nli
from hierarcaps.generation import TextGenerator
from hierarcaps.nli import NLIScorer, NLIScores
from hierarcaps.prompting import load_prompt
from hierarcaps.stages.seeds import SeedSettings, extract_quoted, generate_seeds, parse_answer

CAPTIONS = [
    "a goat eating leaves of a lemon tree on the island",
    "teenage boys pitching a tent at the lake in forest",
    "pie with candles and gifts in boxes on a white background",
    "super slow motion of middle-age woman hands with scissors cutting white fabric on a tabletop",
]
# Continuations per step, keyed by the text the prompt was filled with.
SCRIPT = {
    "shorten": {
        CAPTIONS[0]: ' "goat on island"\n\nI removed the details.',
        CAPTIONS[1]: " boys by a lake",  # no quotation marks
        CAPTIONS[2]: ' “decorated pie on a white background”',  # curly quotes count
        CAPTIONS[3]: ' "woman cutting fabric with scissors"',
    },
    "fill": {
        "goat on island": ' goat ."',
        "decorated pie on a white background": ' ??? ."',  # nothing alphanumeric
        "woman cutting fabric with scissors": " scissors.\" That's it.",
    },
    "concept": {"goat": 'animal". The term is broad.', "scissors": 'cutting tools"'},
}
GOOD = {  # (general, specific) relations the scorer double says hold
    ("animal", "goat"), ("animal", "goat on island"), ("animal", CAPTIONS[0]),
    ("goat", "goat on island"), ("goat", CAPTIONS[0]), ("goat on island", CAPTIONS[0]),
    ("cutting tools", "scissors"), ("cutting tools", "woman cutting fabric with scissors"),
    ("scissors", "woman cutting fabric with scissors"), ("scissors", CAPTIONS[3]),
    ("woman cutting fabric with scissors", CAPTIONS[3]),
    # ("cutting tools", CAPTIONS[3]) is missing: only the all-pairs filter can catch it
}


class ScriptedGenerator:
    """Test double of TextGenerator: answers each prompt from SCRIPT, records every call."""

    model_id = "scripted-chat"

    def __init__(self, script=SCRIPT, fail_first: set[str] = frozenset()) -> None:
        self.tokenizer = SimpleNamespace(chat_template=None)  # -> Llama-2 [INST] markup
        self.script, self.fail_first = script, set(fail_first)
        self.calls: list[dict] = []
        self.generate_calls = 0

    def generate(self, prompts, **kwargs):
        self.calls.append({"prompts": list(prompts), **kwargs})
        self.generate_calls += 1
        return [[self._answer(p)] for p in prompts]

    def _answer(self, prompt: str) -> str:
        step = "shorten" if "Shorten" in prompt else "fill" if "fill" in prompt else "concept"
        for text, answer in self.script[step].items():
            if f'"{text}"' in prompt:
                if text in self.fail_first:
                    self.fail_first.discard(text)
                    return " no quotes this time"
                return answer
        raise AssertionError(f"unscripted prompt {prompt!r}")


class TableScorer:
    """Test double of NLIScorer: p_e(premise ⇒ hypothesis) = 0.9 if (hypothesis, premise) in GOOD else 0.1."""

    model_id = "table-nli"

    def __init__(self, good=GOOD) -> None:
        self.good = good
        self.calls: list[list[tuple[str, str]]] = []
        self.pairs_scored = 0

    def score(self, pairs):
        self.calls.append(list(pairs))
        self.pairs_scored += len(pairs)
        e = np.array([0.9 if (h, p) in self.good else 0.1 for p, h in pairs])
        return NLIScores(entailment=e, neutral=1 - e, contradiction=np.zeros(len(pairs)))


@pytest.mark.parametrize(
    ("text", "quote_open", "expected"),
    [
        (' "goat on island" is shorter', False, "goat on island"),
        ("Shortened:\n“a  goat”", False, "a goat"),
        ("no quotes", False, None),
        (' "unterminated', False, None),
        ('animal". Done', True, "animal"),
        ("animal and more", True, None),
        # Real SmolLM2 output: a stray closing quote is no answer, and it must not pair with a
        # curly closing mark lines later.
        (' scene below."\n\nsuch as “metal roofs” by', False, None),
        (' "the old lighthouse\nstands on a cliff"', False, None),  # quotations close on their line
        (' “a dog" and more', False, None),  # a curly opening closes with a curly mark only
        (' "a dog” and more', False, "a dog"),  # a straight opening closes with either mark
        (' "a dog” said "the cat"', False, "a dog"),
        (' “a dog” and "a cat"', False, "a dog"),
        (' no "quote" then “another”', False, "quote"),
        ("animal\nThe term is broad.\"", True, None),
        ("animal” is the term", True, "animal"),
    ],
)
def test_extract_quoted(text, quote_open, expected) -> None:
    assert extract_quoted(text, quote_open) == expected


def test_parse_answer_per_prompt() -> None:
    fill, concept = load_prompt("seed_fill_blank"), load_prompt("seed_general_concept")
    assert parse_answer(fill, ' goat ."') == ("goat", None)  # the template's " ." is not part of T2
    assert parse_answer(fill, " red fox.\"") == ("red fox", None)
    assert parse_answer(concept, ' ... "') == (None, "no_alphanumeric")
    assert parse_answer(concept, "cutting tools") == (None, "no_quoted_text")
    # Models put sentence punctuation inside the quotes; it is not part of the tier.
    shorten = load_prompt("seed_shorten")
    assert parse_answer(shorten, ' "The old lighthouse stands on a rocky cliff."') == (
        "The old lighthouse stands on a rocky cliff", None)
    assert parse_answer(concept, 'scatter." Use only') == ("scatter", None)
    assert parse_answer(fill, ' ____ ."') == (None, "no_alphanumeric")


def test_seed_chain_batching_rejections_and_all_pairs_filter() -> None:
    generator, scorer = ScriptedGenerator(), TableScorer()
    rows, stats = generate_seeds(CAPTIONS, generator, scorer, SeedSettings(batch_size=2, seed=5))

    assert [r["tiers"] for r in rows] == [["animal", "goat", "goat on island", CAPTIONS[0]]]
    assert rows[0]["caption"] == CAPTIONS[0]
    assert stats.items_in == 4 and stats.kept == 1
    # caption 1: no quotes at step 1; caption 2: "???" at step 2; caption 3: T1 not entailed by T4
    assert dict(stats.rejected) == {"no_quoted_text": 1, "no_alphanumeric": 1, "not_entailed": 1}
    # batched across captions: step 1 has 4 alive (2 calls), step 2 has 3 (2 calls), step 3 has 2 (1 call)
    assert [len(c["prompts"]) for c in generator.calls] == [2, 2, 2, 1, 2]
    assert stats.extra["generate_calls"] == 5
    assert all(c["temperature"] == 1.2 and c["num_return_sequences"] == 1 for c in generator.calls)
    # the answers of the fill and concept prompts (quote opened by the partial answer) end on their line
    assert [c["stop_at_newline"] for c in generator.calls] == [False, False, True, True, True]
    # one NLI call, all 6 tier pairs of both complete chains in both directions
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 2 * 6 * 2
    assert stats.extra["nli_pairs_scored"] == 24

    provenance = json.loads(rows[0]["provenance"])
    assert provenance["attempt"] == 0 and provenance["prompts"][0] == "seed_shorten"
    assert provenance["nli"]["pairs"] == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert provenance["nli"]["p_forward"] == [0.9] * 6 and provenance["nli"]["p_backward"] == [0.1] * 6
    assert provenance["generator"] == "scripted-chat" and provenance["nli_model"] == "table-nli"


def test_attempts_retry_failed_captions_with_fresh_seeds() -> None:
    once = ScriptedGenerator(fail_first={CAPTIONS[0]})
    rows, stats = generate_seeds(CAPTIONS[:1], once, TableScorer(), SeedSettings(attempts=1))
    assert rows == [] and dict(stats.rejected) == {"no_quoted_text": 1}

    twice = ScriptedGenerator(fail_first={CAPTIONS[0]})
    rows, stats = generate_seeds(CAPTIONS[:1], twice, TableScorer(), SeedSettings(attempts=2))
    assert [r["tiers"][0] for r in rows] == ["animal"] and not stats.rejected
    assert json.loads(rows[0]["provenance"])["attempt"] == 1
    assert stats.extra["rejected_attempts"] == 1
    step1_seeds = [c["seed"] for c in twice.calls if "Shorten" in c["prompts"][0]]
    assert len(step1_seeds) == 2 and step1_seeds[0] != step1_seeds[1]


def test_tiny_chat_model_plumbing_is_deterministic(tiny_chat_lm_dir, tiny_nli_dir) -> None:
    """Real models end to end: random text, so only counts and determinism are asserted."""
    device = dict(device="cpu", dtype="float32")
    model, tokenizer = load_causal_lm(ModelSpec(str(tiny_chat_lm_dir), **device))
    scorer = NLIScorer(*load_nli(ModelSpec(str(tiny_nli_dir), **device)))
    settings = SeedSettings(max_new_tokens=12, batch_size=3, seed=1)
    runs = []
    for _ in range(2):
        generator = TextGenerator(model, tokenizer)
        rows, stats = generate_seeds(CAPTIONS + CAPTIONS[:1], generator, scorer, settings)
        assert stats.items_in == 5 and stats.kept + sum(stats.rejected.values()) == 5
        assert stats.extra["generate_calls"] >= math.ceil(5 / 3)
        runs.append((rows, dict(stats.rejected)))
    assert runs[0] == runs[1]
