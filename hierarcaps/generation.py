"""Batched text sampling around one loaded causal or seq2seq language model.

:class:`TextGenerator` is the only place the build stages call ``model.generate``. Each call
of :meth:`TextGenerator.generate` (or :meth:`~TextGenerator.generate_with_status`) runs exactly
one ``model.generate`` over all the prompts it is given, with ``num_return_sequences`` samples
per prompt, and returns the decoded *continuations* (for a causal LM the prompt is cut off; for
a seq2seq model the decoder output is the continuation). The stages decide how many prompts go
into one call; the generator counts the calls (``generate_calls``) so benchmarks can report them.

Sampling is plain temperature sampling, as the HierarCaps paper describes ("stochastic sampling
with temperature"): by default top-k and top-p are switched off explicitly, because
transformers would otherwise apply its own default ``top_k=50`` or a model's
``generation_config`` (Llama-2-chat ships ``top_p=0.9``). Every call seeds a private copy of
the torch random state, so the same prompts and seed give the same texts.

Stop strings (e.g. the newline of few-shot augmentation, the ``→`` of negative hallucination)
end a sampled sequence early: every vocabulary token whose text contains a stop string acts as
an end-of-sequence token. The returned text is always cut at the first stop string, so the
result does not depend on how the tokenizer splits it.

:meth:`TextGenerator.generate_with_status` also says, per sample, whether it *finished* (an
end-of-sequence or stop token among its generated ids, or a stop string in its decoded text)
or was cut off by ``max_new_tokens``. Few-shot augmentation needs this: the paper generates
"until another newline is predicted", so a line that ran out of tokens is not a line.

Decoding keeps the hierarchy delimiters ``→``/``←`` even when they were added to the
tokenizer as special tokens: only the tokenizer's other special tokens (pad, eos, bos, ...)
are removed before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hierarcaps.hierarchy import BACKWARD, FORWARD
from hierarcaps.models import model_provenance_id

NEWLINE = "\n"


@dataclass
class Generation:
    """Continuations of one :meth:`TextGenerator.generate_with_status` call.

    ``texts[p][s]`` is sample ``s`` of prompt ``p``, cut before the first stop string;
    ``finished[p][s]`` is ``True`` when that sample ended on its own (an end-of-sequence or stop
    token, or a stop string in its text) and ``False`` when ``max_new_tokens`` cut it off.
    """

    texts: list[list[str]]
    finished: list[list[bool]]


class TextGenerator:
    """Sample continuations of prompts from a loaded model, in batched ``generate`` calls.

    Args:
        model: a transformers causal LM or encoder-decoder model (``model.generate``).
        tokenizer: its tokenizer; a missing pad token is set to the eos token.
        model_id: name recorded in provenance (default: :func:`~hierarcaps.models.model_provenance_id`).
        max_input_length: inputs longer than this many tokens are truncated (``None``: never).
        top_k, top_p: sampling filters; the defaults (0 and 1.0) mean plain temperature sampling.
        keep_tokens: special tokens kept in the decoded text (the hierarchy delimiters).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str | None = None,
        max_input_length: int | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        keep_tokens: Sequence[str] = (FORWARD, BACKWARD),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id or model_provenance_id(model)
        self.max_input_length = max_input_length
        self.top_k = top_k
        self.top_p = top_p
        self.keep_tokens = tuple(keep_tokens)
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.generate_calls = 0
        self.sequences_generated = 0
        self._token_texts: list[str] | None = None
        self._stop_ids: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: Sequence[str],
        *,
        num_return_sequences: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        stop_at_newline: bool = False,
        stop_strings: Sequence[str] = (),
        seed: int = 0,
    ) -> list[list[str]]:
        """Sample ``num_return_sequences`` continuations for every prompt, in ONE generate call.

        Returns a list (one entry per prompt, in order) of lists of decoded continuations (in
        sample order), each cut before the first stop string.
        """
        return self.generate_with_status(
            prompts,
            num_return_sequences=num_return_sequences,
            temperature=temperature,
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
        max_new_tokens: int = 64,
        stop_at_newline: bool = False,
        stop_strings: Sequence[str] = (),
        seed: int = 0,
    ) -> Generation:
        """Like :meth:`generate` (ONE generate call), also flagging which samples finished.

        A sample finished when one of its generated token ids is an end-of-sequence id (the
        tokenizer's, the generation config's, or a token containing a stop string) or its decoded
        text contains a stop string (one the tokenizer splits over several tokens); otherwise
        ``max_new_tokens`` cut it off.
        """
        if not prompts:
            return Generation(texts=[], finished=[])
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        stops = [*stop_strings, *([NEWLINE] if stop_at_newline else [])]
        inputs = self._tokenize(list(prompts))
        eos_ids = self._eos_ids(stops)
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed)
            with torch.inference_mode():
                sequences = self.model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=num_return_sequences,
                    eos_token_id=eos_ids,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
        self.generate_calls += 1
        self.sequences_generated += sequences.shape[0]
        # the continuation: a causal LM echoes the prompt; a decoder output starts with its start token
        sequences = sequences[:, 1:] if self.is_encoder_decoder else sequences[:, inputs["input_ids"].shape[1]:]
        raw = self.decode(sequences)
        hit_eos = torch.isin(sequences, torch.tensor(eos_ids, device=sequences.device)).any(dim=1).tolist()
        finished = [eos or any(stop in text for stop in stops) for eos, text in zip(hit_eos, raw)]
        texts = [cut_at_stops(t, stops) for t in raw]
        n = num_return_sequences
        return Generation(
            texts=[texts[i * n:(i + 1) * n] for i in range(len(prompts))],
            finished=[finished[i * n:(i + 1) * n] for i in range(len(prompts))],
        )

    def decode(self, sequences: torch.Tensor) -> list[str]:
        """Decode token ids (N, L) dropping special tokens other than ``keep_tokens``."""
        drop = set(self.tokenizer.all_special_ids) - set(self._keep_ids())
        rows = [[i for i in row if i not in drop] for row in sequences.tolist()]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ helpers
    def _tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Pad (left for causal LMs, so continuations start at one column) and move to device."""
        bos = self.tokenizer.bos_token
        # chat templates may already write the BOS text; never add a second one
        add_special = not (bos and any(p.startswith(bos) for p in prompts))
        encoded = self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            padding_side="right" if self.is_encoder_decoder else "left",
            truncation=self.max_input_length is not None,
            max_length=self.max_input_length,
            add_special_tokens=add_special,
        )
        device = self.model.device
        return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}

    def _keep_ids(self) -> list[int]:
        unk = self.tokenizer.unk_token_id
        ids = (self.tokenizer.convert_tokens_to_ids(t) for t in self.keep_tokens)
        return [i for i in ids if i is not None and i != unk]

    def _eos_ids(self, stops: Sequence[str]) -> list[int]:
        """The eos ids of tokenizer and generation config plus every token containing a stop string.

        Chat models may end a turn with a token other than the tokenizer's eos (Llama-3's
        ``<|eot_id|>``); their ``generation_config`` lists it.
        """
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        ids = {i for i in [self.tokenizer.eos_token_id, *configured] if i is not None}
        for stop in stops:
            ids.update(self._tokens_containing(stop))
        return sorted(ids)

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
