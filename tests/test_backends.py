"""Backends (finetune.backends) on the tiny HF CLIP, open_clip and BERT models built at test time."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.backends import BackendError, _features, load_backend

TEXTS = ["", "animal", "goat on island", "a goat eating leaves of a lemon tree on the island", "frog"]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    # Different sizes and a greyscale image: preprocessing must resize and convert.
    arrays = [rng.integers(0, 255, (40, 52, 3)), rng.integers(0, 255, (64, 32, 3)), rng.integers(0, 255, (50, 50))]
    return [Image.fromarray(a.astype("uint8")) for a in arrays]


@pytest.fixture(scope="module", params=["hf-clip", "open-clip", "text"])
def backend(request, tiny_hf_clip_dir, tiny_open_clip_dir, tiny_text_encoder_dir):
    path = {"hf-clip": tiny_hf_clip_dir, "open-clip": tiny_open_clip_dir, "text": tiny_text_encoder_dir}[request.param]
    return load_backend(request.param, path)


def test_encode_text_is_normalised_batched_and_matches_training_path(backend):
    full = backend.encode_text(TEXTS)
    assert full.shape == (len(TEXTS), backend.embed_dim)
    assert not full.requires_grad
    assert torch.allclose(full.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    # Padding to the batch must not change an embedding: one text per batch gives the same result.
    assert torch.allclose(backend.encode_text(TEXTS, batch_size=1), full, atol=1e-5)
    raw = backend.encode_tokens(backend.tokenize(TEXTS))
    assert torch.allclose(raw / raw.norm(dim=-1, keepdim=True), full, atol=1e-5)
    assert backend.encode_text([]).shape == (0, backend.embed_dim)


CAPTIONS = TEXTS + [f"a {w} standing near {n} small boats in the harbour" for n in range(12) for w in ("dog", "goat")]


def test_padding_bounded_batches_hand_cases():
    from finetune.backends import padding_bounded_batches

    assert padding_bounded_batches([], 4, 0.1) == []
    assert padding_bounded_batches([5, 5, 5, 5, 5], 4, 0.1) == [(0, 4), (4, 5)]  # the cap
    # 3, 3 then 10: padding 3, 3 to 10 would be 14 of 30 tokens (> 10 %): 10 starts a batch;
    # 10, 11: 22 tokens for 21 real (4.8 %) stay together; 20 alone.
    assert padding_bounded_batches([3, 3, 10, 11, 20], 8, 0.1) == [(0, 2), (2, 4), (4, 5)]
    assert padding_bounded_batches([3, 3, 10, 11, 20], 8, 10.0) == [(0, 5)]  # padding allowed: one batch


def test_encode_text_by_length_gives_each_call_its_own_tokenization(backend, monkeypatch):
    """Each call gets exactly the tensors of tokenizing its texts alone; the embeddings are
    encode_text's, in input order; calls hold at most max_batch texts of similar length."""
    seen: list[dict[str, torch.Tensor]] = []
    original = type(backend).encode_tokens
    monkeypatch.setattr(type(backend), "encode_tokens", lambda self, tok: seen.append(tok) or original(self, tok))
    emb = backend.encode_text_by_length(CAPTIONS, max_batch=8)
    calls = list(seen)
    seen.clear()
    assert all(len(next(iter(tok.values()))) <= 8 for tok in calls)
    assert sum(len(next(iter(tok.values()))) for tok in calls) == len(CAPTIONS)
    for tok in calls:  # the texts of this call, from their token ids, tokenized on their own
        ids = next(iter(tok.values()))
        texts = [CAPTIONS[j] for j in _rows_of(backend, ids)]
        alone = backend.tokenize(texts)
        assert alone.keys() == tok.keys() and all(torch.equal(alone[k], tok[k]) for k in tok)
    seen.clear()
    torch.testing.assert_close(emb, backend.encode_text(CAPTIONS, batch_size=1), rtol=0, atol=1e-5)
    assert backend.encode_text_by_length([], 8).shape == (0, backend.embed_dim)


def _rows_of(backend, ids: torch.Tensor) -> list[int]:
    """Indices in CAPTIONS of the token-id rows ``ids`` (each caption tokenizes to distinct ids)."""
    full = next(iter(backend.tokenize(CAPTIONS).values()))
    return [next(j for j in range(len(CAPTIONS)) if torch.equal(full[j, : row.shape[0]], row)
                 and bool((full[j, row.shape[0]:] == full[j, -1]).all() if row.shape[0] < full.shape[1] else True))
            for row in ids]


