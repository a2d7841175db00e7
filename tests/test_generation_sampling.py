"""Sampling settings (top_k / top_p per stage) and ``models.<role>.batch_size`` on the HF path.

A real tiny Llama (random weights) samples; a spy around ``model.generate`` records each call.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hierarcaps.generation import Sampling, TextGenerator, plan_calls
from hierarcaps.stages.augment import AugmentSettings, augment_hierarchies
from hierarcaps.stages.complete import CompleteSettings, complete_positives

PROMPTS = ["a goat on the island", "dog", "a picture of a cat", "boys pitching a tent", "the"]


class GenerateSpy:
    """Wraps ``model.generate``: records the keyword arguments and batch size of every call."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.original = model.generate
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        self.calls.append({**kwargs, "sequences": kwargs["input_ids"].shape[0] * kwargs["num_return_sequences"]})
        return self.original(**kwargs)


@pytest.fixture()
def spied(tiny_causal_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    spy = GenerateSpy(model)
    model.generate = spy
    return model, tokenizer, spy


def test_plan_calls_splits_prompts_then_samples() -> None:
    assert plan_calls(5, 4, None) == [(0, 5, 4)]
    assert plan_calls(5, 4, 8) == [(0, 2, 4), (2, 4, 4), (4, 5, 4)]  # two whole prompts per call
    assert plan_calls(2, 64, 32) == [(0, 1, 32), (0, 1, 32), (1, 2, 32), (1, 2, 32)]  # samples in blocks
    assert plan_calls(1, 5, 2) == [(0, 1, 2), (0, 1, 2), (0, 1, 1)]
    assert plan_calls(3, 1, 100) == [(0, 3, 1)]


def test_default_is_plain_temperature_sampling_and_filters_reach_generate(spied) -> None:
    model, tokenizer, spy = spied
    generator = TextGenerator(model, tokenizer)
    generator.generate(PROMPTS[:2], max_new_tokens=2, temperature=1.2)
    generator.generate(PROMPTS[:2], max_new_tokens=2, top_k=50, top_p=0.9)
    plain, filtered = spy.calls
    # explicit "off" values, so neither transformers' top_k=50 nor a model's generation_config applies
    assert (plain["temperature"], plain["top_k"], plain["top_p"]) == (1.2, 0, 1.0)
    assert (filtered["top_k"], filtered["top_p"]) == (50, 0.9)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        Sampling(top_k=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        generator.generate(PROMPTS[:1], top_p=1.5)


def test_top_k_1_is_greedy_decoding(spied) -> None:
    """Top-k 1 keeps only the most likely token: the texts are greedy decoding's, whatever the seed."""
    model, tokenizer, spy = spied
    generator = TextGenerator(model, tokenizer)
    sampled = generator.generate(PROMPTS, top_k=1, max_new_tokens=6, seed=11)
    inputs = generator._tokenize(PROMPTS)
    greedy = spy.original(**inputs, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=generator._eos_ids([]))
    assert sampled == [[text] for text in generator.decode(greedy[:, inputs["input_ids"].shape[1]:])]
    assert generator.generate(PROMPTS, top_k=1, max_new_tokens=6, seed=12) == sampled


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_batch_size_caps_the_sequences_per_generate_call(spied, batch_size) -> None:
    """models.<role>.batch_size splits a call; deterministic (top-k 1) results do not change."""
    model, tokenizer, spy = spied
    unsplit = TextGenerator(model, tokenizer).generate(PROMPTS, num_return_sequences=2, top_k=1, max_new_tokens=5)
    spy.calls.clear()
    generator = TextGenerator(model, tokenizer, batch_size=batch_size)
    split = generator.generate_with_status(PROMPTS, num_return_sequences=2, top_k=1, max_new_tokens=5)
    assert split.texts == unsplit
    assert len(spy.calls) == generator.generate_calls == len(plan_calls(len(PROMPTS), 2, batch_size))
    assert all(call["sequences"] <= batch_size for call in spy.calls)
    assert sum(call["sequences"] for call in spy.calls) == 10 == generator.sequences_generated
    assert len(split.finished) == len(split.new_tokens) == 5 and all(len(f) == 2 for f in split.finished)


def test_a_batch_size_that_fits_the_call_keeps_the_seeded_samples(spied) -> None:
    model, tokenizer, spy = spied
    kwargs = dict(num_return_sequences=3, max_new_tokens=6, seed=4)
    unsplit = TextGenerator(model, tokenizer).generate(PROMPTS, **kwargs)
    assert TextGenerator(model, tokenizer, batch_size=15).generate(PROMPTS, **kwargs) == unsplit
    assert TextGenerator(model, tokenizer, batch_size=5).generate(PROMPTS, **kwargs) != unsplit


def test_token_counts(spied) -> None:
    model, tokenizer, _ = spied
    generator = TextGenerator(model, tokenizer)
    result = generator.generate_with_status(PROMPTS[:2], num_return_sequences=2, max_new_tokens=4)
    assert result.prompt_tokens == [len(ids) for ids in generator.prompt_ids(PROMPTS[:2])]
    for counts, flags in zip(result.new_tokens, result.finished):
        for count, finished in zip(counts, flags):
            assert 1 <= count <= 4 and (finished or count == 4)


class RecordingGenerator:
    """Records the keyword arguments the stages pass; answers nothing usable."""

    model_id = "recorder"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.generate_calls = 0

    def generate_with_status(self, prompts, **kwargs):
        from hierarcaps.generation import Generation

        self.calls.append(kwargs)
        self.generate_calls += 1
        n = kwargs.get("num_return_sequences", 1)
        return Generation(texts=[["x"] * n for _ in prompts], finished=[[True] * n for _ in prompts])

    def generate(self, prompts, **kwargs):
        return self.generate_with_status(prompts, **kwargs).texts


def test_stages_pass_their_top_k_and_top_p() -> None:
    seeds = [("a", "b", "c", "d"), ("e", "f", "g", "h")]
    recorder = RecordingGenerator()
    augment_hierarchies(seeds, recorder, AugmentSettings(target_count=1, batch_size=1, max_calls=1, shots=1,
                                                          top_k=40, top_p=0.8))
    complete_positives([{"id": "1", "caption": "a goat on an island in the sea"}], recorder, None,
                       CompleteSettings(num_candidates=2, top_p=0.95))
    augment, complete = recorder.calls
    assert (augment["top_k"], augment["top_p"]) == (40, 0.8)
    assert (complete["top_k"], complete["top_p"]) == (None, 0.95)
