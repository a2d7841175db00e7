"""Caption sources (hierarcaps.sources): parsing, filtering with per-reason counts, streaming, sampling."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from hierarcaps.sources import (
    CaptionRow,
    SourceFormatError,
    caption_key,
    demo_source,
    iter_captions,
    sample_captions,
)
from hierarcaps.stats import StageStats

TEN = "one two three four five six seven eight nine ten"


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def _read(path: Path, fmt: str, **kwargs) -> tuple[list[CaptionRow], StageStats]:
    stats = StageStats(stage="captions")
    return list(iter_captions(path, fmt, stats=stats, **kwargs)), stats


# ---------------------------------------------------------------- Conceptual Captions TSV


def test_cc_tsv_normalises_filters_and_counts_each_reason(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "cc.tsv",
        f"  a dog   runs across the\u00a0green field near an old barn \t http://x/0.jpg\n"  # kept, normalised
        f"too short to keep\thttp://x/1.jpg\n"  # too_short
        f"A DOG runs across the green field near an old barn\thttp://x/2.jpg\n"  # duplicate (case)
        f"\n"  # empty line
        f"   \thttp://x/4.jpg\n"  # empty caption
        f"{TEN}\thttp://x/5.jpg\textra field\n"  # malformed
        f"{TEN}\t\n"  # malformed: no url
        f"{TEN}\thttp://x/7.jpg\r\n",  # kept, CRLF line end
    )
    rows, stats = _read(path, "cc_tsv")
    assert rows == [
        CaptionRow("a dog runs across the green field near an old barn", "http://x/0.jpg", "conceptual_captions"),
        CaptionRow(TEN, "http://x/7.jpg", "conceptual_captions"),
    ]
    assert stats.items_in == 8 and stats.kept == 2
    assert stats.rejected == Counter({"too_short": 1, "duplicate": 1, "empty": 2, "malformed": 2})


def test_min_words_and_dedup_are_settings(tmp_path: Path) -> None:
    path = _write(tmp_path / "cc.tsv", "three word caption\tu1\nthree  WORD caption\tu2\n")
    assert [r.image_ref for r in iter_captions(path, "cc_tsv", min_words=3)] == ["u1"]
    assert [r.image_ref for r in iter_captions(path, "cc_tsv", min_words=3, dedup=False)] == ["u1", "u2"]
    assert list(iter_captions(path, "cc_tsv", min_words=4)) == []


def test_cc_tsv_line_without_tab_is_a_format_error_naming_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "cc.tsv", f"{TEN}\tu1\n{TEN} again\tu2\nthis line has no tab at all in it\n")
    with pytest.raises(SourceFormatError, match=r"cc\.tsv: line 3: no tab"):
        list(iter_captions(path, "cc_tsv"))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "line 1: not UTF-8"),
        (b"ok caption\tu\n\x00\x01\x02\x03\tu\n", "line 2: binary data"),
        (b"caf\xe9 au lait\tu\n", "line 1: not UTF-8"),
    ],
)
def test_binary_or_non_utf8_input_is_a_format_error(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "cc.tsv"
    path.write_bytes(payload)
    with pytest.raises(SourceFormatError, match=message):
        list(iter_captions(path, "cc_tsv"))


def test_iteration_is_streaming_rows_arrive_before_the_file_is_read_to_the_end(tmp_path: Path) -> None:
    """A bad line 3 only raises when iteration reaches it: nothing reads the whole file first."""
    path = _write(tmp_path / "cc.tsv", f"{TEN}\tu1\n{TEN} more\tu2\nno tab here\n")
    rows = iter_captions(path, "cc_tsv")
    assert next(rows).image_ref == "u1"
    assert next(rows).image_ref == "u2"
    with pytest.raises(SourceFormatError, match="line 3"):
        next(rows)


def test_gzipped_tsv_is_read(tmp_path: Path) -> None:
    path = tmp_path / "cc.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(f"{TEN}\tu1\n")
    assert [r.image_ref for r in iter_captions(path, "cc_tsv")] == ["u1"]


# ---------------------------------------------------------------- COCO captions JSON


def _coco(path: Path, data: object) -> Path:
    return _write(path, json.dumps(data, indent=1))


def test_coco_json_image_refs_and_malformed_annotations(tmp_path: Path) -> None:
    path = _coco(
        tmp_path / "captions_val.json",
        {
            "images": [
                {"id": 1, "file_name": "a.jpg", "coco_url": "http://c/a.jpg"},
                {"id": 2, "file_name": "b.jpg"},
            ],
            "annotations": [
                {"image_id": 1, "id": 10, "caption": f"{TEN} first\n"},
                {"image_id": 2, "id": 11, "caption": f"{TEN} second"},
                {"image_id": 3, "id": 12, "caption": f"{TEN} unknown image"},  # malformed
                {"image_id": 1, "id": 13},  # malformed: no caption
                {"image_id": 1, "id": 14, "caption": 5},  # malformed: not a string
                {"image_id": 2, "id": 15, "caption": "Short one."},  # too_short
            ],
        },
    )
    rows, stats = _read(path, "coco_json")
    assert rows == [
        CaptionRow(f"{TEN} first", "http://c/a.jpg", "coco"),
        CaptionRow(f"{TEN} second", "b.jpg", "coco"),
    ]
    assert stats.items_in == 6 and stats.kept == 2
    assert stats.rejected == Counter({"malformed": 3, "too_short": 1})


def test_coco_json_without_images_uses_the_image_id(tmp_path: Path) -> None:
    path = _coco(tmp_path / "c.json", {"annotations": [{"image_id": 42, "caption": TEN}]})
    assert [r.image_ref for r in iter_captions(path, "coco_json")] == ["42"]


def test_coco_json_without_annotations_is_a_format_error(tmp_path: Path) -> None:
    path = _coco(tmp_path / "instances.json", {"images": [], "categories": []})
    with pytest.raises(SourceFormatError, match=r"instances\.json: no 'annotations' list \(found \['categories', 'images'\]\)"):
        list(iter_captions(path, "coco_json"))


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.json", '{\n "annotations": [\n  {"caption": "x",}\n ]\n}\n')
    with pytest.raises(SourceFormatError, match=r"c\.json: line 3, column \d+: not JSON"):
        list(iter_captions(path, "coco_json"))


# ---------------------------------------------------------------- text and CSV


def test_text_lines_have_no_image_ref_and_source_from_file_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "my_captions.txt", f"{TEN}\n\n{TEN} b\n")
    rows, stats = _read(path, "text")
    assert rows == [CaptionRow(TEN, "", "my_captions"), CaptionRow(f"{TEN} b", "", "my_captions")]
    assert stats.rejected == Counter({"empty": 1})
    assert [r.source for r in iter_captions(path, "text", source="mine")] == ["mine", "mine"]


def test_csv_named_columns_multiline_cells_and_malformed_records(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "c.csv",
        "\ufeffurl,text,other\n"
        f'u1,"{TEN},\nwith a line break",x\n'  # kept, normalised
        f"u2,{TEN} b\n"  # malformed: 2 fields
        f"u3,{TEN} c,x\n",
    )
    rows, stats = _read(path, "csv", column="text", image_column="url")
    assert rows == [CaptionRow(f"{TEN}, with a line break", "u1", "c"), CaptionRow(f"{TEN} c", "u3", "c")]
    assert stats.rejected == Counter({"malformed": 1})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"column": "caption"}, r"c\.csv: line 1: no column 'caption'"),
    ({"column": "text", "image_column": "image"}, r"line 1: no column 'image'"),
    ({}, r"needs the caption column's name"),
])
def test_csv_without_the_named_column_is_a_format_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = _write(tmp_path / "c.csv", f"url,text\nu1,{TEN}\n")
    with pytest.raises(SourceFormatError, match=message):
        list(iter_captions(path, "csv", **kwargs))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown caption source format 'tsv'"):
        list(iter_captions(tmp_path / "x", "tsv"))  # type: ignore[arg-type]
    with pytest.raises(SourceFormatError, match="no such file"):
        list(iter_captions(tmp_path / "absent.tsv", "cc_tsv"))


def test_caption_key_ignores_case_only() -> None:
    assert caption_key("A Dog runs") == caption_key("a dog RUNS")
    assert caption_key("a dog runs") != caption_key("a dog ran")


# ---------------------------------------------------------------- sampling


def _rows(n: int) -> list[CaptionRow]:
    return [CaptionRow(f"caption {i}", f"u{i}", "s") for i in range(n)]


def test_sample_is_deterministic_in_stream_order_and_a_subset() -> None:
    rows = _rows(1000)
    first = sample_captions(iter(rows), 50, seed=7)
    assert first == sample_captions(iter(rows), 50, seed=7)
    assert first != sample_captions(iter(rows), 50, seed=8)
    assert len(first) == 50 and len(set(first)) == 50
    indices = [rows.index(r) for r in first]
    assert indices == sorted(indices)
    assert sample_captions(iter(rows[:3]), 50, seed=0) == rows[:3]
    assert sample_captions(iter(rows), 0, seed=0) == []


def test_sample_is_uniform_over_the_stream() -> None:
    """Each of 20 rows is chosen in about n/N = 1/4 of 4000 seeded draws (binomial sd ~ 27)."""
    rows = _rows(20)
    counts = Counter(r.image_ref for seed in range(4000) for r in sample_captions(iter(rows), 5, seed=seed))
    assert set(counts) == {r.image_ref for r in rows}
    assert all(abs(c - 1000) < 140 for c in counts.values()), counts


# ---------------------------------------------------------------- the shipped demo inputs


def test_demo_sources_are_valid_inputs_of_their_formats() -> None:
    rows, stats = _read(demo_source("cc_captions.tsv"), "cc_tsv")
    assert len(rows) == stats.items_in >= 50  # every demo CC caption is kept: >= 10 words, distinct
    assert all(r.image_ref.startswith("https://") for r in rows)
    coco_path = demo_source("coco_captions.json")
    data = json.loads(coco_path.read_text())
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert len(data["images"]) >= 25 and set(per_image.values()) <= {2, 3, 4, 5}
    rows, stats = _read(coco_path, "coco_json")
    assert stats.items_in == len(data["annotations"]) and stats.rejected.keys() <= {"too_short"}
    assert len({r.image_ref for r in rows}) >= 25
    with pytest.raises(FileNotFoundError, match="no demo source"):
        demo_source("nope.tsv")
