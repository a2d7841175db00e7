"""Hierarchy alignment training on ``accelerate``: RE / EC (text tower), RCME and level (both towers).

One step (SPEC section 3), for a batch of B train items:

1. the 8 texts of every item (P1..P4, N1..N4) and the empty string ``""`` go through the
   *trainable* text encoder in one batched forward: (8B + 1, D), normalised; the last row is
   the root r, so the root moves with the model and receives gradients. A taxonomy table
   (``data.format=taxonomy``, :mod:`finetune.taxonomy_data`) gives 2L texts per item, one
   positive and one sibling negative per rank, masks for the missing ones, and the root text
   ``taxonomy.root_text`` (``Eukarya``);
2. RCME also encodes the items' images through the trainable image tower;
3. the loss of :mod:`finetune.losses` is computed and back-propagated; every
   ``gradient_accumulation_steps`` micro-batches AdamW steps.

The level-restricted contrastive loss (``loss.name=level``, BioCLIP-HC) reads a HierarCaps item
as an image with one label per level: the four positive tiers T1..T4 are the levels, and two
items share a level-l label when their tier-l texts are equal (:func:`level_batch`); a taxonomy
item has one level per rank, and an item lacking a rank sits out that level. Its step
encodes only the batch's *distinct* positive texts (general tiers such as ``animal`` recur) and
the images; negatives and the root are not used. Both towers train; the logit scale is frozen.

**Cheap regulariser.** RE's regulariser compares every text's embedding with the embedding the
*pretrained* (frozen) encoder gives the same text. That value depends on the text only, so
instead of the released code's second full text-model forward per step we compute it once per
unique text before the first update (:func:`frozen_reference`: batched, no grad, deduplicated,
sharded over processes) and gather rows per step. The result is the same embedding the
per-step frozen forward computes (``tests/test_train.py`` checks it), without a second model
copy in memory. ``benchmarks/bench_finetune.py`` measures the gain.

**Outputs** in ``run.output_dir``: ``checkpoint-<step>/`` every ``run.checkpoint_every``
optimizer steps and at the end (``model/`` in the backend's native format, plus optimizer,
scheduler, RNG and position in ``trainer_state.pt``; written to a temporary folder and renamed),
``final/`` (native format, loadable by ``finetune.backends.load_backend`` and by the
model's own library), ``loss_log.jsonl`` (one line per optimizer step), ``loss_curve.png`` and
``run.json`` (resolved settings, seed, model, package versions, counts, timings).
``run.resume=true`` continues from the newest checkpoint and reproduces the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from finetune.backends import Backend, load_backend
from finetune.config import IMAGE_LOSSES, FinetuneSettings, SettingsError, resolve, to_dict
from finetune.data import TrainData, images_for_training
from finetune.geometry import normalize
from finetune.losses import ec_loss, level_contrastive_loss, rcme_loss, re_loss
from finetune.taxonomy_data import TaxonomyTrainData, load_settings_data, taxonomy_image_paths
from hierarcaps.image_folder import ImageLocation, open_image

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings that fix the sequence of batches and updates; resuming with other values is refused.
_RESUME_KEYS = ("model", "data", "taxonomy", "loss", "optim", "run.seed")


class TrainError(RuntimeError):
    """A run cannot start or resume as configured; the message says what to change."""


@dataclass
class TrainResult:
    """Where a finished run put its outputs, and how far it went."""

    output_dir: Path
    final_dir: Path
    steps: int
    log_path: Path
    curve_path: Path
    run_json: Path


class AlignmentModule(nn.Module):
    """The backend's trainable model behind one ``forward`` so that DDP and autocast wrap it.

    ``forward(tokens, pixels)`` -> (normalised text embeddings (N, D), normalised image
    embeddings (B, D) or None).
    """

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.model = backend.model  # registered so that DDP sees the parameters

    def forward(
        self, tokens: dict[str, torch.Tensor], pixels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        text = normalize(self.backend.encode_tokens(tokens).float())
        image = None if pixels is None else normalize(self.backend.encode_pixels(pixels).float())
        return text, image


# ----------------------------------------------------------------------------- frozen reference


@torch.no_grad()
def frozen_reference(
    backend: Backend, texts: Sequence[str], accelerator: Any = None, batch_size: int = 256
) -> torch.Tensor:
    """Normalised embeddings (U, D), float32 on the CPU, of ``texts`` under the current weights.

    Called before the first update, this is the frozen pretrained encoder's output for every
    unique text. With several processes each encodes an equal share and the shares are gathered.
    """
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    share = math.ceil(len(texts) / world)
    mine = list(texts[rank * share : (rank + 1) * share])
    mine += [""] * (share - len(mine))  # equal shapes for the gather; the padding is cut off below
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    was_training = backend.model.training
    backend.model.eval()
    with autocast:
        emb = backend.encode_text(mine, batch_size=batch_size).float()
    backend.model.train(was_training)
    if world > 1:
        emb = accelerator.gather(emb)
    return emb[: len(texts)].cpu()


# ----------------------------------------------------------------------------- batches


def batch_plan(n_items: int, batch_size: int, epoch: int, seed: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """This process's item indices per micro-batch of ``epoch`` (shuffled by ``seed`` and epoch).

    Global batches hold ``batch_size * world`` items and process ``rank`` takes its slice. With one
    process the last batch may be short; with several, a short last global batch is dropped so
    that every process steps the same number of times.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    step = batch_size * world
    stop = n_items if world == 1 else n_items - n_items % step
    return [order[s : s + step][rank * batch_size : (rank + 1) * batch_size].tolist() for s in range(0, stop, step)]


