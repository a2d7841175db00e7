"""HierarCaps hierarchical image-to-text retrieval (HierarCaps paper section 6.1, SPEC section 4).

For each test image, retrieval walks outwards from the entailment root ``r`` (the normalised
embedding of ``""``): at each of ``steps`` radius thresholds it predicts the candidate text of
highest cosine similarity to the image among the texts whose genericness ``d_r(e) = |e - r|`` is at
most the threshold. Dropping consecutive duplicates leaves a predicted chain, general to specific.

Metrics, following the authors' released evaluator (``variant="released"``, the default):

* candidates are the distinct positive texts of all test rows (duplicates across rows are one
  candidate: they have one embedding, so the prediction is the same text either way);
* thresholds are global: ``linspace(min R, max R, steps)`` over the radii of all candidates;
* the ground truth of an image is the union of the chains of all rows with that image;
* **precision** = |set(preds) ∩ GT| / |set(preds)|; **recall** = fraction of the levels k = 1..4
  at which some reference's level-k text was predicted; both averaged over unique images;
* **tau_d** = mean over rows of Kendall's tau between the order of the row's four radii and
  1..4, ``kendalltau(argsort(radii), [1, 2, 3, 4])`` as the released evaluator computes it (1 when
  every tier lies further from the root than the tier before it; tied radii keep their tier order);
* among exactly tied similarities the prediction is the first candidate, as ``numpy.argmax`` picks.

``variant="paper"`` follows the paper's text instead: per-image thresholds from the root
(radius 0) to the radius of the candidate nearest the image, and the prediction closest to the
root is dropped. Every result says which variant produced it.

The search is vectorised: candidates are sorted by radius once, so the candidate set of any
threshold is a prefix of that order; a cumulative arg-max of the (images x texts) similarity
matrix along it gives every threshold's prediction for every image at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from finetune.evaluation.common import (
    Encoder,
    content_sha256,
    encode_image_files,
    encode_texts,
    file_sha256,
    package_versions,
    text_root,
)
from finetune.evaluation.image_cache import ImageEmbeddingCache
from finetune.geometry import radius
from hierarcaps.formats import load_dataset_folder, read_release_columns
from hierarcaps.hierarchy import N_TIERS, RELEASE_DELIMITER
from hierarcaps.image_folder import ImageLocation, resolve_image_refs

Variant = Literal["released", "paper"]
VARIANTS = ("released", "paper")
# Images per block of the similarity matrix: bounds memory for large candidate sets.
IMAGE_BLOCK = 256


@dataclass(frozen=True)
class RetrievalSet:
    """Test rows: one positive chain (T1..T4, general to specific) and one image reference each."""

    chains: list[tuple[str, str, str, str]]
    image_refs: list[str]
    origin: str
    sha256: str
    sha256_of: Literal["file", "rows"] = "file"

    def __len__(self) -> int:
        return len(self.chains)


def read_test_csv(path: Path) -> RetrievalSet:
    """Read a release CSV (``hierarcaps.formats.read_release_columns``): curated test (``id, captions,
    image_url``) or expanded / train (``positive, negative, image_url``; only positives are used).

    Tiers are stripped of surrounding whitespace, as the released evaluator does.
    """
    path = Path(path)
    table = read_release_columns(path)
    column = "captions" if "captions" in table else "positive"
    chains = [tuple(t.strip() for t in cell.split(RELEASE_DELIMITER)) for cell in table[column]]
    return RetrievalSet(chains, list(table["image_url"]), str(path), file_sha256(path), "file")


def test_set_from_rows(rows: Any, origin: str = "dataset") -> RetrievalSet:
    """A :class:`RetrievalSet` from our own dataset rows (``datasets.Dataset`` or a list of dicts with
    ``positive`` (4 tiers) and ``image_ref``)."""
    positives = rows["positive"] if hasattr(rows, "column_names") else [r["positive"] for r in rows]
    refs = rows["image_ref"] if hasattr(rows, "column_names") else [r["image_ref"] for r in rows]
    chains = []
    for i, tiers in enumerate(positives):
        if len(tiers) != N_TIERS:
            raise ValueError(f"{origin} row {i}: 'positive' has {len(tiers)} tiers, expected {N_TIERS}")
        chains.append(tuple(str(t) for t in tiers))
    digest = content_sha256({"positive": [list(c) for c in chains], "image_ref": list(refs)})
    return RetrievalSet(chains, [str(r) for r in refs], origin, digest, "rows")


def load_test_set(source: Any, split: str = "test") -> RetrievalSet:
    """A :class:`RetrievalSet` from a CSV path, a saved ``DatasetDict``/``Dataset`` folder, a
    ``DatasetDict`` (its ``split``), a ``Dataset`` or a list of row dicts."""
    if isinstance(source, RetrievalSet):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            folder = load_dataset_folder(path)
            if split not in folder:
                raise ValueError(f"{path}: no split {split!r} (found {list(folder)}); pick one with --split")
            return test_set_from_rows(folder[split], f"{path}[{split}]")
        return read_test_csv(path)
    if hasattr(source, "keys") and split in source.keys() and hasattr(source[split], "column_names"):
        return test_set_from_rows(source[split], f"DatasetDict[{split!r}]")
    return test_set_from_rows(source)


@dataclass(frozen=True)
class Candidates:
    """Distinct texts of a test set and where each row's tiers sit among them."""

    texts: list[str]
    chain_ids: np.ndarray  # (n_rows, 4) int: index into ``texts`` of tier k of row i
    images: list[str]  # distinct image references, in order of first appearance
    row_image: np.ndarray  # (n_rows,) int: index into ``images`` of each row's image


