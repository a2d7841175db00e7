"""Throughput of positive completion and negative hallucination.

Runs :func:`~hierarcaps.stages.complete.complete_positives` and
:func:`~hierarcaps.stages.negatives.hallucinate_negatives` on N captions and prints captions per
second, NLI pairs scored per caption and generate calls per caption.

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

from hierarcaps.generation import TextGenerator
from hierarcaps.models import ModelSpec, load_nli, load_seq2seq_lm
from hierarcaps.nli import NLIScorer
from hierarcaps.stages.complete import CompleteSettings, complete_positives
from hierarcaps.stages.completer import CompleterSettings, add_delimiter_tokens, train_completer
from hierarcaps.stages.negatives import NegativeSettings, hallucinate_negatives
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
        scorer = NLIScorer(*load_nli(ModelSpec(nli_path, **spec)), batch_size=args.nli_batch_size)
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
        pairs_before = scorer.pairs_scored
        start = time.perf_counter()
        _, negative_stats = hallucinate_negatives(negative_rows, completer, scorer,
                                                  NegativeSettings(batch_size=args.batch_size))
        negative_seconds = time.perf_counter() - start
    n = args.captions
    return {
        "captions": n,
        "complete_captions_per_s": n / complete_seconds,
        "complete_nli_pairs_per_caption": complete_stats.extra["nli_pairs_scored"] / n,
        "complete_generate_calls_per_caption": complete_stats.extra["generate_calls"] / n,
        "complete_kept": complete_stats.kept,
        "negatives_captions_per_s": n / negative_seconds,
        "negatives_nli_pairs_per_caption": (scorer.pairs_scored - pairs_before) / n,
        "negatives_generate_calls_per_caption": negative_stats.extra["generate_calls"] / n,
        "negatives_kept": negative_stats.kept,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=64, help="samples per caption (paper: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="captions per generate call")
    parser.add_argument("--nli-batch-size", type=int, default=64)
    parser.add_argument("--completer", help="trained completer (hub id or folder); default: tiny T5")
    parser.add_argument("--nli", help="NLI model (hub id or folder); default: tiny BART")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    figures = run(args)
    for key, value in figures.items():
        print(f"{key:40s} {value:10.3f}" if isinstance(value, float) else f"{key:40s} {value:10d}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    from hierarcaps.models import quiet_library_progress

    quiet_library_progress()
    main()
