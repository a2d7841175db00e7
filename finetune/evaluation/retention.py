"""Retention of pretraining skills (HierarCaps paper Table 1 and supplementary Table 4).

Fine-tuning for hierarchy must not cost standard cross-modal ability. Two checks:

* **text-to-image retrieval** R@1/5/10 on the HierarCaps test images, each queried by its most
  specific caption T4 (the original human caption); the gallery is the set of unique images and a
  query is correct when its own image ranks within the top k;
* **zero-shot classification** (CLIP protocol) from a label list and a folder of labelled images
  laid out as ``DIR/<label>/<image>``: each class is the normalised mean of the normalised
  embeddings of its label in every prompt template (CLIP's prompt ensemble); top-1 and top-5
  accuracy, and the mean per-class top-1.

Ties in similarity count in the query's favour (rank = number of strictly better candidates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune.evaluation.common import (
    Encoder,
    encode_image_files,
    encode_texts,
    list_images,
    package_versions,
)
from finetune.evaluation.retrieval import index_test_set, load_test_set
from finetune.geometry import normalize
from hierarcaps.image_folder import resolve_image_refs

# CLIP's prompt ensemble for CIFAR-10/100 (Radford et al. 2021, released notebook).
CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)
DEFAULT_KS = (1, 5, 10)


def ranks_of_targets(sim: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's target among the candidates.

    ``sim``: (Q, N) similarities; ``targets``: (Q,) candidate index. Returns (Q,) int64: the
    number of candidates strictly more similar than the target.
    """
    target_sim = sim.gather(1, targets[:, None])
    return (sim > target_sim).sum(1)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"R@k": fraction of queries with rank < k}`` for each k."""
    return {f"R@{k}": float((ranks < k).double().mean()) for k in ks}


def text_to_image_retrieval(
    encoder: Encoder,
    test_rows: Any,
    images_dir: Path | str,
    ks: Sequence[int] = DEFAULT_KS,
    model: str | None = None,
    draft_size: int | None = None,
    workers: int = 0,
    image_cache: Any = None,
) -> dict[str, Any]:
    """Text-to-image R@k on a HierarCaps test set, queries = each row's T4 caption.

    ``workers``, ``image_cache``: image decoding and embedding reuse, as for retrieval.
    """
    test = load_test_set(test_rows)
    cand = index_test_set(test)
    paths = resolve_image_refs(cand.images, images_dir)
    with torch.no_grad():
        queries = encode_texts(encoder, [chain[-1] for chain in test.chains])
        gallery = encode_image_files(encoder, paths, draft_size=draft_size, workers=workers, cache=image_cache,
                                     model=getattr(encoder, "name", None))
    ranks = ranks_of_targets(queries @ gallery.T, torch.as_tensor(cand.row_image))
    return {
        "task": "text_to_image_retrieval",
        **recall_at_k(ranks, ks),
        "n_queries": len(test),
        "n_images": len(paths),
        "model": model,
        "backend": getattr(encoder, "kind", None),
        "test_file": test.origin,
        "test_sha256": test.sha256,
        "versions": package_versions(),
    }


def read_labels(path: Path | str) -> list[str]:
    """One class label per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    labels = [label for label in labels if label and not label.startswith("#")]
    if not labels:
        raise ValueError(f"{path}: no labels; write one class label per line")
    return labels


def labelled_images(folder: Path | str, labels: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """Images of ``folder/<label>/`` for every label: (paths, (N,) label indices).

    A subfolder named after no label is an error (a typo would silently drop a class).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in index)
    if unknown:
        raise ValueError(f"{folder}: subfolders {unknown[:5]} match no label of the label list")
    paths, targets = [], []
    for label in labels:
        sub = folder / label
        if sub.is_dir():
            found = list_images(sub)
            paths += found
            targets += [index[label]] * len(found)
    if not paths:
        raise ValueError(f"{folder}: no images in any <label>/ subfolder")
    return paths, np.asarray(targets, dtype=np.int64)


def class_embeddings(encoder: Encoder, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Prompt-ensemble class embeddings (C, D): normalised mean over templates, one batched pass."""
    texts = [t.format(label) for label in labels for t in templates]
    emb = encode_texts(encoder, texts).view(len(labels), len(templates), -1)
    return normalize(emb.mean(1))


def classification_metrics(sim: torch.Tensor, targets: torch.Tensor, n_classes: int) -> dict[str, float]:
    """Top-1, top-5 and mean per-class top-1 accuracy from (N, C) similarities and (N,) targets."""
    ranks = ranks_of_targets(sim, targets)
    hit = (ranks == 0).double()
    per_class = [hit[targets == c].mean() for c in range(n_classes) if (targets == c).any()]
    return {
        "top1": float(hit.mean()),
        "top5": float((ranks < 5).double().mean()),
        "mean_per_class_top1": float(torch.stack(per_class).mean()),
    }


def zero_shot_classification(
    encoder: Encoder,
    labels: Sequence[str],
    images_dir: Path | str,
    templates: Sequence[str] = CIFAR_TEMPLATES,
    model: str | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy on ``images_dir/<label>/*`` with the prompt ensemble ``templates``."""
    paths, targets = labelled_images(images_dir, labels)
    with torch.no_grad():
        classes = class_embeddings(encoder, labels, templates)
        images = encode_image_files(encoder, paths)
    return {
        "task": "zero_shot_classification",
        **classification_metrics(images @ classes.T, torch.as_tensor(targets), len(labels)),
        "n_images": len(paths),
        "n_classes": len(labels),
        "n_templates": len(templates),
        "model": model,
        "backend": getattr(encoder, "kind", None),
        "images_dir": str(images_dir),
        "versions": package_versions(),
    }
