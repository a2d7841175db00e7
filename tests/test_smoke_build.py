"""The smoke profile end to end with its real (tiny, primed) models, no test doubles.

This is the issue's "done when" for the build run in-process through the Prefect-free pipeline
(the Prefect flow around it is covered by tests/test_flow_build.py): every stage runs on the
models the smoke profile builds, and the result is a loadable DatasetDict with non-empty splits,
a dataset card and a manifest that say it is a plumbing check.
"""

from __future__ import annotations

import json

import datasets
import pytest

from hierarcaps.pipeline import Pipeline
from hierarcaps.settings import resolve_settings

pytestmark = pytest.mark.slow


def test_smoke_profile_builds_a_dataset_with_card_and_manifest(smoke_build_dir):
    # the session fixture runs Pipeline(resolve_settings("smoke"), ...).run() once for every test that needs a build
    final = smoke_build_dir / "final"
    assert (final / "_SUCCESS").is_file()
    built = datasets.load_from_disk(str(final / "dataset"))
    assert len(built["train"]) > 0 and len(built["test"]) > 0
    assert all(len(row["positive"]) == 4 and len(row["negative"]) == 4 for row in built["train"])
    assert all(row["positive"][3] == row["caption"] for row in built["test"])
    card = (final / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "PLUMBING CHECK" in card
    manifest = json.loads((final / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["plumbing_check"] is True
    assert manifest["counts"] == {"train": len(built["train"]), "test": len(built["test"])}
    # throughput accounting reaches the manifest and the card, with counts the real models made
    stages = {row["stage"]: row for row in manifest["stages"]}
    for name in ("seeds", "augment", "complete_train", "complete_test", "negatives"):
        extra, rates = stages[name]["extra"], stages[name]["throughput"]
        assert extra["generate_calls"] > 0 and extra["prompt_tokens"] > 0 and extra["generated_tokens"] > 0
        assert all(isinstance(extra[key], int) for key in ("generate_calls", "prompt_tokens", "generated_tokens"))
        assert rates["tokens_per_s"] == pytest.approx(extra["generated_tokens"] / stages[name]["seconds"], rel=0.01)
        if name != "augment":
            assert extra["nli_pairs_scored"] > 0 and rates["pairs_per_s"] > 0
    assert "## Throughput" in card and "generated tokens/s" in card


def test_a_second_build_elsewhere_interrupted_and_resumed_gives_byte_identical_dataset_files(smoke_build_dir, tmp_path):
    """Issue 9 item 5: provenance names models by hub id or content hash, never by path or mtime.

    Build ``a`` (the shared smoke build); build ``b`` in another folder, stopped after ``complete_train`` and resumed by a
    new pipeline. ``b`` gets ``a``'s primed tiny models copied with fresh mtimes (priming them again
    would only repeat ``a``'s minutes of work; by hand, two fully independent smoke builds gave the
    same bytes too). Every dataset file (Arrow, Parquet, release CSV, dataset JSON) is the same
    byte for byte, ``provenance`` included; only the card and manifest differ (timings, dates).
    """
    import shutil

    from hierarcaps.pipeline import ORDER, TINY_MODELS_DIR, release_models

    settings = resolve_settings("smoke")
    shutil.copytree(smoke_build_dir / TINY_MODELS_DIR, tmp_path / "b" / TINY_MODELS_DIR, copy_function=shutil.copy)
    interrupted = Pipeline(settings, tmp_path / "b")
    for name in ORDER[:ORDER.index("complete_train") + 1]:
        interrupted.run_stage(name)
    release_models()
    Pipeline(settings, tmp_path / "b").run()
    final_a, final_b = smoke_build_dir / "final", tmp_path / "b" / "final"
    files = sorted(p.relative_to(final_a) for p in final_a.rglob("*")
                   if p.is_file() and p.parent != final_a)  # dataset/, data/, release/
    assert {"dataset/train/data-00000-of-00001.arrow", "data/train-00000-of-00001.parquet",
            "release/train.csv"} <= {p.as_posix() for p in files}
    for rel in files:
        assert (final_a / rel).read_bytes() == (final_b / rel).read_bytes(), rel
    provenance = datasets.load_from_disk(str(final_b / "dataset"))["train"][0]["provenance"]
    assert "completer#sha256:" in provenance and str(tmp_path) not in provenance and str(smoke_build_dir) not in provenance
