"""Text sampling with vLLM (``generation.backend = "vllm"``), for the decoder-only roles.

vLLM's offline engine (``vllm.LLM``) keeps the KV cache in pages and shares a prompt's cache
among its samples (prefix caching), which is what makes 64 completion candidates per caption or
10K few-shot lines from a 13B model affordable. :class:`VLLMGenerator` is a
:class:`~hierarcaps.generation.TextGenerator` whose sampling step is one ``LLM.generate`` call;
everything else is shared with the Hugging Face path, so both give the same kind of result:

* prompts are tokenized by the model's Hugging Face tokenizer (one BOS, same truncation) and
  passed as token ids, so vLLM reads exactly what ``model.generate`` would;
* every sample is its own request (``n=1``) with its own seed derived from the call's seed
  (:func:`~hierarcaps.generation.sample_seed`): some vLLM versions copy one request's seed into
  all ``n`` of its samples, which makes them identical; prefix caching still shares the prompt;
* the same stop strings and end-of-sequence ids (the tokenizer's, the generation config's, and
  every token containing a stop string) end a sample; the generated ids are decoded and cut at
  the first stop string by the shared code, and a sample *finished* when vLLM reports
  ``finish_reason == "stop"`` (or its text holds a stop string), not ``"length"``;
* ``temperature``, ``top_k`` and ``top_p`` mean what they mean for ``model.generate``
  (``None``: no filter).

vLLM is an optional extra (``pip install "hierarcaps[vllm]"``) and needs a GPU. It has no
encoder-decoder (T5) support, so a T5 completer always samples with transformers.
``models.<role>.batch_size``, when set, is vLLM's ``max_num_seqs`` (sequences decoded at once).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

import transformers

from hierarcaps.generation import Sampled, Sampling, TextGenerator, sample_seed
from hierarcaps.models import ModelLoadError, ModelSpec, _source

INSTALL_HINT = 'pip install "hierarcaps[vllm]" (vLLM needs a CUDA GPU)'


class VLLMGenerator(TextGenerator):
    """A :class:`~hierarcaps.generation.TextGenerator` that samples with a ``vllm.LLM``.

    Args:
        llm: the ``vllm.LLM`` engine (built by :meth:`from_spec`).
        tokenizer: the model's Hugging Face tokenizer (prompt ids, stop tokens, decoding).
        generation_config: the model's ``transformers.GenerationConfig`` (its eos ids), or ``None``.
        sampling_params: ``vllm.SamplingParams`` (the class; injected so tests can record calls).
        model_id: name recorded in provenance.
        max_input_length: prompts longer than this many tokens are truncated (``None``: never).
    """

    backend = "vllm"

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        *,
        generation_config: Any,
        sampling_params: Any,
        model_id: str,
        max_input_length: int | None = None,
    ) -> None:
        super().__init__(None, tokenizer, model_id=model_id, max_input_length=max_input_length)
        self.llm = llm
        self.generation_config = generation_config
        self.sampling_params = sampling_params

    @classmethod
    def from_spec(cls, spec: ModelSpec, setting: str) -> "VLLMGenerator":
        """Start a vLLM engine on the model of ``spec`` (``setting`` names it in errors).

        Raises :class:`~hierarcaps.models.ModelLoadError` when vLLM is not installed or the model
        is an encoder-decoder (T5) model, which vLLM cannot run.
        """
        vllm = import_vllm(setting)
        source, kwargs = _source(spec)
        try:
            config = transformers.AutoConfig.from_pretrained(source, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load {setting} {spec.label!r} for vLLM: {type(exc).__name__}: {exc}\n"
                                 "-> check the hub id, revision or local folder") from exc
        if getattr(config, "is_encoder_decoder", False):
            refuse_encoder_decoder(spec, setting)
        try:
            generation_config = transformers.GenerationConfig.from_pretrained(source, **kwargs)
        except OSError:
            generation_config = None  # no generation_config.json: the tokenizer's eos only
        engine: dict[str, Any] = {
            "model": str(Path(source) / kwargs["gguf_file"]) if "gguf_file" in kwargs else source,
            "tokenizer": source,
            "revision": spec.revision,
            "dtype": vllm_dtype(spec),
            "trust_remote_code": spec.trust_remote_code,
            "enable_prefix_caching": True,
            "seed": 0,
        }
        if spec.quantization == "4bit":
            engine["quantization"] = "bitsandbytes"
        if spec.batch_size is not None:
            engine["max_num_seqs"] = spec.batch_size
        try:
            llm = vllm.LLM(**engine)
        except Exception as exc:  # vLLM raises many types (CUDA, memory, unsupported architecture)
            raise ModelLoadError(f"vLLM could not start {setting} {spec.label!r}: {type(exc).__name__}: {exc}\n"
                                 "-> vLLM needs a CUDA GPU with room for the model; or set generation.backend=hf"
                                 ) from exc
        return cls(llm, tokenizer, generation_config=generation_config, sampling_params=vllm.SamplingParams,
                   model_id=spec.label)

    def _configured_eos(self) -> int | list[int] | None:
        return getattr(self.generation_config, "eos_token_id", None)

    def _sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        sampling: Sampling,
        max_new_tokens: int,
        stops: Sequence[str],
        seed: int,
    ) -> list[Sampled]:
        """ONE ``LLM.generate``: ``n`` single-sample requests per prompt, each with its own seed."""
        eos_ids = self._eos_ids(stops)
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(n)]
        params = [
            self.sampling_params(
                n=1,
                temperature=sampling.temperature,
                top_k=-1 if sampling.top_k is None else sampling.top_k,
                top_p=1.0 if sampling.top_p is None else sampling.top_p,
                seed=sample_seed(seed, index),
                stop=list(stops),
                stop_token_ids=eos_ids,
                max_tokens=max_new_tokens,
            )
            for index in range(len(requests))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        self.generate_calls += 1
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        sampled = []
        for output in outputs:
            (completion,) = output.outputs
            sampled.append(Sampled(list(completion.token_ids), completion.finish_reason == "stop"))
        return sampled


def vllm_dtype(spec: ModelSpec) -> str:
    """The spec's dtype; ``auto`` as the HF path picks it on a GPU (bfloat16 where supported, else float16)."""
    if spec.dtype != "auto":
        return spec.dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"


def import_vllm(setting: str = "generation.backend") -> Any:
    """The ``vllm`` module, or a :class:`~hierarcaps.models.ModelLoadError` naming the extra."""
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ModelLoadError(f"{setting}: generation.backend='vllm' needs the vLLM package, which is not "
                             f"installed ({exc}); {INSTALL_HINT}, or set generation.backend=hf") from exc


def refuse_encoder_decoder(spec: ModelSpec, setting: str) -> None:
    """Raise the error for an encoder-decoder (T5) model asked to sample with vLLM."""
    raise ModelLoadError(
        f"{setting} {spec.label!r} is an encoder-decoder (T5-style) model and vLLM has no T5 / encoder-decoder "
        "support; sample it with transformers (for the completer: generation.completer_backend=hf, or leave it "
        "unset; otherwise generation.backend=hf) or use a decoder-only model"
    )
