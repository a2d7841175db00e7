"""The evaluators' image-embedding cache and parallel image decoding, on the real test images with
tiny CLIP models: a text-only fine-tune reuses the image embeddings without running the image
tower, the metrics are identical cold and warm, and any change to the image tower or an image
file's bytes is a miss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune.backends import HFClipBackend, load_backend
from finetune.evaluation.common import encode_image_files
from finetune.evaluation.image_cache import ImageEmbeddingCache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hierarcaps"
SCORES = ("precision", "recall", "f1", "tau_d")


@pytest.fixture
def subset(real_test_rows) -> Path:
    """The first 24 rows of the real curated test set."""
    return real_test_rows(24)


@pytest.fixture
def image_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Number of images each call of the hf-clip image tower embedded (in this process)."""
    calls: list[int] = []
    original = HFClipBackend.encode_pixels

    def counted(self: HFClipBackend, pixels: torch.Tensor) -> torch.Tensor:
        calls.append(int(pixels.shape[0]))
        return original(self, pixels)

    monkeypatch.setattr(HFClipBackend, "encode_pixels", counted)
    return calls


def _fine_tuned(base: Path, out: Path, tower: str) -> Path:
    """A copy of ``base`` whose ``tower`` ("text" or "image") weights moved, as training would."""
    backend = load_backend("hf-clip", base)
    prefix = HFClipBackend._TEXT if tower == "text" else HFClipBackend._IMAGE
    with torch.no_grad():
        for name, param in backend.model.named_parameters():
            if name.startswith(prefix):
                param.add_(0.05 * torch.randn_like(param))
    return backend.save(out)


def _retrieval(model: Path, subset: Path, output: Path, *extra: str) -> dict:
    from finetune.evaluation.cli import main

    argv = ["retrieval", "--backend", "hf-clip", "--model", str(model), "--test-csv", str(subset),
            "--images", str(DATA / "test_imgs"), "--output", str(output), *extra]
    assert main(argv) == 0
    return json.loads(output.read_text())


def test_text_fine_tune_reuses_cached_image_embeddings(tiny_hf_clip_dir, subset, image_forwards, tmp_path):
    torch.manual_seed(0)
    text_ft = _fine_tuned(tiny_hf_clip_dir, tmp_path / "text-ft", "text")
    image_ft = _fine_tuned(tiny_hf_clip_dir, tmp_path / "image-ft", "image")
    cache = tmp_path / "cache"

    zero_shot = _retrieval(tiny_hf_clip_dir, subset, tmp_path / "zs.json", "--image-cache", str(cache), "--workers", "1")
    assert sum(image_forwards) == 24 and zero_shot["image_cache"] == {"dir": str(cache), "hits": 0, "misses": 24}

    image_forwards.clear()  # a text-only fine-tune: same image tower, so no image is embedded again
    warm = _retrieval(text_ft, subset, tmp_path / "warm.json", "--image-cache", str(cache), "--workers", "1")
    assert image_forwards == [] and warm["image_cache"]["hits"] == 24 and warm["image_cache"]["misses"] == 0

    # Cold (no cache, images decoded in this process) gives exactly the warm numbers.
    cold = _retrieval(text_ft, subset, tmp_path / "cold.json", "--no-image-cache", "--workers", "0")
    assert sum(image_forwards) == 24 and cold["image_cache"] is None
    assert {k: cold[k] for k in SCORES} == {k: warm[k] for k in SCORES}
    assert {k: warm[k] for k in SCORES} != {k: zero_shot[k] for k in SCORES}  # the text tower did change

    image_forwards.clear()  # a changed image tower is a miss for every image
    moved = _retrieval(image_ft, subset, tmp_path / "img.json", "--image-cache", str(cache), "--workers", "0")
    assert sum(image_forwards) == 24 and moved["image_cache"]["misses"] == 24
    assert not list(cache.rglob(".*"))  # no temporary file left behind
    assert len(list(cache.glob("*/tower.json"))) == 2 and len(list(cache.glob("*/*.f32"))) == 48