def index_test_set(test: RetrievalSet) -> Candidates:
    """Deduplicate texts and images of a test set (order of first appearance)."""
    text_ids: dict[str, int] = {}
    chain_ids = np.array([[text_ids.setdefault(t, len(text_ids)) for t in chain] for chain in test.chains], dtype=np.int64)
    image_ids: dict[str, int] = {}
    row_image = np.array([image_ids.setdefault(ref, len(image_ids)) for ref in test.image_refs], dtype=np.int64)
    return Candidates(list(text_ids), chain_ids.reshape(-1, N_TIERS), list(image_ids), row_image)


def global_thresholds(radii: torch.Tensor, steps: int) -> torch.Tensor:
    """Released thresholds ``linspace(min R, max R, steps)`` over all candidate radii: (steps,) float64."""
    r = radii.double()
    return torch.linspace(float(r.min()), float(r.max()), steps, dtype=torch.float64)


def per_image_thresholds(sim: torch.Tensor, radii: torch.Tensor, steps: int) -> torch.Tensor:
    """Paper thresholds: for each image, ``steps`` equally spaced radii from the root (radius 0)
    to the radius of the image's nearest text, ``linspace(0, R(nearest text), steps)``.

    ``sim``: (I, T) cosine similarities; ``radii``: (T,). Returns (I, steps) float64. The nearest
    text is the first of highest similarity (``argmax``'s choice among exact ties).
    """
    nearest = radii.double()[sim.argmax(dim=1)]
    frac = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    return nearest[:, None] * frac[None, :]


