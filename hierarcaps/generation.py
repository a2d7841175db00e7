"""Batched text sampling around one loaded causal or seq2seq language model.

:class:`TextGenerator` is the only place the build stages sample text. Each call of
:meth:`TextGenerator.generate` (or :meth:`~TextGenerator.generate_with_status`) samples
``num_return_sequences`` continuations of every prompt it is given and returns the decoded
*continuations* (for a causal LM the prompt is cut off; for a seq2seq model the decoder output is
the continuation). With Hugging Face transformers (this class) one call runs ONE
``model.generate`` over all the prompts, unless ``batch_size`` (``models.<role>.batch_size``)
caps the sequences per ``model.generate``: then the call is split into several, the first seeded
with the call's seed. :class:`hierarcaps.vllm_backend.VLLMGenerator` samples the same way with
vLLM (``generation.backend = "vllm"``). The stages decide how many prompts go into one call; the
generator counts the model calls (``generate_calls``), the prompt tokens it read
(``prompt_tokens``, padding excluded, each prompt once) and the tokens it sampled
(``generated_tokens``, up to and including each sample's end-of-sequence token), so stages and
benchmarks can report throughput.

Sampling is plain temperature sampling by default, as the HierarCaps paper describes
("stochastic sampling with temperature"): unless a stage sets ``top_k``/``top_p``, both filters
are switched off explicitly, because transformers would otherwise apply its own default
``top_k=50`` or a model's ``generation_config`` (Llama-2-chat ships ``top_p=0.9``). Every call
seeds a private copy of the torch random state, so the same prompts and seed give the same texts.

Stop strings (e.g. the newline of few-shot augmentation, the ``→`` of negative hallucination)
end a sampled sequence early: every vocabulary token whose text contains a stop string acts as
an end-of-sequence token. The returned text is always cut at the first stop string, so the
result does not depend on how the tokenizer splits it.

:meth:`TextGenerator.generate_with_status` also says, per sample, whether it *finished* (an
end-of-sequence or stop token among its generated ids, or a stop string in its decoded text)
or was cut off by ``max_new_tokens``, and how many tokens each prompt and sample had. Few-shot
augmentation needs the status: the paper generates "until another newline is predicted", so a
line that ran out of tokens is not a line. Every backend reports these from one place
(:meth:`TextGenerator._finish`), so they mean the same whichever library sampled.

Decoding keeps the hierarchy delimiters ``→``/``←`` even when they were added to the
tokenizer as special tokens: only the tokenizer's other special tokens (pad, eos, bos, ...)
are removed before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from hierarcaps.hierarchy import BACKWARD, FORWARD
from hierarcaps.models import model_provenance_id

# numpy and torch are imported by the functions that sample, not here: the stage settings that
# every command reads live in modules that import this one.
if TYPE_CHECKING:
    import torch

NEWLINE = "\n"


@dataclass
class Generation:
    """Continuations of one :meth:`TextGenerator.generate_with_status` call.

    ``texts[p][s]`` is sample ``s`` of prompt ``p``, cut before the first stop string;
    ``finished[p][s]`` is ``True`` when that sample ended on its own (an end-of-sequence or stop
    token, or a stop string in its text) and ``False`` when ``max_new_tokens`` cut it off;
    ``new_tokens[p][s]`` is the number of tokens sampled for it (up to and including the token
    that ended it); ``prompt_tokens[p]`` the number of tokens of prompt ``p`` (without padding).
    """

    texts: list[list[str]]
    finished: list[list[bool]]
    new_tokens: list[list[int]] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Sampling:
    """How one call samples: temperature and the optional top-k / top-p (nucleus) filters.

    ``top_k = None`` and ``top_p = None`` mean no filter: plain temperature sampling (the paper).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or none for no top-k filter), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or none for no nucleus filter), got {self.top_p}")


@dataclass
class Sampled:
    """One sampled sequence as a backend returns it: generated ids and whether it ended by itself."""

    token_ids: list[int]
    ended: bool