def test_changed_image_file_is_the_only_miss(tiny_open_clip_dir, tmp_path):
    if not (DATA / "test_imgs").is_dir():
        pytest.skip(f"real HierarCaps images not found at {DATA}")
    images = tmp_path / "imgs"
    images.mkdir()
    for src in sorted((DATA / "test_imgs").iterdir())[:6]:
        shutil.copy(src, images / src.name)
    paths = sorted(images.iterdir())
    backend = load_backend("open-clip", tiny_open_clip_dir)
    cache = ImageEmbeddingCache(tmp_path / "cache")
    first = encode_image_files(backend, paths, batch_size=4, workers=2, cache=cache)
    assert (cache.hits, cache.misses) == (0, 6)
    # Parallel decoding gives the same embeddings as decoding in this process.
    torch.testing.assert_close(first, encode_image_files(backend, paths, batch_size=4), rtol=0, atol=0)
    from PIL import Image

    Image.open(paths[2]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths[2])
    again = encode_image_files(backend, paths, batch_size=4, cache=cache)
    assert (cache.hits, cache.misses) == (5, 7)
    torch.testing.assert_close(again[[0, 1, 3, 4, 5]], first[[0, 1, 3, 4, 5]], rtol=0, atol=0)
    assert not torch.equal(again[2], first[2])
    # Another JPEG draft size decodes other pixels: a separate key.
    encode_image_files(backend, paths[:1], draft_size=64, cache=cache)
    assert cache.misses == 8
    # A damaged entry (wrong size) is recomputed, not trusted.
    entry = next(p for p in (tmp_path / "cache").rglob("*.f32"))
    entry.write_bytes(entry.read_bytes()[:-4])
    encode_image_files(backend, paths, batch_size=4, cache=cache)
    assert cache.misses == 9 and entry.stat().st_size == 4 * first.shape[1]


def test_unwritable_cache_folder_is_one_clear_error(tiny_hf_clip_dir, subset, tmp_path, capsys):
    from finetune.evaluation.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["retrieval", "--backend", "hf-clip", "--model", str(tiny_hf_clip_dir), "--test-csv", str(subset),
            "--images", str(DATA / "test_imgs"), "--image-cache", str(blocker / "cache"), "--output", str(tmp_path / "m.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "image cache folder" in err and "--no-image-cache" in err and len(err.strip().splitlines()) == 1


def test_default_cache_folder(monkeypatch, tmp_path):
    from finetune.evaluation.image_cache import default_cache_dir

    monkeypatch.delenv("HIERARCAPS_IMAGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "hierarcaps" / "image-embeddings"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "hierarcaps" / "image-embeddings"
    monkeypatch.setenv("HIERARCAPS_IMAGE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_remembered_file_hashes_follow_every_change(tmp_path, monkeypatch):
    """file-sha256.json saves rehashing unchanged files; a rewritten file (same size, mtime set
    back) is hashed again, and a damaged memo is rebuilt, never trusted."""
    import os

    from finetune.evaluation import image_cache
    from finetune.evaluation.common import file_sha256

    monkeypatch.setattr(image_cache, "RACY_SECONDS", 0.0)  # files written just now may be remembered
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.jpg")
        paths[-1].write_bytes(bytes([i]) * 1000)
    cache = ImageEmbeddingCache(tmp_path / "cache")
    truth = [file_sha256(p) for p in paths]
    assert cache.file_digests(paths) == truth and cache.hashed == 4
    assert ImageEmbeddingCache(tmp_path / "cache").file_digests(paths) == truth  # a new process reads the memo
    assert cache.file_digests(paths) == truth and cache.hashed == 4
    # Same size, mtime restored: only the ctime tells; the file must be hashed again.
    before = paths[1].stat()
    paths[1].write_bytes(b"\x07" * 1000)
    os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert cache.file_digests(paths) == [truth[0], file_sha256(paths[1]), truth[2], truth[3]]
    assert cache.hashed == 5 and file_sha256(paths[1]) != truth[1]
    (tmp_path / "cache" / image_cache.HASHES_FILE).write_text("{not json")
    assert cache.file_digests(paths)[1] == file_sha256(paths[1]) and cache.hashed == 9


def test_recently_written_files_are_not_remembered(tmp_path):
    """A file changed within RACY_SECONDS of hashing could change again inside one clock tick."""
    path = tmp_path / "img.jpg"
    path.write_bytes(b"x" * 100)
    cache = ImageEmbeddingCache(tmp_path / "cache")
    cache.file_digests([path])
    cache.file_digests([path])
    assert cache.hashed == 2
