"""Resume: a failed build reruns only unfinished work and ends with the same dataset.

The model-backed stage bodies are replaced by deterministic test doubles (counting their calls)
because this test is about the orchestration: stage directories, fingerprints, shards,
``_SUCCESS`` markers. The captions stage (demo files) and the final stage (assembly,
validation, exports, card, manifest) are the real ones. The stages themselves are tested with
tiny models in the stage tests.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from datasets import load_from_disk

from hierarcaps import pipeline
from hierarcaps.pipeline import BuildError, Pipeline
from hierarcaps.settings import resolve_settings
from hierarcaps.stagedir import SUCCESS, StageDir, atomic_path, fingerprint, read_rows, stage_dir_name, write_rows
from hierarcaps.stats import StageStats


class FakeStages:
    """Deterministic stand-ins for the model-backed stages; ``fail`` makes one call raise once."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fail: set[str] = set()

    def _call(self, key: str) -> None:
        self.calls[key] += 1
        if key in self.fail:
            self.fail.discard(key)
            raise RuntimeError(f"simulated failure in {key}")

    def seeds(self, pipe, rows, index):
        self._call(f"seeds/{index}")
        out = [{"tiers": _chain(r["caption"]), "caption": r["caption"], "provenance": "{}"} for r in rows]
        return out, StageStats("seeds", items_in=len(rows), kept=len(out))

    def augment(self, pipe, index):
        self._call(f"augment/{index}")
        seeds = read_rows(pipe.upstream_dir("augment", "seeds") / "rows.parquet")
        out = [{"tiers": [f"{t} #{index}" for t in s["tiers"]]} for s in seeds[:3]]
        return out, StageStats("augment", items_in=3, kept=3)

    def completer(self, pipe, out: Path):
        self._call("completer")
        rows = read_rows(pipe.upstream_dir("completer", "augment") / "rows.parquet")
        (out / "model").mkdir()
        (out / "model" / "weights.txt").write_text(fingerprint([r["tiers"] for r in rows]))
        return [StageStats("completer", items_in=len(rows), kept=len(rows))]

    def complete(self, stage):
        def run(pipe, rows, index):
            self._call(f"{stage}/{index}")
            out = [{**r, "positive": _chain(r["caption"]), "provenance": json.dumps({"shard": index})}
                   for r in rows if len(r["caption"]) % 5 != 0]  # some captions are rejected
            stats = StageStats(stage, items_in=len(rows), kept=len(out))
            stats.reject("not_entailed", len(rows) - len(out))
            return out, stats
        return run

    def negatives(self, pipe, rows, index):
        self._call(f"negatives/{index}")
        rounds = pipe.settings.negatives.rounds
        out = [{**r, "negative": [f"not {t} ({rounds})" for t in r["positive"]]} for r in rows]
        return out, StageStats("negatives", items_in=len(rows), kept=len(out))


def _chain(caption: str) -> list[str]:
    words = caption.split()
    return [words[0], " ".join(words[:2]), " ".join(words[:5]), caption]


@pytest.fixture
def fakes(monkeypatch) -> FakeStages:
    fake = FakeStages()
    monkeypatch.setitem(pipeline.SHARD_RUNNERS, "seeds", fake.seeds)
    monkeypatch.setitem(pipeline.SHARD_RUNNERS, "complete_train", fake.complete("complete_train"))
    monkeypatch.setitem(pipeline.SHARD_RUNNERS, "complete_test", fake.complete("complete_test"))
    monkeypatch.setitem(pipeline.SHARD_RUNNERS, "negatives", fake.negatives)
    monkeypatch.setitem(pipeline.WHOLE_RUNNERS, "completer", fake.completer)
    monkeypatch.setattr(pipeline, "_augment_shard", fake.augment)
    return fake


def _settings(*overrides: str):
    return resolve_settings("smoke", overrides=[
        "captions.seed_captions=6", "captions.train_captions=20", "captions.test_captions=9",
        "sharding.shard_size=8", "augment.target_count=10", *overrides,
    ])


