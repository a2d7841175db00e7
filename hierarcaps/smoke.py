"""Tiny models that write the right *format*, for the smoke profile's plumbing check.

A random tiny language model never closes a quotation, never writes a ``" => "`` line and never
writes ``←``, so with the smoke profile's random models no caption would survive the first
stage and the later stages would never run. The smoke profile therefore names its language
models ``tiny-primed:<kind>``: a tiny random model (:func:`hierarcaps.tiny_models.build_tiny_model`)
briefly trained, on CPU in seconds, on texts in the formats the stages parse:

* ``chat_lm``: the three seed prompts (rendered with the model's chat template) followed by an
  answer and its closing quotation mark;
* ``causal_lm``: few-shot blocks of ``T1 => T2 => T3 => T4`` lines;
* ``seq2seq``: completer pairs (:func:`hierarcaps.stages.completer.make_completer_pairs`).

The texts come from :func:`rule_hierarchy`, a mechanical rule over the demo captions (T3 the first
half of the caption's words, T2 two words, T1 one word), so the hierarchies are meaningless:
this only lets data flow through every stage. Nothing here is used outside the smoke profile.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Sequence

import torch

PRIMED_KINDS = ("chat_lm", "causal_lm", "seq2seq")


def rule_hierarchy(caption: str) -> list[str]:
    """A mechanical four-tier chain of strictly growing length ending in ``caption``."""
    words = caption.split()
    t3 = " ".join(words[: max(3, math.ceil(len(words) / 2))])
    return [words[-1], " ".join(words[-3:-1]) if len(words) > 3 else words[0], t3, caption]


def chat_texts(tokenizer: Any, captions: Sequence[str]) -> list[tuple[str, str]]:
    """``(prompt, answer)``: seed prompts with rule answers, as the chat LM should complete them."""
    from hierarcaps.prompting import SEED_PROMPTS, load_prompt, render_prompts

    prompts = [load_prompt(name) for name in SEED_PROMPTS]
    texts = []
    for caption in captions:
        t1, t2, t3, t4 = rule_hierarchy(caption)
        for prompt, (source, answer) in zip(prompts, [(t4, t3), (t3, t2), (t2, t1)]):
            rendered = render_prompts(tokenizer, prompt, [source])[0]
            closing = f' {answer}"' if prompt.answer_opens_quote else f' "{answer}"'
            texts.append((rendered, closing + (tokenizer.eos_token or "")))
    return texts


def few_shot_texts(captions: Sequence[str], shots: int, rng: random.Random) -> list[tuple[str, str]]:
    """``(shots lines, next line)``: release-format lines, as the base LM should continue them."""
    lines = [" => ".join(rule_hierarchy(c)) for c in captions]
    blocks = [rng.sample(lines, min(shots + 1, len(lines))) for _ in range(len(lines))]
    return [("".join(line + "\n" for line in block[:-1]), block[-1] + "\n") for block in blocks]


def _train(model: Any, batches: list[dict[str, torch.Tensor]], steps: int, lr: float) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = 0.0
    for step in range(steps):
        output = model(**batches[step % len(batches)])
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = output.loss.item()
    model.eval()
    return loss


def _causal_batches(tokenizer: Any, texts: list[tuple[str, str]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of prompt + answer; the loss covers the answer tokens only."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        enc = tokenizer([p + a for p, a in chunk], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for row, (prompt, _) in enumerate(chunk):
            labels[row, : len(tokenizer(prompt)["input_ids"])] = -100
        batches.append({**enc, "labels": labels})
    return batches


def _seq2seq_batches(tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True, truncation=True, max_length=128)
        target = tokenizer([t for _, t in chunk], return_tensors="pt", padding=True, truncation=True, max_length=128)
        labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
        batches.append({**enc, "labels": labels})
    return batches


def prime_tiny_model(kind: str, folder: Path, captions: Sequence[str], *, steps: int = 60, seed: int = 0) -> float:
    """Train the tiny model saved in ``folder`` on format texts built from ``captions``; save it back.

    Returns the last training loss.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if kind not in PRIMED_KINDS:
        raise ValueError(f"cannot prime tiny model kind {kind!r}; primed kinds: {', '.join(PRIMED_KINDS)}")
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "seq2seq":
            from hierarcaps.stages.completer import add_delimiter_tokens, make_completer_pairs

            model = AutoModelForSeq2SeqLM.from_pretrained(folder)
            add_delimiter_tokens(tokenizer, model)
            hierarchies = [rule_hierarchy(c) for c in captions]
            pairs = [p for _ in range(8) for p in make_completer_pairs(hierarchies, rng)]
            rng.shuffle(pairs)
            batches = _seq2seq_batches(tokenizer, pairs, 16)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder)
            texts = chat_texts(tokenizer, captions) if kind == "chat_lm" else few_shot_texts(captions, 3, rng)
            rng.shuffle(texts)
            batches = _causal_batches(tokenizer, texts, 8)
        loss = _train(model, batches, steps, lr=3e-3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return loss
