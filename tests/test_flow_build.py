"""The Prefect flow and the ``build-hierarcaps`` CLI.

ONE flow run (Prefect's ephemeral API costs seconds per run) with the model-backed stage bodies
replaced by the deterministic test doubles of ``test_resume`` (the orchestration is under test
here; stages are tested with tiny models in their own tests). The CLI's plan and failure
paths are tested without a flow run.
"""

from __future__ import annotations

import pytest
from datasets import load_from_disk

from flows import cli
from flows.cli import main
from hierarcaps.pipeline import Pipeline
from tests.test_resume import _settings, fakes  # noqa: F401 - the fixture is used by name

OVERRIDES = ["captions.seed_captions=6", "captions.train_captions=20", "captions.test_captions=9",
             "sharding.shard_size=8", "augment.target_count=10", "sharding.concurrency=2"]


def test_flow_runs_shards_as_tasks_and_summarises(tmp_path, fakes):  # noqa: F811
    from flows.build import run_build

    out = tmp_path / "out"
    settings = _settings("sharding.concurrency=2")
    pipe = Pipeline(settings, out)
    pipe.run_stage("captions")  # done before the flow: reported as such, not rerun
    result = run_build(settings, out)
    assert all(p.done for p in Pipeline(settings, out).plan())
    dataset = load_from_disk(result["final"] + "/dataset")
    assert dataset["train"].num_rows > 0 and dataset["test"].num_rows > 0
    summary = {row["stage"]: row for row in result["summary"]}
    assert summary["captions_train"]["status"] == "done before"
    assert summary["negatives"]["status"] == "ran" and summary["negatives"]["kept"] == dataset["train"].num_rows
    completed = summary["complete_train"]
    assert completed["in"] == completed["kept"] + completed["rejected"] and completed["rejected"] > 0
    assert completed["reasons"] == f"not_entailed={completed['rejected']}"
    assert {"gen_calls", "prompt_tok", "gen_tok", "nli_pairs", "cache_hits", "tok/s", "pairs/s"} <= set(completed)
    assert fakes.calls["seeds/0"] == 1 and fakes.calls["negatives/1"] == 1


def test_dry_run_prints_plan_with_done_stages(tmp_path, fakes, capsys):  # noqa: F811
    out = tmp_path / "out"
    Pipeline(_settings(), out).run_stage("captions")
    args = ["--profile", "smoke", "--output-dir", str(out), "--dry-run"] + [a for o in OVERRIDES for a in ("--set", o)]
    assert main(args[:-2]) == 0  # without the concurrency override: same plan
    lines = capsys.readouterr().out.splitlines()
    assert any("NOT usable data" in line for line in lines)
    state = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert "done (skipped)" in state["captions"] and "will run" in state["seeds"]
    assert str(out / "final") in state["final"]


def test_cli_failure_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def failing(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("flows.build.run_build", failing)
    monkeypatch.setattr(cli, "_server", lambda: None)  # no temporary server for a replaced flow (and no
    # PREFECT_API_URL pointing nowhere: Prefect reads it once, when first imported, for every later test)
    assert main(["--profile", "smoke", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "CUDA out of memory" in err and cli.RESUME_HINT in err


def test_cli_settings_error_exits_2(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--set", "seeds.temprature=1", "--dry-run"]) == 2
    assert "unknown setting 'seeds.temprature'" in capsys.readouterr().err


def test_paper_profile_without_caption_files_fails_clearly(tmp_path):
    from hierarcaps.pipeline import BuildError
    from hierarcaps.settings import resolve_settings

    with pytest.raises(BuildError, match="captions.train.path is not set"):
        Pipeline(resolve_settings("paper"), tmp_path).run_stage("captions")


def test_cli_checks_caption_files_before_starting(tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the flow started although a caption file is missing")

    monkeypatch.setattr("flows.build.run_build", must_not_run)
    assert main(["--output-dir", str(tmp_path)]) == 2
    assert "captions.train.path is not set" in capsys.readouterr().err
    missing = ["--set", f"captions.train.path={tmp_path / 'cc.tsv'}", "--set", "captions.test.path=resources:demo/coco_captions.json"]
    assert main(["--output-dir", str(tmp_path)] + missing) == 2
    assert "cc.tsv': no such file" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path), "--dry-run"] + missing) == 2  # the plan still prints, then the error
    captured = capsys.readouterr()
    assert captured.out.startswith("output dir: ") and "cc.tsv': no such file" in captured.err


# Flows run here report to one session-wide Prefect API (conftest.prefect_server).
pytestmark = pytest.mark.usefixtures("prefect_server")