class _Items(torch.utils.data.Dataset):
    """Item index -> (index, RGB image or None); images load in DataLoader workers."""

    def __init__(self, image_paths: list[ImageLocation] | None) -> None:
        self.image_paths = image_paths

    def __len__(self) -> int:  # pragma: no cover - batches come from a batch sampler
        return 0 if self.image_paths is None else len(self.image_paths)

    def __getitem__(self, j: int) -> tuple[int, Any]:
        if self.image_paths is None:
            return j, None
        return j, open_image(self.image_paths[j])


def _collate(batch: list[tuple[int, Any]]) -> tuple[list[int], list[Any] | None]:
    idx = [j for j, _ in batch]
    images = [im for _, im in batch]
    return idx, None if images[0] is None else images


# ----------------------------------------------------------------------------- loss of one batch


def batch_texts(data: TrainData, items: Sequence[int]) -> list[str]:
    """The 2L texts of each item (P1..PL, N1..NL), item after item, then the root text (``""``)."""
    return [data.texts[k] for j in items for k in data.index[j]] + [data.root_text]


def batch_masks(data: TrainData, items: Sequence[int], device: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(B, L) masks of the existing positive and negative texts, or (None, None) when all exist."""
    if data.mask is None:
        return None, None
    mask = torch.as_tensor(data.mask[list(items)], device=device)
    return mask[:, : data.levels], mask[:, data.levels :]


def level_batch(data: TrainData, items: Sequence[int]) -> tuple[list[str], torch.Tensor]:
    """The batch's distinct positive tier texts and every item's label id per level.

    Returns ``texts`` (U,) and ``labels`` (B, L) with ``texts[labels[b, l]]`` = tier l+1 of item
    b: equal texts share an id, different texts never do. Ids index ``texts``, so the embedding
    of each label is one row of the encoded ``texts``.
    """
    levels = data.levels
    unique, inverse = np.unique(data.index[list(items), :levels], return_inverse=True)  # text ids
    texts = [data.texts[k] for k in unique]
    return texts, torch.as_tensor(inverse.reshape(len(items), levels), dtype=torch.long)


def _level_loss(
    module: nn.Module, backend: Backend, data: TrainData, items: Sequence[int], images: list[Any] | None
) -> dict[str, torch.Tensor]:
    """Level-restricted contrastive loss of one micro-batch: ``level1``..``levelL`` and ``total``."""
    if images is None:
        raise SettingsError("loss.name=level needs images: set data.images_dir to the folder holding the train images")
    texts, labels = level_batch(data, items)
    text, image = module(backend.tokenize(texts), backend.preprocess(images))  # (U, D), (B, D)
    labels = labels.to(text.device)
    mask, _ = batch_masks(data, items, text.device)
    out = level_contrastive_loss(image, text[labels], labels, backend.logit_scale, mask)  # text[labels]: (B, L, D)
    return {**{f"level{i + 1}": v for i, v in enumerate(out["per_level"])}, "total": out["total"]}


def batch_loss(
    module: nn.Module,
    backend: Backend,
    data: TrainData,
    items: Sequence[int],
    settings: FinetuneSettings,
    reference: torch.Tensor | None,
    images: list[Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms (scalars) of one micro-batch; ``reference``: (U, D) frozen embeddings or None."""
    loss = settings.loss
    if loss.name == "level":
        return _level_loss(module, backend, data, items, images)
    tokens = backend.tokenize(batch_texts(data, items))
    pixels = backend.preprocess(images) if images is not None else None
    text, image = module(tokens, pixels)
    levels = data.levels
    chains = text[:-1].view(len(items), 2 * levels, -1)  # (B, 2L, D)
    pos, neg, root = chains[:, :levels], chains[:, levels:], text[-1]
    pos_mask, neg_mask = batch_masks(data, items, text.device)
    if loss.name == "rcme":
        return rcme_loss(pos, neg, root, image, backend.logit_scale, alpha=loss.rcme_alpha, beta=loss.rcme_beta,
                         pos_mask=pos_mask, neg_mask=neg_mask)
    pos_ref = neg_ref = None
    if reference is not None:
        ref = reference[torch.as_tensor(data.index[list(items)])].to(text.device)  # (B, 2L, D)
        pos_ref, neg_ref = ref[:, :levels], ref[:, levels:]
    weights = tuple(loss.weights)
    if loss.name == "ec":
        return ec_loss(pos, neg, root, pos_ref, neg_ref, loss.ec_margin, loss.ec_epsilon, weights, pos_mask, neg_mask)
    return re_loss(pos, neg, root, pos_ref, neg_ref, weights, pos_mask, neg_mask)


# ----------------------------------------------------------------------------- checkpoints


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, folder), oldest first."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT.match(p.name)
            if m and (p / "trainer_state.pt").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator: Any, backend: Backend, output_dir: Path, step: int, state: dict[str, Any], keep: int | None
) -> Path:
    """Write ``checkpoint-<step>`` through a temporary folder; prune to the newest ``keep``."""
    target = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        backend.save(tmp / "model")
        torch.save(state, tmp / "trainer_state.pt")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        if keep is not None:
            for _, old in checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target


