"""Retention: text-to-image recall@k and zero-shot classification."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.evaluation.retention import (
    classification_metrics,
    labelled_images,
    ranks_of_targets,
    recall_at_k,
    text_to_image_retrieval,
    zero_shot_classification,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hierarcaps"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def test_ranks_and_recall_at_k_hand_case():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.9, 0.1, 0.5], [0.2, 0.2, 0.1]])
    targets = torch.tensor([0, 1, 1])
    ranks = ranks_of_targets(sim, targets)
    # query 0: target best; query 1: two better; query 2: tied with one (ties favour the query)
    assert ranks.tolist() == [0, 2, 0]
    assert recall_at_k(ranks, (1, 2, 3)) == {"R@1": pytest.approx(2 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}


def test_classification_metrics_hand_case():
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    targets = torch.tensor([0, 1, 1, 1])
    m = classification_metrics(sim, targets, 2)
    # correct: 0, 1; wrong: 2, 3 -> top1 1/2; per class: 1/1 and 1/3 -> mean 2/3
    assert m["top1"] == 0.5 and m["top5"] == 1.0 and m["mean_per_class_top1"] == pytest.approx(2 / 3)


class ColourEncoder:
    """Test double: an image embeds as its mean RGB, a prompt as the RGB of the colour it names.
    It makes decisions we can predict, which a random tiny CLIP cannot."""

    name = "colour"

    def encode_text(self, texts, batch_size=256):
        vecs = [next(torch.tensor(v, dtype=torch.float) for c, v in COLOURS.items() if c in t) for t in texts]
        return torch.nn.functional.normalize(torch.stack(vecs), dim=-1)

    def encode_images(self, images, batch_size=64):
        vecs = [torch.tensor(np.asarray(im, dtype=np.float32).mean((0, 1))) for im in images]
        return torch.nn.functional.normalize(torch.stack(vecs), dim=-1)


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    # two reddish, one green, one blue image that is mislabelled as green
    for label, name, rgb in [("red", "a", (200, 10, 10)), ("red", "b", (250, 40, 0)), ("green", "c", (5, 200, 5)), ("green", "d", (0, 10, 200))]:
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), rgb).save(root / label / f"{name}.png")
    return root


def test_zero_shot_with_colour_double(tmp_path):
    root = _folder(tmp_path)
    m = zero_shot_classification(ColourEncoder(), ["red", "green", "blue"], root, templates=("a photo of a {}.", "a {} thing."))
    assert m["n_images"] == 4 and m["n_classes"] == 3 and m["n_templates"] == 2
    assert m["top1"] == 0.75 and m["mean_per_class_top1"] == pytest.approx((1.0 + 0.5) / 2)


def test_labelled_images_rejects_unknown_folder(tmp_path):
    root = _folder(tmp_path)
    (root / "purple").mkdir()
    with pytest.raises(ValueError, match="purple"):
        labelled_images(root, ["red", "green"])


def test_text_to_image_retrieval_on_real_rows_with_tiny_clip(tiny_hf_clip_dir, real_test_rows):
    from finetune.backends import load_backend

    subset = real_test_rows(60)
    m = text_to_image_retrieval(load_backend("hf-clip", tiny_hf_clip_dir), subset, DATA / "test_imgs", draft_size=64)
    assert m["n_queries"] == 60 and m["n_images"] == 60
    assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1
