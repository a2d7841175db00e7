"""Where the images of a dataset lie: a fetch-images folder or a folder of image files.

Every reader of images (evaluation with ``hierarcaps-eval --images``, training with
``data.images_dir``, the review page) finds them here. :class:`ImageFolder` maps image references
to stored images: in a ``hierarcaps fetch-images`` folder through its mapping ``images.parquet``
(a file, or a member of a webdataset tar shard: :class:`TarMember`; a failed fetch keeps its
reason), in any other folder by file name or COCO image id, as the authors' evaluator matches
their ``test_imgs``. :func:`open_image` reads either kind of location.

Only the standard library and Pillow are imported here (pyarrow when a mapping is read), so
commands that read images start without pandas; writing the mapping is :mod:`hierarcaps.images`.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

MAPPING_FILE = "images.parquet"
REPORT_FILE = "fetch_report.json"
OK = "ok"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# COCO image ids in file names: COCO_val2014_000000301718.jpg (2014 release) or 000000301718.jpg (2017).
_COCO_ID = re.compile(r"COCO_[a-z0-9]+_0*(\d+)\.|^(\d{12})\.", re.IGNORECASE)
_EXAMPLES_IN_ERRORS = 3


class FetchError(ValueError):
    """The source, the output folder or the settings cannot be used; the message says which and why."""


@dataclass(frozen=True)
class TarMember:
    """An image stored inside a webdataset tar shard, at a byte offset."""

    tar: Path
    offset: int
    size: int


ImageLocation = Path | TarMember


@dataclass(frozen=True)
class FetchedImage:
    """One row of the mapping: the status of a reference and, when ``ok``, where its image is."""

    status: str
    location: ImageLocation | None


def is_fetched_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a fetch-images mapping."""
    return (Path(folder) / MAPPING_FILE).is_file()


def load_image_map(folder: str | Path) -> dict[str, FetchedImage]:
    """image_ref -> :class:`FetchedImage` from ``folder/images.parquet`` (absolute locations)."""
    folder = Path(folder).resolve()
    import pyarrow.parquet as pq  # only fetch-images folders need it (pyarrow takes a while to import)

    try:
        table = pq.read_table(folder / MAPPING_FILE, columns=["image_ref", "status", "path", "offset", "size"]).to_pydict()
    except (OSError, ValueError, KeyError) as err:
        raise FetchError(f"{folder / MAPPING_FILE}: not a fetch-images mapping ({err}); rerun hierarcaps fetch-images") from None
    images = {}
    for ref, status, path, offset, size in zip(*(table[c] for c in ("image_ref", "status", "path", "offset", "size"))):
        location: ImageLocation | None = None
        if status == OK:
            location = folder / path if offset is None else TarMember(folder / path, int(offset), int(size))
        images[ref] = FetchedImage(status, location)
    return images


def read_tar_member(member: TarMember) -> bytes:
    """The stored bytes of an image inside a webdataset tar shard (the file as fetched)."""
    with open(member.tar, "rb") as fh:
        fh.seek(member.offset)
        return fh.read(member.size)


def open_image(location: ImageLocation, draft_size: int | None = None) -> Image.Image:
    """An RGB image (COCO holds a few greyscale ones) from a file or a member of a webdataset tar shard.

    ``draft_size``: decode a JPEG at the smallest built-in scale (1/2, 1/4, 1/8) that keeps both
    sides >= ``draft_size`` pixels. Much faster for small model inputs, but the pixels differ
    slightly from a full decode, so it is off by default (exact released behaviour).
    """
    source = io.BytesIO(read_tar_member(location)) if isinstance(location, TarMember) else location
    with Image.open(source) as img:
        if draft_size:
            img.draft("RGB", (draft_size, draft_size))
        return img.convert("RGB")


# ----------------------------------------------------------------------------- finding the image of a reference


class MissingImagesError(FileNotFoundError):
    """Image references without a usable image in an images folder; the message says how many, why and what to do."""


def coco_image_id(name: str) -> int | None:
    """The COCO image id of a file name (``COCO_val2014_000000301718.jpg`` or ``000000301718.jpg``), else None."""
    match = _COCO_ID.search(name)
    return int(match.group(1) or match.group(2)) if match else None


def local_image(ref: str, base_dir: Path | None = None) -> Path | None:
    """``ref`` itself when it is the path of a local image file (relative to ``base_dir``, else to the
    working folder), else None. Only image suffixes count, so a reference never opens another file."""
    if not ref or "://" in ref:
        return None
    path = Path(ref)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() else None


