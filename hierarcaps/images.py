"""Fetch a dataset's images with img2dataset: ``hierarcaps fetch-images SOURCE --output DIR``.

Neither a build nor the authors' train release carries images, only their URLs (``image_ref``).
:func:`fetch_images` downloads every distinct reference of a built dataset (``OUT``,
``OUT/final`` or any dataset folder) or of a release CSV through img2dataset, the downloader this
field uses for CC and COCO: resized, concurrently, as image files or webdataset tar shards.
It writes::

    DIR/
      images.parquet       the mapping, one row per distinct image_ref: status ("ok" or a failure
                           reason), path (relative to DIR), member/offset/size inside a tar shard,
                           width, height, sha256 (img2dataset's: of the bytes as downloaded, not
                           of the resized file stored), error_message
      fetch_report.json    counts per status, a few examples per failure reason, settings, timings
      fetch_settings.json  the settings the folder was fetched with (a rerun must use the same)
      fetch.log            img2dataset's own output, appended on every run
      shards/              img2dataset's output: NNNNN/ folders ("files") or NNNNN.tar
                           ("webdataset"), NNNNN.parquet (status per URL), NNNNN_stats.json

Failure reasons: ``not_found`` (HTTP 404/410), ``http_error`` (other HTTP status), ``timeout``,
``network_error`` (refused, DNS, TLS...), ``disallowed`` (an ``X-Robots-Tag: noai``-style header),
``not_an_image`` (does not decode), ``too_small`` (shorter side < ``min_image_size``),
``not_a_url`` (the reference is no http(s) URL), ``not_fetched`` (no result yet: an interrupted
run or a crashed shard; a rerun fetches it).

Resume: img2dataset writes a shard's ``_stats.json`` after the shard, so a shard counts as done
when it exists. The mapping is rebuilt from all done shards on every run (a later shard wins for
a reference fetched twice); shards without stats (an interrupted run) are deleted. A rerun
requests only references that have no result, whose file is gone, or whose failure may be
transient (timeout, http_error, network_error); ``retry_failed`` requests every failed one.

``hierarcaps-finetune --set data.images_dir=DIR`` reads the mapping (``image_folder.load_image_map``):
items whose image failed stay in the dataset and in the mapping, and image losses skip them.

Reading the result (the mapping, tar members, folders of plain files) is
:mod:`hierarcaps.image_folder`, which needs neither pandas nor img2dataset.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata, util
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hierarcaps.image_folder import MAPPING_FILE, OK, REPORT_FILE, FetchError
from hierarcaps.formats import CSV_SUFFIXES, UnfinishedBuildError, find_build_dataset, load_dataset_folder, read_release_csv
from hierarcaps.schema import SchemaError
from hierarcaps.stagedir import atomic_path, write_json_atomic

SETTINGS_FILE = "fetch_settings.json"
LOG_FILE = "fetch.log"
SHARDS_DIR = "shards"
REASONS = (
    "not_found", "http_error", "timeout", "network_error", "disallowed",
    "not_an_image", "too_small", "not_a_url", "not_fetched",
)
TRANSIENT = frozenset({"timeout", "http_error", "network_error", "not_fetched"})
OUTPUT_FORMATS = ("files", "webdataset")
RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")
_ENCODE_FORMAT = "jpg"
_MAPPING_COLUMNS = ["image_ref", "status", "path", "member", "offset", "size", "width", "height", "sha256", "error_message"]
_OOM_SHARD_COUNT = 5  # shard names have 5 digits, as img2dataset's default
_EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class FetchSettings:
    """How images are fetched and stored (img2dataset's settings of the same meaning in brackets).

    ``image_size``/``resize_mode``: resize to this size (``image_size``, ``resize_mode``; only
    downscaling, ``resize_only_if_bigger``); ``min_image_size``: reject images whose shorter side
    is smaller; ``timeout`` seconds per request; ``retries`` per URL; ``processes`` and
    ``threads`` (``processes_count``, ``thread_count``); ``shard_size`` images per shard
    (``number_sample_per_shard``).
    """

    output_format: str = "files"
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    min_image_size: int = 0
    timeout: float = 10.0
    retries: int = 0
    processes: int = 1
    threads: int = 16
    shard_size: int = 1000

    def check(self) -> None:
        """Raise :class:`FetchError` naming the first invalid setting."""
        if self.output_format not in OUTPUT_FORMATS:
            raise FetchError(f"output format {self.output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise FetchError(f"resize mode {self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        for name in ("image_size", "processes", "threads", "shard_size"):
            if getattr(self, name) < 1:
                raise FetchError(f"{name} = {getattr(self, name)}: must be at least 1")
        if self.min_image_size < 0 or self.retries < 0 or self.timeout <= 0:
            raise FetchError("min_image_size and retries must be >= 0 and timeout > 0")

    def stored(self) -> dict[str, object]:
        """The settings that shape the stored images (a rerun into the same folder must keep them)."""
        return {k: getattr(self, k) for k in ("output_format", "image_size", "resize_mode", "min_image_size")}


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_images` did: the files it wrote and the counts of its report."""

    mapping: Path
    report: Path
    refs: int
    ok: int
    failed: dict[str, int]
    requested: int


# ----------------------------------------------------------------------------- the source


def _dataset_folder(path: Path) -> Path:
    """The dataset folder of a build output (``OUT`` or ``OUT/final``), else ``path`` itself."""
    try:
        return find_build_dataset(path) or path
    except UnfinishedBuildError as err:
        raise FetchError(str(err)) from None


def read_image_refs(source: str | Path, split: str | None = None) -> tuple[list[str], int]:
    """Distinct image references of ``source`` in first-seen order, and the number of rows without one.

    ``source``: a build output folder, a dataset folder (every split, or only ``split``) or a
    release CSV. Raises :class:`FetchError` naming the file when it is none of these.
    """
    path = Path(source)
    if not path.exists():
        raise FetchError(f"{path}: no such file or folder; give a build output folder, a dataset folder or a release CSV")
    try:
        if path.is_file():
            if not path.name.lower().endswith(CSV_SUFFIXES):
                raise FetchError(f"{path}: not a release CSV ({', '.join(CSV_SUFFIXES)}) nor a dataset folder")
            tables = {"csv": read_release_csv(path)}
        else:
            tables = dict(load_dataset_folder(_dataset_folder(path)))
    except SchemaError as err:
        raise FetchError(str(err)) from None
    if split is not None:
        if split not in tables:
            raise FetchError(f"{path}: no split {split!r} (has {', '.join(tables)})")
        tables = {split: tables[split]}
    refs: dict[str, None] = {}
    empty = 0
    for name, table in tables.items():
        column = next((c for c in ("image_ref", "image_url") if c in table.column_names), None)
        if column is None:
            raise FetchError(f"{path} split {name}: no image_ref or image_url column (has {', '.join(table.column_names)})")
        for ref in table[column]:
            if ref and ref.strip():
                refs.setdefault(ref.strip(), None)
            else:
                empty += 1
    if not refs:
        raise FetchError(f"{path}: no row has an image reference; nothing to fetch")
    return list(refs), empty


def is_url(ref: str) -> bool:
    """Whether img2dataset can fetch ``ref`` (an http or https URL)."""
    parts = urlsplit(ref)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


# ----------------------------------------------------------------------------- failure reasons


def failure_reason(status: str, error_message: str | None) -> str:
    """Our reason for one img2dataset result (its ``status`` and ``error_message`` columns)."""
    if status == "success":
        return OK
    message = (error_message or "").lower()
    if status == "failed_to_resize":
        return "too_small" if "too small" in message else "not_an_image"
    if "http error 404" in message or "http error 410" in message:
        return "not_found"
    if "http error" in message:
        return "http_error"
    if "timed out" in message:
        return "timeout"
    if "disallowed" in message:
        return "disallowed"
    return "network_error"


# ----------------------------------------------------------------------------- shards and the mapping


def _shard_ids(shards: Path) -> list[int]:
    """Ids of the done shards (those with a ``_stats.json``), ascending."""
    return sorted(int(p.name.split("_")[0]) for p in shards.glob("*_stats.json"))


def _remove_unfinished_shards(shards: Path) -> None:
    """Delete the output of shards that have no ``_stats.json`` (an interrupted run)."""
    done = set(_shard_ids(shards))
    for entry in shards.iterdir():
        stem = entry.name.split(".")[0].split("_")[0]
        if stem.isdigit() and int(stem) not in done:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    shutil.rmtree(shards / "_tmp", ignore_errors=True)


def _tar_members(tar: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of a tar file."""
    with tarfile.open(tar) as archive:
        return {m.name: (m.offset_data, m.size) for m in archive.getmembers() if m.isfile()}


def _shard_rows(folder: Path) -> pd.DataFrame:
    """One row per reference fetched in the done shards (the later shard wins), with its location."""
    shards = folder / SHARDS_DIR
    tables, paths, members, offsets, sizes = [], [], [], [], []
    for shard_id in _shard_ids(shards) if shards.is_dir() else []:
        name = f"{shard_id:0{_OOM_SHARD_COUNT}d}"
        table = pq.read_table(shards / f"{name}.parquet", columns=["url", "key", "status", "error_message", "width", "height", "sha256"])
        tables.append(table)
        tar = shards / f"{name}.tar"
        in_tar = _tar_members(tar) if tar.is_file() else None
        for key, status in zip(table["key"].to_pylist(), table["status"].to_pylist()):
            file = f"{key}.{_ENCODE_FORMAT}"
            stored = status == "success"
            paths.append(None if not stored else f"{SHARDS_DIR}/{name}.tar" if in_tar is not None else f"{SHARDS_DIR}/{name}/{file}")
            members.append(file if stored and in_tar is not None else None)
            offsets.append(in_tar[file][0] if stored and in_tar is not None else None)
            sizes.append(in_tar[file][1] if stored and in_tar is not None else None)
    if not tables:
        return pd.DataFrame(columns=_MAPPING_COLUMNS)
    rows = pa.concat_tables(tables).to_pandas().rename(columns={"url": "image_ref"})
    rows["status"] = [failure_reason(s, e) for s, e in zip(rows["status"], rows["error_message"])]
    rows["path"], rows["member"] = pd.array(paths, dtype="string"), pd.array(members, dtype="string")
    rows["offset"], rows["size"] = pd.array(offsets, dtype="Int64"), pd.array(sizes, dtype="Int64")
    return rows[_MAPPING_COLUMNS].drop_duplicates("image_ref", keep="last")


def _mapping(refs: list[str], fetched: pd.DataFrame) -> pd.DataFrame:
    """The mapping over ``refs`` (source order): fetched rows, else ``not_fetched`` or ``not_a_url``."""
    table = pd.DataFrame({"image_ref": refs}).merge(
        fetched.reset_index(drop=True), on="image_ref", how="left", validate="one_to_one"
    )
    unfetched = table["status"].isna()
    urls = pd.Series([is_url(ref) for ref in refs], index=table.index)
    table.loc[unfetched & urls, "status"] = "not_fetched"
    table.loc[unfetched & ~urls, "status"] = "not_a_url"
    for column in ("offset", "size", "width", "height"):
        table[column] = pd.to_numeric(table[column]).astype("Int64")
    return table[_MAPPING_COLUMNS]


def _wanted(folder: Path, mapping: pd.DataFrame, retry_failed: bool) -> list[str]:
    """References to request now: never fetched, file gone, or failed (transiently, or any if ``retry_failed``)."""
    status = mapping["status"]
    ok = status == OK
    gone = pd.Series([good and not (folder / path).is_file() for good, path in zip(ok, mapping["path"])], index=mapping.index)
    failed = ~ok & (status != "not_a_url")
    retry = failed if retry_failed else failed & status.isin(TRANSIENT)
    return mapping.loc[gone | retry, "image_ref"].tolist()


# ----------------------------------------------------------------------------- running img2dataset


def _img2dataset_downloader(shards: Path, settings: FetchSettings):
    """img2dataset's Downloader with our settings (what ``img2dataset.download`` builds)."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import FilesSampleWriter, WebDatasetSampleWriter

    resizer = Resizer(
        image_size=settings.image_size, resize_mode=settings.resize_mode, resize_only_if_bigger=True,
        upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=95,
        encode_format=_ENCODE_FORMAT, skip_reencode=False, disable_all_reencoding=False,
        min_image_size=settings.min_image_size, max_image_area=float("inf"), max_aspect_ratio=float("inf"),
    )
    writer = WebDatasetSampleWriter if settings.output_format == "webdataset" else FilesSampleWriter
    return Downloader(
        sample_writer_class=writer, resizer=resizer, thread_count=settings.threads, save_caption=False,
        extract_exif=False, output_folder=str(shards), column_list=["url"], timeout=settings.timeout,
        number_sample_per_shard=settings.shard_size, oom_shard_count=_OOM_SHARD_COUNT, compute_hash="sha256",
        verify_hash_type=None, encode_format=_ENCODE_FORMAT, retries=settings.retries, user_agent_token=None,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )


def _download(folder: Path, urls: list[str], settings: FetchSettings, progress: bool) -> None:
    """Fetch ``urls`` into new shards of ``folder/shards`` with img2dataset's Reader and Downloader.

    The shards are numbered after the done ones (img2dataset's ``incremental_mode="extend"``).
    One process downloads here (``settings.threads`` threads per shard); more processes take
    shards from a spawn pool, as ``img2dataset.download`` does. We build img2dataset's parts
    rather than call ``download``, which also spawns a logging process (importing the library
    again) and installs a Ctrl-C handler that exits with status 0. img2dataset's prints go to
    ``fetch.log``; the progress bar counts images per finished shard.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations asks PyPI for updates on import
    from img2dataset.reader import Reader
    from tqdm.auto import tqdm

    shards = folder / SHARDS_DIR
    tmp = shards / "_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    url_list = folder / ".fetch-urls.parquet"
    pd.DataFrame({"url": urls}).to_parquet(url_list, index=False)
    done = _shard_ids(shards)
    downloader = _img2dataset_downloader(shards, settings)
    bar = tqdm(total=len(urls), desc="fetch-images", unit="img", disable=not progress)
    with (folder / LOG_FILE).open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        print(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} fetching {len(urls)} images")
        reader = Reader(str(url_list), "parquet", "url", None, None, None, None, settings.shard_size, set(),
                        str(tmp), done[-1] + 1 if done else 0)
        try:
            with contextlib.ExitStack() as stack:
                if settings.processes == 1:
                    results = map(downloader, reader)
                else:
                    pool = stack.enter_context(mp.get_context("spawn").Pool(settings.processes, maxtasksperchild=5))
                    results = pool.imap_unordered(downloader, reader)
                for finished, (shard_id, _) in results:
                    stats = shards / f"{shard_id:0{_OOM_SHARD_COUNT}d}_stats.json"
                    if finished and stats.is_file():
                        bar.update(json.loads(stats.read_text(encoding="utf-8"))["count"])
        finally:
            bar.close()
            log.flush()
            url_list.unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the command


def _writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and check that files can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise FetchError(f"{folder}: cannot write there ({err.strerror or err}); choose a writable --output folder") from None


def _check_stored_settings(folder: Path, settings: FetchSettings) -> None:
    """Record the storing settings on the first run; refuse a rerun with different ones."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        write_json_atomic(path, settings.stored())
        return
    stored = json.loads(path.read_text(encoding="utf-8"))
    changed = {k: (stored.get(k), v) for k, v in settings.stored().items() if stored.get(k) != v}
    if changed:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise FetchError(f"{folder}: fetched before with other settings ({what}); keep them or choose a new --output folder")


def _report(mapping: pd.DataFrame, source: str, empty_rows: int, requested: int, settings: FetchSettings,
            seconds: float) -> dict[str, object]:
    counts = Counter(mapping["status"])
    failed = mapping[mapping["status"] != OK]
    examples = {
        reason: [
            {"image_ref": ref, "error_message": None if pd.isna(message) else message}
            for ref, message in zip(group["image_ref"][:_EXAMPLES_PER_REASON], group["error_message"])
        ]
        for reason, group in failed.groupby("status", sort=True)
    }
    return {
        "source": source,
        "refs": len(mapping),
        "ok": counts.get(OK, 0),
        "failed": {reason: counts[reason] for reason in REASONS if counts.get(reason)},
        "rows_without_image_ref": empty_rows,
        "requested_this_run": requested,
        "examples": examples,
        "settings": asdict(settings),
        "img2dataset_version": metadata.version("img2dataset"),
        "seconds": round(seconds, 3),
    }


def fetch_images(
    source: str | Path,
    output: str | Path,
    settings: FetchSettings = FetchSettings(),
    split: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> FetchResult:
    """Fetch every distinct image reference of ``source`` into ``output`` (see the module docstring).

    Raises :class:`FetchError` for a malformed source, an unwritable folder, changed settings or
    a failed img2dataset run. Interrupting it loses only the shard in progress.
    """
    started = time.perf_counter()
    settings.check()
    if util.find_spec("img2dataset") is None:
        raise FetchError("img2dataset is not installed; pip install img2dataset (a hierarcaps dependency)")
    refs, empty_rows = read_image_refs(source, split)
    folder = Path(output)
    _writable_folder(folder)
    _check_stored_settings(folder, settings)
    if (folder / SHARDS_DIR).is_dir():
        _remove_unfinished_shards(folder / SHARDS_DIR)
    wanted = _wanted(folder, _mapping(refs, _shard_rows(folder)), retry_failed)
    if wanted:
        _download(folder, wanted, settings, progress)
    mapping = _mapping(refs, _shard_rows(folder))
    with atomic_path(folder / MAPPING_FILE) as tmp:
        mapping.to_parquet(tmp, index=False)
    report = _report(mapping, str(source), empty_rows, len(wanted), settings, time.perf_counter() - started)
    write_json_atomic(folder / REPORT_FILE, report)
    return FetchResult(folder / MAPPING_FILE, folder / REPORT_FILE, len(refs), report["ok"], report["failed"], len(wanted))


