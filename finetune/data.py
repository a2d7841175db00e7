"""Train items for alignment: loading, test-image exclusion, unique texts and images.

A source is one of

* a ``DatasetDict`` folder in the hierarcaps schema (the ``dataset`` folder that
  ``build-hierarcaps`` writes, or ``hierarcaps convert`` output); a single-``Dataset`` folder is
  its ``train`` split;
* a ``build-hierarcaps`` output folder ``OUT`` or its ``OUT/final``: the finished build's
  ``OUT/final/dataset`` (:func:`build_dataset_dir`);
* an authors' release CSV (``positive,negative,image_url``, tiers joined by ``" => "``; read with
  :mod:`hierarcaps.formats`);
* a Hugging Face Hub dataset id, in the hierarcaps schema or the release layout.

Every train item needs four positive and four negative tiers. SPEC section 5: the expanded
test release shares 4,709 rows' images with the curated test set; ``exclude_images_from`` lists
sources whose images must not be trained on (matched by file name of the image reference).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from datasets import Dataset, Value

from hierarcaps.formats import (
    BUILD_FINAL, CSV_SUFFIXES, UnfinishedBuildError, find_build_dataset, load_dataset_folder, read_release_csv,
)
from hierarcaps.hierarchy import N_TIERS
from hierarcaps.image_folder import (
    MAPPING_FILE,
    OK,
    FetchError,
    ImageLocation,
    is_fetched_folder,
    load_image_map,
    resolve_image_refs,
)
from hierarcaps.manifest import MANIFEST
from hierarcaps.schema import SchemaError, release_layout, release_to_rows

TEXTS_PER_ITEM = 2 * N_TIERS  # P1..P4 then N1..N4
#: Files ``save_to_disk`` writes at the top of a ``DatasetDict`` / ``Dataset`` folder.
_DATASET_MARKERS = ("dataset_dict.json", "dataset_info.json")


class TrainDataError(ValueError):
    """A train source cannot be used; the message names the source, split or row and what to do."""


@dataclass
class TrainData:
    """Train items as parallel lists; ``texts[index[j, k]]`` is text k (P1..PL, N1..NL) of item j."""

    ids: list[str]
    positive: list[list[str]]  # (N, 4)
    negative: list[list[str]]  # (N, 4)
    image_refs: list[str]
    source: str
    texts: list[str] = field(default_factory=list)  # unique texts, first-seen order
    index: np.ndarray = field(default_factory=lambda: np.zeros((0, TEXTS_PER_ITEM), dtype=np.int64))  # (N, 8)
    excluded: int = 0  # items left out because their image is in an excluded (test) source
    levels: int = N_TIERS  # chain length L: 4 tiers, or the ranks of a taxonomy (finetune.taxonomy_data)
    mask: np.ndarray | None = None  # (N, 2L) bool: which of P1..PL, N1..NL exist; None = all
    root_text: str = ""  # the root's text: "" (HierarCaps) or taxonomy.root_text ("Eukarya")

    def __len__(self) -> int:
        return len(self.ids)


def _is_csv(path: Path) -> bool:
    return path.is_file() and str(path).lower().endswith(CSV_SUFFIXES)


def _build_dataset(folder: Path) -> Path | None:
    """:func:`hierarcaps.formats.find_build_dataset`, an unfinished build as a :class:`TrainDataError`."""
    try:
        return find_build_dataset(folder)
    except UnfinishedBuildError as err:
        raise TrainDataError(str(err)) from None


def build_dataset_dir(build_output_dir: Path) -> Path:
    """The ``DatasetDict`` folder of a finished build: ``OUT/final/dataset`` (``OUT`` or ``OUT/final`` given)."""
    found = _build_dataset(Path(build_output_dir))
    if found is None:
        raise TrainDataError(
            f"{build_output_dir}: no {BUILD_FINAL}/dataset folder; give the --output-dir of a finished build-hierarcaps run"
        )
    return found


def dataset_folder(path: Path) -> Path:
    """``path`` itself when ``save_to_disk`` wrote it, else the dataset of the build output ``path``."""
    if any((path / marker).is_file() for marker in _DATASET_MARKERS):
        return path
    found = _build_dataset(path)
    if found is None:
        raise TrainDataError(
            f"{path}: neither a dataset folder (save_to_disk) nor a build-hierarcaps output folder with "
            f"{BUILD_FINAL}/dataset; give a finished build's --output-dir, its {BUILD_FINAL}/dataset, or a release CSV"
        )
    return found


def plumbing_check_warning(source: str) -> str | None:
    """A warning when ``source`` is a build made as a plumbing check (smoke profile), else ``None``.

    Read from the build's ``manifest.json`` (``plumbing_check: true``) beside its dataset folder.
    """
    path = Path(source)
    if not path.is_dir():
        return None
    manifest = dataset_folder(path).parent / MANIFEST
    if not manifest.is_file() or not json.loads(manifest.read_text(encoding="utf-8")).get("plumbing_check"):
        return None
    return (
        f"{source}: this build is a plumbing check (smoke profile; {manifest} has plumbing_check: true); "
        "its captions are not usable data, so the trained model checks the plumbing only"
    )


def _to_schema(table: Dataset, origin: str) -> Dataset:
    """Schema rows from a table that is either in the hierarcaps schema or a release layout."""
    if "positive" in table.column_names and not isinstance(table.features["positive"], Value):
        return table  # already schema rows (positive is a sequence of tiers, not one release text)
    try:
        release_layout(table.column_names, where=origin)
    except ValueError as err:
        raise TrainDataError(f"{origin}: neither hierarcaps schema rows nor a release table ({err})") from None
    return release_to_rows(table)


def load_rows(source: str, split: str = "train") -> Dataset:
    """Schema rows of ``split`` from a dataset or build folder, a release CSV or a Hub dataset id.

    Raises :class:`TrainDataError` (one line naming the file, and the line where there is one).
    """
    try:
        return _load_rows(source, split)
    except SchemaError as err:  # a bad release CSV or dataset folder; the message names file and line
        raise TrainDataError(str(err)) from None


def _load_rows(source: str, split: str) -> Dataset:
    path = Path(source)
    if _is_csv(path):
        return release_to_rows(read_release_csv(path))
    if path.is_dir():
        path = dataset_folder(path)
        splits = load_dataset_folder(path)
        if split not in splits:
            raise TrainDataError(f"{path}: no split {split!r} (has {', '.join(splits)}); set data.split")
        return _to_schema(splits[split], f"{path} split {split}")
    if path.exists():
        raise TrainDataError(f"{path}: not a dataset folder or a release CSV ({', '.join(CSV_SUFFIXES)})")
    if source.count("/") != 1:
        raise TrainDataError(f"{source}: no such file or folder, and not a Hub dataset id (org/name)")
    from datasets import load_dataset

    try:
        table = load_dataset(source, split=split)
    except Exception as err:  # hub errors come in many types; the message carries the cause
        raise TrainDataError(
            f"cannot load Hub dataset {source!r} split {split!r}: {type(err).__name__}: {err}. "
            "Check the id and the network, or give a local folder or release CSV."
        ) from err
    return _to_schema(table, f"Hub dataset {source} split {split}")


def image_name(ref: str) -> str:
    """File name of an image reference (URL, path or bare name)."""
    return ref.rstrip("/").rsplit("/", 1)[-1]


def excluded_names(sources: Sequence[str]) -> set[str]:
    """Image file names of every split of every source (release CSV or dataset folder)."""
    names: set[str] = set()
    for source in sources:
        path = Path(source)
        if not (_is_csv(path) or path.is_dir()):
            raise TrainDataError(f"data.exclude_images_from: {source}: no such release CSV or dataset folder")
        try:
            if _is_csv(path):
                tables = [release_to_rows(read_release_csv(path))]
            else:
                tables = list(load_dataset_folder(dataset_folder(path)).values())
        except (SchemaError, TrainDataError) as err:
            raise TrainDataError(f"data.exclude_images_from: {err}") from None
        for table in tables:
            names.update(image_name(r) for r in table["image_ref"] if r)
    return names


def index_texts(positive: list[list[str]], negative: list[list[str]]) -> tuple[list[str], np.ndarray]:
    """Unique texts (first-seen order) and the (N, 2L) index of every item's P1..PL, N1..NL in them."""
    lookup: dict[str, int] = {}
    width = len(positive[0]) + len(negative[0]) if positive else TEXTS_PER_ITEM
    index = np.empty((len(positive), width), dtype=np.int64)
    for j, (pos, neg) in enumerate(zip(positive, negative)):
        for k, text in enumerate([*pos, *neg]):
            index[j, k] = lookup.setdefault(text, len(lookup))
    return list(lookup), index