# ----------------------------------------------------------------------------- records


def _versions() -> dict[str, Any]:
    from finetune.evaluation.common import package_versions

    return package_versions(("hierarcaps", "torch", "transformers", "accelerate", "open_clip_torch", "datasets", "numpy"))


def _write_json(path: Path, obj: Any) -> None:
    from finetune.evaluation.common import write_json

    write_json(path, obj)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``loss_log.jsonl`` (an absent file has none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Loss terms against optimizer step as a PNG (matplotlib Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    keys = [k for k in (records[0] if records else {}) if k.startswith("loss/")]
    for key in keys:
        ax.plot(steps, [r[key] for r in records], label=key.removeprefix("loss/"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _check_resume(output_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume a run whose batch-deciding settings changed."""
    previous_path = output_dir / "run.json"
    if not previous_path.is_file():
        return
    previous = json.loads(previous_path.read_text(encoding="utf-8")).get("settings", {})

    def get(tree: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            tree = tree.get(part, {}) if isinstance(tree, dict) else {}
        return tree

    changed = [k for k in _RESUME_KEYS if get(previous, k) != get(settings, k)]
    if changed:
        raise TrainError(
            f"{output_dir}: cannot resume, settings {', '.join(changed)} differ from the checkpointed run "
            "(see run.json); use the same settings or another run.output_dir"
        )


# ----------------------------------------------------------------------------- the run


def _make_accelerator(settings: FinetuneSettings) -> Any:
    from accelerate import Accelerator

    # Accumulation is done explicitly below (no_sync + stepping every k micro-batches), so the
    # Accelerator itself keeps gradient_accumulation_steps=1.
    return Accelerator(mixed_precision=settings.run.mixed_precision, cpu=settings.run.cpu)


def _scheduler(optimizer: torch.optim.Optimizer, settings: FinetuneSettings, total_steps: int) -> Any:
    """The learning-rate schedule; only the learning rate moves, AdamW's betas stay as configured.

    ``cycle_momentum=False``: PyTorch's one-cycle default would also cycle β1 between 0.95 and 0.85,
    silently overriding ``optim.betas`` (RCME's recipe fixes β = (0.9, 0.98)).
    """
    if settings.optim.scheduler == "one-cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=settings.optim.lr, total_steps=max(total_steps, 1), cycle_momentum=False,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _schedule_record(scheduler: Any) -> dict[str, Any]:
    """What run.json records of the schedule: its class and the settings that shape it."""
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        return {"name": "one-cycle", "cycle_momentum": scheduler.cycle_momentum, "total_steps": scheduler.total_steps,
                "pct_start": 0.3, "anneal_strategy": "cos", "div_factor": 25.0, "final_div_factor": 1e4}
    return {"name": "constant"}


def train(settings: FinetuneSettings, *, progress: bool = False, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Run (or resume) one fine-tuning run as configured; see the module docstring for the outputs.

    ``progress`` shows a tqdm bar with the loss; ``on_step`` receives each log record.
    """
    from accelerate.utils import set_seed

    settings = resolve(settings)
    cfg_tree = to_dict(settings)
    run, optim = settings.run, settings.optim
    output_dir = Path(run.output_dir)
    if not run.resume and (checkpoints(output_dir) or (output_dir / "final").exists()):
        raise TrainError(f"{output_dir}: holds a previous run; set run.resume=true to continue it or choose another run.output_dir")
    if run.resume:
        _check_resume(output_dir, cfg_tree)
    started = time.perf_counter()
    set_seed(run.seed)
    accelerator = _make_accelerator(settings)
    output_dir.mkdir(parents=True, exist_ok=True)

    data = load_settings_data(settings)
    image_paths, skipped = None, {}
    if settings.loss.name in IMAGE_LOSSES:
        if not settings.data.images_dir:
            raise SettingsError(
                f"loss.name={settings.loss.name} needs images: set data.images_dir to the folder holding the train images"
            )
        if isinstance(data, TaxonomyTrainData):
            image_paths = taxonomy_image_paths(data.image_refs, settings.data.images_dir)
        else:
            data, image_paths, skipped = images_for_training(data, settings.data.images_dir)

    backend = load_backend(
        settings.model.backend, settings.model.name_or_path, device=accelerator.device,
        dtype=settings.model.dtype, revision=settings.model.revision,
    )
    t0 = time.perf_counter()
    uses_reg = settings.loss.name in ("re", "ec") and settings.loss.weights[2] != 0
    reference = frozen_reference(backend, data.texts, accelerator) if uses_reg else None
    reference_seconds = time.perf_counter() - t0

    resume_from = checkpoints(output_dir)[-1] if run.resume and checkpoints(output_dir) else None
    if resume_from is not None:
        saved = load_backend(settings.model.backend, resume_from[1] / "model", device="cpu")
        backend.model.load_state_dict(saved.model.state_dict())
        del saved
    trainable = backend.set_trainable(settings.loss.towers)
    backend.model.train()

    module = AlignmentModule(backend)
    params = [p for p in backend.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = len(batch_plan(len(data), optim.batch_size, 0, run.seed, world, rank))
    steps_per_epoch = math.ceil(micro_per_epoch / optim.gradient_accumulation_steps)
    total_steps = steps_per_epoch * optim.epochs
    if optim.max_steps is not None:
        total_steps = min(total_steps, optim.max_steps)
    if total_steps == 0:
        raise TrainError(f"{data.source}: {len(data)} items make no batch of {optim.batch_size} on {world} processes")
    scheduler = _scheduler(optimizer, settings, total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)

    step, log_path = 0, output_dir / "loss_log.jsonl"
    if resume_from is not None:
        state = torch.load(resume_from[1] / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        _set_rng_state(torch.load(resume_from[1] / f"rng_state_{rank}.pt", weights_only=False))
        if accelerator.is_main_process:  # drop records written after the checkpoint
            kept = [r for r in read_log(log_path) if r["step"] <= step]
            _write_log(log_path, kept)
    elif accelerator.is_main_process:
        _write_log(log_path, [])

    record_base = {
        "settings": cfg_tree,
        "model": {"backend": settings.model.backend, "name_or_path": settings.model.name_or_path,
                  "revision": settings.model.revision},
        "seed": run.seed,
        "versions": _versions(),
        "counts": {
            "items": len(data), "excluded_items": data.excluded, "unique_texts": len(data.texts), "levels": data.levels,
            **({"negatives_without_sibling": data.no_sibling} if isinstance(data, TaxonomyTrainData) else {}),
            "skipped_items_without_image": sum(skipped.values()), "skipped_by_reason": skipped,
            "trainable_parameters": sum(p.numel() for p in params), "trainable_tensors": len(trainable),
            "processes": world, "micro_batches_per_epoch": micro_per_epoch,
            "optimizer_steps_per_epoch": steps_per_epoch, "total_optimizer_steps": total_steps,
        },
        "device": str(accelerator.device),
        "mixed_precision": run.mixed_precision,
        "reference_seconds": round(reference_seconds, 3),
        "schedule": _schedule_record(scheduler),
    }
    if accelerator.is_main_process:
        _write_json(output_dir / "run.json", {**record_base, "status": "running", "resumed_from_step": step})

    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step")

    loader_kw = {"num_workers": settings.data.num_workers, "collate_fn": _collate}
    accum = optim.gradient_accumulation_steps
    train_start = time.perf_counter()
    start_step = step
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        plan = batch_plan(len(data), optim.batch_size, epoch, run.seed, world, rank)
        groups = [plan[i : i + accum] for i in range(0, len(plan), accum)][done_in_epoch:]  # one per optimizer step
        # An own generator: creating the iterator must not draw from the global RNG (resume exactness).
        loader = torch.utils.data.DataLoader(
            _Items(image_paths), batch_sampler=[mb for g in groups for mb in g],
            generator=torch.Generator().manual_seed(run.seed + epoch), **loader_kw,
        )
        batches = iter(loader)
        for group in groups:
            micro: list[dict[str, torch.Tensor]] = []
            for m in range(len(group)):
                items, images = next(batches)
                sync = m == len(group) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(module):
                    terms = batch_loss(module, backend, data, items, settings, reference, images)
                    accelerator.backward(terms["total"] / len(group))
                micro.append({k: v.detach() for k, v in terms.items()})
            if optim.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, optim.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; scheduler.step() sets the next one
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = _record(accelerator, micro, step, epoch, lr, train_start, step - start_step)
            if accelerator.is_main_process:
                _append_log(log_path, record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss/total']:.4f}")
            if on_step is not None:
                on_step(record)
            if step % run.checkpoint_every == 0 or step == total_steps:
                state = _trainer_state(optimizer, scheduler, step, epoch)
                save_checkpoint(accelerator, backend, output_dir, step, state, run.save_total_limit)
            if step >= total_steps:
                break
    if bar is not None:
        bar.close()

    final_dir = output_dir / "final"
    curve = output_dir / "loss_curve.png"
    if accelerator.is_main_process:
        backend.save(final_dir)
        plot_loss_curve(read_log(log_path), curve)
        _write_json(output_dir / "run.json", {
            **record_base, "status": "complete", "steps": step, "resumed_from_step": start_step,
            "train_seconds": round(time.perf_counter() - train_start, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
        })
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, final_dir, step, log_path, curve, output_dir / "run.json")


def _trainer_state(optimizer: Any, scheduler: Any, step: int, epoch: int) -> dict[str, Any]:
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch}


def _record(
    accelerator: Any, micro: list[dict[str, torch.Tensor]], step: int, epoch: int, lr: float,
    train_start: float, steps_done: int,
) -> dict[str, Any]:
    """One log record: loss terms averaged over the step's micro-batches and over processes, and the
    learning rate the step's update used."""
    keys = [k for k in micro[0] if micro[0][k].ndim == 0]
    means = torch.stack([torch.stack([m[k].float() for m in micro]).mean() for k in keys])
    means = accelerator.reduce(means, reduction="mean") if accelerator.num_processes > 1 else means
    elapsed = time.perf_counter() - train_start
    record: dict[str, Any] = {"step": step, "epoch": epoch, "lr": lr}
    record.update({f"loss/{k}": float(v) for k, v in zip(keys, means.tolist())})
    record["steps_per_second"] = round(steps_done / elapsed, 4) if elapsed > 0 else None
    return record


def _write_log(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
