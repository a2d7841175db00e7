"""NLI scorer plumbing on the tiny BART classifier; decision logic on a scorer double."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import pytest
import torch

from hierarcaps.models import ModelLoadError, ModelSpec, load_nli
from hierarcaps.nli import (
    NLIScorer,
    NLIScores,
    contradicts,
    entailed_not_entailing,
    hierarchy_entailment,
    tier_pairs,
)

PAIRS = [
    ("a goat eating leaves of a lemon tree on the island", "goat on island"),
    ("goat on island", "animal"),
    ("animal", "goat"),
    ("goats graze at snowy night", "portrait"),
    ("frog", "a small frog sitting under the flowers in the garden on a sunny day"),
]


@pytest.fixture(scope="module")
def nli(tiny_nli_dir: Path):
    return load_nli(ModelSpec(str(tiny_nli_dir)))


def _count_forwards(model: torch.nn.Module) -> list[int]:
    """Batch sizes of every forward pass the model runs from now on."""
    sizes: list[int] = []
    model.register_forward_hook(lambda module, args, kwargs, out: sizes.append(out.logits.shape[0]),
                                with_kwargs=True)
    return sizes


def _direct_probs(model, tokenizer, pairs, template='a picture of: "{}"') -> np.ndarray:
    """Independent reference: one padded-free forward per pair, softmax, columns in id2label order."""
    rows = []
    for premise, hypothesis in pairs:
        enc = tokenizer(template.format(premise), template.format(hypothesis), return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**enc).logits.softmax(-1)[0].numpy())
    return np.array(rows)


def test_one_forward_per_batch_of_unique_pairs(tiny_nli_dir: Path) -> None:
    model, tokenizer = load_nli(ModelSpec(str(tiny_nli_dir)))
    sizes = _count_forwards(model)
    scorer = NLIScorer(model, tokenizer, batch_size=2)
    scores = scorer.score(PAIRS + PAIRS[:3] + PAIRS[::-1])
    assert sorted(sizes) == [1, 2, 2]  # 5 unique pairs, batches of 2
    assert scorer.forward_calls == 3 and scorer.pairs_scored == 5
    assert len(scores) == 13
    np.testing.assert_array_equal(scores.entailment[5:8], scores.entailment[:3])
    np.testing.assert_array_equal(scores.contradiction[8:], scores.contradiction[4::-1])


def test_probabilities_match_direct_model_in_id2label_order(nli) -> None:
    model, tokenizer = nli
    scores = NLIScorer(model, tokenizer, batch_size=3).score(PAIRS)
    direct = _direct_probs(model, tokenizer, PAIRS)  # columns: 0 contradiction, 1 neutral, 2 entailment
    np.testing.assert_allclose(scores.contradiction, direct[:, 0], atol=1e-5)
    np.testing.assert_allclose(scores.neutral, direct[:, 1], atol=1e-5)
    np.testing.assert_allclose(scores.entailment, direct[:, 2], atol=1e-5)
    np.testing.assert_allclose(scores.entailment + scores.neutral + scores.contradiction, 1.0, atol=1e-6)


def test_shuffled_label_order_gives_identical_probabilities(nli, tiny_nli_shuffled_dir: Path) -> None:
    standard = NLIScorer(*nli).score(PAIRS)
    shuffled = NLIScorer(*load_nli(ModelSpec(str(tiny_nli_shuffled_dir)))).score(PAIRS)
    for label in ("entailment", "neutral", "contradiction"):
        np.testing.assert_allclose(getattr(shuffled, label), getattr(standard, label), atol=1e-6)
    # The labels are distinguishable, so a scorer that assumed a fixed order would fail above.
    assert np.abs(standard.entailment - standard.contradiction).min() > 0.01
    assert np.abs(standard.entailment - standard.neutral).min() > 0.01


def test_premise_comes_first_and_template_is_applied(nli) -> None:
    model, tokenizer = nli
    scorer = NLIScorer(model, tokenizer)
    forward = scorer.score([PAIRS[0]])
    backward = scorer.score([PAIRS[0][::-1]])
    assert forward.entailment[0] != backward.entailment[0]
    bare = NLIScorer(model, tokenizer, template="{}").score([PAIRS[0]])
    direct_bare = _direct_probs(model, tokenizer, [PAIRS[0]], template="{}")
    assert bare.entailment[0] != forward.entailment[0]
    np.testing.assert_allclose(bare.entailment, direct_bare[:, 2], atol=1e-5)


def test_padding_does_not_change_scores(nli) -> None:
    model, tokenizer = nli
    one_by_one = NLIScorer(model, tokenizer, batch_size=1).score(PAIRS)
    batched = NLIScorer(model, tokenizer, batch_size=64).score(PAIRS)
    np.testing.assert_allclose(batched.entailment, one_by_one.entailment, atol=1e-5)


def test_memory_cache_hit_runs_no_forward(nli) -> None:
    scorer = NLIScorer(*nli)
    first = scorer.score(PAIRS)
    calls = scorer.forward_calls
    again = scorer.score(PAIRS[::-1])
    assert scorer.forward_calls == calls and scorer.cache_hits == len(PAIRS)
    np.testing.assert_array_equal(again.entailment, first.entailment[::-1])
    assert len(scorer.score([])) == 0 and scorer.forward_calls == calls


def test_disk_cache_is_shared_across_scorers(nli, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "nli.sqlite"
    with NLIScorer(*nli, cache_path=cache) as writer:
        first = writer.score(PAIRS)
    reader = NLIScorer(*nli, cache_path=cache)
    again = reader.score(PAIRS)
    assert reader.forward_calls == 0 and reader.cache_hits == len(PAIRS)
    np.testing.assert_array_equal(again.contradiction, first.contradiction)
    # The key includes the template and the model: either change misses.
    other_template = NLIScorer(*nli, cache_path=cache, template="{}")
    other_template.score(PAIRS[:2])
    assert other_template.forward_calls == 1
    other_model = NLIScorer(*nli, cache_path=cache, model_id="another-model")
    other_model.score(PAIRS[:2])
    assert other_model.forward_calls == 1


def test_disk_cache_key_includes_dtype(tiny_nli_dir: Path, tmp_path: Path) -> None:
    """Scores of a bfloat16 model differ from float32 ones: a float32 cache must not answer it."""
    cache = tmp_path / "nli.sqlite"
    with NLIScorer(*load_nli(ModelSpec(str(tiny_nli_dir), dtype="float32")), cache_path=cache) as fp32:
        full = fp32.score(PAIRS)
    half = NLIScorer(*load_nli(ModelSpec(str(tiny_nli_dir), dtype="bfloat16")), cache_path=cache)
    assert half.model_id == fp32.model_id and half.cache_key != fp32.cache_key
    scores = half.score(PAIRS)
    assert half.cache_hits == 0 and half.pairs_scored == len(PAIRS)
    assert not np.array_equal(scores.entailment, full.entailment)  # bf16 really gives other numbers
    again = NLIScorer(*load_nli(ModelSpec(str(tiny_nli_dir), dtype="bfloat16")), cache_path=cache)
    np.testing.assert_array_equal(again.score(PAIRS).entailment, scores.entailment)
    assert again.cache_hits == len(PAIRS) and again.pairs_scored == 0


LONG_PAIRS = PAIRS + [
    (" ".join(["a goat on a green island"] * k), " ".join(["goat"] * (k % 4 + 1))) for k in range(1, 30)
]


def _forward_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(pairs, padded length) of every forward pass the model runs from now on."""
    shapes: list[tuple[int, int]] = []
    model.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes


