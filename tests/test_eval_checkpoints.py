"""``hierarcaps-eval retrieval`` with several ``--model``: one process evaluates a series of
checkpoints, each exactly as a command of its own would, the text-fine-tuned ones reading the
image embeddings the first one cached; one JSON per model, then a comparison table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.backends import HFClipBackend, load_backend
from finetune.evaluation.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hierarcaps"
SCORES = ("precision", "recall", "f1", "tau_d")


@pytest.fixture
def subset(real_test_rows) -> Path:
    """The first 16 rows of the real curated test set."""
    return real_test_rows(16)


def _text_fine_tuned(base: Path, out: Path, seed: int) -> Path:
    """A copy of ``base`` whose text tower moved (as RE training moves it), image tower untouched."""
    backend = load_backend("hf-clip", base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in backend.model.named_parameters():
            if name.startswith(HFClipBackend._TEXT):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return backend.save(out)


def _argv(subset: Path, output: Path, *models: str, cache: Path | None = None) -> list[str]:
    argv = ["retrieval", "--backend", "hf-clip", "--test-csv", str(subset), "--images", str(DATA / "test_imgs"),
            "--output", str(output), "--workers", "0"]
    argv += ["--image-cache", str(cache)] if cache else ["--no-image-cache"]
    for model in models:
        argv += ["--model", model]
    return argv


def test_several_checkpoints_in_one_command(tiny_hf_clip_dir, subset, tmp_path, capsys):
    steps = [_text_fine_tuned(tiny_hf_clip_dir, tmp_path / f"step-{k}", seed=k) for k in (1, 2)]
    out = tmp_path / "eval"
    code = main(_argv(subset, out, f"zero-shot={tiny_hf_clip_dir}", str(steps[0]), f"late={steps[1]}",
                      cache=tmp_path / "cache"))
    assert code == 0
    step_name = "step-1"  # an unlabelled model is named by the last part of its path
    files = {label: out / f"{label}.json" for label in ("zero-shot", step_name, "late")}
    metrics = {label: json.loads(path.read_text()) for label, path in files.items()}

    # Each equals a command of its own on that model alone, without any cache.
    for label, model in (("zero-shot", tiny_hf_clip_dir), (step_name, steps[0]), ("late", steps[1])):
        alone = tmp_path / f"alone-{label}.json"
        assert main(_argv(subset, alone, str(model))) == 0
        expected = json.loads(alone.read_text())
        assert {k: metrics[label][k] for k in SCORES} == {k: expected[k] for k in SCORES}, label
        assert metrics[label]["model"] == str(model)
    assert len({metrics[label]["tau_d"] for label in files}) == 3  # the text towers differ

    # The first embedded the 16 images; the text-fine-tuned ones read them back.
    assert metrics["zero-shot"]["image_cache"]["misses"] == 16 and metrics["zero-shot"]["image_cache"]["hits"] == 0
    assert all(metrics[label]["image_cache"] == {"dir": str(tmp_path / "cache"), "hits": 16, "misses": 0}
               for label in (step_name, "late"))

    table = (out / "comparison.md").read_text()
    assert all(label in table for label in files)
    captured = capsys.readouterr()
    assert "[1/3] zero-shot: precision" in captured.err and "[3/3] late:" in captured.err


def test_two_models_with_the_same_file_name_are_refused(tiny_hf_clip_dir, subset, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(_argv(subset, out, f"a/b={tiny_hf_clip_dir}", f"a_b={tiny_hf_clip_dir}")) == 2
    err = capsys.readouterr().err
    assert "a_b.json" in err and "LABEL=MODEL" in err
    assert not out.exists()  # refused before loading anything
    # Two checkpoints in folders of the same name (runs/a/final, runs/b/final) need labels too.
    assert main(_argv(subset, out, str(tmp_path / "a" / "final"), str(tmp_path / "b" / "final"))) == 2
    assert "final.json" in capsys.readouterr().err and not out.exists()


def test_several_models_need_a_folder_not_a_file(tiny_hf_clip_dir, subset, tmp_path, capsys):
    existing = tmp_path / "metrics.json"
    existing.write_text("{}")
    assert main(_argv(subset, existing, f"a={tiny_hf_clip_dir}", f"b={tiny_hf_clip_dir}")) == 2
    assert "is a file" in capsys.readouterr().err and existing.read_text() == "{}"
