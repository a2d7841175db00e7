"""Helpers shared by the evaluators: embedding in batches, image loading, provenance, atomic writes.

Every evaluator talks to a model only through a :class:`finetune.backends.Backend`-like object:
``encode_text(texts, batch_size) -> (N, D)`` and ``encode_images(images, batch_size) -> (N, D)``,
both L2-normalised and without gradient. Images are opened and encoded chunk by chunk, so a
thousand COCO images never sit in memory at full resolution at once; backends that also have
``image_pixels`` / ``encode_image_pixels`` get their images decoded in DataLoader workers, and an
``image_cache.ImageEmbeddingCache`` skips the images the same image tower has embedded before.
Images are image files or members of webdataset tar shards (``hierarcaps.image_folder.ImageLocation``),
found by ``hierarcaps.image_folder.resolve_image_refs`` in a folder of files or a fetch-images folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

import torch
from PIL import Image

from hierarcaps.image_folder import IMAGE_SUFFIXES, ImageLocation, open_image
from hierarcaps.stagedir import follow_umask

if TYPE_CHECKING:
    from finetune.evaluation.image_cache import ImageEmbeddingCache


class Encoder(Protocol):
    """The part of a ``finetune.backends.Backend`` that evaluation uses."""

    name: str

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor: ...

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor: ...


def text_root(encoder: Encoder) -> torch.Tensor:
    """The entailment root: the normalised embedding of the empty string ``""``. Returns (D,)."""
    return encoder.encode_text([""])[0].float().cpu()


# Texts per model call when none is asked for. A GPU runs big batches best; on the CPU a batch of
# 256 long texts runs about a quarter slower than batches of 16 to 64 (open_clip ViT-B/32, which
# pads every text to 77 tokens: 256 texts in 45 s at 256, 32 s at 64, 30 s at 16, one thread).
GPU_TEXT_BATCH = 256
CPU_TEXT_BATCH = 64


def text_batch_size(encoder: Encoder, requested: int | None = None) -> int:
    """``requested``, or the default for the encoder's device: 64 on the CPU, else 256."""
    if requested is not None:
        return requested
    device = getattr(encoder, "device", None)
    return CPU_TEXT_BATCH if device is None or torch.device(device).type == "cpu" else GPU_TEXT_BATCH


def encode_texts(encoder: Encoder, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
    """Normalised embeddings of ``texts`` in batches: (N, D) float32 on the CPU, in input order.

    ``batch_size``: most texts per model call (None: :func:`text_batch_size`'s default for the device).

    Texts are encoded in order of length, so each batch pads to about its own texts' length
    (test sets mix two-word tiers with long captions; unsorted, most batches pad to the longest).
    A backend (``finetune.backends.Backend.encode_text_by_length``) sorts by token length and also
    cuts a batch where padding would pass a tenth of its tokens; other encoders get character-length order.
    """
    texts = list(texts)
    size = text_batch_size(encoder, batch_size)
    if hasattr(encoder, "encode_text_by_length"):
        return encoder.encode_text_by_length(texts, size).float().cpu()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    emb = encoder.encode_text([texts[i] for i in order], batch_size=size).float().cpu()
    out = torch.empty_like(emb)
    out[torch.as_tensor(order, dtype=torch.long)] = emb
    return out


def encode_image_files(
    encoder: Encoder,
    paths: Sequence[ImageLocation],
    batch_size: int = 64,
    draft_size: int | None = None,
    workers: int = 0,
    cache: ImageEmbeddingCache | None = None,
    model: str | None = None,
) -> torch.Tensor:
    """Normalised embeddings of the images (files or tar members), ``batch_size`` at a time: (N, D) float32.

    ``draft_size``: approximate JPEG decoding at a reduced scale (``hierarcaps.image_folder.open_image``).

    ``workers`` > 0 decodes and preprocesses in that many DataLoader worker processes while the
    model runs (for backends with ``image_pixels``); ``cache`` reads embeddings computed before by
    the same image tower and stores new ones (``image_cache``; ``model`` names it in the cache).
    """
    if not paths:
        raise ValueError("no images to encode")
    if cache is None:
        return _encode_files(encoder, paths, batch_size, draft_size, workers)
    from finetune.evaluation.image_cache import cached_image_embeddings

    return cached_image_embeddings(
        encoder, paths, cache, lambda todo: _encode_files(encoder, todo, batch_size, draft_size, workers), draft_size, model
    )


class _ImageFiles(torch.utils.data.Dataset):
    """Images (files or tar members) as preprocessed pixels (1, 3, H, W), decoded in DataLoader workers."""

    def __init__(self, paths: Sequence[ImageLocation], image_pixels: Any, draft_size: int | None) -> None:
        self.paths, self.image_pixels, self.draft_size = list(paths), image_pixels, draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.image_pixels([open_image(self.paths[i], self.draft_size)])


def _encode_files(
    encoder: Encoder, paths: Sequence[ImageLocation], batch_size: int, draft_size: int | None, workers: int
) -> torch.Tensor:
    """Embed images: in this process chunk by chunk, or with DataLoader workers."""
    chunks = []
    if workers > 0 and hasattr(encoder, "image_pixels"):
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, encoder.image_pixels, draft_size),
            batch_size=batch_size,
            num_workers=min(workers, -(-len(paths) // batch_size)),
            collate_fn=torch.cat,
        )
        for pixels in loader:
            chunks.append(encoder.encode_image_pixels(pixels).float().cpu())
    else:
        for start in range(0, len(paths), batch_size):
            images = [open_image(p, draft_size) for p in paths[start : start + batch_size]]
            chunks.append(encoder.encode_images(images, batch_size=batch_size).float().cpu())
    return torch.cat(chunks)


def default_workers() -> int:
    """Image-decoding worker processes by default: the usable CPU cores, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(obj: Any) -> str:
    """Hex sha256 of the canonical JSON of ``obj`` (for inputs that are not files)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def package_versions(names: Iterable[str] = ("hierarcaps", "torch", "transformers", "open_clip_torch", "numpy", "scipy")) -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers (None when absent), plus Python."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    follow_umask(Path(tmp))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    """JSON fallback for numpy scalars/arrays and paths."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")
