"""On-disk cache of image embeddings for the evaluators.

Text-only fine-tuning (RE) leaves the image tower as it was, so the test images embed to the same
vectors for every checkpoint, and decoding and embedding them is most of an evaluation's time.
The cache keeps each image's normalised embedding (float32, exactly as computed) in

    <cache dir>/<image-tower key>/<image file sha256>.f32     (D raw little-endian float32 values)

where the image-tower key is a sha256 of the backend's :meth:`~finetune.backends.Backend.image_tower_fingerprint`
(kind, device type, preprocessing, every image-tower tensor) and the JPEG draft size. A change to
any of them, or to an image file's bytes, is a miss. ``tower.json`` beside the entries names the
model the key was made from and the embedding size D, for whoever cleans the folder. Entries are written to a temporary file
and renamed, so an interrupted run leaves no partial entry; an unreadable entry is recomputed.

An image inside a webdataset tar shard of a fetch-images folder (``hierarcaps.image_folder.TarMember``) is
keyed by the sha256 of its member's bytes, the stored image file (the mapping's own ``sha256`` column
is img2dataset's hash of the bytes as downloaded, before resizing, so it cannot serve); the same
image stored as a file or as a member is one entry.

Hashing a thousand JPEGs costs more than reading their cached embeddings, so ``file-sha256.json`` in
the cache folder remembers each image file's sha256 under its absolute path, size, modification
time and status-change time (``st_ctime_ns``, which every write updates and no tool can set back);
a file whose stat differs in any of them is hashed again. A tar member is remembered under its
shard's absolute path, offset and size, with the shard's stat. A file changed less than
``RACY_SECONDS`` before it was hashed is not remembered, so that a second write within one tick
of a coarse file-system clock cannot hide behind an unchanged stat.

The command line caches by default in ``$HIERARCAPS_IMAGE_CACHE`` or else
``$XDG_CACHE_HOME/hierarcaps/image-embeddings`` (``~/.cache`` without XDG); ``--image-cache DIR``
moves it and ``--no-image-cache`` turns it off. The Python
functions cache only when given an :class:`ImageEmbeddingCache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune.evaluation.common import file_sha256
from hierarcaps.image_folder import ImageLocation, TarMember, read_tar_member


def default_cache_dir() -> Path:
    """``$HIERARCAPS_IMAGE_CACHE`` if set, else ``$XDG_CACHE_HOME/hierarcaps/image-embeddings``
    (``~/.cache/...`` without XDG_CACHE_HOME)."""
    if os.environ.get("HIERARCAPS_IMAGE_CACHE"):
        return Path(os.environ["HIERARCAPS_IMAGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hierarcaps" / "image-embeddings"


HASHES_FILE = "file-sha256.json"
RACY_SECONDS = 2.0


def image_sha256(location: ImageLocation) -> str:
    """Hex sha256 of an image file's bytes, or of a tar member's (the image file stored in the shard)."""
    if isinstance(location, TarMember):
        return hashlib.sha256(read_tar_member(location)).hexdigest()
    return file_sha256(location)


def file_digests(paths: Sequence[ImageLocation], threads: int = 4) -> list[str]:
    """Content sha256 of each image, hashed in parallel threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(image_sha256, paths))


def _memo_name(location: ImageLocation) -> str:
    """The name an image's hash is remembered under: the file's absolute path, or the shard's plus offset and size."""
    if isinstance(location, TarMember):
        return f"{os.path.abspath(location.tar)}@{location.offset}+{location.size}"
    return os.path.abspath(location)


