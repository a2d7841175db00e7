"""Taxonomy metrics for RCME / BioCLIP-HC users (RCME section 5; BioCLIP-HC model card).

Input: a taxonomy table in the layout of BioCLIP's Rare Species metadata (one row per image; rank
columns ``kingdom, phylum, cls (or class), order, family, genus, species``, where ``species`` is the
epithet; an image path column ``filepath`` relative to an images folder). A taxon is identified by
its whole path from the kingdom down (so two genera of the same name in different families stay
apart). Each taxon has a text label: ``"taxonomic"`` style joins the names from the kingdom down
(BioCLIP's taxonomic text, ``Animalia Chordata Aves ... Corvus corax``), ``"name"`` style is the
taxon's own name (species as the binomial ``Corvus corax``).

Metrics, from image embeddings (N, D) and label embeddings per rank:

* **ordering tau**: for each species, Kendall's tau between the radii ``|e - r|`` of its labels at
  every rank and the rank order (1 = kingdom nearest the root, species farthest); mean over species;
* **hierarchical retrieval** P / R / F1: the HierarCaps retrieval of
  :mod:`finetune.evaluation.retrieval` with all taxon labels as candidates and each image's chain
  of labels as its ground truth (released semantics, global thresholds);
* **per-rank zero-shot top-1**: at each rank, the image's most similar label among all taxa of
  that rank, independently of other ranks;
* **top-down constrained accuracy**: the kingdom as above, then at each rank only the children of
  the taxon predicted at the rank above compete;
* **first-misclassification depth**: per image, the first rank where the top-down prediction is
  wrong (``"none"`` when every rank is right); reported as counts per rank;
* **normalised LCA distance**: ``(L - depth of the lowest common ancestor) / L`` between the
  predicted and the true species, with L ranks (0: right species, 1: wrong kingdom); for the
  top-down prediction and for the flat species prediction; mean over images.

The root is the embedding of ``""`` by default; RCME's released code uses ``"Eukarya"``
(``root_text``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch

from finetune.evaluation.common import Encoder, encode_image_files, encode_texts, file_sha256, package_versions
from finetune.evaluation.retrieval import Candidates, kendall_tau_order, retrieve, summarize
from finetune.geometry import radius

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
# Rank name -> table columns to try in order (Rare Species keeps the rank in "cls" and the
# scientific name in "class").
COLUMN_ALIASES = {"class": ("cls", "class")}
LabelStyle = Literal["taxonomic", "name"]


@dataclass(frozen=True)
class Taxonomy:
    """Taxa per rank and their parents.

    ``paths[j][k]``: names from the kingdom down to taxon k of rank j; ``parent[j][k]``: index
    of its parent among the taxa of rank j-1 (``parent[0]`` is all zeros).
    """

    ranks: tuple[str, ...]
    paths: list[list[tuple[str, ...]]]
    parent: list[np.ndarray]

    def labels(self, style: LabelStyle = "taxonomic") -> list[list[str]]:
        """Text label of every taxon, per rank (see the module docstring)."""
        if style not in ("taxonomic", "name"):
            raise ValueError(f"label style must be 'taxonomic' or 'name', got {style!r}")
        out = []
        for j, paths in enumerate(self.paths):
            if style == "taxonomic":
                out.append([" ".join(p) for p in paths])
            elif self.ranks[j] == "species" and j > 0:
                out.append([f"{p[-2]} {p[-1]}" for p in paths])
            else:
                out.append([p[-1] for p in paths])
        return out


@dataclass(frozen=True)
class TaxonomyTable:
    """A taxonomy and, per table row (image), the index of its taxon at every rank."""

    taxonomy: Taxonomy
    row_taxa: np.ndarray  # (N, L) int
    image_files: list[str]
    origin: str


def _rank_column(df: pd.DataFrame, rank: str, where: str) -> str:
    for name in COLUMN_ALIASES.get(rank, (rank,)):
        if name in df.columns:
            return name
    raise ValueError(f"{where}: no column for rank {rank!r} (tried {COLUMN_ALIASES.get(rank, (rank,))}); found {list(df.columns)}")


def taxonomy_from_paths(ranks: Sequence[str], row_paths: Sequence[Sequence[str]]) -> tuple[Taxonomy, np.ndarray]:
    """Build a :class:`Taxonomy` from one name per rank per row. Returns it and (N, L) taxon indices."""
    n_ranks = len(ranks)
    index: list[dict[tuple[str, ...], int]] = [{} for _ in ranks]
    row_taxa = np.zeros((len(row_paths), n_ranks), dtype=np.int64)
    for i, names in enumerate(row_paths):
        for j in range(n_ranks):
            row_taxa[i, j] = index[j].setdefault(tuple(names[: j + 1]), len(index[j]))
    paths = [list(ix) for ix in index]
    parent = [np.zeros(len(paths[0]), dtype=np.int64)]
    for j in range(1, n_ranks):
        parent.append(np.array([index[j - 1][p[:-1]] for p in paths[j]], dtype=np.int64))
    return Taxonomy(tuple(ranks), paths, parent), row_taxa


def read_taxonomy_table(path: Path | str, ranks: Sequence[str] = RANKS, image_column: str = "filepath") -> TaxonomyTable:
    """Read a taxonomy table (CSV; layout in the module docstring). Errors name file, line, column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"taxonomy table {path} does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    columns = [_rank_column(df, r, str(path)) for r in ranks]
    for rank, col in zip(ranks, columns):
        empty = np.nonzero(df[col].str.strip().to_numpy() == "")[0]
        if len(empty):
            raise ValueError(f"{path}: line {empty[0] + 2}: empty {rank!r} (column {col!r})")
    names = df[columns].apply(lambda c: c.str.strip()).to_numpy().tolist()
    if ranks[-1] == "species" and len(ranks) > 1:
        # A species column may hold the epithet or the binomial; keep the epithet.
        names = [row[:-1] + [row[-1][len(row[-2]) + 1 :] if row[-1].startswith(row[-2] + " ") else row[-1]] for row in names]
    taxonomy, row_taxa = taxonomy_from_paths(ranks, names)
    files = df[image_column].tolist() if image_column in df.columns else []
    return TaxonomyTable(taxonomy, row_taxa, files, str(path))


