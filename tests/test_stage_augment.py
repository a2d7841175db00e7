"""Few-shot augmentation: prompt construction, filtering logic with a generator double, tiny-LM plumbing.

``LineGenerator`` is a test double of the ``TextGenerator.generate_with_status`` contract that
returns given lines, each finished (it ended at its newline) unless wrapped in ``Cut`` (it ran out
of ``max_new_tokens``). A random tiny LM almost never writes a four-tier line, so it cannot
exercise the keep/drop logic.
"""

from __future__ import annotations

import random

import pytest

from hierarcaps.generation import Generation, TextGenerator
from hierarcaps.models import ModelSpec, load_causal_lm
from hierarcaps.stages.augment import AugmentSettings, augment_hierarchies, few_shot_prompt, format_line, parse_line

SEEDS = [
    ["cutting tools", "scissors", "middle-aged woman cutting white fabric with scissors in super slow motion",
     "super slow motion of middle-age woman hands with scissors cutting white fabric on a tabletop"],
    ["dessert", "pie", "decorated pie on a white background",
     "pie with candles and gifts in boxes on a white background"],
    ["youth", "boys", "boys setting up tent by lake", "teenage boys pitching a tent at the lake in forest"],
] + [[f"concept {i}", f"thing {i}", f"thing {i} outside", f"a thing {i} outside on a sunny day"] for i in range(12)]

NEW = [
    "music artist => singer => singer with group performs at event => pop singer with group performs at event",
    "textiles => towels => striped towels => a variety of striped towels in a range of colours and patterns",
    "flowers => poppies => fields of poppies. => a field of poppies, bright orange, on a sunny day",
]


class Cut(str):
    """A scripted line that ``max_new_tokens`` cut off before its newline."""


class LineGenerator:
    """Test double of TextGenerator: returns the next scripted lines, records calls."""

    model_id = "scripted-base"

    def __init__(self, lines: list[str]) -> None:
        self.lines = list(lines)
        self.calls: list[dict] = []
        self.generate_calls = 0

    def generate_with_status(self, prompts, **kwargs) -> Generation:
        self.calls.append({"prompts": list(prompts), **kwargs})
        self.generate_calls += 1
        lines = [self.lines.pop(0) if self.lines else "nonsense" for _ in prompts]
        return Generation(texts=[[str(line)] for line in lines],
                          finished=[[not isinstance(line, Cut)] for line in lines])

    def generate(self, prompts, **kwargs):
        return self.generate_with_status(prompts, **kwargs).texts


def test_parse_line_keeps_exactly_four_non_empty_tiers() -> None:
    assert parse_line(NEW[2]) == (("flowers", "poppies", "fields of poppies.",
                                   "a field of poppies, bright orange, on a sunny day"), None)
    assert parse_line("a => b => c") == (None, "not_four_tiers")
    assert parse_line("a => b => c => d => e") == (None, "not_four_tiers")
    assert parse_line("a =>  => c => d") == (None, "empty_tier")
    assert parse_line("") == (None, "not_four_tiers")


def test_few_shot_prompt_has_distinct_random_seeds_one_per_line() -> None:
    prompt = few_shot_prompt(SEEDS, random.Random(0), shots=10)
    lines = prompt.split("\n")
    assert lines[-1] == ""  # ends with a newline: the model writes the next line
    assert len(lines[:-1]) == len(set(lines[:-1])) == 10
    assert set(lines[:-1]) <= {format_line(s) for s in SEEDS}
    assert prompt == few_shot_prompt(SEEDS, random.Random(0), shots=10)
    assert prompt != few_shot_prompt(SEEDS, random.Random(1), shots=10)
    assert few_shot_prompt(SEEDS[:3], random.Random(0), shots=10).count("\n") == 3  # fewer seeds than shots


def test_keeps_new_four_tier_lines_and_drops_duplicates_until_target() -> None:
    lines = [
        NEW[0],
        format_line(SEEDS[1]),  # a seed
        "a => b => c",  # three tiers
        " " + NEW[0].replace(" => ", "=>"),  # the same hierarchy as an earlier output
        NEW[1],
        "x =>  => y => z",
        NEW[2],
        "never read",
    ]
    generator = LineGenerator(lines)
    rows, stats = augment_hierarchies(SEEDS, generator, AugmentSettings(target_count=3, batch_size=4, seed=7))
    assert [" => ".join(r["tiers"]) for r in rows] == NEW
    assert dict(stats.rejected) == {"duplicate": 2, "not_four_tiers": 1, "empty_tier": 1}
    assert stats.items_in == 7 and stats.kept == 3 and stats.extra["lines_after_target"] == 1
    assert stats.extra["generate_calls"] == 2 == len(generator.calls)
    assert all(c["stop_at_newline"] and c["temperature"] == 1.0 for c in generator.calls)
    assert generator.calls[0]["seed"] != generator.calls[1]["seed"]
    assert all(p.count("\n") == 10 for c in generator.calls for p in c["prompts"])


def test_cut_off_line_is_rejected_even_with_four_tiers() -> None:
    """Paper B.1: a line ends at the predicted newline; one cut off by max_new_tokens is not a line."""
    generator = LineGenerator([Cut(NEW[0]), NEW[1], Cut("a => b"), NEW[0]])
    rows, stats = augment_hierarchies(SEEDS, generator, AugmentSettings(target_count=2, batch_size=4, seed=1))
    assert [" => ".join(r["tiers"]) for r in rows] == [NEW[1], NEW[0]]  # the same line, finished, is kept
    assert dict(stats.rejected) == {"unfinished_line": 2} and stats.items_in == 4 and stats.kept == 2


def test_call_budget_stops_a_model_that_writes_nothing_usable() -> None:
    rows, stats = augment_hierarchies(SEEDS, LineGenerator([]), AugmentSettings(target_count=5, batch_size=2, max_calls=3))
    assert rows == [] and stats.extra["generate_calls"] == 3 and stats.extra["stopped_early"] == 1
    assert dict(stats.rejected) == {"not_four_tiers": 6}
    _, default = augment_hierarchies(SEEDS, LineGenerator([]), AugmentSettings(target_count=4, batch_size=2))
    assert default.extra["generate_calls"] == 10 * 2  # ten times the calls a perfect model needs


def test_no_seeds_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="seed hierarch"):
        augment_hierarchies([], LineGenerator([]), AugmentSettings())


def test_tiny_base_lm_plumbing(tiny_causal_lm_dir) -> None:
    """A real Llama (random weights): one generate call per batch, every line read and counted."""
    model, tokenizer = load_causal_lm(ModelSpec(str(tiny_causal_lm_dir), device="cpu", dtype="float32"))
    generator = TextGenerator(model, tokenizer)
    settings = AugmentSettings(target_count=50, batch_size=3, max_new_tokens=16, max_calls=2, seed=3)
    rows, stats = augment_hierarchies(SEEDS, generator, settings)
    assert generator.generate_calls == 2 and stats.items_in == 6
    assert stats.kept + sum(stats.rejected.values()) == 6
    again, _ = augment_hierarchies(SEEDS, TextGenerator(model, tokenizer), settings)
    assert again == rows