def threshold_predictions(sim: torch.Tensor, radii: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For every image and threshold, the candidate of highest similarity with radius <= threshold.

    ``sim``: (I, T); ``radii``: (T,); ``thresholds``: (S,) shared or (I, S) per image.
    Returns (I, S) int64 candidate indices, -1 where no candidate lies within the threshold.
    Among exactly tied similarities the lowest candidate index wins, as ``numpy.argmax`` over the
    texts in their original order picks the first (the released evaluator's choice).
    """
    order = torch.argsort(radii.double(), stable=True)
    sorted_r = radii.double()[order]
    thr = thresholds.double()
    counts = torch.searchsorted(sorted_r, thr.contiguous(), right=True)  # (S,) or (I, S)
    preds = torch.empty(sim.shape[0], thr.shape[-1], dtype=torch.int64)
    for start in range(0, sim.shape[0], IMAGE_BLOCK):
        block = sim[start : start + IMAGE_BLOCK][:, order]
        best = _first_index_cummax(block, order)  # best[i, j]: arg-max over the j+1 most generic texts
        c = counts if counts.dim() == 1 else counts[start : start + IMAGE_BLOCK]
        c = c.expand(block.shape[0], -1)
        picked = torch.gather(best, 1, (c - 1).clamp_min(0))
        preds[start : start + IMAGE_BLOCK] = torch.where(c > 0, picked, -1)
    return preds


def _first_index_cummax(block: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Running arg-max along the columns of ``block`` (texts in radius order), as original indices.

    ``block``: (I, T) similarities with column j holding text ``order[j]``. Returns (I, T) int64:
    entry j is the original index of the best text among columns 0..j; exact ties go to the
    lowest original index. A run of columns with the same running maximum is one segment; within
    it, a cumulative minimum of the original indices of the columns that reach the maximum.
    """
    running, _ = torch.cummax(block, dim=1)
    n = block.shape[1]
    new_max = torch.ones_like(block, dtype=torch.bool)
    new_max[:, 1:] = running[:, 1:] > running[:, :-1]
    segment = torch.cumsum(new_max.long(), dim=1)  # 1, 2, ... per strict new maximum
    at_max = torch.where(block == running, order.expand_as(block), n)
    # Later segments get smaller keys, so the cumulative minimum restarts at each new maximum.
    key = at_max - segment * (n + 1)
    best, _ = torch.cummin(key, dim=1)
    return best + segment * (n + 1)


def kept_predictions(preds: np.ndarray, drop_first: bool = False) -> np.ndarray:
    """Mask of the predictions that form each image's chain: (I, S) bool.

    Invalid entries (-1) and consecutive duplicates are dropped; with ``drop_first`` the first
    remaining prediction (the one nearest the root) is dropped too.
    """
    preds = np.asarray(preds)
    valid = preds >= 0
    prev = np.full_like(preds, -1)
    # The previous *valid* prediction: carry the last valid index forward along each row.
    last_valid = np.where(valid, np.arange(preds.shape[1])[None, :], -1)
    last_valid = np.maximum.accumulate(last_valid, axis=1)
    shifted = np.concatenate([np.full((preds.shape[0], 1), -1), last_valid[:, :-1]], axis=1)
    has_prev = shifted >= 0
    prev[has_prev] = preds[np.nonzero(has_prev)[0], shifted[has_prev]]
    kept = valid & (preds != prev)
    if drop_first:
        first = kept.argmax(axis=1)
        kept[np.arange(len(kept)), first] = False
    return kept


def predicted_chains(preds: np.ndarray, texts: Sequence[str], drop_first: bool = False) -> list[list[str]]:
    """Each image's predicted chain (general to specific) as texts."""
    kept = kept_predictions(preds, drop_first)
    return [[texts[j] for j in row[mask]] for row, mask in zip(np.asarray(preds), kept)]


def precision_recall(
    preds: np.ndarray, chain_ids: np.ndarray, row_image: np.ndarray, n_texts: int, drop_first: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image retrieval precision and recall against multi-reference ground truth.

    ``preds``: (I, S) candidate indices (-1: none); ``chain_ids``: (n_rows, L) candidate index of
    each row's tier k (L = 4 for HierarCaps, the number of ranks for a taxonomy); ``row_image``: (n_rows,) image index of each row. Returns two (I,) arrays:
    precision = |set(preds) ∩ GT| / max(1, |set(preds)|), GT = union of the image's chains;
    recall = fraction of levels k at which some reference's level-k text is in set(preds).
    """
    n_images, n_levels = preds.shape[0], chain_ids.shape[1]
    kept = kept_predictions(preds, drop_first)
    predicted = np.zeros((n_images, n_texts), dtype=bool)
    rows, cols = np.nonzero(kept)
    predicted[rows, preds[rows, cols]] = True
    in_gt = np.zeros((n_images, n_texts), dtype=bool)
    in_gt[np.repeat(row_image, n_levels), chain_ids.reshape(-1)] = True
    n_pred = predicted.sum(1)
    precision = (predicted & in_gt).sum(1) / np.maximum(1, n_pred)
    level_hit = np.zeros((n_images, n_levels), dtype=bool)
    np.logical_or.at(level_hit, row_image, predicted[row_image[:, None], chain_ids])
    recall = level_hit.mean(1)
    return precision, recall


def kendall_tau_order(radii: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between each row of ``radii`` (n, k) and the order 1..k: (n,).

    With distinct radii this is the plain tau; tied radii count as neither concordant nor
    discordant (as scipy.stats.kendalltau); a row whose radii are all equal gives NaN.
    """
    radii = np.asarray(radii, dtype=np.float64)
    k = radii.shape[1]
    i, j = np.triu_indices(k, 1)
    s = np.sign(radii[:, j] - radii[:, i])
    n0 = len(i)
    ties = (s == 0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return s.sum(1) / np.sqrt((n0 - ties) * n0)


def released_tau_d(radii: np.ndarray) -> np.ndarray:
    """tau_d per row as the released evaluator computes it: ``kendalltau(argsort(radii), 1..k)``.

    ``radii``: (n, k) radii of each row's tiers T1..Tk. Tied radii keep their tier order (a stable
    ``argsort``, which numpy's scalar sort of so short a row also gives), so ties count as
    correctly ordered: equal T1 and T2 radii cost nothing, and a row of equal radii scores 1.
    (numpy >= 2 may sort ties in another order on CPUs where it uses SIMD sorting networks, which
    makes the released script's tau_d with ties depend on the machine; the stable order is the
    one the released code was written against.) Without ties this equals :func:`kendall_tau_order`.
    """
    order = np.argsort(np.asarray(radii, dtype=np.float64), axis=1, kind="stable")
    return kendall_tau_order(order)  # a permutation has no ties: tau-b is the plain tau


@dataclass
class RetrievalRun:
    """Everything one retrieval evaluation computed (kept for reports)."""

    test: RetrievalSet
    candidates: Candidates
    variant: str
    steps: int
    text_radii: np.ndarray  # (T,)
    predictions: np.ndarray  # (I, S) candidate indices
    thresholds: np.ndarray  # (S,) or (I, S)
    precision: np.ndarray  # (I,)
    recall: np.ndarray  # (I,)
    tau: np.ndarray  # (n_rows,)
    text_emb: torch.Tensor  # (T, D) normalised
    image_emb: torch.Tensor  # (I, D) normalised
    root: torch.Tensor  # (D,)
    image_paths: list[ImageLocation] = field(default_factory=list)
    draft_size: int | None = None
    image_cache: dict[str, Any] | None = None  # cache folder, hits, misses (None: no cache)

    def chains(self) -> list[list[str]]:
        """Predicted chain per unique image."""
        return predicted_chains(self.predictions, self.candidates.texts, self.variant == "paper")


def retrieve(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    root: torch.Tensor,
    candidates: Candidates,
    variant: Variant = "released",
    steps: int = 50,
) -> dict[str, np.ndarray]:
    """Hierarchical retrieval and its metrics from embeddings.

    ``text_emb``: (T, D) normalised embeddings of ``candidates.texts``; ``image_emb``: (I, D) of
    ``candidates.images``; ``root``: (D,). Returns arrays ``radii`` (T,), ``predictions`` (I, S),
    ``thresholds``, ``precision`` (I,), ``recall`` (I,), ``tau`` (n_rows,).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    radii = radius(text_emb.float(), root.float())
    sim = image_emb.float() @ text_emb.float().T
    thresholds = global_thresholds(radii, steps) if variant == "released" else per_image_thresholds(sim, radii, steps)
    preds = threshold_predictions(sim, radii, thresholds).numpy()
    precision, recall = precision_recall(
        preds, candidates.chain_ids, candidates.row_image, len(candidates.texts), drop_first=variant == "paper"
    )
    radii_np = radii.double().numpy()
    tau = released_tau_d(radii_np[candidates.chain_ids])
    return {
        "radii": radii_np,
        "predictions": preds,
        "thresholds": thresholds.numpy(),
        "precision": precision,
        "recall": recall,
        "tau": tau,
    }


def summarize(precision: np.ndarray, recall: np.ndarray, tau: np.ndarray) -> dict[str, float]:
    """Aggregate per-image P/R (mean over images) and per-row tau (mean over rows); F1 of the means
    (as RCME reports it)."""
    p, r = float(np.mean(precision)), float(np.mean(recall))
    return {
        "precision": p,
        "recall": r,
        "f1": 0.0 if p + r == 0 else 2 * p * r / (p + r),
        "tau_d": float(np.nanmean(tau)),
        "tau_d_undefined_rows": int(np.isnan(tau).sum()),
    }


def run_retrieval(
    encoder: Encoder,
    test_rows: Any,
    images_dir: Path | str,
    variant: Variant = "released",
    steps: int = 50,
    text_batch_size: int | None = None,
    image_batch_size: int = 64,
    draft_size: int | None = None,
    workers: int = 0,
    image_cache: ImageEmbeddingCache | None = None,
) -> RetrievalRun:
    """Embed a test set in batches and run hierarchical retrieval (see :func:`retrieve`).

    ``draft_size``: fast approximate JPEG decoding (see ``hierarcaps.image_folder.open_image``); None decodes fully.
    ``workers``: image-decoding processes (0: in this process); ``image_cache``: reuse the image
    embeddings of an identical image tower (see ``image_cache``).
    """
    test = load_test_set(test_rows)
    cand = index_test_set(test)
    paths = resolve_image_refs(cand.images, images_dir)
    hits, misses = (image_cache.hits, image_cache.misses) if image_cache is not None else (0, 0)
    with torch.no_grad():
        root = text_root(encoder)
        text_emb = encode_texts(encoder, cand.texts, text_batch_size)
        image_emb = encode_image_files(encoder, paths, image_batch_size, draft_size, workers, image_cache,
                                       getattr(encoder, "name", None))
    out = retrieve(text_emb, image_emb, root, cand, variant, steps)
    stats = None
    if image_cache is not None:
        stats = {"dir": str(image_cache.directory), "hits": image_cache.hits - hits, "misses": image_cache.misses - misses}
    return RetrievalRun(
        test, cand, variant, steps, out["radii"], out["predictions"], out["thresholds"],
        out["precision"], out["recall"], out["tau"], text_emb, image_emb, root, paths, draft_size, stats,
    )


def run_metrics(run: RetrievalRun, model: str | None = None, seconds: float | None = None) -> dict[str, Any]:
    """The metrics JSON of a run: scores plus what is needed to reproduce them."""
    return {
        "task": "hierarcaps_retrieval",
        "variant": run.variant,
        "steps": run.steps,
        **summarize(run.precision, run.recall, run.tau),
        "n_rows": len(run.test),
        "n_images": len(run.candidates.images),
        "n_candidate_texts": len(run.candidates.texts),
        "model": model,
        "test_file": run.test.origin,
        "test_sha256": run.test.sha256,
        "test_sha256_of": run.test.sha256_of,
        "image_draft_size": run.draft_size,
        "image_cache": run.image_cache,
        "seconds": seconds,
        "versions": package_versions(),
    }


def evaluate_retrieval(
    backend: Encoder,
    test_rows: Any,
    images_dir: Path | str,
    variant: Variant = "released",
    steps: int = 50,
    model: str | None = None,
    text_batch_size: int | None = None,
    image_batch_size: int = 64,
    draft_size: int | None = None,
    workers: int = 0,
    image_cache: ImageEmbeddingCache | None = None,
) -> dict[str, Any]:
    """HierarCaps hierarchical retrieval metrics of ``backend`` on ``test_rows``.

    ``test_rows``: a release CSV path, a saved dataset folder, a ``DatasetDict`` (its ``test``
    split), a ``Dataset`` or a :class:`RetrievalSet`; ``images_dir``: folder with the test images (image files, or a ``hierarcaps fetch-images`` folder);
    ``workers``, ``image_cache``: as in :func:`run_retrieval`.
    Returns the metrics dict (``precision``, ``recall``, ``f1``, ``tau_d``, variant, model,
    backend, test hash, counts, image-cache hits, package versions).
    """
    start = time.perf_counter()
    run = run_retrieval(backend, test_rows, images_dir, variant, steps, text_batch_size, image_batch_size, draft_size,
                        workers, image_cache)
    metrics = run_metrics(run, model, round(time.perf_counter() - start, 3))
    metrics["backend"] = getattr(backend, "kind", type(backend).__name__)
    return metrics
