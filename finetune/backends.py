"""Model backends: one small interface over the encoders that hierarchy alignment fine-tunes.

Three kinds exist (``load_backend(kind, model)``):

* ``"hf-clip"``: a Hugging Face dual encoder (``CLIPModel``, the HierarCaps authors' choice, or any
  ``AutoModel`` with ``get_text_features`` / ``get_image_features``, e.g. SigLIP). ``model`` is a hub
  id or a ``save_pretrained`` folder.
* ``"open-clip"``: any open_clip model. ``model`` is a built-in architecture name optionally followed
  by ``:pretrained-tag-or-file`` (``ViT-B-32:openai``), an ``hf-hub:org/repo`` id (BioCLIP is
  ``hf-hub:imageomics/bioclip``), a ``local-dir:/path`` or a plain path to a folder holding
  ``open_clip_config.json`` and weights.
* ``"text"``: any transformers text encoder (``AutoModel``) with attention-masked mean pooling, for
  text-only alignment. It has no image tower.

Every backend exposes the same members:

* ``tokenize(texts) -> dict[str, Tensor]`` on the backend's device, and
  ``encode_tokens(tokens) -> (N, D)``: differentiable, **not** normalised (the training path);
* ``preprocess(images) -> (N, 3, H, W)`` and ``encode_pixels(pixels) -> (N, D)``: the same for images;
  ``image_pixels(images)`` is the preprocessing alone, on the CPU (safe in DataLoader workers);
* ``encode_text(texts) / encode_images(images) -> (N, D)``: batched, no grad, L2-normalised
  (the evaluation path); ``encode_image_pixels(pixels)`` the same from ``image_pixels`` output;
* ``image_tower_fingerprint()``: sha256 of everything that decides an image's embedding (the key
  of the evaluators' image-embedding cache);
* ``logit_scale``: the model's (frozen) contrastive temperature as ``exp(log_scale)``, or ``None``;
* ``set_trainable("text" | "both")``: which parameters train (SPEC section 3: RE trains the text
  transformer and text projection, RCME trains both towers; the logit scale never trains);
* ``save(dir)``: the backend's native format (``save_pretrained`` folder, or an open_clip folder
  loadable with ``local-dir:``), written to a temporary folder and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from finetune.geometry import normalize
from hierarcaps.stagedir import follow_umask

KINDS = ("hf-clip", "open-clip", "text")
TOWERS = ("text", "both")


class BackendError(RuntimeError):
    """A backend cannot be loaded or used as asked; the message says what to change."""


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/``"auto"`` -> None (keep the checkpoint's dtype), a name such as ``"bfloat16"`` -> dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    resolved = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise BackendError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto")
    return resolved


def _atomic_dir(target: Path) -> Path:
    """A fresh temporary folder beside ``target``; :func:`_publish_dir` renames it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def _publish_dir(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the completely written ``tmp`` folder, its modes following the umask."""
    follow_umask(tmp)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def _features(out: Any) -> torch.Tensor:
    """Projected features from ``get_text_features``/``get_image_features``.

    transformers 4.x returns the tensor, 5.x an output object whose ``pooler_output`` is the projection.
    """
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise BackendError(f"cannot read projected features from a {type(out).__name__}")
    return pooled


def padding_bounded_batches(lengths: Sequence[int], max_batch: int, max_padding: float) -> list[tuple[int, int]]:
    """Cut ascending token ``lengths`` into ``(start, stop)`` batches of at most ``max_batch`` items
    whose padding to their longest stays within ``max_padding`` of the batch's tokens (a batch
    of one is always allowed). Dense runs of similar lengths make full batches; the long tail of
    captions makes small ones instead of padding short texts to the longest."""
    batches, start, total = [], 0, 0
    for i, length in enumerate(lengths):
        size = i - start + 1
        if i > start and (size > max_batch or size * length > (total + length) * (1 + max_padding)):
            batches.append((start, i))
            start, total = i, 0
        total += length
    if lengths:
        batches.append((start, len(lengths)))
    return batches


class Backend(ABC):
    """A text (and image) encoder plus its tokenizer and image preprocessing. See the module docstring."""

    name: str
    kind: str
    model: nn.Module

    def __init__(self, name: str, model: nn.Module, device: torch.device) -> None:
        self.name = name
        self.model = model
        self.device = device

    # -- training path (differentiable) ---------------------------------------------------------

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token tensors for ``texts`` (padded to the batch, truncated to the context length)."""

    @abstractmethod
    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Text embeddings (N, D), differentiable and not normalised."""

    def image_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocessed pixels (N, 3, H, W) float32 on the CPU. Uses no model state, so DataLoader
        workers may call it while the main process runs the model."""
        raise NotImplementedError(f"the {self.kind!r} backend has no image tower")

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pixel tensor (N, 3, H, W) on the backend's device, in the model's dtype, for ``images``."""
        return self.image_pixels(images).to(self.device, dtype=next(self.model.parameters()).dtype)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings (N, D) from pixels (N, 3, H, W), differentiable and not normalised."""
        raise NotImplementedError(f"the {self.kind!r} backend has no image tower")

    @property
    def logit_scale(self) -> torch.Tensor | None:
        """The contrastive temperature ``exp(log_scale)`` (scalar tensor), or None without one."""
        return None

    # -- evaluation path (no grad, normalised, batched) ----------------------------------------

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (N, D) in batches of ``batch_size``, without gradients."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        chunks = [
            normalize(self.encode_tokens(self.tokenize(texts[i : i + batch_size])).float())
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_text_by_length(self, texts: Sequence[str], max_batch: int, max_padding: float = 0.1) -> torch.Tensor:
        """L2-normalised text embeddings (N, D) in input order, embedded shortest first.

        The texts are tokenized once; each model call takes at most ``max_batch`` texts of similar
        token length and ends before padding would exceed ``max_padding`` of its tokens
        (:func:`padding_bounded_batches`). A call gets exactly the tensors that tokenizing its own
        texts would give (right padding cut at its longest text), so the embeddings are those of
        :meth:`encode_text`, with less padding computed: on the CPU, where every token costs, up
        to a third less time than batches cut by count. Falls back to :meth:`encode_text` on
        length-sorted texts where the tokenizer pads on the left.
        """
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        tokens = self.tokenize(texts)
        mask = tokens.get("attention_mask")
        if mask is not None and not bool(mask[:, 0].all()):  # left padding: a cut would drop real tokens
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            emb = self.encode_text([texts[i] for i in order], batch_size=max_batch)
            return emb[torch.as_tensor(order).argsort()]
        # Without a mask (open_clip) every text fills the whole context: all lengths are equal.
        lengths = mask.sum(1).tolist() if mask is not None else [0] * len(texts)
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = torch.empty(len(texts), self.embed_dim, device=self.device)
        for start, stop in padding_bounded_batches([lengths[i] for i in order], max_batch, max_padding):
            rows = torch.as_tensor(order[start:stop], device=mask.device if mask is not None else self.device)
            width = lengths[order[stop - 1]]
            batch = {k: v[rows, :width] if mask is not None else v[rows] for k, v in tokens.items()}
            out[rows] = normalize(self.encode_tokens(batch).float())
        return out

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) in batches of ``batch_size``, without gradients."""
        images = list(images)
        if not images:
            return torch.empty(0, self.embed_dim, device=self.device)
        chunks = [self.encode_image_pixels(self.image_pixels(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_image_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) of CPU pixels from :meth:`image_pixels`, without gradients."""
        return normalize(self.encode_pixels(pixels.to(self.device, dtype=next(self.model.parameters()).dtype)).float())

    def _preprocessing_id(self) -> str:
        """A stable description of the image preprocessing (sizes, crop, interpolation, mean, std)."""
        raise NotImplementedError(f"the {self.kind!r} backend has no image tower")

    def image_tower_fingerprint(self) -> str:
        """Hex sha256 of what decides an image's embedding: the backend kind, the device type, the
        preprocessing, and every tensor of the image tower (name, dtype, shape and bytes).

        Computed afresh on each call (weights may have trained since); a text-only fine-tune
        keeps it unchanged.
        """
        digest = hashlib.sha256(json.dumps([self.kind, self.device.type, self._preprocessing_id()]).encode())
        n_tensors = 0
        for name, tensor in sorted(self.model.state_dict().items()):
            if self._tower_of(name) != "image":
                continue
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(t.view(torch.uint8).numpy())
            n_tensors += 1
        if not n_tensors:
            raise BackendError(f"{self.name!r} has no image tower to fingerprint")
        return digest.hexdigest()

    @cached_property
    def embed_dim(self) -> int:
        """Size D of the joint embedding (read once from an encoded empty text)."""
        return int(self.encode_tokens(self.tokenize([""])).shape[-1])

    # -- parameters and persistence -------------------------------------------------------------

    @abstractmethod
    def _tower_of(self, param_name: str) -> str | None:
        """``"text"``, ``"image"`` or None (never trains, e.g. the logit scale) for a parameter."""

    def set_trainable(self, towers: str) -> list[str]:
        """Train the text tower (``"text"``) or both towers (``"both"``); freeze the rest.

        Returns the names of the trainable parameters.
        """
        if towers not in TOWERS:
            raise BackendError(f"towers must be one of {TOWERS}, got {towers!r}")
        allowed = {"text"} if towers == "text" else {"text", "image"}
        names = []
        for name, param in self.model.named_parameters():
            train = self._tower_of(name) in allowed
            param.requires_grad_(train)
            if train:
                names.append(name)
        if not names:
            raise BackendError(f"no parameter of {self.name!r} belongs to the {towers!r} tower(s)")
        return names

    def save(self, directory: str | Path) -> Path:
        """Save in the backend's native format to ``directory`` (atomically). Returns the folder."""
        target = Path(directory)
        tmp = _atomic_dir(target)
        try:
            self._save_into(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish_dir(tmp, target)
        return target

    @abstractmethod
    def _save_into(self, directory: Path) -> None:
        """Write the native checkpoint into the (existing, empty) ``directory``."""


class HFClipBackend(Backend):
    """Hugging Face dual encoder (``CLIPModel`` and relatives)."""

    kind = "hf-clip"
    _TEXT = ("text_model.", "text_projection.")
    _IMAGE = ("vision_model.", "visual_projection.")

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, image_processor: Any, device: torch.device):
        super().__init__(name, model, device)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        text_config = getattr(model.config, "text_config", model.config)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _features(self.model.get_text_features(**tokens))

    def image_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.image_processor is None:
            raise BackendError(f"{self.name!r} has no image processor: save one beside the model")
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return pixels["pixel_values"].float()

    def _preprocessing_id(self) -> str:
        return "none" if self.image_processor is None else self.image_processor.to_json_string()

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    @property
    def logit_scale(self) -> torch.Tensor | None:
        scale = getattr(self.model, "logit_scale", None)
        return None if scale is None else scale.detach().float().exp()

    def _tower_of(self, param_name: str) -> str | None:
        if param_name.startswith(self._TEXT):
            return "text"
        if param_name.startswith(self._IMAGE):
            return "image"
        return None

    def _save_into(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(directory)


class OpenClipBackend(Backend):
    """open_clip model (``CLIP``, ``CustomTextCLIP``): text tower = everything but ``visual.*`` and the scale."""

    kind = "open-clip"
    _NEVER = ("logit_scale", "logit_bias")

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer: Any,
        transform: Any,
        config: dict[str, Any],
        device: torch.device,
    ):
        super().__init__(name, model, device)
        self.tokenizer = tokenizer
        self.transform = transform
        self.config = config

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"text": self.tokenizer(list(texts)).to(self.device)}

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["text"])

    def image_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(im.convert("RGB")) for im in images]).float()

    def _preprocessing_id(self) -> str:
        return repr(self.transform)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    @property
    def logit_scale(self) -> torch.Tensor | None:
        scale = getattr(self.model, "logit_scale", None)
        return None if scale is None else scale.detach().float().exp()

    def _tower_of(self, param_name: str) -> str | None:
        if param_name in self._NEVER:
            return None
        return "image" if param_name.startswith("visual.") else "text"

    def _save_into(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / "open_clip_model.safetensors"))
        (directory / "open_clip_config.json").write_text(json.dumps(self.config, indent=2))


