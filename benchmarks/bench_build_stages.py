"""Throughput of positive completion and negative hallucination, against a naive per-caption loop.

Runs :func:`~hierarcaps.stages.complete.complete_positives` and
:func:`~hierarcaps.stages.negatives.hallucinate_negatives` on N captions and prints captions per
second, generated tokens/s, NLI pairs/s, NLI pairs and forward passes per caption and generate
calls per caption.

It then runs the *naive loop* on the same models and the first ``--naive-captions`` captions:
one model call per candidate, as a straightforward script would. Completion: per caption, per
sample (up to ``num_candidates``), one generate call of one sample, the structural check, and
for a survivor one NLI call on its three adjacent pairs (both directions); it stops at the first
valid candidate. Negatives: per item, per round, per missing tier, one generate call and one
NLI check of that tier. It prints captions/s of both and our speed-up (target: at least 10x).

Last, NLI work per accepted caption against *naive all-pairs scoring* (every candidate of
every caption scored on its three adjacent pairs in both directions, 6 pairs per candidate,
in forward passes of ``--nli-batch-size``; counted, not run): our NLI pairs and forward passes
per accepted caption and their ratio to naive (target: at most 1/5). With the tiny random NLI
model, decisions follow the smoke profile's length rule (the model still scores every pair), so
that captions are accepted at all.

By default it builds the tiny models (``hierarcaps.tiny_models``) and distils the tiny T5 for
a few seconds on grammar-made hierarchies, so its samples contain delimiters and some reach
the NLI stage (the figures measure the plumbing, not a real build). Point ``--completer`` and
``--nli`` at real models (hub ids or folders; e.g. a trained completer and
``facebook/bart-large-mnli``) on a GPU for real figures::

    python benchmarks/bench_build_stages.py --captions 64
    python benchmarks/bench_build_stages.py --completer runs/completer/model \\
        --nli facebook/bart-large-mnli --device cuda --captions 512 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

import math
from collections import Counter
from typing import Any

from hierarcaps.generation import TextGenerator
from hierarcaps.hierarchy import BACKWARD, FORWARD, N_TIERS, completer_prompt, first_tier, normalize_text
from hierarcaps.models import ModelSpec, load_nli, load_seq2seq_lm
from hierarcaps.nli import NLIScorer, entailed_not_entailing
from hierarcaps.pipeline import LengthRuleScorer
from hierarcaps.stages._common import call_seed
from hierarcaps.stages.complete import CompleteSettings, adjacent_pairs, complete_positives, structural_survivors
from hierarcaps.stages.completer import CompleterSettings, add_delimiter_tokens, train_completer
from hierarcaps.stages.negatives import NegativeSettings, check_negatives, hallucinate_negatives, negative_prompts
from hierarcaps.tiny_models import build_tiny_model

ANIMALS = ["goat", "dog", "cat", "horse", "bird", "cow", "sheep", "lion"]
PLACES = ["island", "beach", "street", "park", "field", "forest", "river", "garden"]
ACTIONS = ["eating leaves of", "standing near", "walking on", "sitting under", "looking at"]
OBJECTS = ["a lemon tree", "the flowers", "a red car", "a wooden table", "the grass", "a small boat"]


def synthetic_hierarchies(n: int, seed: int = 0) -> list[list[str]]:
    """Grammar-made hierarchies ``animal → X → X on P → a caption of ten or more words``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
        caption = f"a young {animal} {rng.choice(ACTIONS)} {rng.choice(OBJECTS)} on the {place} in the morning"
        out.append(["animal", animal, f"{animal} on {place}", caption])
    return out


def tiny_models(folder: Path, device: str) -> tuple[str, str]:
    """Build the tiny T5 and BART NLI, distil the T5 briefly; return (completer dir, nli dir)."""
    base, nli = build_tiny_model("seq2seq", folder / "t5"), build_tiny_model("nli", folder / "nli")
    model, tokenizer = load_seq2seq_lm(ModelSpec(str(base), device=device, dtype="float32"))
    settings = CompleterSettings(epochs=3, batch_size=32, learning_rate=1e-2)
    train_completer(synthetic_hierarchies(640), model, tokenizer, settings, folder / "completer")
    return str(folder / "completer"), str(nli)


