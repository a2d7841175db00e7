"""HyperLex lexical entailment: file parsing, score direction and Spearman ρ on controlled embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.evaluation.lexical import entailment_scores, evaluate_lexical, read_hyperlex

HEADER = "WORD1 WORD2 POS TYPE AVG_SCORE AVG_SCORE_0_10 STD SCORES..\n"


def _unit(angle: float, z: float = 0.0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor([math.cos(angle), math.sin(angle), z]), dim=0)


class PlacedWords:
    """Test double for a text encoder: each prompt maps to a vector we place by hand, so the
    exterior angles (and hence the ranking) are known without any model."""

    name = "placed-words"

    def __init__(self, vectors: dict[str, torch.Tensor]):
        self.vectors = vectors

    def encode_text(self, texts, batch_size=256):
        return torch.stack([self.vectors[t] for t in texts])


# root along x; "animal" 0.5 rad out; "dog" further out along the same ray (a child), "rock"
# sideways (unrelated), "thing" between the root and "animal" (a parent, not a child).
VECTORS = {
    "": _unit(0.0),
    "a picture of a animal": _unit(0.5),
    "a picture of a dog": _unit(0.9),
    "a picture of a rock": _unit(0.5, 0.8),
    "a picture of a thing": _unit(0.2),
    "a picture of a run": _unit(0.6),
    "a picture of a move": _unit(0.4),
}


def test_score_direction_child_beats_unrelated_beats_parent():
    root, g = VECTORS[""], VECTORS["a picture of a animal"]
    spec = torch.stack([VECTORS["a picture of a dog"], VECTORS["a picture of a rock"], VECTORS["a picture of a thing"]])
    s = entailment_scores(spec, g.expand(3, -1), root)
    assert s[0] > s[1] > s[2]
    # On one great circle the chord from angle a to angle b points along (a + b) / 2 + pi/2 when
    # b > a and (a + b) / 2 - pi/2 when b < a. Chord root->animal: 0.25 + pi/2; animal->dog:
    # 0.7 + pi/2, so Ξ = 0.45; animal->thing: 0.35 - pi/2, so Ξ = pi - 0.1.
    assert float(s[0]) == pytest.approx(-0.45, abs=1e-5)
    assert float(s[2]) == pytest.approx(-(math.pi - 0.1), abs=1e-4)


def test_spearman_on_hand_placed_pairs(tmp_path):
    f = tmp_path / "hyperlex-all.txt"
    # predicted order (best first): dog/animal, rock/animal, thing/animal; gold swaps the last two.
    f.write_text(
        HEADER
        + "dog animal N hyp-1 6.0 10.0 0.1 6 6\n"
        + "rock animal N no-rel 1.0 1.6 0.2 1 1\n"
        + "thing animal N rhyp-1 2.0 3.3 0.3 2 2\n"
        + "run move V hyp-1 5.0 8.3 0.1 5 5\n"
    )
    metrics = evaluate_lexical(PlacedWords(VECTORS), f)
    # nouns: predicted ranks (3, 2, 1) vs gold ranks (3, 1, 2): rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert metrics["rho_nouns"] == pytest.approx(0.5)
    assert metrics["n_pairs"] == 4 and metrics["n_noun_pairs"] == 3
    assert -1 <= metrics["rho_all"] <= 1 and len(metrics["file_sha256"]) == 64


def test_read_hyperlex_formats_and_errors(tmp_path):
    f = tmp_path / "h.csv"
    f.write_text("word1,word2,avg_score\ncat,animal,5.5\n")
    pairs = read_hyperlex(f)
    assert pairs.specific == ["cat"] and pairs.general == ["animal"] and pairs.pos == [""]
    np.testing.assert_allclose(pairs.score, [5.5])
    bad = tmp_path / "bad.txt"
    bad.write_text(HEADER + "cat animal N hyp-1 notanumber\n")
    with pytest.raises(ValueError, match=r"bad\.txt: line 2"):
        read_hyperlex(bad)
    (tmp_path / "nohead.txt").write_text("A B\n")
    with pytest.raises(ValueError, match="header lacks"):
        read_hyperlex(tmp_path / "nohead.txt")