def test_token_budget_bounds_every_batch_and_keeps_results_and_order(tiny_nli_dir: Path) -> None:
    model, tokenizer = load_nli(ModelSpec(str(tiny_nli_dir), dtype="float32"))
    shapes = _forward_shapes(model)
    budget = 600
    by_budget = NLIScorer(model, tokenizer, batch_size=1000, max_batch_tokens=budget)
    scores = by_budget.score(LONG_PAIRS)
    assert shapes and all(n * length <= budget for n, length in shapes)
    assert sum(n for n, _ in shapes) == len(LONG_PAIRS) == by_budget.pairs_scored
    assert max(n for n, _ in shapes) >= 8 and min(n for n, _ in shapes) <= 3  # short pairs share, long ones do not
    lengths = [length for _, length in shapes]
    assert lengths == sorted(lengths)  # batches run shortest first
    assert by_budget.padded_tokens == sum(n * length for n, length in shapes)
    fixed = NLIScorer(model, tokenizer, batch_size=8).score(LONG_PAIRS)  # fixed-size batching
    direct = _direct_probs(model, tokenizer, LONG_PAIRS)  # one pair at a time, input order
    for label, column in (("contradiction", 0), ("neutral", 1), ("entailment", 2)):
        np.testing.assert_allclose(getattr(scores, label), getattr(fixed, label), atol=1e-5)
        np.testing.assert_allclose(getattr(scores, label), direct[:, column], atol=1e-5)


def test_pair_longer_than_budget_runs_alone(tiny_nli_dir: Path) -> None:
    model, tokenizer = load_nli(ModelSpec(str(tiny_nli_dir)))
    shapes = _forward_shapes(model)
    scorer = NLIScorer(model, tokenizer, batch_size=64, max_batch_tokens=8)
    scorer.score(PAIRS)
    assert [n for n, _ in shapes[-len(PAIRS):]] == [1] * len(PAIRS) and scorer.forward_calls == len(PAIRS)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        NLIScorer(model, tokenizer, max_batch_tokens=-1)


def test_model_id_of_local_folder_is_its_name_and_content_hash(nli, tiny_nli_dir: Path) -> None:
    scorer = NLIScorer(*nli)
    name, digest = scorer.model_id.split("#sha256:")
    assert name == tiny_nli_dir.name and len(digest) == 16  # no absolute path in provenance


