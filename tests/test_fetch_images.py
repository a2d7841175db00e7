"""``hierarcaps fetch-images`` for real: img2dataset against an HTTP server on the loopback address.

The server (started here, in a thread) serves real HierarCaps test images from ../shared/data and
broken URLs: 404, 500, a response slower than the timeout, an HTML page named .jpg, an 8x8 image
below min_image_size; one URL points at a closed port and one reference is no URL. The tests
check the counts per failure reason, the files, the mapping and the report, that a rerun fetches
only what is missing (counted in the server's request log), webdataset shards, and a short RCME
run on the fetched images through ``hierarcaps-finetune``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finetune.backends import load_backend
from finetune.cli import main as finetune_main
from finetune.data import images_for_training, load_train_data
from hierarcaps.cli import main as hierarcaps_main
from hierarcaps.formats import convert
from hierarcaps.images import FetchSettings, fetch_images, read_image_refs
from hierarcaps.image_folder import FetchError, TarMember, load_image_map, open_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hierarcaps"
EXPANDED = DATA / "hierarcaps_test_expanded.csv.gz"
IMAGES = DATA / "test_imgs"
pytestmark = pytest.mark.skipif(
    not (EXPANDED.is_file() and IMAGES.is_dir()),
    reason=f"needs the HierarCaps expanded test CSV and test images in {DATA}",
)

N_REAL = 6
TIMEOUT = 1.0  # seconds; the slow URL answers after SLOW_SECONDS
SLOW_SECONDS = 3.0
IMAGE_SIZE = 64  # the test images are 256 x 256: fetched files are resized to 64 x 64
MIN_SIZE = 16  # the tiny image is 8 x 8
FAILED_FIRST = {"not_found": 1, "http_error": 1, "timeout": 1, "network_error": 1, "not_an_image": 1,
                "too_small": 1, "not_a_url": 1}
OPTIONS = ["--timeout", str(TIMEOUT), "--image-size", str(IMAGE_SIZE), "--min-image-size", str(MIN_SIZE),
           "--shard-size", "4", "--threads", "4"]
SETTINGS = FetchSettings(image_size=IMAGE_SIZE, min_image_size=MIN_SIZE, timeout=TIMEOUT, threads=4, shard_size=4)


class _Server(http.server.ThreadingHTTPServer):
    """Serves /img/NAME (real images), /slow/NAME (late unless ``slow`` is False), /page.jpg (HTML),
    /tiny.png (8 x 8), /error.jpg (500); 404 otherwise. Logs every request path."""

    daemon_threads = True

    def __init__(self, images: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.images, self.slow, self.requests = images, True, []
        self.lock = threading.Lock()
        tiny = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(tiny, format="PNG")
        self.tiny = tiny.getvalue()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:  # the slow answer meets a closed socket
        pass

    def taken(self) -> list[str]:
        """The request paths since the last call, sorted."""
        with self.lock:
            paths, self.requests = sorted(self.requests), []
        return paths


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append(self.path)
        folder, _, name = self.path.lstrip("/").partition("/")
        if folder in ("img", "slow") and name in self.server.images:
            if folder == "slow" and self.server.slow:
                time.sleep(SLOW_SECONDS)
            self._send(200, self.server.images[name], "image/jpeg")
        elif self.path == "/page.jpg":
            self._send(200, b"<html><body>not an image</body></html>", "text/html")
        elif self.path == "/tiny.png":
            self._send(200, self.server.tiny, "image/png")
        elif self.path == "/error.jpg":
            self._send(500, b"server error", "text/plain")
        else:
            self._send(404, b"not found", "text/plain")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _expanded_rows() -> list[tuple[str, str, str]]:
    """The first expanded-test rows with distinct images that are in test_imgs (enough for all refs)."""
    rows, seen = [], set()
    with gzip.open(EXPANDED, "rt", encoding="utf-8", newline="") as fh:
        for positive, negative, url in csv.reader(fh):
            name = url.rsplit("/", 1)[-1]
            if name not in seen and (IMAGES / name).is_file():
                seen.add(name)
                rows.append((positive, negative, name))
                if len(rows) == N_REAL + 8:
                    return rows
    raise AssertionError("too few expanded test rows with images")


@pytest.fixture(scope="module")
def server():
    rows = _expanded_rows()
    srv = _Server({name: (IMAGES / name).read_bytes() for _, _, name in rows})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def source(server, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A train-layout release CSV whose image URLs point at the server; returns it and ref -> kind."""
    rows = _expanded_rows()
    refs = {f"{server.base}/img/{name}": "ok" for _, _, name in rows[:N_REAL]}
    refs |= {
        f"{server.base}/slow/{rows[N_REAL][2]}": "timeout",
        f"{server.base}/missing.jpg": "not_found",
        f"{server.base}/error.jpg": "http_error",
        f"http://127.0.0.1:{_closed_port()}/x.jpg": "network_error",
        f"{server.base}/page.jpg": "not_an_image",
        f"{server.base}/tiny.png": "too_small",
        "COCO_val2014_000000000139.jpg": "not_a_url",
    }
    path = tmp_path_factory.mktemp("source") / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["positive", "negative", "image_url"])
        for (positive, negative, _), ref in zip(rows, refs):
            writer.writerow([positive, negative, ref])
        first = next(iter(refs))
        writer.writerow([rows[-1][0], rows[-1][1], first])  # a second item with the first image
    return path, refs


