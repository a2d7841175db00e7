"""``build-hierarcaps --dry-run --estimate``: figures per unit, their sources, and the projection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from hierarcaps.estimate import (
    BUILT_IN_SOURCE,
    Figures,
    calibration_settings,
    figures_from_folder,
    project,
    render_estimate,
)
from hierarcaps.pipeline import ORDER
from hierarcaps.settings import resolve_settings
from hierarcaps.stats import StageStats


def _stats(stage: str, items_in: int, kept: int, seconds: float, **extra: int) -> dict:
    return StageStats(stage=stage, items_in=items_in, kept=kept, seconds=seconds, extra=dict(extra)).to_dict()


def test_projection_scales_seconds_per_unit_to_configured_counts() -> None:
    settings = resolve_settings("paper", overrides=["sharding.concurrency=4"])
    figures = {
        "complete_train": Figures(seconds_per_unit=0.1, generated_tokens_per_unit=2000, nli_pairs_per_unit=12,
                                  keep_rate=0.5, source="A"),
        "negatives": Figures(seconds_per_unit=0.2, keep_rate=0.8, source="A"),
        "completer": Figures(seconds_per_unit=0.5, source="B"),
        "final": Figures(seconds_per_unit=0.001, seconds=30.0, source="B"),
    }
    rows = {p.stage: p for p in project(settings, figures)}
    # 150000 train captions in shards of 1000, 4 at a time: 150000 x 0.1 s / 4
    assert rows["complete_train"].units == 150000 and rows["complete_train"].wall_seconds == pytest.approx(3750)
    assert rows["complete_train"].generated_tokens == 300_000_000 and rows["complete_train"].nli_pairs == 1_800_000
    # negatives get what complete_train keeps (half): 75000 x 0.2 s / 4
    assert rows["negatives"].units == 75000 and rows["negatives"].wall_seconds == pytest.approx(3750)
    # completer: ceil(10000 / 32) x 3 epochs steps, not sharded
    assert rows["completer"].units == 313 * 3 and rows["completer"].wall_seconds == pytest.approx(313 * 3 * 0.5)
    # final: negatives kept (75000 x 0.8) + test captions (5000, no keep rate recorded)
    assert rows["final"].units == 60000 + 5000 and rows["final"].wall_seconds == 30.0  # mostly fixed: not scaled
    assert rows["seeds"].wall_seconds is None and rows["seeds"].source == "no figures"
    text = render_estimate(list(rows.values()))
    # 3750 + 3750 + 469.5 + 30 s
    assert "total projected wall time: 2.2 h (without captions, seeds, augment, complete_test: no figures)" in text
    assert "figures for completer, final: B" in text


def _write_record(path: Path, stats: dict | list) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "_SUCCESS").write_text(json.dumps({"stats": stats}), encoding="utf-8")


def test_figures_from_a_build_folder_merge_finished_shards(tmp_path: Path) -> None:
    stages = tmp_path / "stages"
    _write_record(stages / "seeds-v1-0123456789ab", [_stats("seeds", 10, 4, 5.0, generated_tokens=700)])
    unfinished = stages / "complete_train-v1-abcdefabcdef" / "shards"  # two of its shards finished
    _write_record(unfinished / "00000", _stats("complete_train", 8, 4, 2.0, nli_pairs_scored=40))
    _write_record(unfinished / "00001", _stats("complete_train", 8, 2, 6.0, nli_pairs_scored=24))
    figures = figures_from_folder(tmp_path)
    assert set(figures) == {"seeds", "complete_train"}
    assert figures["seeds"].seconds_per_unit == 0.5 and figures["seeds"].generated_tokens_per_unit == 70
    assert figures["complete_train"].seconds_per_unit == 0.5 and figures["complete_train"].nli_pairs_per_unit == 4
    assert figures["complete_train"].keep_rate == 6 / 16
    assert figures["seeds"].source == f"figures recorded in {tmp_path}"
    with pytest.raises(FileNotFoundError, match="neither a manifest.json nor a build folder"):
        figures_from_folder(tmp_path / "nothing")


def test_figures_from_a_manifest_join_caption_splits(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"stages": [
        _stats("captions_train", 100, 90, 1.0, sampled_seed=10, sampled_train=30),
        _stats("captions_test", 50, 45, 1.0, sampled_test=10),
        _stats("augment", 40, 30, 6.0, generated_tokens=3000),
    ]}), encoding="utf-8")
    figures = figures_from_folder(manifest)
    assert figures["captions"].seconds_per_unit == 2.0 / 50  # 2 s for 50 captions sampled
    assert figures["augment"].seconds_per_unit == 6.0 / 30 and figures["augment"].generated_tokens_per_unit == 100


def test_paper_profile_estimate_runs_without_models(tmp_path: Path, capsys) -> None:
    assert main(["--output-dir", str(tmp_path / "out"), "--dry-run", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "total projected wall time:" in out and BUILT_IN_SOURCE in out
    for stage in ORDER:
        assert f"\n{stage} " in out
    assert "complete_train  150000" in out


def test_estimate_from_a_previous_build_says_so(tmp_path: Path, capsys) -> None:
    _write_record(tmp_path / "old" / "stages" / "augment-v1-0123456789ab", [_stats("augment", 20, 10, 2.0)])
    assert main(["--output-dir", str(tmp_path / "out"), "--dry-run", "--estimate-from", str(tmp_path / "old")]) == 0
    out = capsys.readouterr().out
    assert "augment         10000" in out and "2000.0 s" not in out and "33.3 min" in out  # 10000 x 0.2 s
    assert f"figures for augment: figures recorded in {tmp_path / 'old'}" in out


def test_estimate_needs_dry_run_and_a_readable_source(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path), "--estimate"])
    assert exit_info.value.code == 2 and "need --dry-run" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path), "--dry-run", "--estimate-from", str(tmp_path / "missing")]) == 2
    assert "estimate: --estimate-from" in capsys.readouterr().err


def test_calibration_settings_cut_every_count() -> None:
    settings = calibration_settings(resolve_settings("paper"), 6)
    c = settings.captions
    assert (c.seed_captions, c.train_captions, c.test_captions, settings.augment.target_count) == (6, 6, 6, 6)
    assert settings.models == resolve_settings("paper").models  # the configured models


@pytest.mark.slow
def test_calibration_runs_a_short_build_with_the_configured_models(tmp_path: Path, capsys) -> None:
    """The smoke profile's tiny models load here, so its calibration really runs (seeds on 4 captions)."""
    assert main(["--output-dir", str(tmp_path / "out"), "--profile", "smoke", "--dry-run", "--calibrate", "4"]) == 0
    captured = capsys.readouterr()
    assert "figures for captions, seeds" in captured.out
    assert "a calibration build of 4 captions with the configured models" in captured.out
    assert not (tmp_path / "out").exists()  # nothing of the calibration is left in the build folder
    # 4 captions give no seed hierarchy here: the later stages' figures come from elsewhere, and it says so
    assert "calibration stopped early" in captured.err and "a larger --calibrate N may get further" in captured.err
