"""The learning-rate schedule as trained and as logged, and the permissions of what training writes."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from finetune.config import load_settings
from finetune.evaluation.common import write_json
from finetune.train import read_log, train


def _train_csv(path: Path, n: int = 8) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["positive", "negative", "image_url"])
        for i in range(n):
            animal = ["goat", "frog", "dog", "cat"][i % 4]
            writer.writerow([f"animal => {animal} => {animal} on island => a {animal} eating leaves {i}",
                             f"portrait => person => person in city => a person at night {i}", f"http://x/{i}.jpg"])
    return path


def _one_cycle(model_dir: Path, tmp_path: Path, *extra: str):
    return load_settings(None, [
        "model.backend=text", f"model.name_or_path={model_dir}", f"data.source={_train_csv(tmp_path / 'train.csv')}",
        f"run.output_dir={tmp_path / 'run'}", "optim.scheduler=one-cycle", "optim.lr=1e-3", "optim.betas=[0.9, 0.98]",
        "optim.batch_size=4", "optim.epochs=2", "optim.max_steps=4", "run.checkpoint_every=2", *extra,
    ])


def test_one_cycle_keeps_the_configured_betas_and_logs_the_rate_each_step_used(tiny_text_encoder_dir, tmp_path):
    result = train(_one_cycle(tiny_text_encoder_dir, tmp_path))
    # torch's default cycle_momentum=True would have put beta1 at 0.85..0.95, never the configured 0.9.
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        state = torch.load(result.output_dir / checkpoint / "trainer_state.pt", weights_only=False)
        assert all(tuple(g["betas"]) == (0.9, 0.98) for g in state["optimizer"]["param_groups"])
    # One-cycle starts at max_lr / div_factor (25): the first step's update used exactly that rate.
    log = read_log(result.log_path)
    assert log[0]["lr"] == pytest.approx(1e-3 / 25, rel=1e-9)
    # Independently: the rate in force before each scheduler.step() of the same schedule.
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=4, cycle_momentum=False)
    used = []
    for _ in range(4):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [r["lr"] for r in log] == pytest.approx(used, rel=1e-9)
    run = json.loads(result.run_json.read_text())
    assert run["schedule"]["name"] == "one-cycle" and run["schedule"]["cycle_momentum"] is False


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_training_outputs_follow_the_umask(tiny_text_encoder_dir, tmp_path, umask_022):
    result = train(_one_cycle(tiny_text_encoder_dir, tmp_path, "optim.max_steps=2"))
    folders = [result.final_dir, result.output_dir / "checkpoint-2", result.output_dir / "checkpoint-2" / "model"]
    assert [oct(_mode(f)) for f in folders] == [oct(0o755)] * len(folders)
    files = [result.run_json, result.log_path, *result.final_dir.iterdir(),
             *(result.output_dir / "checkpoint-2").glob("*.pt")]
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(0o644) for f in files}
    # Metrics and reports go through the same atomic writer.
    assert _mode(write_json(tmp_path / "metrics.json", {"tau_d": 1.0})) == 0o644
    os.umask(0o077)  # and a private umask stays private
    assert _mode(write_json(tmp_path / "private.json", {})) == 0o600