def top_down_predictions(sims: Sequence[torch.Tensor], parent: Sequence[np.ndarray]) -> np.ndarray:
    """Constrained predictions: at rank j only children of the rank j-1 prediction compete.

    ``sims[j]``: (N, K_j) image-label similarities. Returns (N, L) taxon indices.
    """
    preds = [sims[0].argmax(1)]
    for j in range(1, len(sims)):
        allowed = torch.as_tensor(parent[j])[None, :] == preds[-1][:, None]  # (N, K_j)
        preds.append(sims[j].masked_fill(~allowed, float("-inf")).argmax(1))
    return torch.stack(preds, 1).numpy()


def lca_depth(pred_leaf_paths: Sequence[tuple[str, ...]], true_leaf_paths: Sequence[tuple[str, ...]]) -> np.ndarray:
    """Number of leading ranks two leaf paths share (the depth of their lowest common ancestor)."""
    out = []
    for p, t in zip(pred_leaf_paths, true_leaf_paths):
        d = 0
        while d < len(t) and p[d] == t[d]:
            d += 1
        out.append(d)
    return np.asarray(out, dtype=np.int64)


def taxonomy_metrics(
    image_emb: torch.Tensor,
    label_emb: Sequence[torch.Tensor],
    root: torch.Tensor,
    taxonomy: Taxonomy,
    true_taxa: np.ndarray,
    steps: int = 50,
) -> dict[str, Any]:
    """All taxonomy metrics (module docstring) from embeddings.

    ``image_emb``: (N, D) normalised; ``label_emb[j]``: (K_j, D) normalised labels of rank j;
    ``root``: (D,); ``true_taxa``: (N, L) true taxon index per rank.
    """
    ranks, n_ranks = taxonomy.ranks, len(taxonomy.ranks)
    sims = [image_emb.float() @ e.float().T for e in label_emb]
    flat = np.stack([s.argmax(1).numpy() for s in sims], 1)
    top_down = top_down_predictions(sims, taxonomy.parent)
    td_correct = top_down == true_taxa
    n_correct_prefix = np.cumprod(td_correct, axis=1).sum(1)
    first_wrong = {rank: int((n_correct_prefix == j).sum()) for j, rank in enumerate(ranks)}
    first_wrong["none"] = int((n_correct_prefix == n_ranks).sum())
    leaves = taxonomy.paths[-1]
    true_leaf = [leaves[k] for k in true_taxa[:, -1]]
    flat_lca = lca_depth([leaves[k] for k in flat[:, -1]], true_leaf)

    # Ordering: radii of each species' labels down its path.
    radii = [radius(e.float(), root.float()).double().numpy() for e in label_emb]
    species_chains = _leaf_chains(taxonomy)
    tau = kendall_tau_order(np.stack([radii[j][species_chains[:, j]] for j in range(n_ranks)], 1))

    retrieval = _hierarchical_retrieval(image_emb, label_emb, root, true_taxa, steps)
    return {
        "ordering_tau": float(np.nanmean(tau)),
        "hierarchical_retrieval": retrieval,
        "zero_shot_top1": {rank: float((flat[:, j] == true_taxa[:, j]).mean()) for j, rank in enumerate(ranks)},
        "zero_shot_top1_mean": float((flat == true_taxa).mean()),
        "top_down_accuracy": {rank: float(td_correct[:, j].mean()) for j, rank in enumerate(ranks)},
        "first_misclassification": first_wrong,
        "nlca_top_down": float(((n_ranks - n_correct_prefix) / n_ranks).mean()),
        "nlca_flat": float(((n_ranks - flat_lca) / n_ranks).mean()),
        "n_images": int(len(true_taxa)),
        "n_taxa": {rank: len(p) for rank, p in zip(ranks, taxonomy.paths)},
    }


