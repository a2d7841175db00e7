"""Training (finetune.train), its data loading and settings, on tiny models and small synthetic data."""

from __future__ import annotations

import copy
import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.backends import load_backend
from finetune.config import SettingsError, load_settings, resolve
from finetune.data import TrainData, TrainDataError, index_texts, load_train_data
from finetune.geometry import normalize
from finetune.losses import level_contrastive_loss, re_loss
from finetune.train import (
    AlignmentModule,
    TrainError,
    batch_loss,
    batch_plan,
    batch_texts,
    frozen_reference,
    level_batch,
    read_log,
    train,
)

ANIMALS = ["goat", "frog", "dog", "cat", "horse", "bird", "cow", "sheep"]
PLACES = ["island", "beach", "street", "park", "field", "forest"]
ACTIONS = ["eating leaves of a lemon tree", "standing near the flowers", "walking on the grass", "looking at a ball"]


def write_release_csv(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` caption hierarchies in the authors' train layout (positive, negative, image_url)."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["positive", "negative", "image_url"])
        for i in range(n):
            a, b = rng.sample(ANIMALS, 2)
            place, action = rng.choice(PLACES), rng.choice(ACTIONS)
            pos = ["animal", a, f"{a} on {place}", f"a {a} {action} on the {place}"]
            neg = ["portrait", b, f"{a} in the {rng.choice(PLACES)} at night", f"a {a} on {place} with a red car"]
            writer.writerow([" => ".join(pos), " => ".join(neg), f"http://example.org/img/{i:04d}.jpg"])
    return path


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory) -> Path:
    return write_release_csv(tmp_path_factory.mktemp("data") / "train.csv", 16)


def settings_for(model_dir: Path, source: Path, out: Path, *extra: str, backend: str = "hf-clip"):
    return load_settings(None, [
        f"model.backend={backend}", f"model.name_or_path={model_dir}", f"data.source={source}",
        f"run.output_dir={out}", *extra,
    ])


# ----------------------------------------------------------------------------- settings and data


def test_settings_file_overrides_and_loss_defaults(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[loss]\nname = "rcme"\n[optim]\nlr = 3e-5\n[data]\nsource = "x.csv"\n')
    settings = resolve(load_settings(cfg, ["optim.batch_size=4", "loss.weights=[1, 0, 5]"]))
    assert settings.optim.lr == 3e-5 and settings.optim.batch_size == 4  # file and override win
    assert settings.optim.betas == [0.9, 0.98] and settings.optim.eps == 1e-6  # RCME paper defaults
    assert settings.optim.scheduler == "one-cycle" and settings.loss.towers == "both"
    assert settings.loss.weights == [1.0, 0.0, 5.0]
    re = resolve(load_settings(None, ["data.source=x.csv"]))
    assert (re.optim.lr, re.optim.batch_size, re.loss.towers, re.optim.scheduler) == (1e-7, 8, "text", "constant")
    with pytest.raises(SettingsError, match="optim.learning_rate"):
        load_settings(None, ["optim.learning_rate=1"])
    cfg.write_text("[optim]\nbatch = 3\n")
    with pytest.raises(SettingsError, match=str(cfg)):
        load_settings(cfg)
    with pytest.raises(SettingsError, match="loss.name"):
        resolve(load_settings(None, ["loss.name=mse", "data.source=x"]))


def test_train_data_from_csv_and_folder_with_test_image_exclusion(tmp_path, train_csv):
    from hierarcaps.formats import csv_to_folder

    data = load_train_data(str(train_csv))
    assert len(data) == 16 and data.positive[0][0] == "animal" and data.negative[0][0] == "portrait"
    # Every item's 8 texts are found through the unique-text index.
    for j in (0, 7):
        assert [data.texts[k] for k in data.index[j]] == data.positive[j] + data.negative[j]
    assert len(data.texts) < 8 * 16  # "animal" and "portrait" are shared
    folder = tmp_path / "ds"
    csv_to_folder(train_csv, folder)
    assert load_train_data(str(folder)).positive == data.positive
    test_csv = tmp_path / "test.csv"
    test_csv.write_text(
        "id,captions,image_url\n0,a => b => c => d,http://other.host/x/0003.jpg\n1,a => b => c => d,0005.jpg\n"
    )
    kept = load_train_data(str(train_csv), exclude_images_from=[str(test_csv)])
    assert len(kept) == 14 and kept.excluded == 2
    assert not {"0003.jpg", "0005.jpg"} & {r.rsplit("/", 1)[-1] for r in kept.image_refs}
    with pytest.raises(TrainDataError, match="negative"):
        load_train_data(str(test_csv))
    with pytest.raises(TrainDataError, match="no split 'validation'"):
        load_train_data(str(folder), split="validation")


def test_batch_plan_covers_each_item_once_per_epoch_and_splits_processes():
    plan = batch_plan(10, 4, epoch=0, seed=1)
    assert [len(b) for b in plan] == [4, 4, 2] and sorted(sum(plan, [])) == list(range(10))
    assert batch_plan(10, 4, 0, 1) == plan and batch_plan(10, 4, 1, 1) != plan
    ranks = [batch_plan(10, 2, 0, 1, world=2, rank=r) for r in (0, 1)]
    assert all(len(r) == 2 for r in ranks)  # 10 items, global batch 4: the short last batch is dropped
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))


# ----------------------------------------------------------------------------- cheap regulariser


def test_cached_frozen_reference_equals_per_step_frozen_forward(tiny_hf_clip_dir, train_csv):
    """The released loop embeds each batch with a frozen copy every step; the cache gives the same values."""
    settings = resolve(settings_for(tiny_hf_clip_dir, train_csv, Path("unused"), "optim.lr=1e-3"))
    data = load_train_data(str(train_csv))
    backend = load_backend("hf-clip", tiny_hf_clip_dir)
    frozen = copy.deepcopy(backend.model).eval()
    reference = frozen_reference(backend, data.texts)
    backend.set_trainable("text")
    module = AlignmentModule(backend)
    optimizer = torch.optim.AdamW([p for p in backend.model.parameters() if p.requires_grad], lr=1e-2)
    for items in batch_plan(len(data), 8, 0, 0):
        tokens = backend.tokenize(batch_texts(data, items))
        with torch.no_grad():  # the released loop's second full forward, through the frozen copy
            per_step = normalize(frozen.get_text_features(**tokens).pooler_output)[:-1].view(len(items), 8, -1)
        cached = reference[torch.as_tensor(data.index[items])]
        assert torch.allclose(cached, per_step, atol=1e-6)
        terms = batch_loss(module, backend, data, items, settings, reference)
        text = normalize(backend.encode_tokens(tokens).float())
        chains = text[:-1].view(len(items), 8, -1)
        released = re_loss(chains[:, :4], chains[:, 4:], text[-1], per_step[:, :4], per_step[:, 4:])
        assert terms["total"].item() == pytest.approx(released["total"].item(), abs=1e-6)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()  # the trainable model drifts; the reference must not
    # The trained model now embeds differently: the comparison above was not between equal models.
    assert not torch.allclose(frozen_reference(backend, data.texts[:3]), reference[:3], atol=1e-4)


# ----------------------------------------------------------------------------- training runs


def _re_mean(backend, data) -> float:
    emb = backend.encode_text(data.texts)
    idx = torch.as_tensor(data.index)
    chains = emb[idx]
    return re_loss(chains[:, :4], chains[:, 4:], backend.encode_text([""])[0])["mean"].item()


def test_epochs_on_tiny_clip_lower_re_term_move_root_and_keep_frozen_weights(tiny_hf_clip_dir, train_csv, tmp_path):
    data = load_train_data(str(train_csv))
    before = load_backend("hf-clip", tiny_hf_clip_dir)
    settings = settings_for(tiny_hf_clip_dir, train_csv, tmp_path / "run", "optim.lr=3e-3", "optim.epochs=3",
                            "run.checkpoint_every=100")
    result = train(settings)
    after = load_backend("hf-clip", result.final_dir)
    assert _re_mean(after, data) < _re_mean(before, data) - 0.05
    root_shift = (after.encode_text([""]) - before.encode_text([""])).norm().item()
    assert root_shift > 1e-3  # the empty-string embedding moved: the root is trained
    b, a = dict(before.model.named_parameters()), dict(after.model.named_parameters())
    frozen = [n for n in b if not n.startswith(("text_model.", "text_projection."))]
    assert frozen and all(torch.equal(b[n], a[n]) for n in frozen)  # vision tower and logit scale
    assert not torch.equal(b["text_projection.weight"], a["text_projection.weight"])
    log = read_log(result.log_path)
    assert [r["step"] for r in log] == list(range(1, 7)) and log[0]["loss/reg"] == pytest.approx(0.0, abs=1e-6)
    assert result.curve_path.stat().st_size > 0
    record = json.loads(result.run_json.read_text())
    assert record["status"] == "complete" and record["counts"]["items"] == 16 and record["seed"] == 0
    assert record["settings"]["optim"]["batch_size"] == 8 and record["versions"]["torch"]
    assert (result.output_dir / "checkpoint-6" / "model" / "config.json").is_file()
    with pytest.raises(TrainError, match="resume"):
        train(settings)  # the folder holds a finished run


def test_resume_reproduces_the_uninterrupted_run(tiny_text_encoder_dir, train_csv, tmp_path):
    """BERT has dropout, so the next step matches only if the RNG state is restored too."""
    args = ("optim.lr=1e-3", "optim.batch_size=4", "optim.max_steps=3", "run.checkpoint_every=2",
            "optim.gradient_accumulation_steps=1")
    full = train(settings_for(tiny_text_encoder_dir, train_csv, tmp_path / "full", *args, backend="text"))
    # An interrupted run: it checkpointed step 2, logged step 3 and died before the next checkpoint.
    cut = tmp_path / "cut"
    shutil.copytree(full.output_dir, cut)
    shutil.rmtree(cut / "checkpoint-3")
    shutil.rmtree(cut / "final")
    resumed = train(settings_for(tiny_text_encoder_dir, train_csv, cut, *args, "run.resume=true", backend="text"))
    a, b = read_log(full.log_path), read_log(resumed.log_path)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert b[2]["loss/total"] == pytest.approx(a[2]["loss/total"], abs=1e-6)
    wa = load_backend("text", full.final_dir).model.state_dict()
    wb = load_backend("text", resumed.final_dir).model.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    with pytest.raises(TrainError, match="optim"):
        train(settings_for(tiny_text_encoder_dir, train_csv, cut, *args, "run.resume=true", "optim.lr=1e-2",
                           backend="text"))


def test_gradient_accumulation_matches_one_large_batch(tiny_hf_clip_dir, train_csv, tmp_path):
    """Two accumulated micro-batches of 4 give the same logged loss and update as one batch of 8."""
    # eps = 1 makes AdamW's first update lr * g / (|g| + 1), smooth in the gradient g: with the
    # default eps it is about lr * sign(g), which float noise flips where the true g is 0 (pad tokens).
    args = ("optim.lr=0.1", "optim.eps=1.0", "optim.max_steps=1", "loss.weights=[1, 0, 10]")
    big = train(settings_for(tiny_hf_clip_dir, train_csv, tmp_path / "big", "optim.batch_size=8", *args))
    acc = train(settings_for(tiny_hf_clip_dir, train_csv, tmp_path / "acc", "optim.batch_size=4",
                             "optim.gradient_accumulation_steps=2", *args))
    # Without the minimax term the RE loss is a mean over items, so 2 x 4 accumulated = 1 x 8.
    assert read_log(acc.log_path)[0]["loss/total"] == pytest.approx(read_log(big.log_path)[0]["loss/total"], abs=1e-5)
    wa = load_backend("hf-clip", big.final_dir).model.state_dict()
    wb = load_backend("hf-clip", acc.final_dir).model.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def write_images(folder: Path, n: int = 16) -> Path:
    """Random RGB images named like the train CSV's image URLs (0000.jpg, ...)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3)).astype("uint8")).save(folder / f"{i:04d}.jpg")
    return folder


def test_rcme_trains_both_towers_with_images_and_frozen_logit_scale(tiny_open_clip_dir, train_csv, tmp_path):
    images = write_images(tmp_path / "images")
    args = ("loss.name=rcme", "optim.lr=1e-3", "optim.batch_size=8", "optim.max_steps=2")
    result = train(settings_for(tiny_open_clip_dir, train_csv, tmp_path / "rcme", *args, f"data.images_dir={images}",
                                backend="open-clip"))
    log = read_log(result.log_path)
    assert {"loss/local", "loss/global", "loss/cma", "loss/total"} <= set(log[0]) and log[0]["loss/cma"] > 0
    before = load_backend("open-clip", tiny_open_clip_dir).model.state_dict()
    after = load_backend("open-clip", result.final_dir).model.state_dict()
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    assert not torch.equal(before["text_projection"], after["text_projection"])
    assert torch.equal(before["logit_scale"], after["logit_scale"])
    (images / "0003.jpg").unlink()
    with pytest.raises(TrainDataError, match="0003.jpg"):
        train(settings_for(tiny_open_clip_dir, train_csv, tmp_path / "rcme2", *args, f"data.images_dir={images}",
                           backend="open-clip"))


# ----------------------------------------------------------------------------- level-restricted contrastive


def test_level_batch_labels_equal_texts_share_an_id_per_level():
    positive = [
        ["animal", "goat", "goat on island", "a goat eating"],
        ["animal", "frog", "frog on beach", "a frog sitting"],
        ["animal", "goat", "goat on beach", "a goat eating"],
        ["plant", "tree", "goat", "a tree"],  # "goat" at level 3 is the same text as level 2's "goat"
    ]
    negative = [["x", "y", "z", "w"]] * 4
    texts, index = index_texts(positive, negative)
    data = TrainData([str(i) for i in range(4)], positive, negative, [""] * 4, "test", texts, index)
    items = [2, 0, 3, 1]
    batch, labels = level_batch(data, items)
    assert labels.shape == (4, 4) and labels.dtype == torch.long
    # Every id names the item's tier text, and only positive tiers are encoded, each once.
    assert [[batch[k] for k in row] for row in labels.tolist()] == [positive[j] for j in items]
    assert len(batch) == len(set(batch)) == len({t for j in items for t in positive[j]})
    for level in range(4):
        for a in range(4):
            for b in range(4):
                same_text = positive[items[a]][level] == positive[items[b]][level]
                assert (labels[a, level] == labels[b, level]).item() == same_text
    assert labels[0, 0] == labels[1, 0] == labels[3, 0] != labels[2, 0]  # "animal" x3, "plant"
    assert labels[0, 3] == labels[1, 3]  # "a goat eating" twice


def _level_loss_all(backend, data, images) -> float:
    """The level loss over the whole (tiny) dataset as one batch, without gradients."""
    texts, labels = level_batch(data, range(len(data)))
    text, image = backend.encode_text(texts), backend.encode_images(images)
    return level_contrastive_loss(image, text[labels], labels, backend.logit_scale)["total"].item()


def test_level_loss_run_trains_both_towers_and_lowers_the_level_loss(tiny_hf_clip_dir, train_csv, tmp_path):
    images_dir = write_images(tmp_path / "images")
    images = [Image.open(images_dir / f"{i:04d}.jpg").convert("RGB") for i in range(16)]
    data = load_train_data(str(train_csv))
    before = load_backend("hf-clip", tiny_hf_clip_dir)
    args = ("loss.name=level", "optim.lr=1e-3", "optim.batch_size=8", "optim.epochs=2", "optim.scheduler=constant")
    settings = settings_for(tiny_hf_clip_dir, train_csv, tmp_path / "level", *args, f"data.images_dir={images_dir}")
    resolved = resolve(settings)
    assert resolved.loss.towers == "both" and resolved.optim.betas == [0.9, 0.98]  # RCME's cross-modal recipe
    result = train(settings)
    log = read_log(result.log_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"loss/level1", "loss/level2", "loss/level3", "loss/level4", "loss/total"} <= set(log[0])
    assert all(np.isfinite(r["loss/total"]) for r in log)
    # T1 is "animal" for every item: one shared label, no negative, so level 1 costs nothing.
    assert all(r["loss/level1"] == pytest.approx(0.0, abs=1e-6) for r in log)
    assert all(r["loss/level4"] > 0 for r in log)
    after = load_backend("hf-clip", result.final_dir)
    assert _level_loss_all(after, data, images) < _level_loss_all(before, data, images) - 0.05
    b, a = before.model.state_dict(), after.model.state_dict()
    assert not torch.equal(b["visual_projection.weight"], a["visual_projection.weight"])
    assert not torch.equal(b["text_projection.weight"], a["text_projection.weight"])
    assert torch.equal(b["logit_scale"], a["logit_scale"])
    with pytest.raises(SettingsError, match="data.images_dir"):
        train(settings_for(tiny_hf_clip_dir, train_csv, tmp_path / "level2", *args))
    with pytest.raises(SettingsError, match="loss.name=level"):
        resolve(settings_for(tiny_hf_clip_dir, train_csv, tmp_path / "level3", *args, backend="text"))
