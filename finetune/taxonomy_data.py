"""Taxonomy tables as hierarchies: rank chains and sibling hard negatives for RCME and the level loss.

A **taxonomy table** is a CSV or Parquet file with one row per image (or per taxon), one column
per rank (``taxonomy.ranks``, general to specific; ``class`` also matches a ``cls`` column, as in
BioCLIP's Rare Species metadata), an image path or reference column (``taxonomy.image_column``)
and optionally a common-name column. An empty cell is a missing rank for that row.

* **Taxa.** A taxon is a (rank, name) pair. A ``species`` column that holds the epithet (Rare
  Species: ``tuberculata`` next to genus ``Cyclonaias``) is read as the binomial
  ``Cyclonaias tuberculata``, so equal epithets of different genera stay apart.
* **Checks** (:class:`TaxonomyError`, naming file, line and fix): a rank column is missing; a taxon
  has two different parents (a child under two parents: ``Corvus`` under ``Corvidae`` on one line
  and under ``Laridae`` on another); a taxon is listed twice in a per-taxon table (no image column),
  or an image twice in a per-image table; a row has no rank at all.
* **Rank texts.** Style ``taxonomic``: the taxon's names from the top rank down, BioCLIP's
  taxonomic string (``Animalia Chordata Aves Passeriformes Corvidae Corvus corax``; the species
  contributes its epithet); ``name``: the taxon's own name (the binomial for species);
  ``taxonomic+common``: taxonomic, and the most specific rank ends with ``with common name
  <name>`` where the table gives one (BioCLIP's mixed text). Every text is wrapped in
  ``taxonomy.template`` (``a photo of {}.``). A missing interior rank is filled from the tree
  where another row names it (the parent of a taxon is unique), else it is skipped in the string.
* **Hard negatives** (RCME section 4.3, SPEC section 3). At rank i the negative shares every rank
  above i with the positive and differs at rank i: a random other child of the positive's
  rank-(i-1) taxon (a sibling of the positive at rank i; at the top rank, another top-rank
  taxon), drawn with a seeded generator. Where no sibling exists (an only child, or a taxon whose
  parent is unknown) the negative is masked out and counted (:attr:`TaxonomyTrainData.no_sibling`).

:func:`taxonomy_train_data` turns a table into :class:`finetune.data.TrainData` with ``L`` levels
(``L = len(taxonomy.ranks)``) and a mask of the texts that exist, which :mod:`finetune.train`
feeds to the losses.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from finetune.data import TrainData, TrainDataError, excluded_names, image_name, index_texts, load_train_data

if TYPE_CHECKING:
    from finetune.config import FinetuneSettings

# Rank name -> columns tried in order (Rare Species keeps the class rank in "cls" and the
# scientific name in "class").
COLUMN_ALIASES = {"class": ("cls", "class")}
PARQUET_SUFFIXES = (".parquet", ".pq")
STYLES = ("taxonomic", "name", "taxonomic+common")
MISSING = -1


class TaxonomyError(TrainDataError):
    """A taxonomy table cannot be used; the message names the file, line or setting and the fix."""


@dataclass(frozen=True)
class TaxonomyTree:
    """Taxa per rank: ``names[j][k]`` is taxon k of rank j, ``parent[j][k]`` its rank j-1 index or -1."""

    ranks: tuple[str, ...]
    names: list[list[str]]
    words: list[list[str]]  # the taxon's word in the taxonomic string (the epithet for a binomial)
    parent: list[np.ndarray]

    def children(self, rank: int) -> dict[int, list[int]]:
        """Rank ``rank`` taxa grouped by parent index (all under -1 at the top rank)."""
        groups: dict[int, list[int]] = {}
        for k, p in enumerate(self.parent[rank].tolist()):
            groups.setdefault(p, []).append(k)
        return groups

    def ancestors(self, rank: int, taxon: int) -> list[int]:
        """Taxon index at every rank 0..``rank`` of ``taxon``'s ancestry (-1 where unknown)."""
        chain = [MISSING] * (rank + 1)
        j, k = rank, taxon
        while j >= 0 and k != MISSING:
            chain[j] = k
            k = int(self.parent[j][k]) if j > 0 else MISSING
            j -= 1
        return chain

    def text(self, rank: int, taxon: int, style: str) -> str:
        """The rank text of a taxon without template: ``taxonomic`` or ``name`` (module docstring)."""
        if style == "name":
            return self.names[rank][taxon]
        return " ".join(self.words[j][k] for j, k in enumerate(self.ancestors(rank, taxon)) if k != MISSING)