class ImageFolder:
    """Where the image of each reference lies in ``folder``, for everything that reads images.

    A fetch-images folder (:func:`is_fetched_folder`): the mapping's file or tar member; a failed
    fetch has its reason (:meth:`failure`). Any other folder: the image file directly inside it
    with the reference's base name or, failing that, the same COCO image id (as the authors'
    evaluator matches their ``test_imgs``). Either way a reference that is itself a local image
    path is used as is (relative to ``base_dir``), unless the mapping holds a fetched image or a
    fetch failure for it. Raises :class:`MissingImagesError` when ``folder`` is no folder and
    :class:`FetchError` for an unreadable mapping.
    """

    def __init__(self, folder: str | Path, base_dir: Path | None = None) -> None:
        self.folder, self.base_dir = Path(folder), base_dir
        if not self.folder.is_dir():
            raise MissingImagesError(
                f"images folder {self.folder} does not exist; give a folder of image files or a hierarcaps fetch-images folder"
            )
        self.fetched = load_image_map(self.folder) if is_fetched_folder(self.folder) else None
        self.by_name: dict[str, Path] = {}
        self.by_coco_id: dict[int, Path] = {}
        if self.fetched is None:
            for path in sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                self.by_name.setdefault(path.name, path)
                coco_id = coco_image_id(path.name)
                if coco_id is not None:
                    self.by_coco_id.setdefault(coco_id, path)

    def find(self, ref: str) -> ImageLocation | None:
        """The stored image of ``ref`` (a file or a tar member), or None."""
        if self.fetched is not None:
            image = self.fetched.get(ref)
            if image is not None and image.status == OK:
                return image.location
            if image is not None and image.status != "not_a_url":
                return None
        else:
            name = ref.rstrip("/").rsplit("/", 1)[-1]
            coco_id = coco_image_id(name)
            found = self.by_name.get(name) or (self.by_coco_id.get(coco_id) if coco_id is not None else None)
            if found is not None:
                return found
        return local_image(ref, self.base_dir)

    def failure(self, ref: str) -> str | None:
        """Why fetch-images could not fetch ``ref`` (a failure reason), or None."""
        image = self.fetched.get(ref) if self.fetched is not None else None
        return image.status if image is not None and image.status != OK else None

    def resolve(self, refs: Sequence[str]) -> list[ImageLocation]:
        """The stored image of every reference, in order.

        Raises :class:`MissingImagesError` naming the references without one and what to do:
        metrics are over every row, so a reference cannot simply be skipped.
        """
        found = [self.find(ref) for ref in refs]
        lost = {ref: self.failure(ref) for ref, location in zip(refs, found) if location is None}
        missing = [ref for ref, reason in lost.items() if reason is None]
        failed = Counter(reason for reason in lost.values() if reason is not None)
        if missing:
            raise MissingImagesError(self._missing_message(missing))
        if failed:
            raise MissingImagesError(
                f"{sum(failed.values())} of {len(refs)} image reference(s) failed to fetch into {self.folder} "
                f"({', '.join(f'{reason}: {n}' for reason, n in sorted(failed.items()))}), "
                f"e.g. {list(lost)[:_EXAMPLES_IN_ERRORS]}; every image is needed: rerun hierarcaps fetch-images "
                f"{self._fetch_source()} --output {self.folder} --retry-failed, or pass --images with a folder "
                "holding all of them"
            )
        return [location for location in found if location is not None]

    def _missing_message(self, missing: list[str]) -> str:
        """The error for references that have no image and no fetch failure."""
        examples = missing[:_EXAMPLES_IN_ERRORS]
        if self.fetched is not None:
            return (
                f"{len(missing)} image reference(s) are not in {self.folder / MAPPING_FILE}, e.g. {examples}; "
                f"it was fetched for another source: run hierarcaps fetch-images SOURCE --output {self.folder} "
                "with this one"
            )
        return (
            f"{len(missing)} image reference(s) have no file in {self.folder}, e.g. {examples}; download those "
            "images into that folder (file names as in the URLs) or fetch them with hierarcaps fetch-images"
        )

    def _fetch_source(self) -> str:
        """The source the folder was fetched from (its report), or ``SOURCE``."""
        try:
            return str(json.loads((self.folder / REPORT_FILE).read_text(encoding="utf-8"))["source"])
        except (OSError, ValueError, KeyError, TypeError):
            return "SOURCE"


def resolve_image_refs(refs: Sequence[str], folder: str | Path) -> list[ImageLocation]:
    """The stored image of each reference in ``folder`` (:meth:`ImageFolder.resolve`)."""
    return ImageFolder(folder).resolve(refs)