def _stat_key(location: ImageLocation) -> list[int]:
    """What must be unchanged for a remembered hash to hold: size, mtime and ctime (ns) of the file (or shard)."""
    st = os.stat(location.tar if isinstance(location, TarMember) else location)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class ImageEmbeddingCache:
    """Image embeddings on disk, keyed by image-tower key and image file content (module docstring).

    ``hits`` and ``misses`` count the images looked up since the cache object was made, ``hashed``
    the image files whose sha256 had to be computed (not remembered in ``file-sha256.json``).
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe-")
            probe.close()
        except OSError as err:
            raise ValueError(
                f"image cache folder {self.directory} is not writable ({err.strerror}); "
                "pass --image-cache with a writable folder, or --no-image-cache"
            ) from None
        self.hits = 0
        self.misses = 0
        self.hashed = 0

    def file_digests(self, paths: Sequence[ImageLocation]) -> list[str]:
        """Content sha256 of each image (file or tar member): remembered in ``file-sha256.json`` while the
        file's (shard's) size, mtime and ctime are unchanged, else hashed (``hashed`` counts these) and remembered."""
        memo_path = self.directory / HASHES_FILE
        try:
            memo = json.loads(memo_path.read_text())
            memo = memo if isinstance(memo, dict) else {}
        except (OSError, ValueError):
            memo = {}
        names = [_memo_name(p) for p in paths]
        stats = [_stat_key(p) for p in paths]
        digests: list[str | None] = []
        for name, stat in zip(names, stats):
            known = memo.get(name)
            ok = isinstance(known, list) and len(known) == 2 and known[0] == stat and isinstance(known[1], str)
            digests.append(known[1] if ok else None)
        todo = [i for i, d in enumerate(digests) if d is None]
        if todo:
            settled = time.time_ns() - int(RACY_SECONDS * 1e9)
            for i, digest in zip(todo, file_digests([paths[i] for i in todo])):
                digests[i] = digest
                if max(stats[i][1:]) < settled:
                    memo[names[i]] = [stats[i], digest]
            _write_bytes(memo_path, json.dumps(memo, separators=(",", ":")).encode())
            self.hashed += len(todo)
        return [d for d in digests if d is not None]

    def tower_key(self, encoder: Any, draft_size: int | None) -> str:
        """The image-tower part of the key for ``encoder`` decoding JPEGs at ``draft_size``."""
        fingerprint = getattr(encoder, "image_tower_fingerprint", None)
        if fingerprint is None:
            raise ValueError(f"{type(encoder).__name__} cannot fingerprint its image tower; evaluate without the image cache")
        return hashlib.sha256(f"{fingerprint()}|draft={draft_size}".encode()).hexdigest()[:32]

    def _entry(self, tower: str, digest: str) -> Path:
        return self.directory / tower / f"{digest}.f32"

    def _dim(self, tower: str) -> int | None:
        """Embedding size recorded in ``tower.json``, or None without a readable one."""
        try:
            return int(json.loads((self.directory / tower / "tower.json").read_text())["dim"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load(self, tower: str, digests: Sequence[str]) -> list[np.ndarray | None]:
        """The cached embedding of each image digest under ``tower``, or None where there is none
        (or where the entry does not hold exactly D float32 values)."""
        dim = self._dim(tower)
        found: list[np.ndarray | None] = []
        for digest in digests:
            emb = None
            if dim is not None:
                try:
                    emb = np.fromfile(self._entry(tower, digest), dtype="<f4")
                except OSError:
                    pass
            found.append(emb.astype(np.float32) if emb is not None and emb.shape == (dim,) else None)
        n_hits = sum(e is not None for e in found)
        self.hits += n_hits
        self.misses += len(found) - n_hits
        return found

    def store(self, tower: str, digests: Sequence[str], embeddings: np.ndarray, model: str | None = None) -> None:
        """Write one entry per image (atomically), and ``tower.json`` once per tower key."""
        folder = self.directory / tower
        folder.mkdir(parents=True, exist_ok=True)
        if self._dim(tower) is None:
            info = {"model": model, "dim": int(embeddings.shape[1])}
            _write_bytes(folder / "tower.json", json.dumps(info, indent=2).encode())
        for digest, emb in zip(digests, np.asarray(embeddings, dtype="<f4")):
            _write_bytes(self._entry(tower, digest), emb.tobytes())

    def stats(self) -> dict[str, Any]:
        """Folder, hits and misses, for a metrics JSON."""
        return {"dir": str(self.directory), "hits": self.hits, "misses": self.misses}


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` through a temporary file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_image_embeddings(
    encoder: Any,
    paths: Sequence[ImageLocation],
    cache: ImageEmbeddingCache,
    encode: Any,
    draft_size: int | None = None,
    model: str | None = None,
) -> torch.Tensor:
    """Embeddings (N, D) float32 of the images (files or tar members): cached ones read, the rest
    computed by ``encode(paths) -> (n, D)`` and stored. Images with the same bytes are embedded once."""
    tower = cache.tower_key(encoder, draft_size)
    digests = cache.file_digests(paths)
    unique = list(dict.fromkeys(digests))
    found = dict(zip(unique, cache.load(tower, unique)))
    missing = [d for d in unique if found[d] is None]
    if missing:
        first_path = {d: p for p, d in zip(reversed(paths), reversed(digests))}  # first image of each digest
        computed = encode([first_path[d] for d in missing]).float().cpu()
        cache.store(tower, missing, computed.numpy(), model)
        found.update(zip(missing, computed.numpy()))
    return torch.from_numpy(np.stack([found[d] for d in digests]))