@pytest.fixture(scope="module")
def fetched(server, source, tmp_path_factory) -> tuple[Path, str, str]:
    """The first ``hierarcaps fetch-images`` run (CLI, with the progress bar): folder, stdout, stderr."""
    out = tmp_path_factory.mktemp("fetched") / "images"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = hierarcaps_main(["fetch-images", str(source[0]), "--output", str(out), *OPTIONS])
    assert status == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_counts_failures_per_reason_and_writes_files_mapping_and_report(server, source, fetched):
    out, stdout, stderr = fetched
    path, refs = source
    assert "6 of 13 images fetched (12 requested this run)" in stdout
    assert "12/12" in stderr  # the progress bar reached every requested URL
    # every served URL was requested once (the closed port and the non-URL never reach the server)
    served = sorted(r.removeprefix(server.base) for r, kind in refs.items() if r.startswith(server.base))
    assert server.taken() == served

    report = json.loads((out / "fetch_report.json").read_text())
    assert report["refs"] == 13 and report["ok"] == N_REAL and report["failed"] == FAILED_FIRST
    assert report["requested_this_run"] == 12
    assert "404" in report["examples"]["not_found"][0]["error_message"]
    assert "timed out" in report["examples"]["timeout"][0]["error_message"]

    mapping = pd.read_parquet(out / "images.parquet")
    assert list(mapping["image_ref"]) == list(refs)  # source order, each distinct reference once
    assert dict(zip(mapping["image_ref"], mapping["status"])) == refs
    for row in mapping.itertuples():
        if row.status != "ok":
            assert pd.isna(row.path) and (row.status == "not_a_url" or isinstance(row.error_message, str))
            continue
        file = out / row.path
        served_bytes = server.images[row.image_ref.rsplit("/", 1)[-1]]
        assert row.sha256 == _sha256(served_bytes)  # img2dataset hashes the downloaded bytes
        with Image.open(file) as img:
            assert img.size == (IMAGE_SIZE, IMAGE_SIZE) == (row.width, row.height)
        original = Image.open(io.BytesIO(served_bytes)).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
        diff = np.asarray(original, dtype=float) - np.asarray(open_image(file), dtype=float)
        assert np.abs(diff).mean() < 12  # the same picture, downscaled (JPEG and filter differences only)
    assert not list(out.glob(".fetch-urls*")) and not (out / "shards" / "_tmp").exists()


def test_rerun_fetches_only_what_is_missing(server, source, fetched, tmp_path):
    out = tmp_path / "images"
    shutil.copytree(fetched[0], out)  # the mapping's paths are relative: the copy is a fetched folder
    path, refs = source
    server.taken()
    slow = next(r for r, kind in refs.items() if kind == "timeout")

    # transient failures are retried: the slow URL (now fast) and the 500; nothing else
    server.slow = False
    try:
        result = fetch_images(path, out, SETTINGS, progress=False)
    finally:
        server.slow = True
    assert server.taken() == ["/error.jpg", slow.removeprefix(server.base)]
    assert result.requested == 3 and result.ok == N_REAL + 1  # 3: with the closed port (network_error)
    assert result.failed == {k: v for k, v in FAILED_FIRST.items() if k != "timeout"}
    mapping = pd.read_parquet(out / "images.parquet").set_index("image_ref")
    assert mapping.loc[slow, "status"] == "ok" and (out / mapping.loc[slow, "path"]).is_file()

    # an interrupted shard (no _stats.json) and a deleted file are fetched again
    lost = mapping.loc[next(iter(refs)), "path"]
    (out / lost).unlink()
    shard = pd.read_parquet(out / "shards" / "00001.parquet")
    (out / "shards" / "00001_stats.json").unlink()
    result = fetch_images(path, out, SETTINGS, progress=False)
    # the slow URL of shard 1 was fetched later (shard 3), so it stays
    again = {r.removeprefix(server.base) for r in [*shard["url"], next(iter(refs)), f"{server.base}/error.jpg"]
             if r.startswith(server.base) and r != slow}
    assert set(server.taken()) == again and len(again) > 2
    assert not any(p.name.startswith("00001") for p in (out / "shards").iterdir())
    assert result.ok == N_REAL + 1 and (out / pd.read_parquet(out / "images.parquet")["path"][0]).is_file()

    # --retry-failed asks again for every failed URL, and for nothing that is fetched
    result = fetch_images(path, out, SETTINGS, retry_failed=True, progress=False)
    assert server.taken() == ["/error.jpg", "/missing.jpg", "/page.jpg", "/tiny.png"]
    assert result.requested == 5 and result.ok == N_REAL + 1


