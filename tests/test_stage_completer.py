"""Completer distillation: input/target pairs, delimiter tokens, training, save and reload (tiny models)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from hierarcaps.generation import TextGenerator
from hierarcaps.hierarchy import BACKWARD, FORWARD, split_chain
from hierarcaps.models import ModelSpec, load_causal_lm, load_seq2seq_lm
from hierarcaps.stages.completer import (
    IGNORE_INDEX,
    TRAINING_LOG,
    CompleterSettings,
    _encode_causal,
    add_delimiter_tokens,
    has_single_token,
    make_completer_pairs,
    train_completer,
)

GOAT = ["animal", "goat", "goat on island", "a goat eating leaves of a lemon tree on the island"]
PIE = ["dessert", "pie", "decorated pie on a white background",
       "pie with candles and gifts in boxes on a white background"]
CPU = dict(device="cpu", dtype="float32")


def _reassemble(source: str, target: str) -> tuple[int, str, list[str]]:
    """(k, delimiter, tiers general -> specific) recovered from one pair."""
    delimiter = BACKWARD if BACKWARD in source + target else FORWARD
    lead, rest = split_chain(source.removesuffix(delimiter), delimiter), split_chain(target, delimiter)
    tiers = lead + rest
    return len(lead), delimiter, tiers[::-1] if delimiter == BACKWARD else tiers


def test_pairs_are_exact_cuts_in_both_directions_with_all_k() -> None:
    pairs = make_completer_pairs([GOAT] * 2000, random.Random(0))
    seen = Counter()
    for source, target in pairs:
        k, delimiter, tiers = _reassemble(source, target)
        assert tiers == GOAT
        assert source.endswith(delimiter) and not target.endswith(delimiter)
        seen[k, delimiter] += 1
    assert set(seen) == {(k, d) for k in range(4) for d in (FORWARD, BACKWARD)}
    assert all(abs(n / 2000 - 1 / 8) < 0.03 for n in seen.values())  # k uniform, direction p = 0.5


def test_pair_formats_match_the_paper_including_bare_delimiter() -> None:
    pairs = set(make_completer_pairs([GOAT] * 400, random.Random(1)))
    t1, t2, t3, t4 = GOAT
    assert ("→", f"{t1} → {t2} → {t3} → {t4}") in pairs
    assert ("←", f"{t4} ← {t3} ← {t2} ← {t1}") in pairs
    assert (f"{t1} →", f"{t2} → {t3} → {t4}") in pairs
    assert (f"{t1} → {t2} →", f"{t3} → {t4}") in pairs
    assert (f"{t4} ← {t3} ←", f"{t2} ← {t1}") in pairs
    assert (f"{t4} ←", f"{t3} ← {t2} ← {t1}") in pairs  # the positive-completion input
    assert make_completer_pairs([GOAT, PIE], random.Random(5)) == make_completer_pairs([GOAT, PIE], random.Random(5))


PAPER_EXAMPLES = [  # SPEC section 1 (positive and negative chain) and the paper's B.1 seed / synthetic examples
    GOAT,
    ["portrait", "frog", "goats graze at snowy night", "goat on island with flowers"],
    ["cutting tools", "scissors", "middle-aged woman cutting white fabric with scissors in super slow motion",
     "super slow motion of middle-age woman hands with scissors cutting white fabric on a tabletop"],
    PIE,
    ["youth", "boys", "boys setting up tent by lake", "teenage boys pitching a tent at the lake in forest"],
    ["music artist", "singer", "singer with group performs at event", "pop singer with group performs at event"],
    ["textiles", "towels", "striped towels",
     "a variety of striped towels in a range of colours and patterns - for sale on amazon"],
    ["flowers", "poppies", "fields of poppies.", "a field of poppies, bright orange, on a sunny day"],
]


@pytest.mark.parametrize("tiers", PAPER_EXAMPLES, ids=lambda t: t[0])
def test_paper_examples_round_trip_through_completer_pairs(tiers) -> None:
    for source, target in make_completer_pairs([tiers] * 64, random.Random(2)):
        assert _reassemble(source, target)[2] == tiers


def test_delimiters_added_once_as_special_tokens(tiny_seq2seq_dir) -> None:
    model, tokenizer = load_seq2seq_lm(ModelSpec(str(tiny_seq2seq_dir), **CPU))
    assert not has_single_token(tokenizer, FORWARD)  # T5 maps → to <unk>
    size = len(tokenizer)
    assert add_delimiter_tokens(tokenizer, model) == [FORWARD, BACKWARD]
    assert len(tokenizer) == size + 2 == model.get_input_embeddings().weight.shape[0]
    ids = tokenizer("goat ← animal", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids(BACKWARD) in ids and tokenizer.unk_token_id not in ids
    assert add_delimiter_tokens(tokenizer, model) == []


def test_train_seq2seq_completer_saves_and_reloads(tiny_seq2seq_dir, tmp_path) -> None:
    model, tokenizer = load_seq2seq_lm(ModelSpec(str(tiny_seq2seq_dir), **CPU))
    settings = CompleterSettings(epochs=4, batch_size=8, learning_rate=1e-2, seed=3)
    stats = train_completer([GOAT, PIE] * 4 + [GOAT[:3], ["", "b", "c", "d"]], model, tokenizer, settings,
                            tmp_path / "completer")
    assert stats.items_in == 10 and stats.kept == 8
    assert dict(stats.rejected) == {"not_four_tiers": 1, "empty_tier": 1}
    assert stats.extra["steps"] == 4 * math.ceil(8 / 8) and stats.extra["added_tokens"] == 2

    log = json.loads((tmp_path / "completer" / TRAINING_LOG).read_text())
    assert log["settings"]["learning_rate"] == 1e-2 and log["architecture"] == "seq2seq"
    assert len(log["losses"]) == stats.extra["steps"]
    assert log["epoch_losses"][-1] < log["epoch_losses"][0]  # it learns the 2 hierarchies
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    reloaded, reloaded_tok = load_seq2seq_lm(ModelSpec(str(tmp_path / "completer"), **CPU))
    assert has_single_token(reloaded_tok, FORWARD) and has_single_token(reloaded_tok, BACKWARD)
    prompts = [f"{GOAT[-1]} ←", "→"]
    expected = TextGenerator(model, tokenizer).generate(prompts, num_return_sequences=2, max_new_tokens=12)
    assert TextGenerator(reloaded, reloaded_tok).generate(prompts, num_return_sequences=2, max_new_tokens=12) == expected


def test_causal_completer_loss_covers_the_target_only(tiny_causal_lm_dir) -> None:
    _, tokenizer = load_causal_lm(ModelSpec(str(tiny_causal_lm_dir), **CPU))
    pairs = [("goat on island ←", "goat ← animal"), ("→", "animal → goat → goat on island → a goat")]
    batch = _encode_causal(tokenizer, pairs, CompleterSettings())
    for row, (source, target) in enumerate(pairs):
        prompt_ids = tokenizer(source)["input_ids"]
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :len(prompt_ids)].tolist() == prompt_ids  # as at inference
        assert (batch["labels"][row, :len(prompt_ids)] == IGNORE_INDEX).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()  # padding
        learned = batch["labels"][row, len(prompt_ids):n].tolist()
        assert learned[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(learned[:-1]).strip() == target


def test_train_causal_completer_saves_and_reloads(tiny_causal_lm_dir, tmp_path) -> None:
    model, tokenizer = load_causal_lm(ModelSpec(str(tiny_causal_lm_dir), **CPU))
    stats = train_completer([GOAT, PIE], model, tokenizer, CompleterSettings(epochs=1, batch_size=32), tmp_path / "c")
    assert stats.extra["steps"] == 1 and stats.extra["added_tokens"] == 2  # byte-level BPE: → is 3 bytes
    log = json.loads((tmp_path / "c" / TRAINING_LOG).read_text())
    assert log["architecture"] == "causal_lm"
    reloaded, reloaded_tok = load_causal_lm(ModelSpec(str(tmp_path / "c"), **CPU))
    assert has_single_token(reloaded_tok, BACKWARD)
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_refuses_non_empty_output_and_empty_input(tiny_seq2seq_dir, tmp_path) -> None:
    model, tokenizer = load_seq2seq_lm(ModelSpec(str(tiny_seq2seq_dir), **CPU))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="busy"):
        train_completer([GOAT], model, tokenizer, CompleterSettings(), tmp_path / "busy")
    with pytest.raises(ValueError, match="four non-empty tiers"):
        train_completer([["a", "b"]], model, tokenizer, CompleterSettings(), tmp_path / "empty")


def test_half_precision_completer_trains_float32_master_weights_and_saves_its_dtype(
    tiny_causal_lm_dir, tmp_path, monkeypatch
) -> None:
    """A bfloat16 model (what dtype=auto loads on a GPU) is updated in float32, then saved in bfloat16.

    Adam's first step moves every weight with a gradient by about lr; at lr 1e-4 a bfloat16 add
    would leave most weights unchanged (their spacing is coarser), a float32 master copy moves them.
    """
    from safetensors import safe_open

    model, tokenizer = load_causal_lm(ModelSpec(str(tiny_causal_lm_dir), device="cpu", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    before = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    after_step: list[dict[str, torch.Tensor]] = []

    class RecordingAdamW(torch.optim.AdamW):  # the real AdamW; records the weights after each step
        def step(self, closure=None):
            loss = super().step(closure)
            after_step.append({name: p.detach().clone() for name, p in model.named_parameters()})
            return loss

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    settings = CompleterSettings(epochs=1, batch_size=64, learning_rate=1e-4)
    train_completer([GOAT, PIE], model, tokenizer, settings, tmp_path / "c")
    assert len(after_step) == 1
    weights = after_step[0]
    assert all(w.dtype == torch.float32 for w in weights.values())
    big = [n for n, w in weights.items() if w.dim() == 2 and n in before and w.shape == before[n].shape]
    moved = sum(int((weights[n] != before[n]).sum()) for n in big) / sum(weights[n].numel() for n in big)
    assert moved > 0.9, f"only {moved:.0%} of the weights moved"
    assert model.dtype == torch.bfloat16  # handed back, and saved, in the dtype it was loaded in
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(k).dtype for k in saved.keys()} == {torch.bfloat16}