def test_from_spec_uses_spec_batch_size(tiny_nli_dir: Path) -> None:
    scorer = NLIScorer.from_spec(ModelSpec(str(tiny_nli_dir), batch_size=3))
    scorer.score(PAIRS)
    assert scorer.batch_size == 3 and scorer.forward_calls == 2


def test_model_without_nli_labels_is_rejected() -> None:
    """A config-only double: the check happens before any model call."""
    model = SimpleNamespace(config=SimpleNamespace(id2label={0: "LABEL_0", 1: "LABEL_1"}, _name_or_path="x"))
    with pytest.raises(ModelLoadError, match="lacks entailment, neutral, contradiction"):
        NLIScorer(model, tokenizer=None, model_id="x")


# --------------------------------------------------------------------------- decision logic


class TableScorer:
    """Test double of the scorer contract: returns given probabilities, records each call.

    Real tiny models make random decisions, so decisions are tested with controlled inputs.
    """

    def __init__(self, entailment: dict[tuple[str, str], float] | None = None,
                 contradiction: dict[tuple[str, str], float] | None = None) -> None:
        self.entailment = entailment or {}
        self.contradiction = contradiction or {}
        self.calls: list[list[tuple[str, str]]] = []

    def score(self, pairs: Sequence[tuple[str, str]]) -> NLIScores:
        self.calls.append(list(pairs))
        e = np.array([self.entailment.get(p, 0.0) for p in pairs])
        c = np.array([self.contradiction.get(p, 0.0) for p in pairs])
        return NLIScores(entailment=e, neutral=1.0 - e - c, contradiction=c)


def test_entailed_not_entailing_thresholds() -> None:
    scorer = TableScorer({
        ("goat", "animal"): 0.9, ("animal", "goat"): 0.1,      # ok
        ("dog", "animal"): 0.5, ("animal", "dog"): 0.0,        # p_e(specific => general) not > 0.5
        ("cat", "pet"): 0.8, ("pet", "cat"): 0.5,              # p_e(general => specific) not < 0.5
        ("sofa", "couch"): 0.95, ("couch", "sofa"): 0.95,      # mutual entailment
    })
    decision = entailed_not_entailing(scorer, [("animal", "goat"), ("animal", "dog"), ("pet", "cat"), ("couch", "sofa")])
    assert decision.ok.tolist() == [True, False, False, False]
    assert decision.p_specific_entails_general.tolist() == [0.9, 0.5, 0.8, 0.95]
    assert decision.p_general_entails_specific.tolist() == [0.1, 0.0, 0.5, 0.95]
    assert len(scorer.calls) == 1


def test_tier_pairs() -> None:
    assert tier_pairs(4, adjacent_only=True) == [(0, 1), (1, 2), (2, 3)]
    assert tier_pairs(4, adjacent_only=False) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_hierarchy_entailment_all_pairs_vs_adjacent() -> None:
    good = ["animal", "goat", "goat on island", "a goat eating leaves on the island"]
    # Adjacent pairs pass, but T1 is not entailed by T3: only the all-pairs check rejects it.
    skip = ["thing", "tool", "hammer", "a red hammer"]
    entailment = {}
    for tiers in (good, skip):
        for i, j in tier_pairs(4, adjacent_only=False):
            entailment[(tiers[j], tiers[i])] = round(0.8 + 0.01 * (i + j), 2)
            entailment[(tiers[i], tiers[j])] = 0.1
    entailment[("hammer", "thing")] = 0.3

    scorer = TableScorer(entailment)
    adjacent = hierarchy_entailment(scorer, [good, skip], adjacent_only=True)
    assert [d.ok for d in adjacent] == [True, True]
    assert adjacent[1].pairs == [(0, 1), (1, 2), (2, 3)]
    assert adjacent[1].p_forward == [0.81, 0.83, 0.85] and adjacent[1].p_backward == [0.1, 0.1, 0.1]

    every = hierarchy_entailment(scorer, [good, skip], adjacent_only=False)
    assert [d.ok for d in every] == [True, False]
    assert every[1].pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert every[1].p_forward == [0.81, 0.3, 0.83, 0.83, 0.84, 0.85]
    # One score call per helper call, covering every hierarchy both ways.
    assert [len(call) for call in scorer.calls] == [2 * 2 * 3, 2 * 2 * 6]


def test_contradicts_strictly_above_half() -> None:
    scorer = TableScorer(contradiction={("goat", "frog"): 0.7, ("frog", "goat"): 0.2, ("goat", "cow"): 0.5})
    decision = contradicts(scorer, [("goat", "frog"), ("goat", "cow"), ("frog", "goat")])
    assert decision.ok.tolist() == [True, False, False]
    assert decision.p_contradiction.tolist() == [0.7, 0.5, 0.2]
    assert len(scorer.calls) == 1


def test_helpers_accept_empty_input() -> None:
    scorer = TableScorer()
    assert hierarchy_entailment(scorer, [], adjacent_only=True) == []
    assert entailed_not_entailing(scorer, []).ok.shape == (0,)
    assert contradicts(scorer, []).ok.shape == (0,)