def test_webdataset_shards_hold_the_same_images_and_read_through_the_mapping(source, fetched, tmp_path):
    path, refs = source
    out = tmp_path / "wds"
    result = fetch_images(path, out, dataclasses.replace(SETTINGS, output_format="webdataset"), progress=False)
    assert result.ok == N_REAL and result.failed == FAILED_FIRST
    assert sorted(p.suffix for p in (out / "shards").glob("0000*.*") if p.suffix != ".json") == [".parquet"] * 3 + [".tar"] * 3
    tar_map, file_map = load_image_map(out), load_image_map(fetched[0])
    for ref, kind in refs.items():
        assert tar_map[ref].status == kind
        if kind == "ok":
            member = tar_map[ref].location
            assert isinstance(member, TarMember)
            with open(member.tar, "rb") as fh:
                fh.seek(member.offset)
                assert fh.read(member.size) == file_map[ref].location.read_bytes()  # identical JPEG bytes
    # a fetched folder of either format serves the training items' images
    data = load_train_data(str(path))
    kept, locations, skipped = images_for_training(data, out)
    assert [open_image(loc).tobytes() for loc in locations] == [open_image(file_map[r].location).tobytes() for r in kept.image_refs]


def test_rcme_trains_on_the_fetched_images_and_reports_skipped_items(source, fetched, tiny_open_clip_dir, tmp_path, capsys):
    path, refs = source
    out = fetched[0]
    data = load_train_data(str(path))
    kept, locations, skipped = images_for_training(data, out)
    assert len(data) == 14 and len(kept) == N_REAL + 1 and skipped == dict(sorted(FAILED_FIRST.items()))
    mapping = pd.read_parquet(out / "images.parquet").set_index("image_ref")
    assert locations == [out.resolve() / mapping.loc[r, "path"] for r in kept.image_refs]
    assert all(refs[r] == "ok" for r in kept.image_refs)
    assert sorted(kept.texts) == sorted({t for j in range(len(kept)) for t in [*kept.positive[j], *kept.negative[j]]})

    run = tmp_path / "rcme"
    status = finetune_main([
        "--data", str(path), "--model", str(tiny_open_clip_dir), "--backend", "open-clip", "--output", str(run),
        "--set", "loss.name=rcme", "--set", f"data.images_dir={out}", "--set", "optim.batch_size=4",
        "--set", "optim.max_steps=2", "--set", "optim.lr=1e-3", "--no-progress",
    ])
    printed = capsys.readouterr().out
    assert status == 0, printed
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(FAILED_FIRST.items()))
    assert f"skipped 7 items whose image was not fetched ({reasons}); trained on 7" in printed
    counts = json.loads((run / "run.json").read_text())["counts"]
    assert counts["items"] == 7 and counts["skipped_items_without_image"] == 7
    before = load_backend("open-clip", tiny_open_clip_dir).model.state_dict()
    after = load_backend("open-clip", run / "final").model.state_dict()
    assert not torch.equal(before["visual.proj"], after["visual.proj"])  # the image tower trained


def test_sources_build_folders_and_clear_errors(source, fetched, tmp_path, capsys):
    path, refs = source
    # a dataset folder and a finished build's output give the CSV's references
    convert(path, tmp_path / "ds")
    build = tmp_path / "build"
    shutil.copytree(tmp_path / "ds", build / "final" / "dataset")
    (build / "final" / "_SUCCESS").write_text("{}")
    assert read_image_refs(tmp_path / "ds") == read_image_refs(build) == read_image_refs(build / "final") == (list(refs), 0)
    (build / "final" / "_SUCCESS").unlink()
    with pytest.raises(FetchError, match="unfinished"):
        read_image_refs(build)

    bad = tmp_path / "bad.csv"
    bad.write_text("caption,url\na,http://x/1.jpg\n")
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    cases = [
        ([str(bad), "--output", str(tmp_path / "o1")], f"{bad}: line 1"),
        ([str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o2")], "no such file or folder"),
        ([str(tmp_path / "ds"), "--output", str(tmp_path / "o3"), "--split", "test"], "no split 'test'"),
        ([str(path), "--output", str(not_dir / "sub")], "cannot write there"),
        ([str(path), "--output", str(fetched[0]), "--image-size", "128"], "image_size 64 -> 128"),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert hierarcaps_main(["fetch-images", *args, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hierarcaps fetch-images: error:") and message in err and "\n" not in err, err
