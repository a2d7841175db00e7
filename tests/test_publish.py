"""Publishing: refusals, the dry-run folder, and the exact Hub calls (the Hub cannot be reached here,
so ``DatasetDict.push_to_hub`` and ``HfApi.upload_file`` are replaced by recorders)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import DatasetDict

from flows.cli import main
from hierarcaps.assemble import assemble_dataset, export_dataset, validate_dataset
from hierarcaps.card import render_card
from hierarcaps.manifest import build_manifest, write_manifest
from hierarcaps.publish import PublishError, publish
from hierarcaps.settings import resolve_settings, to_dict
from hierarcaps.stagedir import SUCCESS, StageDir

TRAIN = [{"caption": "a dog runs on the wet sand of a beach", "image_ref": "u1", "source": "cc",
          "positive": ["animal", "a dog", "dog on a beach", "a dog runs on the wet sand of a beach"],
          "negative": ["plant", "a cat", "dog in a car", "a dog sleeps in a red car"], "provenance": "{}"}]
TEST = [{"caption": "two people ride bikes past a red brick building", "image_ref": "u2", "source": "coco",
         "positive": ["people", "cyclists", "two people on bikes", "two people ride bikes past a red brick building"],
         "provenance": "{}"}]


def make_build(root: Path, plumbing_check: bool = False, valid: bool = True) -> Path:
    """A finished build folder written by the real assembly, card and manifest code."""
    settings = to_dict(resolve_settings("paper"))
    settings["plumbing_check"] = plumbing_check
    dataset = assemble_dataset({"train": TRAIN, "test": TEST})
    report = validate_dataset(dataset)
    assert report.ok
    with StageDir(root, "final").build({"fingerprint": "x"}) as out:
        export_dataset(dataset, out.path)
        counts = {k: v.num_rows for k, v in dataset.items()}
        (out.path / "README.md").write_text(render_card(settings=settings, counts=counts, models={}, stages=[]))
        validation = report.to_dict() if valid else {"ok": False, "problems": ["split 'test' is empty"]}
        write_manifest(out.path, build_manifest(out.path, settings=settings, counts=counts, models={},
                                                stages=[], validation=validation))
    return root


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []


@pytest.fixture
def hub(monkeypatch) -> Recorder:
    rec = Recorder()

    def push_to_hub(self, repo_id, **kwargs):
        rec.calls.append(("push_to_hub", (repo_id,), {**kwargs, "splits": {k: v.num_rows for k, v in self.items()}}))

    class FakeApi:
        def __init__(self, token=None):
            rec.calls.append(("HfApi", (), {"token": token}))

        def upload_file(self, **kwargs):
            rec.calls.append(("upload_file", (), kwargs))

    monkeypatch.setattr(DatasetDict, "push_to_hub", push_to_hub)
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    return rec


def test_publish_pushes_dataset_then_card_and_manifest(tmp_path, hub):
    out = make_build(tmp_path / "build")
    result = publish(out, "lab/hierarcaps-x", token="tok")
    push, api, card, manifest = hub.calls
    assert push == ("push_to_hub", ("lab/hierarcaps-x",),
                    {"private": True, "token": "tok", "num_shards": {"train": 1, "test": 1},
                     "splits": {"train": 1, "test": 1}})
    assert api == ("HfApi", (), {"token": "tok"})
    assert card[2]["path_in_repo"] == "README.md" and card[2]["repo_type"] == "dataset"
    assert Path(card[2]["path_or_fileobj"]) == out / "final" / "README.md"
    assert manifest[2]["path_in_repo"] == "manifest.json" and manifest[2]["repo_id"] == "lab/hierarcaps-x"
    assert result.private and "data/train-00000-of-00001.parquet" in result.files


def test_public_flag_and_cli(tmp_path, hub, capsys):
    out = make_build(tmp_path / "build")
    assert main(["publish", str(out), "--repo-id", "lab/x", "--public"]) == 0
    assert hub.calls[0][2]["private"] is False and hub.calls[0][2]["token"] is None
    assert "public" in capsys.readouterr().out


def test_dry_run_writes_exactly_the_upload(tmp_path, hub):
    out = make_build(tmp_path / "build")
    dry = tmp_path / "dry"
    result = publish(out, "lab/x", dry_run_dir=dry)
    assert hub.calls == []
    written = sorted(p.relative_to(dry).as_posix() for p in dry.rglob("*") if p.is_file())
    assert written == sorted(result.files) == sorted(
        ["README.md", "manifest.json", "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"]
    )
    assert pq.read_table(dry / "data/train-00000-of-00001.parquet").to_pylist()[0]["negative"] == TRAIN[0]["negative"]
    assert (dry / "README.md").read_bytes() == (out / "final" / "README.md").read_bytes()


@pytest.mark.parametrize("problem", ["unfinished", "no_manifest", "invalid", "plumbing", "tampered", "repo_id"])
def test_publish_refuses(tmp_path, hub, problem):
    out = make_build(tmp_path / "build", plumbing_check=problem == "plumbing", valid=problem != "invalid")
    final = out / "final"
    if problem == "unfinished":
        (final / SUCCESS).unlink()
    elif problem == "no_manifest":
        (final / "manifest.json").unlink()
    elif problem == "tampered":
        (final / "release" / "test.csv").write_text("id,captions,image_url\n")
    messages = {"unfinished": "not finished", "no_manifest": "manifest.json is missing",
                "invalid": "validation failed", "plumbing": "plumbing check",
                "tampered": "file changed since the build: release/test.csv", "repo_id": "expected ORG/NAME"}
    with pytest.raises(PublishError, match=messages[problem]):
        publish(out, "no-slash" if problem == "repo_id" else "lab/x")
    assert hub.calls == []


def test_cli_publish_refusal_exits_non_zero(tmp_path, hub, capsys):
    assert main(["publish", str(tmp_path / "nothing"), "--repo-id", "lab/x"]) == 1
    assert "not finished" in capsys.readouterr().err
    manifest = json.loads((make_build(tmp_path / "b") / "final" / "manifest.json").read_text())
    assert manifest["validation"]["ok"] is True