def test_encode_text_by_length_with_left_padding_falls_back(tiny_hf_clip_dir):
    """A left-padding tokenizer cannot be cut at a batch's longest text: the texts go to
    encode_text in character-length order, and come back in input order."""
    backend = load_backend("hf-clip", tiny_hf_clip_dir)
    backend.tokenizer.padding_side = "left"
    order = sorted(range(len(CAPTIONS)), key=lambda i: len(CAPTIONS[i]))
    by_length = backend.encode_text([CAPTIONS[i] for i in order], batch_size=8)
    expected = torch.empty_like(by_length)
    expected[torch.as_tensor(order)] = by_length
    torch.testing.assert_close(backend.encode_text_by_length(CAPTIONS, 8), expected, rtol=0, atol=0)


def test_encode_tokens_is_differentiable_into_the_text_tower(backend):
    backend.set_trainable("text")
    backend.model.zero_grad()
    backend.encode_tokens(backend.tokenize(["goat", ""])).sum().backward()
    grads = [p.grad for p in backend.model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    backend.model.zero_grad()


def test_encode_images(backend, images):
    if backend.kind == "text":
        with pytest.raises(NotImplementedError):
            backend.encode_images(images)
        assert backend.logit_scale is None
        return
    emb = backend.encode_images(images, batch_size=2)
    assert emb.shape == (3, backend.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(backend.encode_images(images[:1]), emb[:1], atol=1e-5)
    assert backend.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-3)


def test_hf_clip_text_embedding_is_the_projected_eos_state(tiny_hf_clip_dir):
    """Independent computation through CLIPTextModel + text_projection (not get_text_features)."""
    backend = load_backend("hf-clip", tiny_hf_clip_dir)
    tokens = backend.tokenize(TEXTS)
    with torch.no_grad():
        pooled = backend.model.text_model(**tokens).pooler_output
        expected = backend.model.text_projection(pooled)
    assert torch.allclose(backend.encode_tokens(tokens), expected, atol=1e-6)


def test_features_accepts_both_transformers_api_shapes():
    x = torch.randn(2, 4)
    assert _features(x) is x  # transformers 4.x: a tensor
    assert _features(SimpleNamespace(pooler_output=x)) is x  # 5.x: an output object
    with pytest.raises(BackendError):
        _features(SimpleNamespace(last_hidden_state=x))


def _trainable(backend) -> set[str]:
    return {n for n, p in backend.model.named_parameters() if p.requires_grad}


def test_set_trainable_freezes_per_spec(tiny_hf_clip_dir, tiny_open_clip_dir):
    hf = load_backend("hf-clip", tiny_hf_clip_dir)
    hf.set_trainable("text")
    names = _trainable(hf)
    assert names and all(n.startswith(("text_model.", "text_projection.")) for n in names)
    assert any(n.startswith("text_projection.") for n in names)
    hf.set_trainable("both")
    names = _trainable(hf)
    assert any(n.startswith("vision_model.") for n in names) and any(n.startswith("visual_projection") for n in names)
    assert "logit_scale" not in names

    oc = load_backend("open-clip", tiny_open_clip_dir)
    oc.set_trainable("text")
    names = _trainable(oc)
    assert "text_projection" in names and "token_embedding.weight" in names
    assert not any(n.startswith("visual.") for n in names) and "logit_scale" not in names
    oc.set_trainable("both")
    assert any(n.startswith("visual.") for n in _trainable(oc)) and "logit_scale" not in _trainable(oc)
    with pytest.raises(BackendError, match="towers"):
        oc.set_trainable("image")


def test_save_round_trip_in_native_format(backend, tmp_path, tiny_open_clip_dir):
    with torch.no_grad():  # change the weights so a reload of the original would differ
        next(p for n, p in backend.model.named_parameters() if backend._tower_of(n) == "text").add_(0.5)
    expected = backend.encode_text(TEXTS)
    out = backend.save(tmp_path / "saved")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    reloaded = load_backend(backend.kind, out)
    assert torch.allclose(reloaded.encode_text(TEXTS), expected, atol=1e-6)
    if backend.kind == "open-clip":
        import open_clip

        model, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(out))
        tokens = open_clip.get_tokenizer("local-dir:" + str(out))(TEXTS)
        with torch.no_grad():
            direct = model.encode_text(tokens, normalize=True)
        assert torch.allclose(direct, expected, atol=1e-6)
    backend.save(out)  # overwriting an existing checkpoint replaces it
    assert load_backend(backend.kind, out).encode_text(TEXTS[:1]).shape[0] == 1


def test_bad_kind_and_missing_model_errors(tmp_path):
    with pytest.raises(BackendError, match="unknown backend kind"):
        load_backend("clip", "x")
    with pytest.raises(BackendError, match="no-such-model"):
        load_backend("hf-clip", str(tmp_path / "no-such-model"))
    with pytest.raises(BackendError, match="dtype"):
        load_backend("text", "x", dtype="float7")


def test_text_encoder_rejected_as_dual_encoder(tiny_text_encoder_dir):
    with pytest.raises(BackendError, match="kind 'text'"):
        load_backend("hf-clip", tiny_text_encoder_dir)
