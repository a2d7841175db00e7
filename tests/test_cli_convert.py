"""``hierarcaps convert IN OUT``: release CSV <-> DatasetDict folder (hierarcaps.cli, hierarcaps.formats)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

from hierarcaps.cli import main
from hierarcaps.schema import FEATURES

RELEASE_DIR = Path(__file__).parents[2] / "shared" / "data" / "hierarcaps"
CURATED = RELEASE_DIR / "hierarcaps_test.csv"

CURATED_TEXT = (
    "id,captions,image_url\n"
    '0,"animal => goat => goat on island => a goat eating leaves of a lemon tree, on the island",http://x/0.jpg\n'
    "1,NA => b => c => d ,http://x/1.jpg\n"
)
EXPANDED_TEXT = (
    "positive,negative,image_url\n"
    "animal => goat => goat on island => a goat eating leaves on the island,"
    "portrait => frog => goats graze at snowy night => goat on island with flowers,http://x/0.jpg\n"
)


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def test_curated_csv_to_folder_and_back_is_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _write(tmp_path / "test.csv", CURATED_TEXT)
    folder = tmp_path / "dataset"
    assert main(["convert", str(source), str(folder)]) == 0
    assert "wrote 2 rows (curated layout, split 'test')" in capsys.readouterr().out
    loaded = load_from_disk(str(folder))
    assert list(loaded) == ["test"] and loaded["test"].features == FEATURES
    assert loaded["test"][1]["positive"] == ["NA", "b", "c", "d "]
    assert main(["convert", str(folder), str(tmp_path / "back.csv")]) == 0
    assert (tmp_path / "back.csv").read_bytes() == source.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_folder_gains_splits_and_export_needs_split_when_several(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    curated = _write(tmp_path / "test.csv", CURATED_TEXT)
    expanded = _write(tmp_path / "train.csv", EXPANDED_TEXT)
    folder = tmp_path / "dataset"
    assert main(["convert", str(curated), str(folder)]) == 0
    assert main(["convert", str(expanded), str(folder)]) == 0  # default split for the expanded layout: train
    loaded = load_from_disk(str(folder))
    assert sorted(loaded) == ["test", "train"] and loaded["train"][0]["negative"][1] == "frog"
    capsys.readouterr()

    assert main(["convert", str(folder), str(tmp_path / "out.csv.gz")]) == 2
    assert "has splits ['test', 'train']; pick one with --split" in capsys.readouterr().err
    assert main(["convert", str(folder), str(tmp_path / "out.csv.gz"), "--split", "train"]) == 0
    assert gzip.decompress((tmp_path / "out.csv.gz").read_bytes()) == expanded.read_bytes()


def test_existing_split_and_file_need_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _write(tmp_path / "test.csv", CURATED_TEXT)
    folder = tmp_path / "dataset"
    assert main(["convert", str(source), str(folder)]) == 0
    assert main(["convert", str(source), str(folder)]) == 2
    assert "already has a split 'test'; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(source), str(folder), "--overwrite"]) == 0
    assert main(["convert", str(folder), str(source)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_export_layout_option_and_missing_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "dataset"
    assert main(["convert", str(_write(tmp_path / "e.csv", EXPANDED_TEXT)), str(folder), "--split", "test_expanded"]) == 0
    assert main(["convert", str(folder), str(tmp_path / "ids.csv"), "--layout", "expanded_id"]) == 0
    assert (tmp_path / "ids.csv").read_text().splitlines()[0] == "id,positive,negative,image_url"
    capsys.readouterr()
    assert main(["convert", str(folder), str(tmp_path / "x.csv"), "--split", "validation"]) == 2
    assert "has no split 'validation'; it has ['test_expanded']" in capsys.readouterr().err
    assert main(["convert", str(folder), str(tmp_path / "x.csv"), "--layout", "curated"]) == 2
    assert "curated layout cannot hold" in capsys.readouterr().err


def test_bad_input_is_one_clear_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path / "bad.csv", "id,captions,image_url\n0,a => b => c,u\n")
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hierarcaps convert: error: ") and "bad.csv: line 2, column captions" in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(_write(tmp_path / "notes.txt", "x")), str(tmp_path / "out")]) == 2
    assert "cannot tell the direction" in capsys.readouterr().err
    assert main(["convert", str(bad), str(tmp_path / "again.csv")]) == 2
    assert "name a folder, not a CSV" in capsys.readouterr().err


@pytest.mark.skipif(not CURATED.is_file(), reason=f"the authors' curated test CSV is not at {CURATED}")
def test_console_script_round_trips_the_real_curated_file(tmp_path: Path) -> None:
    """End to end through a fresh interpreter, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    run = [sys.executable, "-m", "hierarcaps.cli", "convert"]
    subprocess.run([*run, str(CURATED), str(tmp_path / "ds")], check=True, env=env, capture_output=True)
    subprocess.run([*run, str(tmp_path / "ds"), str(tmp_path / "back.csv")], check=True, env=env, capture_output=True)
    assert (tmp_path / "back.csv").read_bytes() == CURATED.read_bytes()