class TextBackend(Backend):
    """Any transformers text encoder; the embedding is the attention-masked mean of the last hidden states."""

    kind = "text"

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, device: torch.device):
        super().__init__(name, model, device)
        self.tokenizer = tokenizer
        limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length, 512]
        self.max_length = int(min(x for x in limits if isinstance(x, int) and x > 0))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**tokens).last_hidden_state  # (N, L, D)
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        # A text with no token at all (a tokenizer without special tokens, on "") pools to zero.
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def _tower_of(self, param_name: str) -> str | None:
        return "text"

    def _save_into(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def _load_hf_clip(model: str, device: torch.device, dtype: torch.dtype | None, revision: str | None) -> Backend:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision}
    net = AutoModel.from_pretrained(model, dtype=dtype, **kwargs) if dtype else AutoModel.from_pretrained(model, **kwargs)
    if not hasattr(net, "get_text_features"):
        raise BackendError(f"{model!r} is a {type(net).__name__}, not a dual encoder: use kind 'text' for it")
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    try:
        image_processor = AutoImageProcessor.from_pretrained(model, **kwargs)
    except (OSError, ValueError):
        image_processor = None  # text-only use still works; preprocess() says what is missing
    return HFClipBackend(model, net.to(device).eval(), tokenizer, image_processor, device)


