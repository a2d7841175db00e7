"""``hierarcaps-finetune --data``: build folders are found, bad sources stop with one line and exit 2.

Issue 9 item 4. The build folders here are stand-ins for ``build-hierarcaps`` output (a dataset
written by ``hierarcaps convert`` plus ``final/_SUCCESS`` and ``final/manifest.json``): a real
build is exercised in tests/test_smoke_build.py; what matters here is the folder layout.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.data import TrainDataError, load_rows, plumbing_check_warning
from hierarcaps.formats import csv_to_folder

CHAINS = [
    ["animal", "goat", "goat on island", "a goat eating leaves of a lemon tree on the island"],
    ["person", "man", "man in the kitchen", "a young man holding a ball in the kitchen"],
]
NEGATIVES = [
    ["food", "cat", "dog in the forest", "a dog on the beach with a small boat"],
    ["building", "horse", "car in the river", "a car on the street in winter"],
]


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def _train_rows(n: int) -> list[list[str]]:
    return [["positive", "negative", "image_url"]] + [
        [" => ".join(CHAINS[i % 2]), " => ".join(NEGATIVES[i % 2]), f"http://x/{i}.jpg"] for i in range(n)
    ]


def _build(root: Path, *, plumbing_check: bool, finished: bool = True) -> Path:
    """A build output folder OUT with OUT/final/{dataset, manifest.json, _SUCCESS}."""
    csv_to_folder(_write_csv(root.parent / f"{root.name}.csv", _train_rows(4)), root / "final" / "dataset")
    (root / "final" / "manifest.json").write_text(json.dumps({"plumbing_check": plumbing_check}))
    if finished:
        (root / "final" / "_SUCCESS").write_text("{}")
    return root


def _run(capsys, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["--data", str(data), "--output", str(out), "--no-progress", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([], "empty file"),
        ([["caption", "url"], ["a b", "c"]], "line 1"),
        (_train_rows(2) + [["only one field"]], "line 4"),
        ([["positive", "negative", "image_url"], ["a => b => c", "a => b => c => d", "u"]], "line 2"),
    ],
    ids=["empty", "wrong-header", "short-line", "three-tiers"],
)
def test_a_bad_csv_is_one_line_naming_file_and_line_with_exit_2(tmp_path, capsys, rows, expected):
    bad = _write_csv(tmp_path / "bad.csv", rows)
    code, err = _run(capsys, bad, tmp_path / "run")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("hierarcaps-finetune: error: ")
    assert str(bad) in err and expected in err


def test_a_header_only_csv_is_refused_with_exit_2(tmp_path, capsys):
    code, err = _run(capsys, _write_csv(tmp_path / "header.csv", _train_rows(0)), tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "header.csv" in err and "no train items" in err


def test_a_folder_that_is_neither_dataset_nor_build_is_one_line(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    code, err = _run(capsys, tmp_path / "stuff", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "final/dataset" in err and "build-hierarcaps" in err


def test_an_unfinished_build_is_one_line(tmp_path, capsys):
    build = _build(tmp_path / "out", plumbing_check=False, finished=False)
    code, err = _run(capsys, build, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "unfinished" in err


@pytest.mark.parametrize("where", ["out", "out/final", "out/final/dataset"])
def test_a_build_folder_resolves_to_its_final_dataset(tmp_path, where):
    _build(tmp_path / "out", plumbing_check=False)
    rows = load_rows(str(tmp_path / where))
    assert rows.num_rows == 4 and list(rows[0]["positive"]) == CHAINS[0]


def test_a_plumbing_check_build_warns_and_a_real_one_does_not(tmp_path):
    smoke = _build(tmp_path / "smoke", plumbing_check=True)
    real = _build(tmp_path / "real", plumbing_check=False)
    for where in (smoke, smoke / "final", smoke / "final" / "dataset"):
        assert "plumbing check" in plumbing_check_warning(str(where))
    assert plumbing_check_warning(str(real)) is None
    assert plumbing_check_warning(str(tmp_path / "smoke.csv")) is None


def test_cli_trains_on_a_build_folder_and_warns_on_a_plumbing_check(tmp_path, capsys, tiny_hf_clip_dir):
    smoke = _build(tmp_path / "smoke", plumbing_check=True)
    code, err = _run(capsys, smoke, tmp_path / "run", "--model", str(tiny_hf_clip_dir),
                     "--set", "optim.batch_size=4")
    assert code == 0
    assert err.startswith("hierarcaps-finetune: warning: ") and "plumbing check" in err


def test_load_rows_wraps_schema_errors(tmp_path):
    with pytest.raises(TrainDataError, match="empty file"):
        load_rows(str(_write_csv(tmp_path / "e.csv", [])))
