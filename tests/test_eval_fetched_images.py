"""``hierarcaps-eval --images`` on a ``hierarcaps fetch-images`` folder, fetched for real.

A loopback HTTP server serves the real HierarCaps test images from ../shared/data; the first rows
of the release test CSV, their image URLs pointed at it, are fetched as files and as webdataset
tar shards. Retrieval on either folder gives exactly the metrics of the same stored images as a
plain folder of files; a failed fetch and a reference missing from the mapping are one clear
error; the image-embedding cache keys tar members by their bytes and hits on a second run.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import http.server
import io
import json
import shutil
import threading
from pathlib import Path
from typing import Iterator

import pytest

from finetune.evaluation.cli import main as eval_main
from hierarcaps.cli import main as hierarcaps_main
from hierarcaps.image_folder import (
    ImageFolder,
    MissingImagesError,
    TarMember,
    coco_image_id,
    load_image_map,
    read_tar_member,
    resolve_image_refs,
)
from hierarcaps.tiny_models import build_tiny_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hierarcaps"
TEST_CSV = DATA / "hierarcaps_test.csv"
IMAGES = DATA / "test_imgs"
pytestmark = pytest.mark.skipif(
    not (TEST_CSV.is_file() and IMAGES.is_dir()),
    reason=f"needs the HierarCaps test CSV and test images in {DATA}",
)

N_ROWS = 6
SCORES = ("precision", "recall", "f1", "tau_d", "n_rows", "n_images")
FETCH_OPTIONS = ["--image-size", "64", "--threads", "4", "--timeout", "5", "--no-progress"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """A loopback server of the real test images (404 for any other name)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(IMAGES)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _test_slice(path: Path, base_url: str, extra_names: tuple[str, ...] = ()) -> Path:
    """The first rows of the release test CSV, image URLs on the loopback server; one row per extra name."""
    with TEST_CSV.open(newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))[: N_ROWS + 1]
    rows += [[f"extra{i}", rows[0][1], name] for i, name in enumerate(extra_names)]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([id_, captions, f"{base_url}/{url.rsplit('/', 1)[-1]}"] for id_, captions, url in rows)
    return path


def _fetch(source: Path, output: Path, *options: str) -> Path:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert hierarcaps_main(["fetch-images", str(source), "--output", str(output), *FETCH_OPTIONS, *options]) == 0, stderr.getvalue()
    return output