def load_train_data(
    source: str,
    split: str = "train",
    exclude_images_from: Sequence[str] = (),
    max_items: int | None = None,
) -> TrainData:
    """Train items of ``source`` (see the module docstring), checked, test images removed.

    Raises :class:`TrainDataError` naming the row when an item lacks four positive or negative tiers.
    """
    rows = load_rows(source, split)
    excluded = excluded_names(exclude_images_from) if exclude_images_from else set()
    ids, positive, negative, refs = [], [], [], []
    dropped = 0
    for i, (id_, pos, neg, ref) in enumerate(zip(rows["id"], rows["positive"], rows["negative"], rows["image_ref"])):
        if len(pos) != N_TIERS or len(neg) != N_TIERS:
            raise TrainDataError(
                f"{source} split {split} row {i} (id {id_!r}): {len(pos)} positive and {len(neg)} negative tiers; "
                f"training needs {N_TIERS} of each (a train split; test splits carry no negatives)"
            )
        if excluded and image_name(ref) in excluded:
            dropped += 1
            continue
        ids.append(str(id_))
        positive.append(list(pos))
        negative.append(list(neg))
        refs.append(ref)
        if max_items is not None and len(ids) == max_items:
            break
    if not ids:
        raise TrainDataError(f"{source} split {split}: no train items left (rows: {rows.num_rows}, excluded: {dropped})")
    texts, index = index_texts(positive, negative)
    return TrainData(ids, positive, negative, refs, source, texts, index, dropped)