@dataclass
class TaxonomyTable:
    """A taxonomy tree and each row's taxon per rank (-1: missing), image reference and common name."""

    tree: TaxonomyTree
    taxa: np.ndarray  # (N, L) int64
    image_refs: list[str]  # "" per row when the table has no image column
    common_names: list[str]
    lines: list[int]  # file line of each row (header = line 1)
    origin: str

    def rank_texts(self, style: str, template: str) -> list[list[str | None]]:
        """Per row, the templated text of every rank, general to specific (None where missing)."""
        check_style(style)
        plain = style.split("+")[0]
        base = [[self.tree.text(j, k, plain) for k in range(len(n))] for j, n in enumerate(self.tree.names)]
        last = len(self.tree.ranks) - 1
        out = []
        for row, common in zip(self.taxa.tolist(), self.common_names):
            texts: list[str | None] = [None if k == MISSING else base[j][k] for j, k in enumerate(row)]
            deepest = max((j for j, k in enumerate(row) if k != MISSING), default=-1)
            if style == "taxonomic+common" and common and deepest == last:
                texts[deepest] = f"{texts[deepest]} with common name {common}"
            out.append([None if t is None else template.format(t) for t in texts])
        return out

    def label_texts(self, style: str, template: str) -> list[list[str]]:
        """Templated text of every taxon per rank (evaluation labels). ``taxonomic+common`` adds the
        first common name the table gives a most-specific taxon."""
        check_style(style)
        last = len(self.tree.ranks) - 1
        common: dict[int, str] = {}
        if style == "taxonomic+common":
            for k, name in zip(self.taxa[:, last].tolist(), self.common_names):
                if k != MISSING and name:
                    common.setdefault(k, name)
        out = []
        for j, names in enumerate(self.tree.names):
            texts = [self.tree.text(j, k, style.split("+")[0]) for k in range(len(names))]
            if j == last:
                texts = [f"{t} with common name {common[k]}" if k in common else t for k, t in enumerate(texts)]
            out.append([template.format(t) for t in texts])
        return out


def check_style(style: str) -> None:
    """Raise :class:`TaxonomyError` unless ``style`` is one of :data:`STYLES`."""
    if style not in STYLES:
        raise TaxonomyError(f"taxonomy label style must be one of {', '.join(STYLES)}; got {style!r}")


def read_table(path: Path) -> "pd.DataFrame":  # noqa: F821  (pandas imported lazily)
    """A CSV or Parquet file as a DataFrame of strings, empty cells as ``""``."""
    import pandas as pd

    if not path.is_file():
        raise TaxonomyError(f"{path}: no such taxonomy table (a CSV or Parquet file)")
    if str(path).lower().endswith(PARQUET_SUFFIXES):
        return pd.read_parquet(path).astype("string").fillna("").astype(str)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def looks_like_taxonomy(path: Path, ranks: Sequence[str]) -> bool:
    """Whether ``path`` is a table file whose header has a column for every rank (data.format=auto)."""
    suffix = str(path).lower()
    if not path.is_file() or not suffix.endswith((".csv", *PARQUET_SUFFIXES)):
        return False
    try:
        if suffix.endswith(PARQUET_SUFFIXES):
            import pyarrow.parquet as pq

            columns = pq.read_schema(path).names
        else:
            with path.open(encoding="utf-8", newline="") as fh:
                columns = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return all(any(c in columns for c in COLUMN_ALIASES.get(r, (r,))) for r in ranks)


def _rank_columns(columns: Sequence[str], ranks: Sequence[str], where: str) -> list[str]:
    found = []
    for rank in ranks:
        names = COLUMN_ALIASES.get(rank, (rank,))
        hit = next((c for c in names if c in columns), None)
        if hit is None:
            raise TaxonomyError(
                f"{where}: no column for rank {rank!r} (tried {', '.join(names)}; the table has {', '.join(columns)}); "
                "set taxonomy.ranks to the table's rank columns, general to specific"
            )
        found.append(hit)
    return found


