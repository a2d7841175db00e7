"""Dataset card, manifest, assembly and validation."""

from __future__ import annotations

import hashlib

import yaml

from hierarcaps.assemble import assemble_dataset, validate_dataset
from hierarcaps.card import CITATION, PLUMBING_WARNING, render_card, size_category
from hierarcaps.manifest import build_manifest, file_hashes, verify_manifest
from hierarcaps.settings import resolve_settings, to_dict

POS = ["animal", "a goat", "goat on island", "a goat eating leaves of a lemon tree on the island"]
NEG = ["portrait", "frog", "goats graze at snowy night", "goat on island with flowers"]


def _card(plumbing: bool) -> str:
    settings = to_dict(resolve_settings("smoke" if plumbing else "paper"))
    models = {"nli": {"id": "facebook/bart-large-mnli", "revision": "d7645e1", "quantization": None}}
    stages = [{"stage": "seeds", "items_in": 10, "kept": 4, "rejected": {"not_entailed": 6}, "seconds": 1.5}]
    return render_card(settings=settings, counts={"train": 1200, "test": 30}, models=models, stages=stages)


def test_card_metadata_and_sections():
    text = _card(plumbing=False)
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "other" and meta["language"] == ["en"]
    assert meta["source_datasets"] == ["extended|coco", "extended|conceptual_captions"]
    assert meta["size_categories"] == ["1K<n<10K"]
    assert "image-to-text" in meta["task_categories"]
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"},
                                                {"split": "test", "path": "data/test-*"}]
    assert "| train | 1200 |" in text and "| nli | facebook/bart-large-mnli | d7645e1 |" in text
    assert "not_entailed: 6" in text and CITATION in text and '"num_candidates": 64' in text
    assert PLUMBING_WARNING not in text


def test_smoke_card_says_plumbing_check():
    text = _card(plumbing=True)
    meta = yaml.safe_load(text.split("---\n")[1])
    assert "plumbing-check-not-usable" in meta["tags"]
    assert PLUMBING_WARNING in text and "NOT USABLE DATA" in text


def test_size_categories():
    assert [size_category(n) for n in (0, 999, 1000, 73_000, 100_000, 2_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M"]


def test_manifest_hashes_and_verification(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(b"hello")
    (tmp_path / "README.md").write_text("card")
    manifest = build_manifest(tmp_path, settings={"plumbing_check": True}, counts={"train": 1},
                              models={}, stages=[], validation={"ok": True})
    assert manifest["files"] == {"README.md": hashlib.sha256(b"card").hexdigest(),
                                 "data/a.bin": hashlib.sha256(b"hello").hexdigest()}
    assert manifest["plumbing_check"] is True and manifest["packages"]["datasets"]
    assert verify_manifest(tmp_path, manifest) == []
    (tmp_path / "data" / "a.bin").write_bytes(b"changed")
    (tmp_path / "extra.txt").write_text("x")
    assert verify_manifest(tmp_path, manifest) == ["file not in the manifest: extra.txt",
                                                   "file changed since the build: data/a.bin"]
    assert "manifest.json" not in file_hashes(tmp_path)


def test_validation_reports_each_problem():
    good = {"positive": POS, "negative": NEG, "caption": POS[-1], "provenance": "{}"}
    dataset = assemble_dataset({
        "train": [good, {**good, "id": "train-000000"}, {**good, "negative": [POS[0], *NEG[1:]]},
                  {**good, "positive": [POS[0], POS[0], *POS[2:]]}],
        "test": [{**good, "caption": "another caption"}],
    })
    report = validate_dataset(dataset)
    assert not report.ok
    assert report.problems == [
        "train row 1 (id 'train-000000'): duplicate id",
        "train row 2 (id 'train-000002'): a negative tier equals the positive tier it should contradict",
        "train row 3 (id 'train-000003'): identical adjacent positive tiers",
        "test row 0 (id 'test-000000'): caption differs from T4",
    ]
    assert dataset["test"][0]["negative"] == []  # test rows never carry negatives
    empty = validate_dataset(assemble_dataset({"train": [good], "test": []}))
    assert empty.problems == ["split 'test' is empty: no caption survived the build (see the summary's rejections)"]


def test_card_shows_throughput_per_stage():
    settings = to_dict(resolve_settings("paper"))
    stages = [{"stage": "complete_train", "items_in": 10, "kept": 4, "rejected": {}, "seconds": 4.0,
               "extra": {"generate_calls": 2, "prompt_tokens": 300, "generated_tokens": 1000,
                         "nli_pairs_scored": 64, "nli_cache_hits": 6}},
              {"stage": "captions_train", "items_in": 50, "kept": 40, "rejected": {}, "seconds": 0.5}]
    text = render_card(settings=settings, counts={"train": 4}, models={}, stages=stages)
    section = text.split("## Throughput")[1].split("##")[0]
    assert "| stage | generate calls | prompt tokens | generated tokens | NLI pairs scored | NLI cache hits " \
           "| generated tokens/s | NLI pairs/s | seconds |" in section
    assert "| complete_train | 2 | 300 | 1000 | 64 | 6 | 250.0 | 16.0 | 4.0 |" in section
    assert "| captions_train | 0 | 0 | 0 | 0 | 0 | 0.0 | 0.0 | 0.5 |" in section