def naive_completion(captions: list[str], completer: TextGenerator, scorer: NLIScorer,
                     settings: CompleteSettings) -> int:
    """The per-caption loop: one generate call and one NLI call per candidate; returns captions kept."""
    kept = 0
    for number, caption in enumerate(captions):
        caption = normalize_text(caption)
        for sample in range(settings.num_candidates):
            (text,), = completer.generate([completer_prompt([caption], BACKWARD)], num_return_sequences=1,
                                          temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                                          seed=call_seed(settings.seed, number, sample))
            survivors = structural_survivors(caption, [text], Counter())
            if survivors and entailed_not_entailing(scorer, adjacent_pairs(survivors[0][1])).ok.all():
                kept += 1
                break
    return kept


def naive_negatives(positives: list[list[str]], completer: TextGenerator, scorer: NLIScorer,
                    settings: NegativeSettings) -> int:
    """The per-item loop: per round and missing tier one generate call and one NLI check; returns items kept."""
    kept = 0
    for number, positive in enumerate(positives):
        prompts, found = negative_prompts(positive), [False] * N_TIERS
        for round_no in range(settings.rounds):
            for i in (i for i in range(N_TIERS) if not found[i]):
                (text,), = completer.generate([prompts[i]], num_return_sequences=1, temperature=settings.temperature,
                                              max_new_tokens=settings.max_new_tokens, stop_strings=[FORWARD],
                                              seed=call_seed(settings.seed, number, round_no, i))
                found[i] = check_negatives([(positive, i, first_tier(text, FORWARD))], scorer, Counter())[0] is not None
        kept += all(found)
    return kept