def _binomial(names: list[str], ranks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(identity names, taxonomic words) of one row: a species epithet becomes ``Genus epithet``."""
    words = list(names)
    ids = list(names)
    if len(ranks) > 1 and ranks[-1] == "species" and ranks[-2] == "genus" and names[-1] and names[-2]:
        genus, species = names[-2], names[-1]
        if species.startswith(genus + " "):
            words[-1] = species[len(genus) + 1 :]
        else:
            ids[-1] = f"{genus} {species}"
    return ids, words


def read_taxonomy(
    path: Path | str,
    ranks: Sequence[str],
    image_column: str = "filepath",
    common_name_column: str = "common_name",
) -> TaxonomyTable:
    """Read and check a taxonomy table (module docstring). Raises :class:`TaxonomyError`."""
    path = Path(path)
    df = read_table(path)
    where = str(path)
    columns = _rank_columns(list(df.columns), ranks, where)
    has_images = image_column in df.columns
    cells = df[columns].apply(lambda c: c.str.strip()).to_numpy().tolist()
    refs = df[image_column].str.strip().tolist() if has_images else [""] * len(df)
    commons = df[common_name_column].str.strip().tolist() if common_name_column in df.columns else [""] * len(df)
    n_ranks = len(ranks)
    index: list[dict[str, int]] = [{} for _ in ranks]
    words: list[list[str]] = [[] for _ in ranks]
    parent: list[list[int]] = [[] for _ in ranks]
    parent_line: list[list[int]] = [[] for _ in ranks]
    taxa = np.full((len(cells), n_ranks), MISSING, dtype=np.int64)
    seen: dict[object, int] = {}
    for i, row in enumerate(cells):
        line = i + 2
        ids, row_words = _binomial(row, ranks)
        if not any(ids):
            raise TaxonomyError(f"{where}: line {line}: no rank is named; fill at least one of {', '.join(ranks)} or drop the row")
        for j in range(n_ranks):
            if not ids[j]:
                continue
            k = index[j].setdefault(ids[j], len(index[j]))
            if k == len(words[j]):
                words[j].append(row_words[j])
                parent[j].append(MISSING)
                parent_line[j].append(line)
            taxa[i, j] = k
            up = taxa[i, j - 1] if j > 0 else MISSING
            if up == MISSING:
                continue
            if parent[j][k] == MISSING:
                parent[j][k], parent_line[j][k] = int(up), line
            elif parent[j][k] != up:
                names_up = list(index[j - 1])
                raise TaxonomyError(
                    f"{where}: line {line}: {ranks[j]} {ids[j]!r} is under {ranks[j - 1]} {names_up[up]!r} here but under "
                    f"{names_up[parent[j][k]]!r} on line {parent_line[j][k]}; a taxon has one parent: correct the table "
                    "or give the two homonyms distinct names"
                )
        key: object = refs[i] if has_images else tuple(ids)
        if key in seen:
            what = f"image {refs[i]!r}" if has_images else f"taxon {' / '.join(x for x in ids if x)!r}"
            raise TaxonomyError(f"{where}: line {line}: duplicate {what}, first on line {seen[key]}; list each once")
        seen[key] = line
    tree = TaxonomyTree(tuple(ranks), [list(ix) for ix in index], words, [np.asarray(p, dtype=np.int64) for p in parent])
    return TaxonomyTable(tree, taxa, refs, commons, list(range(2, len(cells) + 2)), where)


def sample_hard_negatives(tree: TaxonomyTree, taxa: np.ndarray, seed: int) -> np.ndarray:
    """Per row and rank, a taxon that shares every rank above with the row's and differs at that rank.

    ``taxa``: (N, L) row taxa (-1 missing). Returns (N, L) negative taxon indices, -1 where the row
    lacks the rank or its taxon has no sibling. A sibling is another child of the same parent
    (another top-rank taxon at rank 0); one is drawn uniformly per row and rank with
    ``default_rng(seed)`` (one uniform number per row, rank after rank).
    """
    rng = np.random.default_rng(seed)
    out = np.full_like(taxa, MISSING)
    for j in range(len(tree.ranks)):
        n_taxa = len(tree.names[j])
        siblings = [[] for _ in range(n_taxa)]
        for p, group in tree.children(j).items():
            if j > 0 and p == MISSING:
                continue  # unknown parent: no negative provably shares the ranks above
            for k in group:
                siblings[k] = [s for s in group if s != k]
        count = np.array([len(x) for x in siblings], dtype=np.int64)
        table = np.full((n_taxa, max(1, int(count.max(initial=0)))), MISSING, dtype=np.int64)
        for k, sib in enumerate(siblings):
            table[k, : len(sib)] = sib
        draw = rng.random(len(taxa))
        rows = np.nonzero(taxa[:, j] != MISSING)[0]
        k = taxa[rows, j]
        has = count[k] > 0
        rows, k = rows[has], k[has]
        out[rows, j] = table[k, (draw[rows] * count[k]).astype(np.int64)]
    return out


@dataclass
class TaxonomyTrainData(TrainData):
    """:class:`finetune.data.TrainData` from a taxonomy table, plus its table and negative taxa."""

    table: TaxonomyTable | None = None
    negative_taxa: np.ndarray | None = None
    no_sibling: dict[str, int] | None = None  # per rank: rows whose negative is masked for want of a sibling


def taxonomy_train_data(
    source: str | Path,
    ranks: Sequence[str],
    image_column: str = "filepath",
    common_name_column: str = "common_name",
    style: str = "taxonomic",
    template: str = "a photo of {}.",
    root_text: str = "Eukarya",
    seed: int = 0,
    exclude_images_from: Sequence[str] = (),
    max_items: int | None = None,
) -> TaxonomyTrainData:
    """Train items from a taxonomy table: L rank texts (positive), L sibling negatives, and masks.

    Missing texts are ``""`` in the chains and ``False`` in ``mask`` (N, 2L): the positive ranks
    then the negative ranks. ``seed`` fixes the negatives. Images listed in
    ``exclude_images_from`` (release CSVs or dataset folders) are left out, by file name.
    ``root_text`` is the text whose embedding is the root (not templated).
    """
    check_style(style)
    table = read_taxonomy(source, ranks, image_column, common_name_column)
    if not any(table.image_refs):
        raise TaxonomyError(
            f"{source}: no image column {image_column!r}; training needs one image per row: set taxonomy.image_column"
        )
    negatives = sample_hard_negatives(table.tree, table.taxa, seed)
    rows = list(range(len(table.taxa)))
    excluded = excluded_names(exclude_images_from) if exclude_images_from else set()
    kept = [i for i in rows if not (excluded and image_name(table.image_refs[i]) in excluded)]
    dropped = len(rows) - len(kept)
    kept = kept[:max_items] if max_items is not None else kept
    if not kept:
        raise TaxonomyError(f"{source}: no train items left (rows: {len(rows)}, excluded: {dropped})")
    texts = table.rank_texts(style, template)
    labels = table.label_texts(style, template)
    positive = [[t or "" for t in texts[i]] for i in kept]
    negative = [[labels[j][k] if k != MISSING else "" for j, k in enumerate(negatives[i])] for i in kept]
    mask = np.concatenate([table.taxa[kept] != MISSING, negatives[kept] != MISSING], axis=1)
    no_sibling = {r: int(((table.taxa[kept, j] != MISSING) & (negatives[kept, j] == MISSING)).sum())
                  for j, r in enumerate(ranks)}
    unique, index = index_texts(positive, negative)
    return TaxonomyTrainData(
        ids=[f"line{table.lines[i]}" for i in kept], positive=positive, negative=negative,
        image_refs=[table.image_refs[i] for i in kept], source=str(source), texts=unique, index=index,
        excluded=dropped, levels=len(ranks), mask=mask, root_text=root_text, table=table, negative_taxa=negatives[kept],
        no_sibling=no_sibling,
    )


def taxonomy_image_paths(image_refs: Sequence[str], images_dir: str | Path) -> list[Path]:
    """Each row's image file: ``images_dir / ref`` (a path relative to the folder), or ``ref`` itself
    when that is an existing file. Raises :class:`TaxonomyError` naming the missing ones."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise TaxonomyError(f"data.images_dir: {folder} is not a folder; set it to the folder the image column is relative to")
    paths, missing = [], []
    for ref in image_refs:
        path = folder / ref
        if not path.is_file() and Path(ref).is_file():
            path = Path(ref)
        if not path.is_file():
            missing.append(ref)
        paths.append(path)
    if missing:
        raise TaxonomyError(
            f"data.images_dir: {len(missing)} image(s) of the taxonomy table are not under {folder}, e.g. {missing[:3]}; "
            "the image column holds paths relative to that folder"
        )
    return paths


def load_settings_data(settings: "FinetuneSettings") -> TrainData:
    """Train items of a run: a taxonomy table (``data.format=taxonomy``, or ``auto`` and the source is
    a table with a column per ``taxonomy.ranks``) or HierarCaps items (:func:`finetune.data.load_train_data`)."""
    data, tax = settings.data, settings.taxonomy
    fmt = data.format
    if fmt == "auto":
        fmt = "taxonomy" if looks_like_taxonomy(Path(data.source), tax.ranks) else "hierarcaps"
    if fmt == "hierarcaps":
        return load_train_data(data.source, data.split, data.exclude_images_from, data.max_items)
    return taxonomy_train_data(
        data.source, tax.ranks, tax.image_column, tax.common_name_column, tax.style, tax.template,
        tax.root_text, settings.run.seed, data.exclude_images_from, data.max_items,
    )
