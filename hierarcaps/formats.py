"""Read and write the authors' HierarCaps release CSVs, and convert them to and from dataset folders.

The release (``../shared/data/hierarcaps`` in this workspace; SPEC section 1) has three files in
two layouts, tiers joined by ``" => "``:

* curated test ``hierarcaps_test.csv``: ``id,captions,image_url``;
* expanded test ``hierarcaps_test_expanded.csv.gz`` and train: ``positive,negative,image_url``
  (we also accept a leading ``id`` column, which we write when ids are not the row indices).

:func:`read_release_csv` returns the file's own columns, every cell verbatim (``"NA"`` stays the
text ``NA``; a T4 with a trailing space or newline keeps it), so :func:`write_release_csv` gives
back the same text; on the real files it gives back the same bytes, as both sides use minimal
quoting and ``\\n`` line ends. Compression follows the file name (``.gz``, ``.bz2``, ``.xz``);
gzip output has a zero timestamp so equal tables give equal files.

The CSV is parsed with the standard ``csv`` module rather than pandas so that every error can name
the physical line of its record (cells may hold newlines) and a row with a missing field is an
error instead of a silent empty cell.

:func:`convert` is the ``hierarcaps convert IN OUT`` command: a release CSV becomes a
``DatasetDict`` folder in the schema of :mod:`hierarcaps.schema`, and a dataset folder's split
becomes a release CSV. Every output is written to a temporary path beside the target and renamed
into place, so a crash never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

from hierarcaps.schema import (
    COLUMNS,
    ReleaseLayout,
    SchemaError,
    release_layout,
    release_to_rows,
    rows_to_release,
    split_release_tiers,
)

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

_HIERARCHY_COLUMNS = ("captions", "positive", "negative")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz")


class ReleaseFormatError(SchemaError):
    """A file is not a release CSV, or a dataset folder cannot be converted; the message says where."""


#: The folder of a build's output that holds ``dataset/``, ``_SUCCESS`` and ``manifest.json``.
BUILD_FINAL = "final"


class UnfinishedBuildError(ValueError):
    """A build output whose final stage has no ``_SUCCESS`` marker: unfinished, or failed."""


def find_build_dataset(folder: str | Path) -> Path | None:
    """``folder/final/dataset`` or ``folder/dataset`` when ``folder`` is a build's output (or its ``final``).

    ``None`` when ``folder`` holds neither. A build without the ``_SUCCESS`` marker of its final
    stage is refused with :class:`UnfinishedBuildError`.
    """
    from hierarcaps.stagedir import SUCCESS  # imported here: stagedir loads pyarrow, readers of CSVs need none

    folder = Path(folder)
    for final in (folder / BUILD_FINAL, folder):
        if (final / "dataset").is_dir():
            if not (final / SUCCESS).is_file():
                raise UnfinishedBuildError(
                    f"{final}: the build is unfinished (no {SUCCESS}); rerun the same build-hierarcaps command first"
                )
            return final / "dataset"
    return None


def is_release_csv_path(path: str | Path) -> bool:
    """Whether a file name looks like a (possibly compressed) release CSV."""
    return str(path).lower().endswith(CSV_SUFFIXES)


def _open_text(path: Path, mode: str, suffix: str | None = None) -> IO[str]:
    """Open a UTF-8 text stream, (de)compressing by ``suffix`` (default: the path's own).

    Reading accepts a byte-order mark; gzip output gets a zero timestamp (reproducible bytes).
    """
    suffix = (suffix if suffix is not None else path.suffix).lower()
    if suffix == ".gz" and "w" in mode:
        raw = gzip.GzipFile(filename="", mode="wb", fileobj=open(path, "wb"), mtime=0)
        return _OwningTextWrapper(raw, encoding="utf-8", newline="")
    opener = _OPENERS.get(suffix, open)
    encoding = "utf-8-sig" if "r" in mode else "utf-8"
    return opener(path, mode + "t", encoding=encoding, newline="")  # type: ignore[operator]


class _OwningTextWrapper(io.TextIOWrapper):
    """A text wrapper over a GzipFile that also closes the file the GzipFile writes into."""

    def close(self) -> None:
        fileobj = getattr(self.buffer, "fileobj", None)
        super().close()
        if fileobj is not None:
            fileobj.close()


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(first physical line, fields)`` per CSV record, header included (line 1)."""
    start = 1
    try:
        with _open_text(path, "r") as handle:
            reader = csv.reader(handle, strict=True)
            for fields in reader:
                yield start, fields
                start = reader.line_num + 1
    except csv.Error as err:
        raise ReleaseFormatError(f"{path}: line {start}: not valid CSV ({err})") from None
    except UnicodeDecodeError as err:
        raise ReleaseFormatError(f"{path}: near line {start}: not UTF-8 text ({err.reason}); is this a release CSV?") from None
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise ReleaseFormatError(f"{path}: cannot read ({err})") from None


def read_release_csv(path: str | Path) -> Dataset:
    """Read a release CSV (any layout, compression by suffix) as a Dataset of its own string columns.

    Raises :class:`ReleaseFormatError` as :func:`read_release_columns` does.
    """
    from datasets import Dataset, Features, Value

    columns = read_release_columns(path)
    return Dataset.from_dict(columns, features=Features({name: Value("string") for name in columns}))


def read_release_columns(path: str | Path) -> dict[str, list[str]]:
    """Read a release CSV (any layout, compression by suffix) as its columns, header order, every
    cell verbatim; without importing ``datasets`` (for the evaluators).

    Raises :class:`ReleaseFormatError` naming the file and line when the header matches no
    release layout, a record has the wrong number of fields, or a hierarchy cell does not
    split into exactly four tiers on ``" => "``.
    """
    path = Path(path)
    if not path.is_file():
        raise ReleaseFormatError(f"{path}: no such file")
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise ReleaseFormatError(f"{path}: empty file; a release CSV starts with a header line")
    _, header = first
    try:
        release_layout(header, where=f"{path}: line 1")
    except SchemaError as err:
        raise ReleaseFormatError(str(err)) from None
    columns: list[list[str]] = [[] for _ in header]
    checked = [i for i, name in enumerate(header) if name in _HIERARCHY_COLUMNS]
    for line, fields in records:
        if len(fields) != len(header):
            raise ReleaseFormatError(
                f"{path}: line {line}: expected {len(header)} fields ({','.join(header)}), found {len(fields)}"
            )
        for i in checked:
            try:
                split_release_tiers(fields[i], where=f"{path}: line {line}, column {header[i]}")
            except SchemaError as err:
                raise ReleaseFormatError(str(err)) from None
        for column, value in zip(columns, fields):
            column.append(value)
    return dict(zip(header, columns))


def _temp_sibling(path: Path) -> Path:
    """An unused temporary path in the target's folder (so the final rename stays on one disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_release_csv(dataset: Dataset, path: str | Path, layout: ReleaseLayout | None = None) -> Path:
    """Write a release table, or schema rows (mapped by ``rows_to_release``), as a release CSV.

    Minimal quoting, ``\\n`` line ends, UTF-8 without BOM, compression by suffix. Every hierarchy
    cell is checked to split back into four tiers before anything is written. ``layout``
    applies to schema rows only (default: chosen by ``rows_to_release``).
    """
    path = Path(path)
    if set(COLUMNS) <= set(dataset.column_names):
        dataset = rows_to_release(dataset, layout=layout)
    else:
        try:
            found = release_layout(dataset.column_names, where="table to write")
        except SchemaError as err:
            raise ReleaseFormatError(f"{path}: {err}; pass a release table or hierarcaps schema rows") from None
        if layout is not None and layout != found:
            raise ReleaseFormatError(f"{path}: the table has the {found} layout, not the requested {layout}")
    header = dataset.column_names
    table = dataset.to_dict()
    for name in header:
        if name in _HIERARCHY_COLUMNS:
            for i, cell in enumerate(table[name]):
                split_release_tiers(cell, where=f"{path}: row {i}, column {name}")
    temp = _temp_sibling(path)
    try:
        with _open_text(temp, "w", suffix=path.suffix) as handle:
            writer = csv.writer(handle, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(zip(*(table[name] for name in header)))
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def save_dataset_dict(dataset_dict: DatasetDict, path: str | Path) -> Path:
    """``save_to_disk`` into a temporary sibling folder, then swap it into place.

    An existing folder at ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    temp = _temp_sibling(path)
    try:
        dataset_dict.save_to_disk(str(temp))
        if path.exists():
            old = _temp_sibling(path)
            os.replace(path, old)
            os.replace(temp, path)
            shutil.rmtree(old)
        else:
            os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return path


def load_dataset_folder(path: str | Path) -> DatasetDict:
    """Load a ``save_to_disk`` folder; a single ``Dataset`` folder becomes the split ``train``."""
    from datasets import DatasetDict, load_from_disk

    path = Path(path)
    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise ReleaseFormatError(f"{path}: not a dataset folder written by save_to_disk ({err})") from None
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote: the output path, the split and layout, and the row count."""

    output: Path
    split: str
    layout: str
    rows: int


def default_split(layout: str) -> str:
    """The split a release layout goes to by default: ``test`` for curated, else ``train``."""
    return "test" if layout == "curated" else "train"


def csv_to_folder(
    csv_path: str | Path, folder: str | Path, split: str | None = None, *, overwrite: bool = False
) -> ConvertResult:
    """Convert a release CSV into split ``split`` of a schema ``DatasetDict`` folder.

    An existing ``DatasetDict`` folder gains the split (so one folder can hold ``test`` and
    ``test_expanded``); replacing a split it already has needs ``overwrite``.
    """
    csv_path, folder = Path(csv_path), Path(folder)
    release = read_release_csv(csv_path)
    layout = release_layout(release.column_names)
    split = split or default_split(layout)
    splits: dict[str, Dataset] = {}
    if folder.exists():
        if not folder.is_dir():
            raise ReleaseFormatError(f"{folder}: exists and is not a folder; choose another output path")
        existing = load_dataset_folder(folder)
        if split in existing and not overwrite:
            raise ReleaseFormatError(
                f"{folder}: already has a split {split!r}; pass --overwrite to replace it or --split to add another"
            )
        splits.update({name: existing[name] for name in existing if name != split})
    splits[split] = release_to_rows(release)
    # Existing splits stay memory-mapped from the old folder while the new one is written beside it.
    from datasets import DatasetDict

    dataset_dict = DatasetDict(splits)
    save_dataset_dict(dataset_dict, folder)
    return ConvertResult(output=folder, split=split, layout=layout, rows=release.num_rows)


def folder_to_csv(
    folder: str | Path, csv_path: str | Path, split: str | None = None, *, layout: ReleaseLayout | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Write one split of a dataset folder as a release CSV (``split`` may be omitted when there is one)."""
    folder, csv_path = Path(folder), Path(csv_path)
    if csv_path.exists() and not overwrite:
        raise ReleaseFormatError(f"{csv_path}: exists; pass --overwrite to replace it")
    dataset_dict = load_dataset_folder(folder)
    if split is None:
        if len(dataset_dict) != 1:
            raise ReleaseFormatError(f"{folder}: has splits {list(dataset_dict)}; pick one with --split")
        split = next(iter(dataset_dict))
    if split not in dataset_dict:
        raise ReleaseFormatError(f"{folder}: has no split {split!r}; it has {list(dataset_dict)}")
    dataset = dataset_dict[split]
    write_release_csv(dataset, csv_path, layout=layout)
    written = layout or release_layout(_header(csv_path))
    return ConvertResult(output=csv_path, split=split, layout=written, rows=dataset.num_rows)


def _header(path: Path) -> list[str]:
    return next(_records(path))[1]


def convert(
    source: str | Path, target: str | Path, split: str | None = None, *, layout: ReleaseLayout | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """``hierarcaps convert``: release CSV -> dataset folder, or dataset folder -> release CSV."""
    source, target = Path(source), Path(target)
    if source.is_dir():
        if not is_release_csv_path(target):
            raise ReleaseFormatError(f"{target}: a dataset folder converts to a CSV; name the output *.csv or *.csv.gz")
        return folder_to_csv(source, target, split, layout=layout, overwrite=overwrite)
    if is_release_csv_path(source):
        if is_release_csv_path(target):
            raise ReleaseFormatError(f"{target}: a CSV converts to a dataset folder; name a folder, not a CSV")
        if layout is not None:
            raise ReleaseFormatError("--layout applies to folder -> CSV only; a CSV's layout is read from its header")
        return csv_to_folder(source, target, split, overwrite=overwrite)
    if not source.exists():
        raise ReleaseFormatError(f"{source}: no such file or folder")
    raise ReleaseFormatError(
        f"{source}: cannot tell the direction: give a release CSV ({', '.join(CSV_SUFFIXES)}) or a dataset folder"
    )
