"""Time our HierarCaps evaluator against a plain per-row loop, as the released evaluator runs it.

The loop makes one model call per test row (its four texts) and one per image, then searches the
thresholds image by image and threshold by threshold. Ours embeds the distinct texts and the
images in batches and searches every threshold for every image in one vectorised pass. Both run
on the same model and data; the script prints the seconds of each phase, the speed-up, and both
sets of metrics (they agree up to embedding round-off).

    python benchmarks/bench_eval.py                      # tiny random CLIP, real test set if present
    python benchmarks/bench_eval.py --rows 200 --backend open-clip
    python benchmarks/bench_eval.py --model openai/clip-vit-base-patch32   # where the hub is reachable
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune.backends import load_backend
from finetune.evaluation.common import encode_image_files, encode_texts, open_rgb, text_root
from finetune.evaluation.retrieval import RetrievalSet, index_test_set, read_test_csv, resolve_image_refs, retrieve, summarize
from hierarcaps.tiny_models import build_tiny_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hierarcaps"


def synthetic_test_set(folder: Path, rows: int, seed: int = 0) -> tuple[RetrievalSet, Path]:
    """Rows of made-up chains over a small vocabulary, with random 320x240 JPEG images."""
    rng = np.random.default_rng(seed)
    words = ["animal", "dog", "cat", "bird", "vehicle", "car", "bus", "food", "pizza", "table", "man", "woman"]
    chains, refs = [], []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        a, b, c = rng.choice(words, 3, replace=False)
        chains.append((a, f"{a} {b}", f"{a} {b} near {c}", f"a {a} and a {b} near the {c} number {i}"))
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(folder / name)
        refs.append(name)
    return RetrievalSet(chains, refs, "synthetic", "-", "rows"), folder


def per_row_loop(backend, test: RetrievalSet, images_dir: Path, steps: int) -> dict[str, float]:
    """The released evaluator's control flow: per-row and per-image model calls, per-image search."""
    t0 = time.perf_counter()
    root = text_root(backend)
    row_emb = torch.stack([backend.encode_text(list(chain)).float().cpu() for chain in test.chains])  # (n, 4, D)
    refs = list(dict.fromkeys(test.image_refs))
    paths = resolve_image_refs(refs, images_dir)
    img_emb = torch.stack([backend.encode_images([open_rgb(p)]).float().cpu()[0] for p in paths])
    t1 = time.perf_counter()
    radii = (row_emb - root).norm(dim=-1)  # (n, 4)
    texts = np.array(test.chains, dtype=object)
    levels = np.linspace(float(radii.min()), float(radii.max()), steps)
    masks = [radii <= thr for thr in levels]
    image_of_row = np.array([refs.index(r) for r in test.image_refs])
    precisions, recalls = [], []
    for i in range(len(refs)):
        sim = row_emb @ img_emb[i]
        preds = []
        for mask in masks:
            t = texts[mask.numpy()][int(sim[mask].argmax())]
            if not preds or preds[-1] != t:
                preds.append(t)
        refs_i = [test.chains[r] for r in np.nonzero(image_of_row == i)[0]]
        gt = {t for chain in refs_i for t in chain}
        sp = set(preds)
        precisions.append(len(sp & gt) / max(1, len(sp)))
        recalls.append(sum(any(c[k] in sp for c in refs_i) for k in range(4)) / 4)
    tau = np.array([[np.sign(r[j] - r[i]) for i in range(4) for j in range(i + 1, 4)] for r in radii.numpy()]).sum(1) / 6
    t2 = time.perf_counter()
    return {"embed_s": t1 - t0, "search_s": t2 - t1, **summarize(np.array(precisions), np.array(recalls), tau)}


def ours(backend, test: RetrievalSet, images_dir: Path, steps: int) -> dict[str, float]:
    """Our evaluator: batched embedding of distinct texts and images, vectorised search."""
    t0 = time.perf_counter()
    cand = index_test_set(test)
    paths = resolve_image_refs(cand.images, images_dir)
    with torch.no_grad():
        root = text_root(backend)
        text_emb = encode_texts(backend, cand.texts)
        image_emb = encode_image_files(backend, paths)
    t1 = time.perf_counter()
    out = retrieve(text_emb, image_emb, root, cand, "released", steps)
    t2 = time.perf_counter()
    return {"embed_s": t1 - t0, "search_s": t2 - t1, **summarize(out["precision"], out["recall"], out["tau"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="hf-clip", choices=("hf-clip", "open-clip"))
    parser.add_argument("--model", default=None, help="model to load (default: a tiny random one built now)")
    parser.add_argument("--rows", type=int, default=1000, help="test rows to use (first N)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model = args.model or str(build_tiny_model(args.backend.replace("-", "_"), tmp / "model"))
    backend = load_backend(args.backend, model, device=args.device)
    if (DATA / "hierarcaps_test.csv").is_file():
        full = read_test_csv(DATA / "hierarcaps_test.csv")
        test = RetrievalSet(full.chains[: args.rows], full.image_refs[: args.rows], full.origin, full.sha256)
        images_dir = DATA / "test_imgs"
    else:
        test, images_dir = synthetic_test_set(tmp / "imgs", args.rows)
    print(f"model {model} ({args.backend}, {args.device}); {len(test)} rows from {test.origin}; "
          f"torch threads {torch.get_num_threads()}")
    ours(backend, RetrievalSet(test.chains[:8], test.image_refs[:8], "warm-up", "-"), images_dir, args.steps)
    a = ours(backend, test, images_dir, args.steps)
    b = per_row_loop(backend, test, images_dir, args.steps)
    print(f"{'':14}{'embed s':>10}{'search s':>10}{'total s':>10}  precision  recall  tau_d")
    for name, r in (("ours", a), ("per-row loop", b)):
        print(f"{name:14}{r['embed_s']:10.2f}{r['search_s']:10.3f}{r['embed_s'] + r['search_s']:10.2f}"
              f"  {r['precision']:.4f}     {r['recall']:.4f}  {r['tau_d']:.4f}")
    print(f"speed-up: total x{(b['embed_s'] + b['search_s']) / (a['embed_s'] + a['search_s']):.1f}, "
          f"embedding x{b['embed_s'] / a['embed_s']:.1f}, threshold search x{b['search_s'] / a['search_s']:.0f}")


if __name__ == "__main__":
    from hierarcaps.models import quiet_library_progress

    quiet_library_progress()
    main()
