"""What a review reads: the split of a build, a dataset folder or a release CSV; the sample; the images.

``hierarcaps review SOURCE`` takes a build's output folder (its ``final/dataset``), a
``DatasetDict`` folder (``save_to_disk``), or a release CSV (which is the split named by
``--split``). The review database lives beside the source unless ``--db`` names it:
``BUILD/review/<split>.sqlite`` for a build, ``<folder>.review-<split>.sqlite`` beside a dataset
folder or CSV.

An unfinished build (its final stage has no ``_SUCCESS``) is refused, as every other command does.

Images are found as evaluation finds them (:class:`hierarcaps.image_folder.ImageFolder`): when
``--images DIR`` was written by ``hierarcaps fetch-images`` (it holds the mapping
``images.parquet``), a reference is shown from its mapped file or tar member, and a failed
fetch is reported with its reason. In any other folder a reference is shown from the file with
its base name or the same COCO image id (the layout of the authors' ``test_imgs``). A reference
that is itself a local image path (relative to the source's folder) is shown as is. Otherwise
the page says the image is not available locally.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hierarcaps.formats import (
    BUILD_FINAL, UnfinishedBuildError, find_build_dataset, is_release_csv_path, load_dataset_folder, read_release_csv,
)
from hierarcaps.image_folder import FetchError, ImageFolder, ImageLocation, local_image
from hierarcaps.review.store import ReviewError, ReviewStore
from hierarcaps.schema import SchemaError, release_to_rows

FINAL_DATASET = Path(BUILD_FINAL) / "dataset"


@dataclass(frozen=True)
class ReviewSource:
    """A resolved review source: what it is, where the split's rows come from, the default database."""

    path: Path
    kind: str  # "build", "dataset" or "csv"
    split: str

    @property
    def build_dir(self) -> Path | None:
        """The build's output folder (whose card and manifest record the review), else ``None``."""
        return self.path if self.kind == "build" else None

    def default_db(self) -> Path:
        if self.kind == "build":
            return self.path / "review" / f"{self.split}.sqlite"
        return self.path.with_name(f"{self.path.name}.review-{self.split}.sqlite")


def resolve_source(path: str | Path, split: str) -> ReviewSource:
    """Classify ``path`` as a build folder (``OUT`` or ``OUT/final``), a dataset folder or a release CSV;
    raise on anything else, and on an unfinished build."""
    path = Path(path)
    try:
        dataset = find_build_dataset(path) if path.is_dir() else None
    except UnfinishedBuildError as err:
        raise ReviewError(str(err)) from None
    if dataset is not None and dataset.parent.name == BUILD_FINAL:
        return ReviewSource(dataset.parent.parent, "build", split)
    if dataset is not None:
        return ReviewSource(dataset, "dataset", split)
    if path.is_dir():
        return ReviewSource(path, "dataset", split)
    if path.is_file() and is_release_csv_path(path):
        return ReviewSource(path, "csv", split)
    if not path.exists():
        raise ReviewError(f"{path}: no such build, dataset folder or release CSV")
    raise ReviewError(f"{path}: not a build folder, a dataset folder or a release CSV (.csv, .csv.gz)")


def load_rows(source: ReviewSource) -> list[dict[str, Any]]:
    """The schema rows of the source's split; a missing split is a :class:`ReviewError` naming those present."""
    try:
        if source.kind == "csv":
            return list(release_to_rows(read_release_csv(source.path)))
        folder = source.path / FINAL_DATASET if source.kind == "build" else source.path
        splits = load_dataset_folder(folder)
    except SchemaError as err:
        raise ReviewError(str(err)) from None
    if source.split not in splits:
        raise ReviewError(f"{folder}: has no split {source.split!r}; it has {sorted(splits)}; pass --split with one of them")
    return list(splits[source.split])


def sample_positions(n_rows: int, sample: int | None, seed: int) -> list[int]:
    """Row indices to review: all rows, or ``sample`` of them drawn with ``random.Random(seed)``, in row order."""
    if sample is None:
        return list(range(n_rows))
    if not 1 <= sample <= n_rows:
        raise ReviewError(f"--sample {sample}: the split has {n_rows} items; pick 1..{n_rows} or leave --sample out")
    return sorted(random.Random(seed).sample(range(n_rows), sample))


class ImageIndex:
    """Maps image references to local images: through ``images_dir`` (:class:`hierarcaps.image_folder.ImageFolder`)
    when given, else only references that are local image paths (relative to ``base_dir``)."""

    def __init__(self, images_dir: Path | None, base_dir: Path | None = None):
        self.base_dir = base_dir
        self.folder: ImageFolder | None = None
        if images_dir is None:
            return
        if not Path(images_dir).is_dir():
            raise ReviewError(f"--images {images_dir}: no such folder")
        try:
            self.folder = ImageFolder(images_dir, base_dir)
        except FetchError as err:
            raise ReviewError(str(err)) from None

    def missing_reason(self, ref: str) -> str:
        """Why a reference has no local image (for the page)."""
        reason = self.folder.failure(ref) if self.folder is not None else None
        if reason is not None:
            return f"fetch-images could not fetch it ({reason})"
        return "not available locally (pass --images DIR)"

    def find(self, ref: str) -> ImageLocation | None:
        """The local file (or tar member) of an image reference, or ``None``."""
        return self.folder.find(ref) if self.folder is not None else local_image(ref, self.base_dir)


def open_review(source: ReviewSource, db: Path | None, sample: int | None, seed: int) -> ReviewStore:
    """Open the review database of ``source`` (creating it with the sampled items on first use).

    An existing database must have been started for the same source, split and sample, so a
    changed ``--sample`` or ``--seed`` cannot silently mix two samples' verdicts.
    """
    db = Path(db) if db is not None else source.default_db()
    meta = {"source": str(source.path.resolve()), "kind": source.kind, "split": source.split,
            "sample": sample, "seed": seed}
    if db.is_file():
        store = ReviewStore(db)
        started = {k: store.meta.get(k) for k in ("split", "sample", "seed")}
        asked = {k: meta[k] for k in started}
        if started != asked:
            raise ReviewError(
                f"{db}: this review was started with {_describe(started)}, not {_describe(asked)}; "
                "repeat those options to continue it, or pass --db with a new file to start another"
            )
        return store
    rows = load_rows(source)
    chosen = [rows[i] for i in sample_positions(len(rows), sample, seed)]
    if not chosen:
        raise ReviewError(f"{source.path}: split {source.split!r} is empty; nothing to review")
    return ReviewStore.create(db, chosen, meta)


def _describe(options: dict[str, Any]) -> str:
    sample = "all items" if options["sample"] is None else f"--sample {options['sample']} --seed {options['seed']}"
    return f"--split {options['split']} {sample}"
