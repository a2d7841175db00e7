"""Time `hierarcaps-eval retrieval` (cold and warm image cache) against per-row loops run the way
the released evaluator runs, on the same model and the real 1K test set.

Two baselines, both one model call per test row (its four texts) and one per image:

* the released control flow (``released_loop``): pandas rows, a torch arg-max with ``.item()``
  per image and threshold, as the authors' evaluator is written;
* a lean per-row loop (``lean_loop``): the same calls without pandas, searching with numpy.

Ours decodes images in DataLoader workers, embeds the distinct texts in batches, reads the image
embeddings from the on-disk cache when the image tower is unchanged (warm), and searches every
threshold for every image in one vectorised pass.

Two sets of figures:

* evaluation: from the test CSV to the metrics, model already loaded (what the evaluator does);
* whole command: wall time of a fresh process each (Python start-up, imports, model load,
  evaluation), `hierarcaps-eval retrieval` against each loop as a script of its own
  (``--loop-only``); and, for scale, a process that only starts, imports and loads the model
  (``--load-only``), the fixed cost every command pays before evaluating anything;
* with ``--checkpoints N``, a checkpoint series: the model and N-1 text-fine-tuned stand-ins, a
  released-flow command each against one ``hierarcaps-eval retrieval`` given all N ``--model``.

The metrics of all runs must be identical; the script says so, or exits 1.

    python benchmarks/bench_eval.py                      # tiny random CLIP, real test set if present
    python benchmarks/bench_eval.py --rows 200 --backend open-clip
    python benchmarks/bench_eval.py --no-commands --checkpoints 5         # a series of 5 checkpoints
    python benchmarks/bench_eval.py --model openai/clip-vit-base-patch32   # where the hub is reachable
    python benchmarks/bench_eval.py --backend open-clip --random-arch ViT-B-32   # real-size towers, random weights
    python benchmarks/bench_eval.py --random-arch ViT-B-32 --rows 100          # the released model's towers (hf-clip)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import kendalltau

from finetune.backends import load_backend
from finetune.evaluation.common import default_workers, text_root
from finetune.evaluation.image_cache import ImageEmbeddingCache
from finetune.evaluation.retrieval import RetrievalSet, evaluate_retrieval, read_test_csv, summarize
from hierarcaps.image_folder import open_image, resolve_image_refs
from hierarcaps.tiny_models import build_tiny_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hierarcaps"
SCORES = ("precision", "recall", "tau_d")


def synthetic_test_set(folder: Path, rows: int, seed: int = 0) -> Path:
    """A release-format CSV of made-up chains over a small vocabulary, with random 320x240 JPEGs."""
    rng = np.random.default_rng(seed)
    words = ["animal", "dog", "cat", "bird", "vehicle", "car", "bus", "food", "pizza", "table", "man", "woman"]
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["id,captions,image_url"]
    for i in range(rows):
        a, b, c = rng.choice(words, 3, replace=False)
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(folder / name)
        lines.append(f'{i},"{a} => {a} {b} => {a} {b} near {c} => a {a} and a {b} near the {c} number {i}",{name}')
    csv = folder / "test.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def released_loop(backend, csv: Path, images_dir: Path, steps: int) -> dict[str, float]:
    """The released evaluator's control flow, written anew (TAU-VAILab/hierarcaps,
    ``code/evaluation/hierarchical_retrieval.py``; its code is not copied): pandas reads the CSV and
    maps COCO ids to the files of a folder listing; one model call per unique image, then one per
    row (its four texts) over ``DataFrame.iterrows``; for every image and every threshold a masked
    torch ``argmax(...).item()`` (and ``max().item()`` for each new prediction); the radii gathered
    row by row again; ``kendalltau`` per row of the radii's ``argsort``. Model calls go through
    ``backend``, the same tokenizer, preprocessing and weights as ours, so the embeddings are the
    same. One change: the argsort is stable (ties in tier order), as in ours and in
    ``finetune.evaluation.retrieval.released_tau_d``. Returns the summary metrics plus ``phase_s``.
    """
    import pandas as pd

    def tiers(row) -> list[str]:
        return [t.strip() for t in row.captions.split("=>")]

    t0 = time.perf_counter()
    coco_id = re.compile(r"_(\d+)\.[A-Za-z]+$")
    id_to_file = {int(m.group(1)): str(p) for p in images_dir.iterdir() if (m := coco_id.search(p.name))}
    df = pd.read_csv(csv)
    df["img_fn"] = df.image_url.str.extract(r"_(\d+)")[0].astype(int).map(id_to_file)
    with torch.no_grad():
        root = text_root(backend)
        unique_files = df.img_fn.drop_duplicates()
        image_index, img_emb = {}, []
        for i, fn in enumerate(unique_files):
            img_emb.append(backend.encode_images([Image.open(fn)]).float().cpu()[0])
            image_index[fn] = i
        t1 = time.perf_counter()
        row_emb, rows_of_image = [], {}
        for i, row in df.iterrows():
            row_emb.append(backend.encode_text(tiers(row)).float().cpu())
            rows_of_image.setdefault(image_index[row.img_fn], []).append(i)
    t2 = time.perf_counter()
    emb, img_emb = torch.stack(row_emb), torch.stack(img_emb)  # (n, 4, D), (m, D)
    radii = (emb - root).norm(dim=-1)  # (n, 4)
    levels = np.linspace(radii.min().item(), radii.max().item(), steps)
    masks = [radii <= thr for thr in levels]
    texts = np.array([tiers(row) for _, row in df.iterrows()])
    masked_texts = [texts[mask.numpy()] for mask in masks]
    precisions, recalls = [], []
    for i in range(len(unique_files)):
        sim = emb @ img_emb[i]  # (n, 4)
        preds, values = [], []
        for mask, candidates in zip(masks, masked_texts):
            t = candidates[sim[mask].argmax().item()]
            if not preds or preds[-1] != t:
                preds.append(t)
                values.append(sim[mask].max().item())
        refs = [texts[j] for j in rows_of_image[i]]
        gt = {t for chain in refs for t in chain}
        sp = set(preds)
        precisions.append(len(sp & gt) / max(1, len(sp)))
        recalls.append(sum(any(c[k] in sp for c in refs) for k in range(4)) / 4)
    row_radii = torch.stack([(emb[i] - root).norm(dim=-1) for i, _ in df.iterrows()])
    tau = np.array([kendalltau(r.numpy(), [1, 2, 3, 4]).statistic for r in row_radii.argsort(dim=-1, stable=True)])
    phases = {"images": t1 - t0, "texts": t2 - t1, "search": time.perf_counter() - t2}
    return {**summarize(np.array(precisions), np.array(recalls), tau), "phase_s": phases}


def lean_loop(backend, test: RetrievalSet, images_dir: Path, steps: int) -> dict[str, float]:
    """A leaner per-row loop: the released control flow without pandas, with our CSV reader and
    file matching and a numpy threshold search (still one model call per row and per image, and
    one arg-max per image and threshold). Returns the summary metrics plus ``phase_s``."""
    t0 = time.perf_counter()
    with torch.no_grad():
        root = text_root(backend)
        row_emb = torch.stack([backend.encode_text(list(chain)).float().cpu() for chain in test.chains])  # (n, 4, D)
        t1 = time.perf_counter()
        refs = list(dict.fromkeys(test.image_refs))
        paths = resolve_image_refs(refs, images_dir)
        img_emb = torch.stack([backend.encode_images([open_image(p)]).float().cpu()[0] for p in paths])
    t2 = time.perf_counter()
    radii = (row_emb - root).norm(dim=-1)  # (n, 4)
    flat_r = radii.reshape(-1).numpy()
    flat_e = row_emb.reshape(-1, row_emb.shape[-1])
    texts = np.array([t for chain in test.chains for t in chain], dtype=object)
    levels = np.linspace(float(flat_r.min()), float(flat_r.max()), steps)
    masks = [flat_r <= thr for thr in levels]
    image_of_row = np.array([refs.index(r) for r in test.image_refs])
    precisions, recalls = [], []
    for i in range(len(refs)):
        sim = (flat_e @ img_emb[i]).numpy()
        preds = []
        for mask in masks:
            t = texts[mask][int(np.argmax(sim[mask]))]
            if not preds or preds[-1] != t:
                preds.append(t)
        refs_i = [test.chains[r] for r in np.nonzero(image_of_row == i)[0]]
        gt = {t for chain in refs_i for t in chain}
        sp = set(preds)
        precisions.append(len(sp & gt) / max(1, len(sp)))
        recalls.append(sum(any(c[k] in sp for c in refs_i) for k in range(4)) / 4)
    tau = np.array([kendalltau(np.argsort(r, kind="stable"), [1, 2, 3, 4]).statistic for r in radii.numpy()])
    phases = {"texts": t1 - t0, "images": t2 - t1, "search": time.perf_counter() - t2}
    return {**summarize(np.array(precisions), np.array(recalls), tau), "phase_s": phases}


def random_hf_clip_b32(out: Path) -> str:
    """``CLIPModel`` with the released ViT-B/32's towers (transformers' CLIPConfig defaults: text
    12 x 512, vision 12 x 768, patch 32, 224 px) and random weights, with the tiny model's
    tokenizer (its vocabulary sets the embedding table) and CLIP's 224 px preprocessing."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model("hf_clip", out.parent / "tokenizer-source"))
    text = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=224, patch_size=32))).save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(out)
    return str(out)


