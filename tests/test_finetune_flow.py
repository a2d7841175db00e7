"""The ``finetune`` Prefect flow and the ``hierarcaps-finetune`` CLI on a tiny CLIP and small data."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.cli import main
from finetune.config import load_settings
from finetune.train import read_log
from hierarcaps.formats import csv_to_folder

# Prefect's ephemeral API server needs more than its default 20 s to start on a busy 2-core CI machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

CHAINS = [
    ["animal", "goat", "goat on island", "a goat eating leaves of a lemon tree on the island"],
    ["animal", "dog", "dog on the beach", "a brown dog running through the grass on the beach"],
    ["person", "man", "man in the kitchen", "a young man holding a ball in the kitchen"],
    ["vehicle", "car", "red car on street", "a red car parked near an old bridge on the street"],
]
NEGATIVES = [
    ["portrait", "frog", "goats graze at snowy night", "goat on island with flowers"],
    ["food", "cat", "dog in the forest", "a dog on the beach with a small boat"],
    ["landscape", "woman", "man in the garden", "a man in the kitchen at night"],
    ["building", "horse", "car in the river", "a car on the street in winter"],
]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    """A stand-in for a finished build-hierarcaps output folder: ``final/dataset`` and ``final/_SUCCESS``."""
    root = tmp_path_factory.mktemp("build")
    train_csv = root / "train.csv"
    with train_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["positive", "negative", "image_url"])
        for i in range(8):
            w.writerow([" => ".join(CHAINS[i % 4]), " => ".join(NEGATIVES[i % 4]), f"http://x/{i}.jpg"])
    csv_to_folder(train_csv, root / "final" / "dataset")
    (root / "final" / "_SUCCESS").write_text("{}")
    return root


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> tuple[Path, Path]:
    """A curated-layout test CSV and its images (random pixels: the metrics' values are not asserted)."""
    root = tmp_path_factory.mktemp("test")
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    with (root / "test.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "captions", "image_url"])
        for i, chain in enumerate(CHAINS):
            w.writerow([i, " => ".join(chain), f"http://images.example/COCO_val2014_{i:012d}.jpg"])
            Image.fromarray(rng.integers(0, 255, (36, 36, 3)).astype("uint8")).save(
                images / f"COCO_val2014_{i:012d}.jpg"
            )
    return root / "test.csv", images


def test_flow_trains_on_build_output_and_evaluates_before_and_after(build_dir, test_set, tiny_hf_clip_dir, tmp_path):
    from flows.finetune import finetune_flow

    test_csv, images = test_set
    settings = load_settings(None, [
        f"model.name_or_path={tiny_hf_clip_dir}", f"run.output_dir={tmp_path / 'run'}", "optim.lr=1e-3",
        "optim.batch_size=4", f"eval.test_source={test_csv}", f"eval.images_dir={images}",
    ])
    result = finetune_flow(build_dir, settings)
    assert result["train"]["steps"] == 2  # 8 items, batch 4, one epoch
    assert Path(result["train"]["final_dir"], "config.json").is_file()
    eval_dir = tmp_path / "run" / "eval"
    for when in ("before", "after"):
        saved = json.loads((eval_dir / when / "metrics.json").read_text())
        metrics = result[when]["hierarcaps"]
        assert saved["hierarcaps"]["precision"] == metrics["precision"] and 0 <= metrics["recall"] <= 1
        assert metrics["n_images"] == 4 and (eval_dir / when / "radius_by_tier.png").is_file()
    assert result["after"]["model"] == result["train"]["final_dir"]
    # RE trains the text tower only: the after-evaluation reads every image embedding from the cache.
    assert result["before"]["hierarcaps"]["image_cache"]["misses"] == 4
    assert result["after"]["hierarcaps"]["image_cache"] == {"dir": str(eval_dir / "image-cache"), "hits": 4, "misses": 0}
    assert result["before"]["model"] == str(tiny_hf_clip_dir)
    table = (eval_dir / "comparison.md").read_text()
    assert "before" in table and "after" in table and "precision" in table


def test_flow_rejects_a_folder_without_dataset(tmp_path):
    from flows.finetune import finetune_flow
    from finetune.config import SettingsError

    with pytest.raises(SettingsError, match="build-hierarcaps"):
        finetune_flow(tmp_path, overrides=[f"run.output_dir={tmp_path / 'run'}"])


def test_an_unfinished_build_is_refused_and_a_finished_one_found(build_dir, tmp_path):
    from finetune.config import SettingsError
    from flows.finetune import build_dataset_dir

    assert build_dataset_dir(build_dir) == build_dir / "final" / "dataset"
    assert build_dataset_dir(build_dir / "final") == build_dir / "final" / "dataset"
    (tmp_path / "final" / "dataset").mkdir(parents=True)  # a final stage that never wrote _SUCCESS
    with pytest.raises(SettingsError, match="unfinished"):
        build_dataset_dir(tmp_path)


def test_cli_trains_with_config_file_and_overrides(build_dir, tiny_open_clip_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  backend: open-clip\n  name_or_path: {tiny_open_clip_dir}\noptim:\n  lr: 0.001\n")
    out = tmp_path / "cli-run"
    code = main(["--config", str(cfg), "--data", str(build_dir / "final" / "dataset"), "--output", str(out),
                 "--set", "optim.batch_size=8", "--no-progress"])
    assert code == 0
    assert "trained 1 step;" in capsys.readouterr().out
    assert (out / "final" / "open_clip_config.json").is_file() and len(read_log(out / "loss_log.jsonl")) == 1
    # A second run into the same folder without --resume is refused with a clear message.
    assert main(["--config", str(cfg), "--data", str(build_dir / "final" / "dataset"), "--output", str(out), "--no-progress"]) == 2
    assert "run.resume" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_build_cli_finetune_subcommand_runs_the_flow(build_dir, tiny_hf_clip_dir, tmp_path, capsys):
    from flows.cli import main

    run = tmp_path / "run"
    code = main(["finetune", str(build_dir), "--model", str(tiny_hf_clip_dir), "--run-dir", str(run),
                 "--set", "optim.batch_size=4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "2 steps" in out and str(run / "final") in out
    assert (run / "final" / "config.json").is_file() and (run / "loss_log.jsonl").is_file()


def test_build_cli_finetune_refuses_an_unfinished_build(tmp_path, capsys):
    from flows.cli import main

    (tmp_path / "final" / "dataset").mkdir(parents=True)
    assert main(["finetune", str(tmp_path), "--model", "unused"]) == 2
    assert "unfinished" in capsys.readouterr().err


# Flows run here report to one session-wide Prefect API (conftest.prefect_server).
pytestmark = pytest.mark.usefixtures("prefect_server")
