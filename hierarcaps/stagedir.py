"""Resumable stage directories: fingerprints, ``_SUCCESS`` markers, atomic writes.

A build is a chain of stages. Each stage (and each shard of a long stage) writes into a
directory whose *name* says exactly what it holds::

    <stage>-v<code_version>-<sha256(settings, models, upstream directory names)[:12]>

so a rerun of the same command finds finished work by name, a changed setting gives a new name
(that stage and every stage downstream of it rerun, because each includes its upstream's name
in its own fingerprint), and a deleted directory is simply rebuilt. A directory is finished
when, and only when, its ``_SUCCESS`` file exists: a JSON record of the settings, lineage,
stats, timings and package versions, written last and atomically.

Two ways to fill a directory, both crash-safe:

* :meth:`StageDir.build` (whole directory): everything is written into a temporary sibling
  ``<name>.tmp-<uuid>``, ``_SUCCESS`` last, and the sibling is renamed into place.
* sharded stages: the stage directory exists while unfinished and holds
  ``shards/<i:05d>/``, each built with :meth:`StageDir.build`; when all shards are done the
  merged outputs are written into the stage directory through temporary names
  (:func:`atomic_path`) and ``_SUCCESS`` is written last (:meth:`StageDir.mark_success`).

The code version is bumped by hand when a stage's code changes its output; this is on purpose
(an automatic hash of the stage function's source misses edits to the helpers it calls).
Nothing here needs Prefect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

# pyarrow is imported by the functions that read and write rows, not here: planning a build
# (fingerprints, ``_SUCCESS`` records) needs none of it.

SUCCESS = "_SUCCESS"
TMP_MARK = ".tmp-"
FINGERPRINT_CHARS = 12

#: Packages whose versions every ``_SUCCESS`` record and manifest lists.
RECORDED_PACKAGES = (
    "hierarcaps", "torch", "transformers", "datasets", "tokenizers", "accelerate",
    "bitsandbytes", "pyarrow", "numpy", "prefect", "prefect-dask", "huggingface_hub",
)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for dataclasses, paths, tuples, sets and enums (recursively)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return value


def canonical_json(value: Any) -> str:
    """One canonical text for a value: sorted keys, no whitespace; equal values, equal text."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(payload: Any) -> str:
    """First 12 hex digits of the sha256 of the canonical JSON of ``payload``."""
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def stage_dir_name(
    stage: str,
    code_version: int,
    settings: Any,
    models: Any = None,
    upstream: Sequence[str] = (),
) -> str:
    """``<stage>-v<code_version>-<fingerprint>`` of the resolved settings, models and upstream names."""
    payload = {"settings": settings, "models": models, "upstream": list(upstream)}
    return f"{stage}-v{code_version}-{fingerprint(payload)}"


def package_versions(names: Sequence[str] = RECORDED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (``None`` when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place (never a half-written file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``, else remove it.

    Works for files and directories (an existing directory at ``path`` is replaced).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def follow_umask(path: Path) -> Path:
    """Give ``path``, and everything under it, the mode a plain ``mkdir``/``open`` would give it.

    ``tempfile`` creates folders 0700 and files 0600 whatever the umask, and some writers
    (safetensors through transformers' ``save_pretrained``) write 0600 files too, so an output
    renamed into place from one stays private to its owner; under umask 022 this makes it 0755/0644.
    Call it on the temporary path before the rename, or on a folder once it is completely written.
    """
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it: put it back at once
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
    return path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], row_group_size: int | None = None) -> None:
    """Write rows (dicts of strings, numbers and lists) as one Parquet file, atomically.

    Readable as a Hugging Face ``Dataset`` (``Dataset.from_parquet``) or with :func:`read_rows`.
    ``row_group_size``: rows per Parquet row group (the shard size of the stage that reads the
    file in slices, so that each shard decodes only its own rows); default: pyarrow's.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows)) if rows else pa.table({})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


def count_rows(path: Path) -> int:
    """Number of rows in a file written by :func:`write_rows` (from its metadata; nothing is decoded)."""
    import pyarrow.parquet as pq

    _check_rows(path)
    return pq.ParquetFile(path).metadata.num_rows


def read_rows(path: Path, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
    """Rows ``start`` to ``stop`` (exclusive; default: all) written by :func:`write_rows`, in order.

    Only the row groups that hold those rows are read and decoded.
    """
    import pyarrow.parquet as pq

    _check_rows(path)
    parquet = pq.ParquetFile(path)
    meta = parquet.metadata
    stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
    groups, first, offset = [], 0, 0
    for group in range(meta.num_row_groups):
        size = meta.row_group(group).num_rows
        if offset < stop and offset + size > start:
            first = first if groups else offset
            groups.append(group)
        offset += size
    if not groups:
        return []
    return parquet.read_row_groups(groups).slice(start - first, stop - start).to_pylist()


def _check_rows(path: Path) -> None:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: stage rows are missing; delete the stage directory and rerun")


@dataclass(frozen=True)
class StageDir:
    """One stage (or shard) directory: ``parent / name``."""

    parent: Path
    name: str

    @property
    def path(self) -> Path:
        return Path(self.parent) / self.name

    @property
    def success_path(self) -> Path:
        return self.path / SUCCESS

    def is_done(self) -> bool:
        """Finished: the ``_SUCCESS`` marker exists."""
        return self.success_path.is_file()

    def record(self) -> dict[str, Any]:
        """The ``_SUCCESS`` record of a finished directory."""
        if not self.is_done():
            raise FileNotFoundError(f"{self.path} is not finished (no {SUCCESS})")
        return json.loads(self.success_path.read_text(encoding="utf-8"))

    def shard(self, index: int) -> "StageDir":
        """The directory of shard ``index``: ``<stage dir>/shards/<index:05d>``."""
        return StageDir(self.path / "shards", f"{index:05d}")

    def clean_temporaries(self) -> None:
        """Remove temporary siblings and inner temporaries left by an interrupted run."""
        for folder in (Path(self.parent), self.path):
            if not folder.is_dir():
                continue
            for child in folder.iterdir():
                if TMP_MARK in child.name and (folder == self.path or child.name.startswith(self.name + TMP_MARK)):
                    _remove(child)

    @contextlib.contextmanager
    def build(self, record: Mapping[str, Any]) -> Iterator["Build"]:
        """Build the whole directory in a temporary sibling.

        Yields a :class:`Build` whose ``path`` is the temporary directory and whose ``record``
        the caller may extend (e.g. with stats known only at the end). On normal exit
        ``_SUCCESS`` (the record plus timing and package versions) is written into it last and
        the sibling is renamed onto :attr:`path`, replacing an unfinished directory there. On an
        exception nothing is renamed and the temporary is removed.
        """
        start = time.time()
        Path(self.parent).mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.mkdir()
            build = Build(tmp, dict(record))
            yield build
            write_json_atomic(tmp / SUCCESS, _finish_record(build.record, start))

    def mark_success(self, record: Mapping[str, Any], started: float | None = None) -> None:
        """Write ``_SUCCESS`` into the (already filled) directory, atomically and last."""
        write_json_atomic(self.success_path, _finish_record(dict(record), started))


@dataclass
class Build:
    """A directory being built: its temporary ``path`` and the ``record`` its ``_SUCCESS`` will hold."""

    path: Path
    record: dict[str, Any]


def _finish_record(record: dict[str, Any], started: float | None) -> dict[str, Any]:
    finished = time.time()
    record.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)))
    if started is not None:
        record.setdefault("seconds", round(finished - started, 3))
    record.setdefault("packages", package_versions())
    return record
