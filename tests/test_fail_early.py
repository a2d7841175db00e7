"""Fail early and name the cause: caption sources, ``--dry-run`` checks, value ranges, model settings.

No flow runs here: the captions stage is the real one (it reads files, no model), the CLI is run
in-process with its temporary-server start replaced by "no server" (the environment is left alone:
Prefect reads ``PREFECT_API_URL`` once, when first imported, and later tests' flows need it unset), and
``flows.build.run_build`` is replaced where a test is about what the CLI prints around a failure.
"""

from __future__ import annotations

import json

import pytest

from flows import cli
from flows.cli import main
from hierarcaps.models import ModelLoadError
from hierarcaps.pipeline import InputError, Pipeline
from hierarcaps.settings import SettingsError, resolve_settings

DEMO_TEST = "resources:demo/coco_captions.json"


@pytest.fixture(autouse=True)
def no_temporary_server(monkeypatch):
    """These tests never reach Prefect's API: the CLI starts no temporary server for them."""
    monkeypatch.setattr(cli, "_server", lambda: None)


def _settings(train_path, *overrides: str):
    return resolve_settings("smoke", overrides=[f"captions.train.path={train_path}", *overrides])


def _captions_error(tmp_path, train_path, *overrides: str) -> str:
    pipe = Pipeline(_settings(train_path, *overrides), tmp_path / "out")
    with pytest.raises(InputError) as caught:
        pipe.run_stage("captions")
    assert not pipe.is_done("captions")  # the stage is not marked finished
    assert not any((tmp_path / "out" / "stages").glob("captions-*"))  # nor left half-written
    return str(caught.value)