def _leaf_chains(taxonomy: Taxonomy) -> np.ndarray:
    """(n_leaves, L): taxon index at every rank of each leaf's ancestry."""
    n_ranks = len(taxonomy.ranks)
    chains = np.zeros((len(taxonomy.paths[-1]), n_ranks), dtype=np.int64)
    chains[:, -1] = np.arange(len(taxonomy.paths[-1]))
    for j in range(n_ranks - 1, 0, -1):
        chains[:, j - 1] = taxonomy.parent[j][chains[:, j]]
    return chains


def _hierarchical_retrieval(
    image_emb: torch.Tensor, label_emb: Sequence[torch.Tensor], root: torch.Tensor, true_taxa: np.ndarray, steps: int
) -> dict[str, float]:
    """HierarCaps-style retrieval over all taxon labels; each image's chain is its ground truth."""
    offsets = np.cumsum([0] + [len(e) for e in label_emb[:-1]])
    chain_ids = true_taxa + offsets[None, :]
    n = len(true_taxa)
    cand = Candidates([str(i) for i in range(int(offsets[-1]) + len(label_emb[-1]))], chain_ids, [str(i) for i in range(n)], np.arange(n))
    out = retrieve(torch.cat(list(label_emb)), image_emb, root, cand, "released", steps)
    s = summarize(out["precision"], out["recall"], out["tau"])
    return {k: s[k] for k in ("precision", "recall", "f1")}


def evaluate_taxonomy(
    encoder: Encoder,
    table: Path | str,
    images_dir: Path | str,
    style: LabelStyle = "taxonomic",
    template: str = "{}",
    root_text: str = "",
    model: str | None = None,
    draft_size: int | None = None,
) -> dict[str, Any]:
    """Taxonomy metrics of ``encoder`` on the labelled images of a taxonomy table.

    ``template`` wraps every label (``"a photo of {}."``); ``root_text``: ``""`` or ``"Eukarya"``.
    """
    tab = read_taxonomy_table(table)
    if not tab.image_files:
        raise ValueError(f"{table}: no 'filepath' column; the table must name one image per row")
    images_dir = Path(images_dir)
    paths = [images_dir / f for f in tab.image_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {table} are not under {images_dir}, e.g. {missing[:3]}")
    labels = tab.taxonomy.labels(style)
    with torch.no_grad():
        root = encode_texts(encoder, [root_text])[0]
        flat_labels = [template.format(t) for rank_labels in labels for t in rank_labels]
        emb = encode_texts(encoder, flat_labels)
        label_emb = list(torch.split(emb, [len(x) for x in labels]))
        image_emb = encode_image_files(encoder, paths, draft_size=draft_size)
    metrics = taxonomy_metrics(image_emb, label_emb, root, tab.taxonomy, tab.row_taxa)
    return {
        "task": "taxonomy",
        **metrics,
        "label_style": style,
        "template": template,
        "root_text": root_text,
        "model": model,
        "backend": getattr(encoder, "kind", None),
        "table": str(table),
        "table_sha256": file_sha256(Path(table)),
        "versions": package_versions(),
    }
