"""Completer distillation (SPEC section 2 step 4; HierarCaps paper, supplementary B.1).

The completer H learns to complete a hierarchy in either direction. Each training example is
one synthetic hierarchy cut at a random k in {0, 1, 2, 3}: the first k tiers (ending with the
delimiter) are the input and the remaining tiers the target. With probability 0.5 the
hierarchy is reversed and written with ``←``. With k = 0 the input is the bare delimiter, so the
model still knows the direction::

    input "→"               target "T1 → T2 → T3 → T4"
    input "T1 → T2 →"       target "T3 → T4"
    input "T4 ← T3 ←"       target "T2 ← T1"

Cuts and directions are drawn afresh every epoch. ``→`` and ``←`` are added to the tokenizer
as special tokens when it lacks them as single tokens (Flan-T5 maps them to ``<unk>``), and the
model's embeddings are resized. Training follows the paper: 3 epochs, batch size 32, learning
rate 1e-3, AdamW, language-modelling loss on the target.

The completer is a seq2seq model (Flan-T5, the paper's choice) or, since
``model.config.is_encoder_decoder`` is false, a decoder-only causal LM: then the input and the
target are concatenated (``input ids + target ids + eos``) and the loss covers the target only.
At inference both are prompted with the input alone (:class:`~hierarcaps.generation.TextGenerator`).

Precision: a model loaded in bfloat16 or float16 (``dtype=auto`` on a GPU) trains on float32
master weights: AdamW updates float32 copies (a bfloat16 add of lr-sized steps would leave most
weights unchanged), the forward pass runs under autocast in the loaded half dtype on CUDA (with
loss scaling for float16), and the trained model is saved in the loaded dtype.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hierarcaps.hierarchy import BACKWARD, FORWARD, N_TIERS, Rejection, completer_prompt, format_chain, normalize_text
from hierarcaps.stats import StageStats
from hierarcaps.stagedir import follow_umask

# torch and tokenizers are imported by the functions that train, not here: the settings
# (CompleterSettings) are read by every command, most of which train nothing.
if TYPE_CHECKING:
    import torch

NOT_FOUR_TIERS = "not_four_tiers"
TRAINING_LOG = "training_log.json"
#: Label value the transformers losses ignore.
IGNORE_INDEX = -100


@dataclass
class CompleterSettings:
    """Training settings of the completer (the paper's values are the defaults)."""

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_source_length: int = 128
    max_target_length: int = 128
    seed: int = 0


def make_completer_pairs(hierarchies: Sequence[Sequence[str]], rng: random.Random) -> list[tuple[str, str]]:
    """One ``(input, target)`` pair per hierarchy (tiers general -> specific), drawn with ``rng``.

    k (the number of input tiers) is uniform in {0, 1, 2, 3}; the direction is reversed (``←``,
    specific -> general) with probability 0.5.
    """
    pairs = []
    for tiers in hierarchies:
        k = rng.randrange(N_TIERS)
        if rng.random() < 0.5:
            ordered, delimiter = list(tiers)[::-1], BACKWARD
        else:
            ordered, delimiter = list(tiers), FORWARD
        pairs.append((completer_prompt(ordered[:k], delimiter), format_chain(ordered[k:], delimiter)))
    return pairs


def add_delimiter_tokens(tokenizer: Any, model: Any | None = None) -> list[str]:
    """Add ``→``/``←`` as special tokens where the tokenizer has no single token for them.

    Resizes ``model``'s token embeddings when tokens were added. Returns the added tokens.
    Added with ``special=True`` (SPEC section 1); :class:`~hierarcaps.generation.TextGenerator`
    keeps them when decoding.
    """
    missing = [d for d in (FORWARD, BACKWARD) if not has_single_token(tokenizer, d)]
    if missing:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(d, special=True, normalized=False) for d in missing], special_tokens=True)
        if model is not None:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return missing