def _dataset(out: Path) -> dict:
    loaded = load_from_disk(str(out / "final" / "dataset"))
    return {name: split.to_dict() for name, split in loaded.items()}


def test_failed_build_resumes_without_recomputing_and_matches_uninterrupted_run(tmp_path, fakes):
    reference = tmp_path / "reference"
    Pipeline(_settings(), reference).run()
    reference_calls = Counter(fakes.calls)
    n_negative_shards = sum(1 for key in reference_calls if key.startswith("negatives/"))
    assert n_negative_shards >= 2 and all(reference_calls[f"negatives/{i}"] == 1 for i in range(n_negative_shards))
    assert reference_calls["augment/1"] == 1  # 10 targets in shards of 8

    fakes.calls.clear()
    resumed = tmp_path / "resumed"
    fakes.fail = {"negatives/1"}  # the second shard of the last long stage fails on its first call
    with pytest.raises(RuntimeError, match="simulated failure"):
        Pipeline(_settings(), resumed).run()
    pipe = Pipeline(_settings(), resumed)
    done = {s.name: s.done for s in pipe.plan()}
    assert done == {"captions": True, "seeds": True, "augment": True, "completer": True,
                    "complete_train": True, "complete_test": True, "negatives": False, "final": False}
    assert pipe.dirs["negatives"].shard(0).is_done() and not pipe.dirs["negatives"].shard(1).is_done()
    assert not list(pipe.dirs["negatives"].path.rglob("*.tmp-*")), "no temporary left behind"
    mtimes = {p.name: (p.dir.path / SUCCESS).stat().st_mtime_ns for p in pipe.plan() if p.done}
    first_calls = Counter(fakes.calls)

    Pipeline(_settings(), resumed).run()
    rerun_calls = fakes.calls - first_calls
    unfinished = {f"negatives/{i}": 1 for i in range(1, n_negative_shards)}
    assert rerun_calls == Counter(unfinished), "only the failed shard and those after it ran"
    assert {p.name: (p.dir.path / SUCCESS).stat().st_mtime_ns for p in pipe.plan() if p.name in mtimes} == mtimes
    assert _dataset(resumed) == _dataset(reference)
    ref_manifest = json.loads((reference / "final" / "manifest.json").read_text())
    new_manifest = json.loads((resumed / "final" / "manifest.json").read_text())
    data_files = [f for f in ref_manifest["files"] if f.startswith(("data/", "release/"))]
    assert data_files and all(ref_manifest["files"][f] == new_manifest["files"][f] for f in data_files)


def test_changed_setting_reruns_that_stage_and_what_follows(tmp_path, fakes):
    out = tmp_path / "out"
    Pipeline(_settings(), out).run()
    before = Counter(fakes.calls)
    changed = Pipeline(_settings("negatives.rounds=3"), out)
    assert [p.name for p in changed.plan() if not p.done] == ["negatives", "final"]
    changed.run()
    assert {key.split("/")[0] for key in fakes.calls - before} == {"negatives"}
    train = _dataset(out)["train"]
    assert train["negative"][0][0].endswith("(3)")
    # the old negatives directory is still there, so switching back costs nothing but the final stage
    assert [p.name for p in Pipeline(_settings(), out).plan() if not p.done] == ["final"]


def test_deleted_stage_directory_is_rebuilt(tmp_path, fakes):
    out = tmp_path / "out"
    Pipeline(_settings(), out).run()
    pipe = Pipeline(_settings(), out)
    shutil.rmtree(pipe.dirs["completer"].path)
    before = Counter(fakes.calls)
    assert [p.name for p in pipe.plan() if not p.done] == ["completer"]
    pipe.run()
    assert fakes.calls - before == Counter({"completer": 1})


def test_unfinished_upstream_is_a_clear_error(tmp_path, fakes):
    pipe = Pipeline(_settings(), tmp_path / "out")
    with pytest.raises(BuildError, match="needs captions, which is not finished"):
        pipe.shard_count("seeds")


