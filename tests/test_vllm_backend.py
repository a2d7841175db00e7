"""The vLLM generation backend (``generation.backend = "vllm"``) against a RECORDED FAKE of vLLM.

vLLM cannot run here (it needs a CUDA GPU and is not installed), so these tests inject a fake
``vllm`` module through ``sys.modules``. Its ``LLM.generate`` replays recorded token streams
(per prompt and seed, from a table the test writes) and applies vLLM's documented per-request
semantics: ``SamplingParams(n, temperature, top_k, top_p, seed, stop, stop_token_ids,
max_tokens)``, a stop string or stop token id ends a request with ``finish_reason="stop"`` (the
``text`` excludes the stop string, ``token_ids`` keep the token that completed it), running out
of ``max_tokens`` gives ``"length"``. Outputs are shaped like vLLM's ``RequestOutput``
(``prompt_token_ids``, ``outputs``) and ``CompletionOutput`` (``text``, ``token_ids``,
``finish_reason``). The real engine is checked on a GPU by ``benchmarks/bench_vllm_vs_hf.py``.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
from transformers import AutoTokenizer

from hierarcaps.generation import Generation, TextGenerator, sample_seed
from hierarcaps.models import ModelLoadError, ModelSpec
from hierarcaps.vllm_backend import VLLMGenerator


@dataclass
class SamplingParams:
    """vLLM's ``SamplingParams`` fields that the adapter sets (vLLM's defaults otherwise)."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int = 16


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class RecordedLLM:
    """A fake ``vllm.LLM``: replays ``recording[(prompt ids, seed)]`` with vLLM's stop rules."""

    def __init__(self, tokenizer: Any, recording: dict[tuple[tuple[int, ...], int], list[int]]) -> None:
        self.tokenizer = tokenizer
        self.recording = recording
        self.calls: list[tuple[list[dict[str, Any]], list[SamplingParams]]] = []

    def generate(self, prompts: list[dict[str, Any]], params: list[SamplingParams], use_tqdm: bool = True):
        self.calls.append((prompts, params))
        outputs = []
        for number, (prompt, p) in enumerate(zip(prompts, params)):
            ids = prompt["prompt_token_ids"]
            stream = self.recording[(tuple(ids), p.seed)]
            outputs.append(RequestOutput(str(number), ids, [self._complete(stream, p)]))
        return outputs

    def _complete(self, stream: list[int], p: SamplingParams) -> CompletionOutput:
        taken: list[int] = []
        for token in stream[:p.max_tokens]:
            taken.append(token)
            if token in p.stop_token_ids:
                return CompletionOutput(0, self._text(taken[:-1]), taken, "stop", token)
            text = self._text(taken)
            hit = [s for s in p.stop if s in text]
            if hit:
                return CompletionOutput(0, text[:min(text.find(s) for s in hit)], taken, "stop", hit[0])
        return CompletionOutput(0, self._text(taken), taken, "length")

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_causal_lm_dir)


