"""Caption sources: the first stage of a build (SPEC section 2, step 1).

The paper takes train captions from Conceptual Captions and test captions from COCO val, and keeps
those with at least ten words. :func:`iter_captions` reads one source file and yields
:class:`CaptionRow` s, one caption at a time:

========== ================================================ ======================
format     file                                             ``image_ref``
========== ================================================ ======================
cc_tsv     ``caption<TAB>url`` per line, no header          the URL
coco_json  COCO captions annotations (``images``,           ``coco_url``, else
           ``annotations`` with ``image_id``, ``caption``)  ``file_name``
text       one caption per line                             ``""``
csv        header line; the caption column is named         the image column's
           by ``column`` (optional ``image_column``)        value, else ``""``
========== ================================================ ======================

Files ending ``.gz`` are decompressed on the fly. Every caption's whitespace is collapsed to
single spaces. Rows are dropped and counted in :class:`~hierarcaps.stats.StageStats` by reason:
``empty`` (nothing left after normalisation), ``too_short`` (fewer than ``min_words`` words),
``duplicate`` (same text as an earlier caption, ignoring case), ``malformed`` (a broken row in a
file that is otherwise of the declared format, e.g. a TSV line with an extra field, a CSV record
with the wrong number of fields, a COCO annotation without a caption or with an unknown image).

A file that is not of the declared format at all -- a TSV line without a tab, binary bytes or
invalid UTF-8, JSON without ``annotations``, a CSV without the named column -- raises
:class:`SourceFormatError` naming the file and the line.

Memory: text formats are read line by line, so a file larger than memory works. De-duplication
keeps one 64-bit hash per distinct caption (about 70 bytes each, 230 MB for the 3.3M
Conceptual Captions), and two different captions collide with probability about n^2 / 2^65.
A COCO annotation file is one JSON document, which is parsed whole: the captions files are small
(``captions_val2014.json`` is about 20 MB, ``captions_train2014.json`` about 80 MB).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.resources
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from hierarcaps.hierarchy import normalize_text
from hierarcaps.schema import SOURCE_COCO, SOURCE_CONCEPTUAL_CAPTIONS
from hierarcaps.stats import StageStats

SourceFormat = Literal["cc_tsv", "coco_json", "text", "csv"]
FORMATS: tuple[str, ...] = ("cc_tsv", "coco_json", "text", "csv")
DEFAULT_MIN_WORDS = 10

EMPTY = "empty"
TOO_SHORT = "too_short"
DUPLICATE = "duplicate"
MALFORMED = "malformed"


class SourceFormatError(ValueError):
    """A caption source file is not of its declared format; the message names file and line."""


@dataclass(frozen=True)
class CaptionRow:
    """One kept caption: the text (whitespace-normalised), its image URL or id, its source name."""

    caption: str
    image_ref: str
    source: str


@dataclass(frozen=True)
class _Raw:
    """A record as read from the file, before filtering; ``caption`` None marks it malformed."""

    caption: str | None
    image_ref: str


def demo_source(name: str) -> Path:
    """Path of a shipped demo input (``cc_captions.tsv``, ``coco_captions.json``) for the smoke profile."""
    path = Path(str(importlib.resources.files("hierarcaps.resources") / "demo" / name))
    if not path.is_file():
        raise FileNotFoundError(f"no demo source {name!r} in {path.parent}; shipped: cc_captions.tsv, coco_captions.json")
    return path


def _binary_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as handle:
        yield from handle


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, text without line end)``; binary or non-UTF-8 lines raise."""
    for number, raw in enumerate(_binary_lines(path), start=1):
        if b"\x00" in raw:
            raise SourceFormatError(f"{path}: line {number}: binary data (NUL byte); expected a text file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SourceFormatError(f"{path}: line {number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if number == 1:
            text = text.removeprefix("\ufeff")
        yield number, text.rstrip("\r\n")


def _read_cc_tsv(path: Path) -> Iterator[_Raw]:
    for number, line in _text_lines(path):
        if not line.strip():
            yield _Raw("", "")
            continue
        fields = line.split("\t")
        if len(fields) == 1:
            raise SourceFormatError(
                f"{path}: line {number}: no tab; a Conceptual Captions TSV line is 'caption<TAB>url' (no header)"
            )
        if len(fields) != 2 or not fields[1].strip():
            yield _Raw(None, "")
            continue
        yield _Raw(fields[0], fields[1].strip())


def _read_text(path: Path) -> Iterator[_Raw]:
    for _, line in _text_lines(path):
        yield _Raw(line, "")


def _read_csv(path: Path, column: str | None, image_column: str | None) -> Iterator[_Raw]:
    if not column:
        raise SourceFormatError(f"{path}: format 'csv' needs the caption column's name (column=...)")
    lines = (line + "\n" for _, line in _text_lines(path))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None:
            raise SourceFormatError(f"{path}: line 1: empty file; expected a header naming column {column!r}")
        for wanted in filter(None, (column, image_column)):
            if wanted not in header:
                raise SourceFormatError(f"{path}: line 1: no column {wanted!r}; the header has {header}")
        caption_at = header.index(column)
        image_at = header.index(image_column) if image_column else None
        for fields in reader:
            if len(fields) != len(header):
                yield _Raw(None if fields else "", "")
                continue
            yield _Raw(fields[caption_at], fields[image_at].strip() if image_at is not None else "")
    except csv.Error as err:
        raise SourceFormatError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None


def _read_coco_json(path: Path) -> Iterator[_Raw]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = json.load(handle)
    except UnicodeDecodeError as err:
        raise SourceFormatError(f"{path}: not UTF-8 JSON ({err.reason}); expected a COCO captions file") from None
    except json.JSONDecodeError as err:
        raise SourceFormatError(
            f"{path}: line {err.lineno}, column {err.colno}: not JSON ({err.msg}); expected a COCO captions file"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise SourceFormatError(
            f"{path}: no 'annotations' list (found {keys}); expected a COCO captions file with 'images' and 'annotations'"
        )
    images = {image.get("id"): image for image in data.get("images", []) if isinstance(image, dict)}
    for annotation in data["annotations"]:
        yield _coco_raw(annotation, images)


def _coco_raw(annotation: Any, images: dict[Any, dict[str, Any]]) -> _Raw:
    """One annotation's record; without an ``images`` list the image id is the reference."""
    if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str):
        return _Raw(None, "")
    image_id = annotation.get("image_id")
    if image_id is None or (images and image_id not in images):
        return _Raw(None, "")
    image = images.get(image_id, {})
    ref = image.get("coco_url") or image.get("file_name") or str(image_id)
    return _Raw(annotation["caption"], str(ref))


def _default_source(path: Path, fmt: str) -> str:
    if fmt == "cc_tsv":
        return SOURCE_CONCEPTUAL_CAPTIONS
    if fmt == "coco_json":
        return SOURCE_COCO
    return path.name.split(".")[0]


def caption_key(caption: str) -> int:
    """The de-duplication key of a normalised caption: a 64-bit hash of its lowercase text."""
    return int.from_bytes(hashlib.blake2b(caption.lower().encode("utf-8"), digest_size=8).digest(), "little")


def iter_captions(
    path: str | Path,
    fmt: SourceFormat,
    *,
    column: str | None = None,
    image_column: str | None = None,
    min_words: int = DEFAULT_MIN_WORDS,
    dedup: bool = True,
    source: str | None = None,
    stats: StageStats | None = None,
) -> Iterator[CaptionRow]:
    """Stream the kept captions of one source file, counting every dropped row by reason.

    ``fmt`` is one of :data:`FORMATS`; ``column`` / ``image_column`` name the CSV columns;
    ``source`` overrides the row's source name (default ``conceptual_captions``, ``coco``, or
    the file's stem). ``stats.items_in`` counts every record read, ``stats.kept`` every row
    yielded. Errors about the file itself are raised when iteration reaches them.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown caption source format {fmt!r}; expected one of {list(FORMATS)}")
    if min_words < 0:
        raise ValueError(f"min_words must be >= 0, got {min_words}")
    if not path.is_file():
        raise SourceFormatError(f"{path}: no such file")
    stats = stats if stats is not None else StageStats(stage="captions")
    source = source or _default_source(path, fmt)
    if fmt == "cc_tsv":
        raws = _read_cc_tsv(path)
    elif fmt == "coco_json":
        raws = _read_coco_json(path)
    elif fmt == "text":
        raws = _read_text(path)
    else:
        raws = _read_csv(path, column, image_column)
    seen: set[int] = set()
    for raw in raws:
        stats.items_in += 1
        if raw.caption is None:
            stats.reject(MALFORMED)
            continue
        caption = normalize_text(raw.caption)
        if not caption:
            stats.reject(EMPTY)
            continue
        if len(caption.split(" ")) < min_words:
            stats.reject(TOO_SHORT)
            continue
        if dedup:
            key = caption_key(caption)
            if key in seen:
                stats.reject(DUPLICATE)
                continue
            seen.add(key)
        stats.kept += 1
        yield CaptionRow(caption=caption, image_ref=raw.image_ref, source=source)


def sample_captions(rows: Iterable[CaptionRow], n: int, seed: int) -> list[CaptionRow]:
    """A uniform sample of ``n`` rows from a stream of unknown length, deterministic in ``seed``.

    Reservoir sampling (Vitter's algorithm R) holds only ``n`` rows; the sample is returned in
    stream order. Fewer than ``n`` rows in the stream gives all of them.
    """
    if n < 0:
        raise ValueError(f"sample size must be >= 0, got {n}")
    rng = random.Random(seed)
    reservoir: list[tuple[int, CaptionRow]] = []
    for index, row in enumerate(rows):
        if index < n:
            reservoir.append((index, row))
            continue
        slot = rng.randrange(index + 1)
        if slot < n:
            reservoir[slot] = (index, row)
    return [row for _, row in sorted(reservoir, key=lambda item: item[0])]