def test_stage_dir_name_depends_on_settings_models_and_upstream():
    base = stage_dir_name("seeds", 1, {"t": 1.2}, {"nli": "a"}, ["captions-v1-x"])
    assert base.startswith("seeds-v1-") and len(base.split("-")[-1]) == 12
    assert stage_dir_name("seeds", 1, {"t": 1.2}, {"nli": "a"}, ["captions-v1-x"]) == base
    assert stage_dir_name("seeds", 2, {"t": 1.2}, {"nli": "a"}, ["captions-v1-x"]) != base
    assert stage_dir_name("seeds", 1, {"t": 1.1}, {"nli": "a"}, ["captions-v1-x"]) != base
    assert stage_dir_name("seeds", 1, {"t": 1.2}, {"nli": "b"}, ["captions-v1-x"]) != base
    assert stage_dir_name("seeds", 1, {"t": 1.2}, {"nli": "a"}, ["captions-v1-y"]) != base


def test_build_is_atomic_and_success_is_written_last(tmp_path):
    stage = StageDir(tmp_path, "s-v1-abc")
    with pytest.raises(ValueError):
        with stage.build({"stage": "s"}) as out:
            write_rows(out.path / "rows.parquet", [{"a": 1}])
            raise ValueError("crash half way")
    assert not stage.path.exists() and list(tmp_path.iterdir()) == []
    with stage.build({"stage": "s"}) as out:
        write_rows(out.path / "rows.parquet", [{"a": 1}, {"a": 2}])
        assert not (out.path / SUCCESS).exists()
        out.record["stats"] = {"kept": 2}
    assert stage.is_done() and stage.record()["stats"] == {"kept": 2}
    assert "packages" in stage.record() and read_rows(stage.path / "rows.parquet") == [{"a": 1}, {"a": 2}]
    with atomic_path(tmp_path / "file.txt") as tmp:
        tmp.write_text("x")
        assert not (tmp_path / "file.txt").exists()
    assert (tmp_path / "file.txt").read_text() == "x"


def test_each_shard_reads_only_its_slice_of_the_upstream_rows(tmp_path, fakes, monkeypatch):
    """A shard decodes its own rows of the upstream Parquet file, not the whole file."""
    import pyarrow.parquet as pq

    pipe = Pipeline(_settings(), tmp_path)
    pipe.run_stage("captions")
    train = read_rows(pipe.dirs["captions"].path / "train.parquet")
    assert len(train) == 20
    decoded: list[int] = []
    read_table, read_row_groups = pq.read_table, pq.ParquetFile.read_row_groups

    def counting_read_table(*args, **kwargs):
        table = read_table(*args, **kwargs)
        decoded.append(table.num_rows)
        return table

    def counting_read_row_groups(self, *args, **kwargs):
        table = read_row_groups(self, *args, **kwargs)
        decoded.append(table.num_rows)
        return table

    monkeypatch.setattr(pq, "read_table", counting_read_table)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting_read_row_groups)
    assert pipe.shard_count("complete_train") == 3 and decoded == []  # counted from the metadata
    pipe.run_shard("complete_train", 1)
    assert decoded == [8]  # shard 1 of size 8 decoded rows 8..15 only
    assert fakes.calls["complete_train/1"] == 1
    shard_rows = read_rows(pipe.dirs["complete_train"].shard(1).path / "rows.parquet")
    assert [r["id"] for r in shard_rows] == [r["id"] for r in train[8:16] if len(r["caption"]) % 5 != 0]


@pytest.mark.parametrize(("start", "stop"), [(0, None), (0, 5), (3, 11), (7, 8), (16, 40), (25, 30), (5, 5)])
def test_read_rows_slices_across_row_groups(tmp_path, start, stop):
    rows = [{"i": i, "text": f"row {i}"} for i in range(23)]
    write_rows(tmp_path / "rows.parquet", rows, row_group_size=4)
    assert read_rows(tmp_path / "rows.parquet", start, stop) == rows[start:stop]