def has_single_token(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` is one vocabulary token (not unknown)."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    return token_id is not None and token_id != tokenizer.unk_token_id


def train_completer(
    hierarchies: Sequence[Sequence[str]],
    model: Any,
    tokenizer: Any,
    settings: CompleterSettings = CompleterSettings(),
    output_dir: str | Path = "completer",
) -> StageStats:
    """Fine-tune ``model`` as the hierarchy completer and save it with its tokenizer.

    ``hierarchies``: tiers general -> specific; any without four non-empty tiers is skipped and
    counted. Writes ``model``, ``tokenizer`` and ``training_log.json`` (settings, per-step
    losses) into ``output_dir`` atomically (a temporary sibling renamed at the end);
    ``output_dir`` must not exist or be empty. Returns stats with ``extra``: ``steps``,
    ``final_epoch_loss``, ``added_tokens``.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"completer output folder {output_dir} is not empty; remove it or choose another")
    stats = StageStats(stage="completer", items_in=len(hierarchies))
    valid = _valid_hierarchies(hierarchies, stats)
    if not valid:
        raise ValueError("no hierarchy with four non-empty tiers to train the completer on")
    with stats.timed():
        added = add_delimiter_tokens(tokenizer, model)
        save_dtype = model.dtype
        model.float()  # float32 master weights (a no-op for a float32 model)
        log = _train(valid, model, tokenizer, settings, compute_dtype=save_dtype)
        model.to(save_dtype)
        _save(model, tokenizer, settings, log, added, output_dir)
    stats.kept = len(valid)
    stats.extra.update(
        steps=len(log["losses"]),
        final_epoch_loss=log["epoch_losses"][-1],
        added_tokens=len(added),
    )
    return stats


def _valid_hierarchies(hierarchies: Sequence[Sequence[str]], stats: StageStats) -> list[list[str]]:
    valid = []
    for tiers in hierarchies:
        tiers = [normalize_text(t) for t in tiers]
        if len(tiers) != N_TIERS:
            stats.reject(NOT_FOUR_TIERS)
        elif not all(tiers):
            stats.reject(Rejection.EMPTY_TIER)
        else:
            valid.append(tiers)
    return valid


def _train(
    hierarchies: list[list[str]], model: Any, tokenizer: Any, settings: CompleterSettings,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """The training loop; returns the log (per-step losses, per-epoch mean losses, seconds).

    ``model`` holds the (float32) weights AdamW updates; on CUDA a half ``compute_dtype``
    (default: float32) runs the forward pass under autocast, with a gradient scaler for float16.
    """
    import torch

    compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    device_type = model.device.type
    autocast = device_type == "cuda" and compute_dtype != torch.float32
    scaler = torch.amp.GradScaler(device_type, enabled=autocast and compute_dtype == torch.float16)
    encode = _encode_seq2seq if model.config.is_encoder_decoder else _encode_causal
    losses: list[float] = []
    epoch_losses: list[float] = []
    start = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        for _ in range(settings.epochs):
            pairs = make_completer_pairs(hierarchies, rng)
            rng.shuffle(pairs)
            epoch = []
            for begin in range(0, len(pairs), settings.batch_size):
                batch = encode(tokenizer, pairs[begin:begin + settings.batch_size], settings)
                with torch.autocast(device_type, dtype=compute_dtype, enabled=autocast):
                    loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                epoch.append(float(loss.detach()))
            losses.extend(epoch)
            epoch_losses.append(sum(epoch) / len(epoch))
    model.eval()
    return {"losses": losses, "epoch_losses": epoch_losses, "seconds": time.perf_counter() - start}


def _encode_seq2seq(tokenizer: Any, pairs: Sequence[tuple[str, str]], settings: CompleterSettings) -> dict[str, torch.Tensor]:
    """Encoder inputs and padded labels (pad -> ignore index), shapes (B, S) and (B, T)."""
    inputs, targets = zip(*pairs)
    batch = tokenizer(list(inputs), max_length=settings.max_source_length, truncation=True,
                      padding=True, return_tensors="pt")
    labels = tokenizer(text_target=list(targets), max_length=settings.max_target_length, truncation=True,
                       padding=True, return_tensors="pt")
    label_ids = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": label_ids}


def _encode_causal(tokenizer: Any, pairs: Sequence[tuple[str, str]], settings: CompleterSettings) -> dict[str, torch.Tensor]:
    """``input ids + target ids + eos`` right-padded (B, L); labels cover the target and eos only.

    The input is tokenized alone, exactly as the generator tokenizes the prompt at inference,
    so the model learns to continue those very ids.
    """
    import torch

    inputs, targets = zip(*pairs)
    prompt_ids = tokenizer(list(inputs), max_length=settings.max_source_length, truncation=True)["input_ids"]
    target_ids = tokenizer([" " + t for t in targets], max_length=settings.max_target_length - 1,
                           truncation=True, add_special_tokens=False)["input_ids"]
    sequences = [p + t + [tokenizer.eos_token_id] for p, t in zip(prompt_ids, target_ids)]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, prompt) in enumerate(zip(sequences, prompt_ids)):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        labels[row, len(prompt):len(seq)] = torch.tensor(seq[len(prompt):])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _save(model: Any, tokenizer: Any, settings: CompleterSettings, log: dict[str, Any],
          added: list[str], output_dir: Path) -> None:
    """Write model, tokenizer and log into a temporary sibling folder, then rename it."""
    import torch

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {
        "settings": asdict(settings),
        "base_model": getattr(model.config, "_name_or_path", ""),
        "architecture": "seq2seq" if model.config.is_encoder_decoder else "causal_lm",
        "added_tokens": added,
        "torch": torch.__version__,
        **log,
    }
    (tmp / TRAINING_LOG).write_text(json.dumps(record, indent=2))
    follow_umask(tmp)
    if output_dir.exists():
        output_dir.rmdir()  # empty (checked before training); rename needs the name free
    os.replace(tmp, output_dir)
