"""GPU check: the vLLM backend against transformers ``generate`` on the same model.

Samples few-shot augmentation lines (``T1 => T2 => T3 => T4``, stop at the newline, as the
augment stage does) from ONE model with both backends and prints, per backend: samples, parse
rate (finished lines with four non-empty tiers), finished rate (ended on the newline or eos,
not cut off by ``max_new_tokens``), newlines leaked into texts (must be 0), distinct samples per
prompt (vLLM with one seed copied into all samples would give 1), generated tokens and
tokens/s. It then checks that parse and finished rates agree within sampling noise (4 standard
errors + 2 points) and exits 1 if not.

By default the model is a tiny Llama with random weights widened to head size 64 (the sizes
vLLM's attention kernels support), primed for a few seconds on demo lines
(:func:`hierarcaps.smoke.prime_tiny_model`) so that it writes parseable lines. ``--model`` takes
any decoder-only hub id or folder instead::

    python benchmarks/bench_vllm_vs_hf.py                       # GPU with vLLM: both backends
    python benchmarks/bench_vllm_vs_hf.py --hf-only --device cpu --prompts 8   # the HF half on a CPU
    python benchmarks/bench_vllm_vs_hf.py --model meta-llama/Llama-2-7b-hf --prompts 256

Without vLLM installed it runs the HF half, prints its figures, and exits 2 with the install hint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hierarcaps.generation import Generation, TextGenerator
from hierarcaps.models import ModelLoadError, ModelSpec, load_causal_lm
from hierarcaps.stages.augment import few_shot_prompt, parse_line


def tiny_model(folder: Path, steps: int) -> Path:
    """A tiny random Llama with head size 64, primed on few-shot lines from the demo captions."""
    from transformers import AutoConfig, LlamaForCausalLM

    from hierarcaps.smoke import prime_tiny_model
    from hierarcaps.tiny_models import build_tiny_model

    build_tiny_model("causal_lm", folder)
    config = AutoConfig.from_pretrained(folder)
    config.update({"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "head_dim": 64})
    LlamaForCausalLM(config).save_pretrained(folder)
    prime_tiny_model("causal_lm", folder, demo_captions(), steps=steps)
    return folder


def demo_captions() -> list[str]:
    """The demo caption texts shipped with the package (Conceptual Captions TSV format)."""
    from importlib import resources

    text = (resources.files("hierarcaps.resources") / "demo" / "cc_captions.tsv").read_text(encoding="utf-8")
    return [line.split("\t")[0] for line in text.splitlines() if line.strip()]


def prompts(count: int, shots: int, seed: int = 0) -> list[str]:
    """Few-shot prompts of ``shots`` rule-made hierarchies each, as the augment stage writes them."""
    from hierarcaps.smoke import rule_hierarchy

    seeds = [rule_hierarchy(c) for c in demo_captions()]
    rng = random.Random(seed)
    return [few_shot_prompt(seeds, rng, shots) for _ in range(count)]


def measure(generator: TextGenerator, texts: list[str], samples: int, max_new_tokens: int) -> dict[str, Any]:
    """One warm-up call, then one timed call; the figures of the timed call."""
    kwargs = dict(num_return_sequences=samples, max_new_tokens=max_new_tokens, stop_at_newline=True)
    generator.generate_with_status(texts[:2], seed=99, **kwargs)
    start = time.perf_counter()
    result: Generation = generator.generate_with_status(texts, seed=0, **kwargs)
    seconds = time.perf_counter() - start
    flat = [(t, f) for ts, fs in zip(result.texts, result.finished) for t, f in zip(ts, fs)]
    tokens = sum(sum(counts) for counts in result.new_tokens)
    return {
        "backend": generator.backend,
        "samples": len(flat),
        "parse_rate": sum(f and parse_line(t)[1] is None for t, f in flat) / len(flat),
        "finished_rate": sum(f for _, f in flat) / len(flat),
        "newlines_in_texts": sum("\n" in t for t, _ in flat),
        "distinct_per_prompt": sum(len(set(ts)) for ts in result.texts) / len(result.texts),
        "generated_tokens": tokens,
        "prompt_tokens": sum(result.prompt_tokens),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def agree(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Rates equal within 4 standard errors of their difference plus 2 points."""
    p = (a[key] * a["samples"] + b[key] * b["samples"]) / (a["samples"] + b["samples"])
    se = math.sqrt(max(p * (1 - p), 1e-12) * (1 / a["samples"] + 1 / b["samples"]))
    return abs(a[key] - b[key]) <= 4 * se + 0.02


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="decoder-only hub id or folder (default: a primed tiny Llama)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto", help="device of the HF half (vLLM picks its GPU)")
    parser.add_argument("--prime-steps", type=int, default=300, help="training steps of the default tiny model")
    parser.add_argument("--hf-only", action="store_true", help="run only the transformers half")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny-llama", args.prime_steps))
        texts = prompts(args.prompts, args.shots)
        model_hf, tokenizer = load_causal_lm(ModelSpec(model, device=args.device))
        hf = measure(TextGenerator(model_hf, tokenizer, model_id=model), texts, args.samples, args.max_new_tokens)
        print(json.dumps(hf))
        if args.hf_only:
            return 0
        del model_hf
        from hierarcaps.vllm_backend import VLLMGenerator

        try:
            generator = VLLMGenerator.from_spec(ModelSpec(model), "--model")
        except ModelLoadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        vllm = measure(generator, texts, args.samples, args.max_new_tokens)
        print(json.dumps(vllm))
    checks = {
        "parse_rate_agrees": agree(hf, vllm, "parse_rate"),
        "finished_rate_agrees": agree(hf, vllm, "finished_rate"),
        "no_newline_leaks": hf["newlines_in_texts"] == vllm["newlines_in_texts"] == 0,
        "vllm_samples_differ": args.samples == 1 or vllm["distinct_per_prompt"] > 1,
        "speed_up": round(vllm["tokens_per_s"] / hf["tokens_per_s"], 2),
    }
    print(json.dumps(checks))
    return 0 if all(v for k, v in checks.items() if k != "speed_up") else 1


if __name__ == "__main__":
    sys.exit(main())