def _word(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _generator(tokenizer, recording) -> tuple[VLLMGenerator, RecordedLLM]:
    llm = RecordedLLM(tokenizer, recording)
    return VLLMGenerator(llm, tokenizer, generation_config=None, sampling_params=SamplingParams,
                         model_id="fake-llama"), llm


def test_every_sample_is_its_own_request_with_its_own_seed_and_maps_back_to_its_prompt(tokenizer) -> None:
    """n=3 samples of 2 prompts: 6 single-sample requests, 6 distinct seeds, outputs grouped per prompt."""
    gen = TextGenerator(None, tokenizer, model_id="x")  # only for the prompt ids the adapter sends
    prompts = ["a goat on the island", "dog"]
    ids = gen.prompt_ids(prompts)
    seeds = [sample_seed(5, i) for i in range(6)]
    recording = {(tuple(ids[i // 3]), seeds[i]): _word(tokenizer, f" p{i // 3} s{i % 3} end") for i in range(6)}
    generator, llm = _generator(tokenizer, recording)
    result = generator.generate_with_status(prompts, num_return_sequences=3, seed=5, max_new_tokens=32)
    assert isinstance(result, Generation)
    assert result.texts == [[f" p{p} s{s} end" for s in range(3)] for p in range(2)]
    assert result.finished == [[False] * 3, [False] * 3]  # no stop, no eos: the stream ran out ("length")
    assert result.prompt_tokens == [len(ids[0]), len(ids[1])]
    assert result.new_tokens == [[len(_word(tokenizer, f" p{p} s{s} end")) for s in range(3)] for p in range(2)]
    ((requests, params),) = llm.calls
    assert generator.generate_calls == 1
    assert [r["prompt_token_ids"] for r in requests] == [ids[0]] * 3 + [ids[1]] * 3
    assert all(p.n == 1 for p in params)
    assert [p.seed for p in params] == seeds and len(set(seeds)) == 6
    # the same call seed replays; another call seed asks for other seeds
    assert generator.generate(prompts, num_return_sequences=3, seed=5, max_new_tokens=32) == result.texts
    with pytest.raises(KeyError):  # no recording for seed 6's requests: proof they use other seeds
        generator.generate(prompts, num_return_sequences=3, seed=6, max_new_tokens=32)


def test_stop_strings_eos_and_length_give_the_hf_paths_texts_and_finished_flags(tokenizer) -> None:
    """Stop string (text cut, finished), eos id (finished), max_tokens (unfinished): like the HF path."""
    gen = TextGenerator(None, tokenizer, model_id="x")
    prompts = ["goat", "dog", "cat"]
    ids = gen.prompt_ids(prompts)
    streams = [
        _word(tokenizer, " mountain goat\nnext line"),        # newline: stop string
        _word(tokenizer, " a dog") + [tokenizer.eos_token_id] + _word(tokenizer, " more"),  # eos
        _word(tokenizer, " a very long answer that runs on and on"),  # cut off by max_new_tokens
    ]
    recording = {(tuple(i), sample_seed(0, k)): s for k, (i, s) in enumerate(zip(ids, streams))}
    generator, llm = _generator(tokenizer, recording)
    result = generator.generate_with_status(prompts, stop_at_newline=True, max_new_tokens=5, seed=0)
    assert result.texts == [[" mountain goat"], [" a dog"], [tokenizer.decode(streams[2][:5])]]
    assert result.finished == [[True], [True], [False]]
    (_, params), = llm.calls
    assert all(p.stop == ["\n"] and p.max_tokens == 5 for p in params)
    # stop token ids: eos plus every vocabulary token containing the stop string, as model.generate gets
    assert set(params[0].stop_token_ids) == set(generator._eos_ids(["\n"]))
    assert tokenizer.eos_token_id in params[0].stop_token_ids
    newline_tokens = generator._tokens_containing("\n")
    assert newline_tokens and set(newline_tokens) <= set(params[0].stop_token_ids)
    # the token counts stop at the token that ended each sample
    assert result.new_tokens[1] == [len(_word(tokenizer, " a dog")) + 1] and result.new_tokens[2] == [5]


def test_sampling_settings_reach_vllm_and_default_to_plain_temperature_sampling(tokenizer) -> None:
    gen = TextGenerator(None, tokenizer, model_id="x")
    (ids,) = gen.prompt_ids(["goat"])
    recording = {(tuple(ids), sample_seed(1, 0)): _word(tokenizer, " x")}
    generator, llm = _generator(tokenizer, recording)
    generator.generate(["goat"], temperature=1.2, seed=1)
    generator.generate(["goat"], temperature=0.7, top_k=50, top_p=0.9, seed=1)
    plain, filtered = (params[0] for _, params in llm.calls)
    assert (plain.temperature, plain.top_k, plain.top_p) == (1.2, -1, 1.0)  # vLLM's "no filter" values
    assert (filtered.temperature, filtered.top_k, filtered.top_p) == (0.7, 50, 0.9)
    with pytest.raises(ValueError, match="top_p"):
        generator.generate(["goat"], top_p=0.0)


def test_delimiter_tokens_are_decoded_like_the_hf_path(tokenizer) -> None:
    """Texts come from the returned token ids through the shared decoder (not vLLM's own text)."""
    gen = TextGenerator(None, tokenizer, model_id="x")
    (ids,) = gen.prompt_ids(["goat"])
    stream = [tokenizer.bos_token_id, *_word(tokenizer, " goat ← animal")]
    generator, _ = _generator(tokenizer, {(tuple(ids), sample_seed(0, 0)): stream})
    assert generator.generate(["goat"]) == [gen.decode([stream])]


# ---------------------------------------------------------------------------- engine start


def _fake_vllm(monkeypatch) -> dict[str, Any]:
    started: dict[str, Any] = {}

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            started.update(kwargs)

    module = types.ModuleType("vllm")
    module.LLM = LLM
    module.SamplingParams = SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return started


def test_from_spec_starts_an_engine_with_prefix_caching(monkeypatch, tiny_causal_lm_dir) -> None:
    started = _fake_vllm(monkeypatch)
    spec = ModelSpec(str(tiny_causal_lm_dir), dtype="float16", batch_size=128)
    generator = VLLMGenerator.from_spec(spec, "models.base_lm")
    assert started["model"] == str(tiny_causal_lm_dir) and started["enable_prefix_caching"] is True
    assert started["dtype"] == "float16" and started["max_num_seqs"] == 128
    assert "quantization" not in started
    assert generator.backend == "vllm" and generator.model_id == str(tiny_causal_lm_dir)
    assert generator.sampling_params is SamplingParams


def test_vllm_refuses_a_t5_model_naming_the_setting(monkeypatch, tiny_seq2seq_dir) -> None:
    _fake_vllm(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"models\.completer .*no T5 / encoder-decoder support.*completer_backend=hf"):
        VLLMGenerator.from_spec(ModelSpec(str(tiny_seq2seq_dir)), "models.completer")


def test_missing_vllm_names_the_extra(monkeypatch, tiny_causal_lm_dir) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, as when not installed
    with pytest.raises(ModelLoadError, match=r'pip install "hierarcaps\[vllm\]"'):
        VLLMGenerator.from_spec(ModelSpec(str(tiny_causal_lm_dir)), "models.chat_lm")