def sample_seed(seed: int, index: int) -> int:
    """A 31-bit seed for sub-call or sample ``index`` of a call seeded ``seed`` (distinct per index)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def plan_calls(num_prompts: int, num_samples: int, max_sequences: int | None) -> list[tuple[int, int, int]]:
    """Split a call into model calls of at most ``max_sequences`` sequences (``None``: one call).

    Returns ``(first prompt, end prompt, samples per prompt)`` per model call: whole prompts
    with all their samples while they fit, else one prompt per call with its samples in blocks.
    """
    if max_sequences is None:
        return [(0, num_prompts, num_samples)]
    block = min(num_samples, max_sequences)
    per_call = max(1, max_sequences // block)
    return [
        (first, min(first + per_call, num_prompts), min(block, num_samples - done))
        for first in range(0, num_prompts, per_call)
        for done in range(0, num_samples, block)
    ]


class TextGenerator:
    """Sample continuations of prompts from a loaded model, in batched ``generate`` calls.

    Args:
        model: a transformers causal LM or encoder-decoder model (``model.generate``).
        tokenizer: its tokenizer; a missing pad token is set to the eos token.
        model_id: name recorded in provenance (default: :func:`~hierarcaps.models.model_provenance_id`).
        max_input_length: inputs longer than this many tokens are truncated (``None``: never).
        batch_size: at most this many sequences (prompts x samples) per ``model.generate``
            (``models.<role>.batch_size``); ``None``: each call is one ``model.generate``.
        keep_tokens: special tokens kept in the decoded text (the hierarchy delimiters).
    """

    backend = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str | None = None,
        max_input_length: int | None = None,
        batch_size: int | None = None,
        keep_tokens: Sequence[str] = (FORWARD, BACKWARD),
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or none), got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        config = getattr(model, "config", None)
        self.model_id = model_id or model_provenance_id(model)
        self.max_input_length = max_input_length
        self.batch_size = batch_size
        self.keep_tokens = tuple(keep_tokens)
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.generate_calls = 0
        self.sequences_generated = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._token_texts: list[str] | None = None
        self._stop_ids: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: Sequence[str],
        *,
        num_return_sequences: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        max_new_tokens: int = 64,
        stop_at_newline: bool = False,
        stop_strings: Sequence[str] = (),
        seed: int = 0,
    ) -> list[list[str]]:
        """Sample ``num_return_sequences`` continuations for every prompt.

        Returns a list (one entry per prompt, in order) of lists of decoded continuations (in
        sample order), each cut before the first stop string.
        """
        return self.generate_with_status(
            prompts,
            num_return_sequences=num_return_sequences,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_at_newline=stop_at_newline,
            stop_strings=stop_strings,
            seed=seed,
        ).texts

    def generate_with_status(
        self,
        prompts: Sequence[str],
        *,
        num_return_sequences: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        max_new_tokens: int = 64,
        stop_at_newline: bool = False,
        stop_strings: Sequence[str] = (),
        seed: int = 0,
    ) -> Generation:
        """Like :meth:`generate`, also flagging which samples finished and counting tokens.

        A sample finished when one of its generated token ids is an end-of-sequence id (the
        tokenizer's, the generation config's, or a token containing a stop string) or its decoded
        text contains a stop string (one the tokenizer splits over several tokens); otherwise
        ``max_new_tokens`` cut it off.
        """
        sampling = Sampling(temperature, top_k, top_p)
        if not prompts:
            return Generation(texts=[], finished=[], new_tokens=[], prompt_tokens=[])
        stops = [*stop_strings, *([NEWLINE] if stop_at_newline else [])]
        prompt_ids = self.prompt_ids(list(prompts))
        sampled = self._sample(prompt_ids, num_return_sequences, sampling, max_new_tokens, stops, seed)
        return self._finish(sampled, [len(ids) for ids in prompt_ids], num_return_sequences, stops)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """The token ids of each prompt as the model reads it (no padding)."""
        encoded = self.tokenizer(prompts, **self._encoding_options(prompts))
        return [list(ids) for ids in encoded["input_ids"]]

    # ------------------------------------------------------------------ one place for every backend
    def _finish(self, sampled: list[Sampled], prompt_tokens: list[int], n: int, stops: Sequence[str]) -> Generation:
        """Decode, cut at stops, flag finished samples and count tokens (``sampled`` prompt-major)."""
        self.sequences_generated += len(sampled)
        raw = self.decode([s.token_ids for s in sampled])
        finished = [s.ended or any(stop in text for stop in stops) for s, text in zip(sampled, raw)]
        texts = [cut_at_stops(t, stops) for t in raw]
        counts = [len(s.token_ids) for s in sampled]
        self.prompt_tokens += sum(prompt_tokens)
        self.generated_tokens += sum(counts)
        per_prompt = range(len(prompt_tokens))
        return Generation(
            texts=[texts[i * n:(i + 1) * n] for i in per_prompt],
            finished=[finished[i * n:(i + 1) * n] for i in per_prompt],
            new_tokens=[counts[i * n:(i + 1) * n] for i in per_prompt],
            prompt_tokens=list(prompt_tokens),
        )

    def _sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        sampling: Sampling,
        max_new_tokens: int,
        stops: Sequence[str],
        seed: int,
    ) -> list[Sampled]:
        """``n`` samples per prompt (prompt-major) from ``model.generate``, split by ``batch_size``."""
        eos_ids = self._eos_ids(stops)
        per_prompt: list[list[Sampled]] = [[] for _ in prompt_ids]
        for call_no, (first, end, samples) in enumerate(plan_calls(len(prompt_ids), n, self.batch_size)):
            rows = self._generate_once(prompt_ids[first:end], samples, sampling, max_new_tokens, eos_ids,
                                       seed if call_no == 0 else sample_seed(seed, call_no))
            for offset, prompt in enumerate(range(first, end)):
                per_prompt[prompt].extend(rows[offset * samples:(offset + 1) * samples])
        return [s for samples in per_prompt for s in samples]

    def _generate_once(
        self,
        prompt_ids: list[list[int]],
        n: int,
        sampling: Sampling,
        max_new_tokens: int,
        eos_ids: list[int],
        seed: int,
    ) -> list[Sampled]:
        """One ``model.generate`` over the prompts, seeded; each row's ids end at its first eos id."""
        import torch

        inputs = self._pad(prompt_ids)
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed)
            with torch.inference_mode():
                sequences = self.model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_k=sampling.top_k or 0,
                    top_p=1.0 if sampling.top_p is None else sampling.top_p,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=n,
                    eos_token_id=eos_ids,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
        self.generate_calls += 1
        # the continuation: a causal LM echoes the prompt; a decoder output starts with its start token
        sequences = sequences[:, 1:] if self.is_encoder_decoder else sequences[:, inputs["input_ids"].shape[1]:]
        ends = set(eos_ids)
        out = []
        for row in sequences.tolist():
            end = next((i for i, token in enumerate(row) if token in ends), None)
            out.append(Sampled(row if end is None else row[:end + 1], end is not None))
        return out

    def decode(self, sequences: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Decode token id rows dropping special tokens other than ``keep_tokens``."""
        import torch

        drop = set(self.tokenizer.all_special_ids) - set(self._keep_ids())
        rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else sequences
        rows = [[i for i in row if i not in drop] for row in rows]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ helpers
    def _encoding_options(self, prompts: list[str]) -> dict[str, Any]:
        """Tokenizer options shared by every backend: truncation, and at most one BOS."""
        bos = self.tokenizer.bos_token
        # chat templates may already write the BOS text; never add a second one
        add_special = not (bos and any(p.startswith(bos) for p in prompts))
        return {
            "truncation": self.max_input_length is not None,
            "max_length": self.max_input_length,
            "add_special_tokens": add_special,
        }

    def _tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize prompt texts into a padded batch on the model's device (see :meth:`_pad`)."""
        return self._pad(self.prompt_ids(prompts))

    def _pad(self, prompt_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad (left for causal LMs, so continuations start at one column) and move to device."""
        import torch

        width = max(len(ids) for ids in prompt_ids)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, tokens in enumerate(prompt_ids):
            columns = slice(0, len(tokens)) if self.is_encoder_decoder else slice(width - len(tokens), width)
            ids[row, columns] = torch.tensor(tokens, dtype=torch.long)
            mask[row, columns] = 1
        device = self.model.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def _keep_ids(self) -> list[int]:
        unk = self.tokenizer.unk_token_id
        ids = (self.tokenizer.convert_tokens_to_ids(t) for t in self.keep_tokens)
        return [i for i in ids if i is not None and i != unk]

    def _eos_ids(self, stops: Sequence[str]) -> list[int]:
        """The eos ids of tokenizer and generation config plus every token containing a stop string.

        Chat models may end a turn with a token other than the tokenizer's eos (Llama-3's
        ``<|eot_id|>``); their ``generation_config`` lists it.
        """
        configured = self._configured_eos()
        configured = configured if isinstance(configured, list) else [configured]
        ids = {i for i in [self.tokenizer.eos_token_id, *configured] if i is not None}
        for stop in stops:
            ids.update(self._tokens_containing(stop))
        return sorted(ids)

    def _configured_eos(self) -> int | list[int] | None:
        """The end-of-sequence id(s) of the model's generation config."""
        return getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)

    def _tokens_containing(self, stop: str) -> list[int]:
        if stop not in self._stop_ids:
            if self._token_texts is None:
                self._token_texts = self.tokenizer.batch_decode(
                    [[i] for i in range(len(self.tokenizer))], skip_special_tokens=False
                )
            self._stop_ids[stop] = [i for i, text in enumerate(self._token_texts) if stop in text]
        return self._stop_ids[stop]

    def _rng_devices(self) -> list[torch.device]:
        device = self.model.device
        return [device] if device.type == "cuda" else []


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]
