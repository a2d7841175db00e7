"""``hierarcaps tiny-model``: writes a model the product's own loaders read, refuses to overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from hierarcaps.cli import main
from hierarcaps.models import ModelSpec, load_nli
from hierarcaps.nli import NLIScorer


def test_tiny_nli_model_loads_and_scores(tmp_path: Path) -> None:
    out = tmp_path / "nli"
    assert main(["tiny-model", "nli", str(out)]) == 0
    model, tokenizer = load_nli(ModelSpec(str(out)))
    scores = NLIScorer(model, tokenizer).score([("a goat on an island", "an animal")])
    total = scores.entailment + scores.neutral + scores.contradiction
    assert total == pytest.approx([1.0])


def test_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["tiny-model", "hf_clip", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_unknown_kind_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "llama-70b", str(tmp_path / "x")])
    assert exit_info.value.code == 2