def test_empty_caption_file_fails_in_the_captions_stage(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    message = _captions_error(tmp_path, empty)
    assert f"captions.train.path = '{empty}'" in message
    assert "0 usable captions of 0 records read" in message and "not empty" in message


def test_all_captions_too_short_names_counts_and_min_words(tmp_path):
    short = tmp_path / "short.tsv"
    short.write_text("".join(f"a short caption number {i}\thttp://x/{i}.jpg\n" for i in range(7)) + "\n")
    message = _captions_error(tmp_path, short)
    assert "0 usable captions of 8 records read" in message
    assert "rejected: empty=1, too_short=7" in message
    assert "captions.train.min_words = 10" in message and "--set captions.train.min_words=" in message


def test_wrong_columns_count_as_malformed_and_point_at_the_format(tmp_path):
    three = tmp_path / "three_columns.tsv"
    three.write_text("".join(f"caption {i} with enough words to pass the ten word minimum\thttp://x\textra\n"
                             for i in range(5)))
    message = _captions_error(tmp_path, three)
    assert "rejected: malformed=5" in message and "captions.train.format = 'cc_tsv'" in message


def test_csv_without_the_named_column_names_the_setting(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("text,url\n" + "a caption long enough to be kept by the ten word rule here,u\n")
    message = _captions_error(tmp_path, table, "captions.train.format=csv", "captions.train.column=caption")
    assert message.startswith("captions.train.format = 'csv'") and "no column 'caption'" in message


def test_fewer_usable_captions_than_seed_captions_leaves_no_train_captions(tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("".join(f"caption {i} has more than enough words to be kept as usable\n" for i in range(5)))
    message = _captions_error(tmp_path, few, "captions.train.format=text")
    assert "5 usable captions" in message and "more than captions.seed_captions = 24 needed" in message


def test_cli_checks_caption_content_before_the_flow_starts(tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the flow started although the caption file has no usable caption")

    monkeypatch.setattr("flows.build.run_build", must_not_run)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert main(["--profile", "smoke", "--output-dir", str(tmp_path / "out"),
                 "--set", f"captions.train.path={empty}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("build-hierarcaps: error: captions.train.path") and "0 usable captions" in err
    assert cli.RESUME_HINT not in err


def test_input_error_inside_the_flow_prints_summary_without_resume_hint(tmp_path, monkeypatch, capsys):
    def fail_after_captions(settings, output_dir, **kwargs):
        Pipeline(settings, output_dir).run_stage("captions")
        raise InputError("the seeds stage kept no seed hierarchy")

    monkeypatch.setattr("flows.build.run_build", fail_after_captions)
    assert main(["--profile", "smoke", "--output-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "Build summary so far" in out and "captions_train" in out and "captions_test" in out
    assert "kept no seed hierarchy" in err and cli.RESUME_HINT not in err


def test_transient_failure_keeps_the_resume_hint(tmp_path, monkeypatch, capsys):
    def out_of_memory(settings, output_dir, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("flows.build.run_build", out_of_memory)
    assert main(["--profile", "smoke", "--output-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "(no stage finished)" in out and cli.RESUME_HINT in err


def test_dry_run_reads_caption_files_and_checks_model_folders(tmp_path, monkeypatch, capsys):
    def no_model_loading(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr("hierarcaps.pipeline.load_lm", no_model_loading)
    monkeypatch.setattr("hierarcaps.pipeline.ensure_tiny_model", no_model_loading)
    out = str(tmp_path / "out")
    assert main(["--profile", "smoke", "--output-dir", out, "--dry-run"]) == 0
    assert "no model was loaded" in capsys.readouterr().out

    bad = tmp_path / "bad.tsv"
    bad.write_text("a caption without a tab\n")
    empty_folder = tmp_path / "no-model"
    empty_folder.mkdir()
    args = ["--profile", "smoke", "--output-dir", out, "--dry-run",
            "--set", f"captions.train.path={bad}",
            "--set", f"models.chat_lm.name_or_path={tmp_path / 'missing'}",
            "--set", f"models.nli.name_or_path={empty_folder}"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "  captions " in captured.out  # the plan is still printed
    errors = [line for line in captured.err.splitlines() if line.startswith("build-hierarcaps: error: ")]
    assert len(errors) == 3, captured.err
    assert f"captions.train.format = 'cc_tsv': {bad}: line 1: no tab" in errors[0]
    assert f"models.chat_lm.name_or_path = '{tmp_path / 'missing'}': no such file or folder" in errors[1]
    assert "models.nli.name_or_path" in errors[2] and "no config.json" in errors[2]


def test_dry_run_reports_unknown_format_and_missing_files(tmp_path, capsys):
    missing = ["--set", f"captions.train.path={tmp_path / 'cc.tsv'}"]
    assert main(["--profile", "smoke", "--output-dir", str(tmp_path), "--dry-run"] + missing) == 2
    assert "cc.tsv': no such file" in capsys.readouterr().err
    assert main(["--profile", "smoke", "--output-dir", str(tmp_path), "--dry-run",
                 "--set", "captions.test.format=coco"]) == 2
    assert "unknown caption source format 'coco'" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "expected"), [
    ("completer.learning_rate=-1", "completer.learning_rate must be greater than 0.0; got -1.0"),
    ("seeds.temperature=0", "seeds.temperature must be greater than 0.0; got 0.0"),
    ("complete.num_candidates=0", "complete.num_candidates must be at least 1; got 0"),
    ("captions.train.min_words=-2", "captions.train.min_words must be at least 0; got -2"),
    ("models.nli.batch_size=0", "batch_size must be >= 1, got 0"),
    ("models.chat_lm.dtype=float8", "dtype 'float8' is not supported"),
    ("seeds.temperature=nan", "seeds.temperature must be greater than 0.0; got nan"),
])
def test_values_out_of_range_are_settings_errors(tmp_path, capsys, override, expected):
    with pytest.raises(SettingsError) as caught:
        resolve_settings("smoke", overrides=[override])
    assert expected in str(caught.value)
    assert main(["--profile", "smoke", "--output-dir", str(tmp_path), "--dry-run", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("build-hierarcaps: settings error: ") and expected in err and len(err.splitlines()) == 1


def test_finetune_learning_rate_out_of_range_is_one_line(tmp_path, capsys):
    final = tmp_path / "build" / "final"
    (final / "dataset").mkdir(parents=True)
    (final / "_SUCCESS").write_text(json.dumps({}))
    args = ["finetune", str(tmp_path / "build"), "--model", "m", "--set", "optim.lr=-1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == "build-hierarcaps finetune: settings error: optim.lr must be greater than 0; got -1.0\n"


def test_model_load_error_names_the_setting(tmp_path):
    pipe = Pipeline(resolve_settings("smoke", overrides=["models.chat_lm.name_or_path=nobody/no-such-model"]),
                    tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        pipe.generator("chat_lm")
    assert str(caught.value).startswith("models.chat_lm.name_or_path = 'nobody/no-such-model': could not load")


def test_hierarcaps_finetune_learning_rate_out_of_range_is_one_line(tmp_path, capsys):
    from finetune.cli import main as finetune_main

    args = ["--data", str(tmp_path / "train.csv"), "--output", str(tmp_path / "run"), "--set", "optim.lr=-1"]
    assert finetune_main(args) == 2
    assert capsys.readouterr().err == "hierarcaps-finetune: error: optim.lr must be greater than 0; got -1.0\n"
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