@pytest.fixture(scope="module")
def folders(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test slice and its images: fetched as files, as webdataset shards, and the stored files copied
    into a plain folder under the URLs' file names (the same bytes, as the released layout)."""
    root = tmp_path_factory.mktemp("fetched")
    csv_path = _test_slice(root / "test.csv", base_url)
    files = _fetch(csv_path, root / "files")
    wds = _fetch(csv_path, root / "wds", "--format", "webdataset")
    plain = root / "plain"
    plain.mkdir()
    for ref, image in load_image_map(files).items():
        assert image.status == "ok", (ref, image)
        shutil.copy(image.location, plain / ref.rsplit("/", 1)[-1])
    return {"csv": csv_path, "files": files, "webdataset": wds, "plain": plain}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("hf_clip", tmp_path_factory.mktemp("tiny-hf-clip"))


def _retrieval(model: Path, test_csv: Path, images: Path, output: Path, *extra: str) -> dict:
    argv = ["retrieval", "--backend", "hf-clip", "--model", str(model), "--test-csv", str(test_csv),
            "--images", str(images), "--output", str(output), *extra]
    assert eval_main(argv) == 0
    return json.loads(output.read_text())


def test_metrics_on_fetch_folders_equal_the_same_images_as_plain_files(folders, model, tmp_path):
    plain = _retrieval(model, folders["csv"], folders["plain"], tmp_path / "plain.json", "--no-image-cache", "--workers", "0")
    files = _retrieval(model, folders["csv"], folders["files"], tmp_path / "files.json", "--no-image-cache", "--workers", "0")
    wds = _retrieval(model, folders["csv"], folders["webdataset"], tmp_path / "wds.json", "--no-image-cache", "--workers", "1")
    assert plain["n_rows"] == N_ROWS
    assert {k: files[k] for k in SCORES} == {k: plain[k] for k in SCORES} == {k: wds[k] for k in SCORES}
    assert isinstance(resolve_image_refs(list(load_image_map(folders["webdataset"])), folders["webdataset"])[0], TarMember)


def test_image_cache_keys_tar_members_by_their_bytes_and_hits_on_a_second_run(folders, model, tmp_path):
    cache = tmp_path / "cache"
    options = ("--image-cache", str(cache), "--workers", "0")
    first = _retrieval(model, folders["csv"], folders["webdataset"], tmp_path / "1.json", *options)
    second = _retrieval(model, folders["csv"], folders["webdataset"], tmp_path / "2.json", *options)
    n = first["n_images"]
    assert (first["image_cache"]["hits"], first["image_cache"]["misses"]) == (0, n)
    assert (second["image_cache"]["hits"], second["image_cache"]["misses"]) == (n, 0)
    assert {k: first[k] for k in SCORES} == {k: second[k] for k in SCORES}
    members = [image.location for image in load_image_map(folders["webdataset"]).values()]
    stored = {p.stem for p in cache.glob("*/*.f32")}
    assert stored == {hashlib.sha256(read_tar_member(m)).hexdigest() for m in members}
    # the same stored bytes as files are the same entries
    files = _retrieval(model, folders["csv"], folders["files"], tmp_path / "3.json", *options)
    assert (files["image_cache"]["hits"], files["image_cache"]["misses"]) == (n, 0)


def test_a_failed_fetch_is_one_clear_error_naming_count_and_reason(base_url, model, tmp_path, capsys):
    csv_path = _test_slice(tmp_path / "test.csv", base_url, extra_names=("COCO_val2014_000000000000.jpg",))
    fetched = _fetch(csv_path, tmp_path / "fetched")
    capsys.readouterr()
    argv = ["retrieval", "--backend", "hf-clip", "--model", str(model), "--test-csv", str(csv_path),
            "--images", str(fetched), "--output", str(tmp_path / "m.json"), "--no-image-cache", "--workers", "0"]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hierarcaps-eval retrieval: error: 1 of" in err
    assert "(not_found: 1)" in err and f"hierarcaps fetch-images {csv_path} --output {fetched} --retry-failed" in err
    assert not (tmp_path / "m.json").exists()


def test_references_missing_from_the_mapping_or_the_folder_are_named(folders):
    with pytest.raises(MissingImagesError, match=r"1 image reference\(s\) are not in .*images\.parquet, e\.g\. \['http://elsewhere/a\.jpg'\]"):
        resolve_image_refs(["http://elsewhere/a.jpg"], folders["files"])
    with pytest.raises(MissingImagesError, match=r"1 image reference\(s\) have no file in .*plain"):
        resolve_image_refs(["http://elsewhere/a.jpg"], folders["plain"])
    with pytest.raises(MissingImagesError, match="does not exist"):
        resolve_image_refs(["a.jpg"], folders["plain"] / "nowhere")


def test_plain_folders_match_by_file_name_or_coco_id(tmp_path):
    assert coco_image_id("COCO_val2014_000000301718.jpg") == 301718
    assert coco_image_id("coco_train2014_000000000009.JPG") == 9
    assert coco_image_id("000000301718.jpg") == 301718  # COCO 2017 names
    assert coco_image_id("img_12.jpg") is None and coco_image_id("12.jpg") is None
    for name in ("COCO_train2014_000000000009.jpg", "000000000042.jpg", "dog_7.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    folder = ImageFolder(tmp_path)
    assert folder.find("http://x/val2014/COCO_val2014_000000000009.jpg") == tmp_path / "COCO_train2014_000000000009.jpg"
    assert folder.find("http://x/COCO_val2014_000000000042.jpg") == tmp_path / "000000000042.jpg"
    assert folder.find("http://x/dog_7.png") == tmp_path / "dog_7.png"
    assert folder.find("http://x/cat_7.png") is None and folder.find("notes.txt") is None


def test_report_page_embeds_thumbnails_of_tar_members_named_by_reference(folders, tmp_path):
    from finetune.evaluation.report import qualitative_set, render_html

    qset = qualitative_set(folders["csv"], folders["webdataset"], max_images=2)
    page = render_html(tmp_path / "page.html", qset, [("m", [["a"], ["b"]])]).read_text()
    names = [ref.rsplit("/", 1)[-1] for ref in qset.image_refs]
    assert all(isinstance(m, TarMember) for m in qset.image_paths) and len(names) == 2
    assert page.count('src="data:image/jpeg;base64,') == 2 and all(f"<code>{n}</code>" in page for n in names)
