"""The tiny-model builders give loadable models with the properties other tests rely on."""

from __future__ import annotations

import filecmp
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer, CLIPModel, CLIPProcessor

from hierarcaps.tiny_models import KINDS, build_tiny_model


def test_unknown_kind_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model kind 'gpt'.*causal_lm"):
        build_tiny_model("gpt", tmp_path)


def test_build_is_deterministic(tmp_path: Path, tiny_nli_dir: Path) -> None:
    again = build_tiny_model("nli", tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert filecmp.cmp(tiny_nli_dir / name, again / name, shallow=False), name


def test_build_does_not_touch_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("text_encoder", tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_chat_template_only_on_chat_lm(tiny_causal_lm_dir: Path, tiny_chat_lm_dir: Path) -> None:
    assert AutoTokenizer.from_pretrained(tiny_causal_lm_dir).chat_template is None
    chat = AutoTokenizer.from_pretrained(tiny_chat_lm_dir)
    text = chat.apply_chat_template([{"role": "user", "content": "Shorten it."}], tokenize=False)
    assert text == "<s>[INST] Shorten it. [/INST]"


def test_seq2seq_tokenizer_lacks_arrows(tiny_seq2seq_dir: Path) -> None:
    """The completer stage must add → and ← itself, as with flan-t5."""
    tok = AutoTokenizer.from_pretrained(tiny_seq2seq_dir)
    ids = tok("goat → animal ←").input_ids
    assert ids.count(tok.unk_token_id) == 2
    assert ids[-1] == tok.eos_token_id
    config = AutoConfig.from_pretrained(tiny_seq2seq_dir)
    assert config.decoder_start_token_id == tok.pad_token_id == 0


def test_nli_label_orders(tiny_nli_dir: Path, tiny_nli_shuffled_dir: Path) -> None:
    assert AutoConfig.from_pretrained(tiny_nli_dir).id2label == {0: "contradiction", 1: "neutral", 2: "entailment"}
    assert AutoConfig.from_pretrained(tiny_nli_shuffled_dir).id2label == {
        0: "ENTAILMENT", 1: "Contradiction", 2: "neutral"}


def test_hf_clip_pools_at_eos(tiny_hf_clip_dir: Path) -> None:
    """Text features come from the first <|endoftext|>, so padding must not change them."""
    model = CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_hf_clip_dir)
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id != 2
    short = processor.tokenizer(["a goat"], return_tensors="pt")
    padded = processor.tokenizer(["a goat"], return_tensors="pt", padding="max_length", max_length=77)
    with torch.no_grad():
        a = model.get_text_features(**short)
        b = model.get_text_features(**padded)
    a = getattr(a, "pooler_output", a)
    b = getattr(b, "pooler_output", b)
    torch.testing.assert_close(a, b)
    pixels = processor(images=[Image.new("RGB", (50, 40))], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)


def test_open_clip_local_dir(tiny_open_clip_dir: Path) -> None:
    name = "local-dir:" + str(tiny_open_clip_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a goat", "an animal"]))
        image = model.encode_image(preprocess(Image.new("RGB", (50, 40))).unsqueeze(0))
    assert text.shape == (2, 32) and image.shape == (1, 32)


def test_every_kind_has_a_fixture(request: pytest.FixtureRequest) -> None:
    for kind in KINDS:
        path = request.getfixturevalue(f"tiny_{kind}_dir")
        assert path.is_dir() and any(path.iterdir())
