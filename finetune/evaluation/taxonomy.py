"""Taxonomy metrics for RCME / BioCLIP-HC users (RCME section 5; BioCLIP-HC model card).

Input: the taxonomy table that training reads (:mod:`finetune.taxonomy_data`; CSV or Parquet),
by default in the layout of BioCLIP's Rare Species metadata (one row per image; rank columns
``kingdom, phylum, cls (or class), order, family, genus, species``, where ``species`` may be the
epithet; an image path column ``filepath`` relative to an images folder). Rank list and column
names are arguments; the table checks (two parents, duplicates, missing rank columns) are the
training reader's, and evaluation further needs every rank named on every row. Each taxon has a
text label: ``"taxonomic"`` style joins the names from the top rank down (BioCLIP's taxonomic
text, ``Animalia Chordata Aves ... Corvus corax``), ``"name"`` style is the taxon's own name
(species as the binomial ``Corvus corax``), ``"taxonomic+common"`` appends ``with common name X``
to the most specific rank where the table gives one. Every metric works for any number of ranks L.

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
  top-down prediction and for the flat species prediction; mean over images;
* **image -> image R@1 per rank**: for each image, its most similar *other* image (cosine); the
  fraction of images whose neighbour has the same taxon at that rank (RCME's image retrieval).
  An image alone in its taxon counts as a miss at that rank.

The root is the embedding of ``""`` by default; RCME's released code uses ``"Eukarya"``
(``root_text``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from finetune.evaluation.common import Encoder, encode_image_files, encode_texts, file_sha256, package_versions
from finetune.evaluation.retrieval import Candidates, kendall_tau_order, retrieve, summarize
from finetune.geometry import radius
from finetune.taxonomy_data import MISSING, TaxonomyTree, read_taxonomy

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
LabelStyle = Literal["taxonomic", "name", "taxonomic+common"]


@dataclass(frozen=True)
class Taxonomy:
    """Taxa per rank and their parents.

    ``paths[j][k]``: names from the kingdom down to taxon k of rank j; ``parent[j][k]``: index
    of its parent among the taxa of rank j-1 (``parent[0]`` is all zeros).
    """

    ranks: tuple[str, ...]
    paths: list[list[tuple[str, ...]]]
    parent: list[np.ndarray]


@dataclass(frozen=True)
class TaxonomyTable:
    """A taxonomy and, per table row (image), the index of its taxon at every rank."""

    taxonomy: Taxonomy
    row_taxa: np.ndarray  # (N, L) int
    image_files: list[str]
    origin: str
    label_texts: list[list[str]]  # per rank, the untemplated text of every taxon in the chosen style


def _taxonomy_of_tree(tree: TaxonomyTree) -> Taxonomy:
    """The evaluation view of a checked tree: every taxon's path of taxonomic words from the top rank."""
    paths = [[tuple(tree.words[i][a] for i, a in enumerate(tree.ancestors(j, k))) for k in range(len(names))]
             for j, names in enumerate(tree.names)]
    parent = [np.maximum(p, 0) for p in tree.parent]  # complete rows: only the top rank has no parent
    return Taxonomy(tree.ranks, paths, parent)


def read_taxonomy_table(
    path: Path | str,
    ranks: Sequence[str] = RANKS,
    image_column: str = "filepath",
    common_name_column: str = "common_name",
    style: LabelStyle = "taxonomic",
) -> TaxonomyTable:
    """Read and check a taxonomy table (module docstring); every row must name every rank.

    Errors (``ValueError``) name file, line and column. ``style`` sets :attr:`TaxonomyTable.label_texts`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"taxonomy table {path} does not exist")
    table = read_taxonomy(path, ranks, image_column, common_name_column)
    missing = np.argwhere(table.taxa == MISSING)
    if len(missing):
        row, rank = missing[0]
        raise ValueError(
            f"{path}: line {table.lines[row]}: empty {ranks[rank]!r}; taxonomy evaluation needs every rank on "
            "every row (drop the row or fill the rank)"
        )
    files = table.image_refs if image_column and any(table.image_refs) else []
    labels = table.label_texts(style, "{}")
    return TaxonomyTable(_taxonomy_of_tree(table.tree), table.taxa, files, str(path), labels)


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
        "image_to_image_r1": image_to_image_r1(image_emb, true_taxa, ranks),
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


def image_to_image_r1(image_emb: torch.Tensor, true_taxa: np.ndarray, ranks: Sequence[str]) -> dict[str, float]:
    """Per rank, the fraction of images whose most similar other image shares their taxon there.

    ``image_emb``: (N, D) normalised, N >= 2; ``true_taxa``: (N, L). Ties go to the lower index.
    """
    if len(image_emb) < 2:
        raise ValueError("image -> image retrieval needs at least two images")
    sims = image_emb.float() @ image_emb.float().T
    sims.fill_diagonal_(float("-inf"))
    nearest = sims.argmax(1).numpy()
    return {rank: float((true_taxa[nearest, j] == true_taxa[:, j]).mean()) for j, rank in enumerate(ranks)}


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
    ranks: Sequence[str] = RANKS,
    image_column: str = "filepath",
    common_name_column: str = "common_name",
) -> dict[str, Any]:
    """Taxonomy metrics of ``encoder`` on the labelled images of a taxonomy table.

    ``template`` wraps every label (``"a photo of {}."``); ``root_text``: ``""`` or ``"Eukarya"``;
    ``ranks``, ``image_column``, ``common_name_column``: the table's layout (as training's
    ``taxonomy.*`` settings).
    """
    tab = read_taxonomy_table(table, ranks, image_column, common_name_column, style)
    if not tab.image_files:
        raise ValueError(f"{table}: no {image_column!r} column; the table must name one image per row")
    images_dir = Path(images_dir)
    paths = [images_dir / f for f in tab.image_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {table} are not under {images_dir}, e.g. {missing[:3]}")
    labels = tab.label_texts
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
        "ranks": list(ranks),
        "model": model,
        "backend": getattr(encoder, "kind", None),
        "table": str(table),
        "table_sha256": file_sha256(Path(table)),
        "versions": package_versions(),
    }