def _timed(function: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        completer_path, nli_path = (args.completer, args.nli)
        if completer_path is None or nli_path is None:
            built = tiny_models(Path(tmp), args.device)
            completer_path, nli_path = completer_path or built[0], nli_path or built[1]
        spec = dict(device=args.device, dtype=args.dtype)
        model, tokenizer = load_seq2seq_lm(ModelSpec(completer_path, **spec))
        add_delimiter_tokens(tokenizer, model)
        nli_model, nli_tokenizer = load_nli(ModelSpec(nli_path, **spec))
        length_rule = args.nli is None if args.length_rule is None else args.length_rule

        def new_scorer(**budget: Any) -> Any:
            scorer = NLIScorer(nli_model, nli_tokenizer, batch_size=args.nli_batch_size, **budget)
            return LengthRuleScorer(scorer) if length_rule else scorer

        scorer = new_scorer(max_batch_tokens=args.nli_max_batch_tokens)
        hierarchies = synthetic_hierarchies(args.captions, seed=1)
        rows = [{"caption": h[-1], "image_ref": str(i), "source": "bench"} for i, h in enumerate(hierarchies)]

        completer = TextGenerator(model, tokenizer)
        complete_settings = CompleteSettings(num_candidates=args.candidates, batch_size=args.batch_size)
        start = time.perf_counter()
        positives, complete_stats = complete_positives(rows, completer, scorer, complete_settings)
        complete_seconds = time.perf_counter() - start

        # Negatives start from the grammar hierarchies so every caption has a positive chain.
        negative_rows = [{"positive": h} for h in hierarchies]
        completer = TextGenerator(model, tokenizer)
        negative_settings = NegativeSettings(batch_size=args.batch_size)
        start = time.perf_counter()
        _, negative_stats = hallucinate_negatives(negative_rows, completer, scorer, negative_settings)
        negative_seconds = time.perf_counter() - start

        # The naive loop on the first captions, fresh generator and scorer (no shared cache).
        k = min(args.naive_captions, args.captions)
        naive_scorer = new_scorer()
        naive_generator = TextGenerator(model, tokenizer)
        naive_complete_kept, naive_complete_seconds = _timed(
            naive_completion, [r["caption"] for r in rows[:k]], naive_generator, naive_scorer, complete_settings)
        naive_negatives_kept, naive_negative_seconds = _timed(
            naive_negatives, hierarchies[:k], naive_generator, naive_scorer, negative_settings)
    n = args.captions
    ours = n / (complete_seconds + negative_seconds)
    naive = k / (naive_complete_seconds + naive_negative_seconds)
    accepted = complete_stats.kept
    naive_pairs = n * args.candidates * 2 * (N_TIERS - 1)  # every candidate, 3 adjacent pairs, both directions
    naive_forwards = n * math.ceil(args.candidates * 2 * (N_TIERS - 1) / args.nli_batch_size)
    return {
        "captions": n,
        "complete_captions_per_s": n / complete_seconds,
        "complete_generated_tokens_per_s": complete_stats.throughput()["tokens_per_s"],
        "complete_nli_pairs_per_s": complete_stats.throughput()["pairs_per_s"],
        "complete_nli_pairs_per_caption": complete_stats.extra["nli_pairs_scored"] / n,
        "complete_nli_forwards_per_caption": complete_stats.extra["nli_forward_calls"] / n,
        "complete_generate_calls_per_caption": complete_stats.extra["generate_calls"] / n,
        "complete_kept": complete_stats.kept,
        "negatives_captions_per_s": n / negative_seconds,
        "negatives_generated_tokens_per_s": negative_stats.throughput()["tokens_per_s"],
        "negatives_nli_pairs_per_s": negative_stats.throughput()["pairs_per_s"],
        "negatives_nli_pairs_per_caption": negative_stats.extra["nli_pairs_scored"] / n,
        "negatives_generate_calls_per_caption": negative_stats.extra["generate_calls"] / n,
        "negatives_kept": negative_stats.kept,
        "naive_captions": k,
        "naive_complete_captions_per_s": k / naive_complete_seconds,
        "naive_complete_kept": naive_complete_kept,
        "naive_negatives_captions_per_s": k / naive_negative_seconds,
        "naive_negatives_kept": naive_negatives_kept,
        "complete_plus_negatives_captions_per_s": ours,
        "naive_complete_plus_negatives_captions_per_s": naive,
        "speed_up_over_naive_loop": ours / naive,
        "accepted_captions": accepted,
        "nli_pairs_per_accepted_caption": complete_stats.extra["nli_pairs_scored"] / max(accepted, 1),
        "naive_all_pairs_per_accepted_caption": naive_pairs / max(accepted, 1),
        "nli_pairs_ratio_to_naive": complete_stats.extra["nli_pairs_scored"] / naive_pairs,
        "nli_forwards_per_accepted_caption": complete_stats.extra["nli_forward_calls"] / max(accepted, 1),
        "naive_all_pairs_forwards_per_accepted_caption": naive_forwards / max(accepted, 1),
        "nli_forwards_ratio_to_naive": complete_stats.extra["nli_forward_calls"] / naive_forwards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=64, help="samples per caption (paper: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="captions per generate call")
    parser.add_argument("--nli-batch-size", type=int, default=64, help="most pairs per NLI forward pass")
    parser.add_argument("--nli-max-batch-tokens", type=int, default=16384, help="most padded tokens per NLI pass")
    parser.add_argument("--length-rule", action=argparse.BooleanOptionalAction, default=None,
                        help="decide NLI by the smoke profile's length rule (the model still scores every pair); "
                        "default: on with the tiny random NLI model, whose decisions accept almost nothing")
    parser.add_argument("--naive-captions", type=int, default=4,
                        help="captions the naive per-caption loop runs on (it is slow; its rate is per caption)")
    parser.add_argument("--completer", help="trained completer (hub id or folder); default: tiny T5")
    parser.add_argument("--nli", help="NLI model (hub id or folder); default: tiny BART")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    figures = run(args)
    for key, value in figures.items():
        print(f"{key:46s} {value:12.3f}" if isinstance(value, float) else f"{key:46s} {value:12d}")
    print(f"speed-up over the naive per-caption loop: {figures['speed_up_over_naive_loop']:.1f}x (target >= 10x)")
    # Both accept the same captions (the first valid candidate in sample order), so per accepted
    # caption the ratio is that of the totals.
    print(f"NLI pairs per accepted caption ({figures['accepted_captions']} accepted): "
          f"{figures['nli_pairs_ratio_to_naive']:.3f} of naive all-pairs (target <= 0.2); "
          f"forward passes: {figures['nli_forwards_ratio_to_naive']:.3f} of naive")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    from hierarcaps.models import quiet_library_progress

    quiet_library_progress()
    main()