def _open_clip_name(model: str) -> tuple[str, str | None]:
    """Split ``model`` into open_clip's ``model_name`` and ``pretrained`` arguments."""
    if model.startswith(("hf-hub:", "local-dir:")):
        return model, None
    if Path(model).is_dir():
        return "local-dir:" + model, None
    arch, _, pretrained = model.partition(":")
    return arch, pretrained or None


def _load_open_clip(model: str, device: torch.device, dtype: torch.dtype | None) -> Backend:
    import open_clip

    name, pretrained = _open_clip_name(model)
    net, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    if dtype is not None:
        net = net.to(dtype)
    config = {"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": dict(net.visual.preprocess_cfg)}
    tokenizer = open_clip.get_tokenizer(name)
    return OpenClipBackend(model, net.eval(), tokenizer, transform, config, device)


def _load_text(model: str, device: torch.device, dtype: torch.dtype | None, revision: str | None) -> Backend:
    from transformers import AutoModel, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision}
    net = AutoModel.from_pretrained(model, dtype=dtype, **kwargs) if dtype else AutoModel.from_pretrained(model, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    return TextBackend(model, net.to(device).eval(), tokenizer, device)


def load_backend(
    kind: str,
    model: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> Backend:
    """Load ``model`` (hub id, folder or open_clip name; see the module docstring) as a ``kind`` backend.

    ``dtype``: None/"auto" keeps the checkpoint's; ``revision`` pins a hub revision (transformers kinds).
    Raises :class:`BackendError` naming the model and what to do when it cannot be loaded.
    """
    if kind not in KINDS:
        raise BackendError(f"unknown backend kind {kind!r}: choose one of {', '.join(KINDS)}")
    model = str(model)
    device = torch.device(device)
    torch_dtype = _resolve_dtype(dtype)
    try:
        if kind == "hf-clip":
            return _load_hf_clip(model, device, torch_dtype, revision)
        if kind == "open-clip":
            return _load_open_clip(model, device, torch_dtype)
        return _load_text(model, device, torch_dtype, revision)
    except BackendError:
        raise
    except Exception as err:  # loaders raise many types (OSError, RuntimeError, ValueError, HTTP errors)
        raise BackendError(
            f"cannot load {kind} backend from {model!r}: {type(err).__name__}: {err}. "
            "Give a local folder or a hub id that is cached (this machine may be offline: HF_HUB_OFFLINE), "
            "and check that the kind matches the checkpoint."
        ) from err
