"""Fine-tuning speed: our RE step (cached frozen reference) against the released loop's step.

The released HierarCaps loop embeds every batch twice per step: once through the trainable text
encoder and once through a frozen copy for the regulariser. Ours computes the frozen embeddings
once per unique text before training (``finetune.train.frozen_reference``) and gathers rows per
step. Both loops below use the same model, data, batch order, loss and optimizer; the figures
include our one-off reference pass. Printed per backend: optimizer steps per second, texts per
second (8 per item + the root), and the ratio ours / released.

    python benchmarks/bench_finetune.py [--items 256] [--batch-size 8] [--backends hf-clip open-clip text]
    python benchmarks/bench_finetune.py --model-dir /path/to/clip --backends hf-clip   # a real model

Tiny random models are built with ``hierarcaps.tiny_models`` when no ``--model-dir`` is given.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

import torch

from finetune.backends import load_backend
from finetune.data import TrainData, index_texts
from finetune.geometry import normalize
from finetune.losses import re_loss
from finetune.train import AlignmentModule, batch_plan, batch_texts, frozen_reference

TINY_KIND = {"hf-clip": "hf_clip", "open-clip": "open_clip", "text": "text_encoder"}


def synthetic_items(n: int, seed: int = 0) -> TrainData:
    """``n`` HierarCaps-like items with the shared general tiers real data has."""
    rng = random.Random(seed)
    animals = ["goat", "frog", "dog", "cat", "horse", "bird", "cow", "sheep", "lion", "fish"]
    places = ["island", "beach", "street", "park", "field", "forest", "city", "river"]
    general = ["animal", "pet", "creature", "wildlife"]
    pos, neg = [], []
    for i in range(n):
        a, b, p = rng.choice(animals), rng.choice(animals), rng.choice(places)
        pos.append([rng.choice(general), a, f"{a} on {p}", f"a {a} standing near the flowers on the {p} {i}"])
        neg.append(["portrait", b, f"{a} in the {rng.choice(places)} at night", f"a {a} on {p} with a red car {i}"])
    texts, index = index_texts(pos, neg)
    return TrainData([str(i) for i in range(n)], pos, neg, [""] * n, "synthetic", texts, index)


def released_loop(kind: str, model: str, data: TrainData, batch_size: int, lr: float) -> tuple[float, int]:
    """The released step: trainable forward + a second full forward through a frozen copy."""
    backend = load_backend(kind, model)
    frozen = copy.deepcopy(backend.model).eval().requires_grad_(False)
    frozen_backend = copy.copy(backend)
    frozen_backend.model = frozen
    backend.set_trainable("text")
    backend.model.train()
    optimizer = torch.optim.AdamW([p for p in backend.model.parameters() if p.requires_grad], lr=lr)
    plan = batch_plan(len(data), batch_size, 0, 0)
    start = time.perf_counter()
    for items in plan:
        tokens = backend.tokenize(batch_texts(data, items))
        text = normalize(backend.encode_tokens(tokens).float())
        with torch.no_grad():
            ref = normalize(frozen_backend.encode_tokens(tokens).float())[:-1].view(len(items), 8, -1)
        chains = text[:-1].view(len(items), 8, -1)
        loss = re_loss(chains[:, :4], chains[:, 4:], text[-1], ref[:, :4], ref[:, 4:])["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, len(plan)


def our_loop(kind: str, model: str, data: TrainData, batch_size: int, lr: float) -> tuple[float, int, float]:
    """Our step: one trainable forward, frozen reference gathered from the one-off cache."""
    backend = load_backend(kind, model)
    start = time.perf_counter()
    reference = frozen_reference(backend, data.texts)
    reference_seconds = time.perf_counter() - start
    backend.set_trainable("text")
    backend.model.train()
    module = AlignmentModule(backend)
    optimizer = torch.optim.AdamW([p for p in backend.model.parameters() if p.requires_grad], lr=lr)
    plan = batch_plan(len(data), batch_size, 0, 0)
    for items in plan:
        text, _ = module(backend.tokenize(batch_texts(data, items)))
        ref = reference[torch.as_tensor(data.index[items])]
        chains = text[:-1].view(len(items), 8, -1)
        loss = re_loss(chains[:, :4], chains[:, 4:], text[-1], ref[:, :4], ref[:, 4:])["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, len(plan), reference_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backends", nargs="+", default=list(TINY_KIND))
    parser.add_argument("--model-dir", help="use this model for every listed backend instead of tiny ones")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = synthetic_items(args.items)
    print(f"{args.items} items, batch {args.batch_size}, {len(data.texts)} unique of {8 * args.items} texts, "
          f"torch threads {torch.get_num_threads()}")
    header = f"{'backend':<10} {'loop':<9} {'steps/s':>8} {'texts/s':>9} {'ref pass s':>10}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.backends:
            model = args.model_dir
            if model is None:
                from hierarcaps.tiny_models import build_tiny_model

                model = str(build_tiny_model(TINY_KIND[kind], Path(tmp) / kind))
            released_loop(kind, model, synthetic_items(16), args.batch_size, 1e-7)  # warm-up
            t_rel, n = released_loop(kind, model, data, args.batch_size, 1e-7)
            t_ours, n2, t_ref = our_loop(kind, model, data, args.batch_size, 1e-7)
            texts = 8 * args.items + n  # every item's 8 texts + one root per step
            print(f"{kind:<10} {'released':<9} {n / t_rel:8.2f} {texts / t_rel:9.0f} {'-':>10}")
            print(f"{kind:<10} {'ours':<9} {n2 / t_ours:8.2f} {texts / t_ours:9.0f} {t_ref:10.2f}")
            print(f"{kind:<10} ratio ours/released (steps/s, reference pass included): {t_rel / t_ours:.2f}x")


if __name__ == "__main__":
    from hierarcaps.models import quiet_library_progress

    quiet_library_progress()
    main()