def resolve_images(data: TrainData, images_dir: str | Path) -> list[ImageLocation]:
    """The image file of every item: its reference's file name (or COCO id) inside ``images_dir``
    (:func:`hierarcaps.image_folder.resolve_image_refs`).

    Raises :class:`TrainDataError` naming the missing images and the folder.
    """
    try:
        return resolve_image_refs(data.image_refs, images_dir)
    except FileNotFoundError as err:
        raise TrainDataError(f"data.images_dir: {err}") from None


def images_for_training(data: TrainData, images_dir: str | Path) -> tuple[TrainData, list[ImageLocation], dict[str, int]]:
    """The items that have an image, their image locations, and the skipped items per reason.

    ``images_dir`` written by ``hierarcaps fetch-images`` (it holds ``images.parquet``): items whose
    image failed to download are skipped (counted per failure reason; ``no_image_ref`` for items
    without a reference). Any other folder: every item's image must be in it (:func:`resolve_images`).
    Raises :class:`TrainDataError` when a reference is not in the mapping or no item is left.
    """
    if not is_fetched_folder(images_dir):
        return data, list(resolve_images(data, images_dir)), {}
    try:
        fetched = load_image_map(images_dir)
    except FetchError as err:
        raise TrainDataError(f"data.images_dir: {err}") from None
    unknown = [ref for ref in data.image_refs if ref and ref not in fetched]
    if unknown:
        raise TrainDataError(
            f"data.images_dir: {len(unknown)} image reference(s) of {data.source} are not in {Path(images_dir) / MAPPING_FILE}, "
            f"e.g. {unknown[:3]}; run hierarcaps fetch-images {data.source} --output {images_dir}"
        )
    keep, skipped = [], Counter()
    for j, ref in enumerate(data.image_refs):
        status = fetched[ref].status if ref else "no_image_ref"
        if status == OK:
            keep.append(j)
        else:
            skipped[status] += 1
    if not keep:
        raise TrainDataError(f"data.images_dir: no item of {data.source} has a fetched image in {images_dir} (skipped: {dict(skipped)})")
    kept = TrainData(
        [data.ids[j] for j in keep], [data.positive[j] for j in keep], [data.negative[j] for j in keep],
        [data.image_refs[j] for j in keep], data.source, excluded=data.excluded,
    )
    kept.texts, kept.index = index_texts(kept.positive, kept.negative)
    return kept, [fetched[ref].location for ref in kept.image_refs], dict(sorted(skipped.items()))