def text_fine_tuned(kind: str, model: str, out: Path, seed: int) -> str:
    """A stand-in for a checkpoint of text-only fine-tuning: ``model`` with its text-tower weights
    moved by seeded noise and its image tower untouched, saved to ``out``."""
    backend = load_backend(kind, model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in backend.model.named_parameters():
            if backend._tower_of(name) == "text":
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return str(backend.save(out))


def checkpoint_series(args: argparse.Namespace, model: str, csv: Path, images_dir: Path, tmp: Path, workers: int) -> None:
    """Time evaluating ``args.checkpoints`` checkpoints (``model``, then text-fine-tuned stand-ins):
    one released-control-flow command per checkpoint against one ``hierarcaps-eval retrieval``
    with every checkpoint as a ``--model`` (cold image cache at its start). Exits 1 unless every
    checkpoint's metrics are identical both ways."""
    series = [model] + [text_fine_tuned(args.backend, model, tmp / f"step-{k}", k) for k in range(1, args.checkpoints)]
    loop_seconds, loop_metrics = 0.0, []
    for checkpoint in series:
        seconds, metrics = command_seconds([sys.executable, str(Path(__file__).resolve()), "--backend", args.backend,
                                            "--model", checkpoint, "--steps", str(args.steps), "--device", args.device,
                                            "--loop-only", "released", str(csv), str(images_dir)])
        loop_seconds += seconds
        loop_metrics.append(metrics)
    out = tmp / "series"
    ours_seconds = process_seconds(
        [sys.executable, "-m", "finetune.evaluation.cli", "retrieval", "--backend", args.backend, "--test-csv", str(csv),
         "--images", str(images_dir), "--steps", str(args.steps), "--device", args.device, "--workers", str(workers),
         "--image-cache", str(tmp / "series-cache"), "--output", str(out)]
        + [arg for i, checkpoint in enumerate(series) for arg in ("--model", f"c{i}={checkpoint}")])
    ours = [json.loads((out / f"c{i}.json").read_text()) for i in range(len(series))]
    same = all(same_scores(a, b) for a, b in zip(loop_metrics, ours))
    print(f"\ncheckpoint series ({len(series)} checkpoints: the model, then text-fine-tuned stand-ins): "
          f"released control flow, a command each: {loop_seconds:.1f} s; one hierarcaps-eval retrieval with "
          f"{len(series)} --model: {ours_seconds:.1f} s; x{loop_seconds / ours_seconds:.1f}; "
          f"metrics {'identical (to 1e-12)' if same else 'DIFFERENT'} for every checkpoint")
    if not same:
        sys.exit(1)


def timed(fn, *args, **kwargs) -> tuple[float, dict]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def same_scores(a: dict, b: dict) -> bool:
    """P, R and tau_d agree to 1e-12 (tau_d: scipy's and our float arithmetic may differ in the last bit)."""
    return all(abs(a[k] - b[k]) <= 1e-12 for k in SCORES)


def command_seconds(argv: list[str]) -> tuple[float, dict]:
    """Wall time of a fresh process running ``argv``, and the metrics JSON it printed last."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout[done.stdout.index("{"):])


def process_seconds(argv: list[str]) -> float:
    """Wall time of a fresh process running ``argv``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="hf-clip", choices=("hf-clip", "open-clip"))
    parser.add_argument("--model", default=None, help="model to load (default: a tiny random one built now)")
    parser.add_argument("--random-arch", default=None, metavar="NAME",
                        help="architecture with random weights, saved once and loaded by every run: real-size "
                             "towers without downloading weights (open-clip: any name, e.g. ViT-B-32; hf-clip: ViT-B-32)")
    parser.add_argument("--rows", type=int, default=1000, help="test rows to use (first N)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None, help="image-decoding workers (default: CPU cores, at most 8)")
    parser.add_argument("--no-commands", action="store_true", help="skip the whole-command (fresh process) timings")
    parser.add_argument("--repeat", type=int, default=1, help="whole-command runs of each kind; the median is shown")
    parser.add_argument("--checkpoints", type=int, default=0, metavar="N",
                        help="also time a series of N checkpoints (the model and N-1 text-fine-tuned stand-ins): "
                             "a released-flow command each against one command with N --model")
    parser.add_argument("--loop-only", nargs=3, metavar=("LOOP", "TEST_CSV", "IMAGES"), help=argparse.SUPPRESS)
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_only:  # the fixed cost of a command: start-up, imports, model load
        load_backend(args.backend, args.model, device=args.device)
        return
    if args.loop_only:  # a loop as a command of its own, for the whole-command timing
        backend = load_backend(args.backend, args.model, device=args.device)
        loop, csv, images = args.loop_only[0], Path(args.loop_only[1]), Path(args.loop_only[2])
        out = released_loop(backend, csv, images, args.steps) if loop == "released" else \
            lean_loop(backend, read_test_csv(csv), images, args.steps)
        print(json.dumps(out))
        return

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    if args.random_arch and args.backend == "hf-clip" and args.random_arch != "ViT-B-32":
        parser.error("--random-arch with --backend hf-clip: only ViT-B-32 (open_clip names any architecture)")
    if args.random_arch:
        model = random_hf_clip_b32(tmp / "model") if args.backend == "hf-clip" else \
            str(load_backend("open-clip", args.random_arch).save(tmp / "model"))
    else:
        model = args.model or str(build_tiny_model(args.backend.replace("-", "_"), tmp / "model"))
    backend = load_backend(args.backend, model, device=args.device)
    if (DATA / "hierarcaps_test.csv").is_file():
        csv, images_dir = tmp / "test.csv", DATA / "test_imgs"
        csv.write_text("".join((DATA / "hierarcaps_test.csv").read_text().splitlines(keepends=True)[: args.rows + 1]))
    else:
        csv = synthetic_test_set(tmp / "imgs", args.rows)
        images_dir = csv.parent
    test = read_test_csv(csv)
    workers = default_workers() if args.workers is None else args.workers
    print(f"model {model} ({args.backend}, {args.device}); {len(test)} rows, "
          f"{len(set(test.image_refs))} images from {images_dir}; {workers} image workers; "
          f"torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")

    cache = tmp / "cache"
    run = lambda: evaluate_retrieval(backend, csv, images_dir, "released", args.steps, model, workers=workers,  # noqa: E731
                                     image_cache=ImageEmbeddingCache(cache))
    t_released, released = timed(released_loop, backend, csv, images_dir, args.steps)
    t_lean, lean = timed(lean_loop, backend, test, images_dir, args.steps)
    t_cold, cold = timed(run)
    t_warm, warm = timed(run)
    assert cold["image_cache"]["misses"] == len(set(test.image_refs)) and warm["image_cache"]["misses"] == 0
    rows = [("released control flow", t_released, released), ("lean per-row loop", t_lean, lean),
            ("ours, cold cache", t_cold, cold), ("ours, warm cache", t_warm, warm)]

    if not args.no_commands:
        loop_cmd = [sys.executable, str(Path(__file__).resolve()), "--backend", args.backend, "--model", model,
                    "--steps", str(args.steps), "--device", args.device]
        kinds = ("load", "released", "lean", "cold", "warm")
        times: dict[str, list[float]] = {k: [] for k in kinds}
        metrics: dict[str, dict] = {}
        for r in range(args.repeat):  # interleaved, so that load from other jobs spreads over all kinds
            ours_cmd = [sys.executable, "-m", "finetune.evaluation.cli", "retrieval", "--backend", args.backend,
                        "--model", model, "--test-csv", str(csv), "--images", str(images_dir), "--steps", str(args.steps),
                        "--device", args.device, "--workers", str(workers), "--image-cache", str(tmp / f"cmd-cache-{r}"),
                        "--output", str(tmp / "m.json")]
            times["load"].append(process_seconds(loop_cmd + ["--load-only"]))
            for loop in ("released", "lean"):
                seconds, metrics[loop] = command_seconds(loop_cmd + ["--loop-only", loop, str(csv), str(images_dir)])
                times[loop].append(seconds)
            caches = {}
            for kind in ("cold", "warm"):
                seconds, metrics[kind] = command_seconds(ours_cmd)
                times[kind].append(seconds)
                caches[kind] = json.loads((tmp / "m.json").read_text())["image_cache"]
            assert caches["cold"]["hits"] == 0 and caches["warm"]["misses"] == 0, caches
        median = {k: float(np.median(t)) for k, t in times.items()}
        rows += [("command: released flow", median["released"], metrics["released"]),
                 ("command: lean loop", median["lean"], metrics["lean"]),
                 ("command: ours, cold", median["cold"], metrics["cold"]),
                 ("command: ours, warm", median["warm"], metrics["warm"])]

    print(f"\n{'':26}{'seconds':>9}{'speed-up':>10}  precision  recall  tau_d")
    for name, seconds, m in rows:
        base = rows[0][1] if not name.startswith("command") else median["released"]
        print(f"{name:26}{seconds:9.2f}{base / seconds:9.1f}x  {m['precision']:.6f}   {m['recall']:.6f}  {m['tau_d']:.6f}")
    same = all(same_scores(m, released) for _, _, m in rows)
    for name, m in (("released control flow", released), ("lean per-row loop", lean)):
        print(f"{name} phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in m["phase_s"].items()))
    print(f"evaluation, model loaded: warm x{t_released / t_warm:.1f}, cold x{t_released / t_cold:.1f} faster than the "
          f"released control flow (x{t_lean / t_warm:.1f}, x{t_lean / t_cold:.1f} than the lean loop)")
    if not args.no_commands:
        print(f"whole command: warm x{median['released'] / median['warm']:.1f}, cold x{median['released'] / median['cold']:.1f} "
              f"faster than the released control flow (x{median['lean'] / median['warm']:.1f}, "
              f"x{median['lean'] / median['cold']:.1f} than the lean loop)")
        print(f"fixed cost of every command (Python start-up, imports, model load, exit): {median['load']:.1f} s; "
              f"ours beyond it: warm {median['warm'] - median['load']:+.1f} s, cold {median['cold'] - median['load']:+.1f} s; "
              f"command seconds (median of {args.repeat}): " + "; ".join(f"{k} {[round(x, 1) for x in t]}" for k, t in times.items()))
    print(f"metrics {'identical (to 1e-12)' if same else 'DIFFERENT'} across all runs")
    if not same:
        sys.exit(1)
    if args.checkpoints:
        checkpoint_series(args, model, csv, images_dir, tmp, workers)


if __name__ == "__main__":
    from hierarcaps.models import quiet_library_progress

    quiet_library_progress()
    main()
