"""Release CSV reading/writing and the release <-> schema mapping (hierarcaps.formats, hierarcaps.schema)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from datasets import Dataset

from hierarcaps import formats
from hierarcaps.formats import ReleaseFormatError, read_release_csv, write_release_csv
from hierarcaps.schema import (
    FEATURES,
    SchemaError,
    release_to_rows,
    rows_to_dataset,
    rows_to_release,
    to_dataset_dict,
)

RELEASE_DIR = Path(__file__).parents[2] / "shared" / "data" / "hierarcaps"
CURATED = RELEASE_DIR / "hierarcaps_test.csv"
EXPANDED = RELEASE_DIR / "hierarcaps_test_expanded.csv.gz"
needs_release = pytest.mark.skipif(
    not CURATED.is_file() or not EXPANDED.is_file(),
    reason=f"the authors' release files are not at {RELEASE_DIR} (workspace data, not shipped with the repo)",
)


def _bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return handle.read().replace(b"\r\n", b"\n")


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------- the real release files


@pytest.fixture(scope="module")
def release_tables() -> dict[str, Dataset]:
    """The authors' files, read once per module (the expanded one takes about a second)."""
    return {path.name: read_release_csv(path) for path in (CURATED, EXPANDED)}


@needs_release
@pytest.mark.parametrize("name", [CURATED.name, EXPANDED.name])
def test_real_release_read_write_read_gives_identical_rows_and_bytes(
    tmp_path: Path, name: str, release_tables: dict[str, Dataset]
) -> None:
    original = RELEASE_DIR / name
    table = release_tables[name]
    out = write_release_csv(table, tmp_path / name)
    assert read_release_csv(out).to_dict() == table.to_dict()
    # minimal quoting and \n line ends reproduce the authors' files byte for byte
    assert _bytes(out) == _bytes(original)


@needs_release
def test_real_release_through_schema_dataset_dict_gives_back_the_same_text(
    tmp_path: Path, release_tables: dict[str, Dataset]
) -> None:
    curated, expanded = release_tables[CURATED.name], release_tables[EXPANDED.name]
    assert (curated.num_rows, expanded.num_rows) == (1000, 23479)  # SPEC section 5
    splits = to_dataset_dict({"test": curated, "test_expanded": expanded})
    assert splits["test"].features == FEATURES == splits["test_expanded"].features
    assert splits["test"][0]["negative"] == [] and len(splits["test_expanded"][0]["negative"]) == 4
    for split, original in (("test", CURATED), ("test_expanded", EXPANDED)):
        out = write_release_csv(splits[split], tmp_path / original.name)
        assert read_release_csv(out).to_dict() == release_tables[original.name].to_dict()
        assert _bytes(out) == _bytes(original)


@needs_release
def test_real_expanded_release_keeps_t4_whitespace_and_newlines_verbatim(release_tables: dict[str, Dataset]) -> None:
    rows = release_to_rows(release_tables[EXPANDED.name])
    captions = rows["caption"]
    assert any(c.endswith(" ") for c in captions) and any(c.endswith("\n") for c in captions)
    assert captions == [p[3] for p in rows["positive"]]


# ---------------------------------------------------------------- reading


def test_read_keeps_na_and_quoted_text_verbatim(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "t.csv",
        'id,captions,image_url\n'
        'NA,"a => b, c => ""quoted"" c => d with trailing space ",null\n'
        '7,"x => y => z => multi\nline T4",\n',
    )
    table = read_release_csv(path)
    assert table.to_dict() == {
        "id": ["NA", "7"],
        "captions": ['a => b, c => "quoted" c => d with trailing space ', "x => y => z => multi\nline T4"],
        "image_url": ["null", ""],
    }
    out = write_release_csv(table, tmp_path / "back.csv")
    assert out.read_bytes() == path.read_bytes()


def test_read_rejects_unknown_header_naming_file_and_layouts(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.csv", "caption,url\na,b\n")
    with pytest.raises(ReleaseFormatError) as err:
        read_release_csv(path)
    message = str(err.value)
    assert str(path) in message and "line 1" in message
    assert "id,captions,image_url" in message and "positive,negative,image_url" in message


def test_read_rejects_hierarchy_without_four_tiers_naming_physical_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "bad.csv",
        "positive,negative,image_url\n"
        '"a => b => c => two-line\nT4",e => f => g => h,u1\n'  # lines 2-3
        "a => b => c,e => f => g => h,u2\n",  # line 4: three tiers
    )
    with pytest.raises(ReleaseFormatError, match=r"bad\.csv: line 4, column positive: .*found 3"):
        read_release_csv(path)


def test_read_rejects_tiers_joined_without_spaces(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.csv", "id,captions,image_url\n0,a=>b=>c=>d,u\n")
    with pytest.raises(ReleaseFormatError, match="line 2, column captions"):
        read_release_csv(path)


@pytest.mark.parametrize("row", ["0,a => b => c => d", "0,a => b => c => d,u,extra"])
def test_read_rejects_records_with_wrong_field_count(tmp_path: Path, row: str) -> None:
    path = _write(tmp_path / "bad.csv", f"id,captions,image_url\n0,a => b => c => d,u\n{row}\n")
    with pytest.raises(ReleaseFormatError, match=r"line 3: expected 3 fields"):
        read_release_csv(path)


def test_read_errors_on_missing_empty_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ReleaseFormatError, match="no such file"):
        read_release_csv(tmp_path / "absent.csv")
    with pytest.raises(ReleaseFormatError, match="empty file"):
        read_release_csv(_write(tmp_path / "empty.csv", ""))
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"id,captions,image_url\n\xff\xfe\x00garbage\n")
    with pytest.raises(ReleaseFormatError, match=str(binary)):
        read_release_csv(binary)


def test_gzip_round_trip_is_reproducible(tmp_path: Path) -> None:
    table = Dataset.from_dict({"positive": ["a => b => c => d"], "negative": ["e => f => g => h"], "image_url": ["u"]})
    first = write_release_csv(table, tmp_path / "one.csv.gz")
    second = write_release_csv(table, tmp_path / "two.csv.gz")
    assert first.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic: compression follows the suffix
    assert first.read_bytes() == second.read_bytes()  # zero mtime, no file name in the header
    assert read_release_csv(first).to_dict() == table.to_dict()


# ---------------------------------------------------------------- writing is atomic


def test_write_refuses_bad_hierarchy_before_creating_anything(tmp_path: Path) -> None:
    table = Dataset.from_dict({"id": ["0"], "captions": ["only => three => tiers"], "image_url": ["u"]})
    with pytest.raises(SchemaError, match="row 0, column captions"):
        write_release_csv(table, tmp_path / "out.csv")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_existing_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _write(tmp_path / "out.csv", "previous content\n")
    table = Dataset.from_dict({"id": ["0"], "captions": ["a => b => c => d"], "image_url": ["u"]})

    class Crash(RuntimeError):
        pass

    class CrashingWriter:
        def __init__(self, handle, **kwargs) -> None:
            self.handle = handle

        def writerow(self, row) -> None:
            self.handle.write("partial")

        def writerows(self, rows) -> None:
            raise Crash("disk full")

    monkeypatch.setattr(formats.csv, "writer", CrashingWriter)
    with pytest.raises(Crash):
        write_release_csv(table, target)
    assert target.read_text() == "previous content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


# ---------------------------------------------------------------- release <-> schema rows


def test_release_to_rows_curated_mapping() -> None:
    table = Dataset.from_dict({"id": ["41"], "captions": ["dog => puppy => puppy on grass => A puppy on the grass."], "image_url": ["http://x/1.jpg"]})
    rows = release_to_rows(table)
    assert rows.features == FEATURES
    assert rows[0] == {
        "id": "41",
        "positive": ["dog", "puppy", "puppy on grass", "A puppy on the grass."],
        "negative": [],
        "caption": "A puppy on the grass.",
        "image_ref": "http://x/1.jpg",
        "source": "hierarcaps_release",
        "provenance": "{}",
    }


def test_release_to_rows_expanded_ids_are_row_indices_unless_present() -> None:
    cells = {"positive": ["a => b => c => d", "e => f => g => h"], "negative": ["1 => 2 => 3 => 4", "5 => 6 => 7 => 8"], "image_url": ["u", "v"]}
    rows = release_to_rows(Dataset.from_dict(cells), source="coco")
    assert rows["id"] == ["0", "1"]
    assert rows["negative"] == [["1", "2", "3", "4"], ["5", "6", "7", "8"]]
    assert rows["caption"] == ["d", "h"] and rows["source"] == ["coco", "coco"]
    with_ids = release_to_rows(Dataset.from_dict({"id": ["x9", "y3"], **cells}))
    assert with_ids["id"] == ["x9", "y3"]


def test_rows_to_release_picks_layout_and_inverts_release_to_rows() -> None:
    curated = rows_to_dataset([{"id": "5", "positive": ["a", "b", "c", "d"], "image_ref": "u"}])
    assert rows_to_release(curated).to_dict() == {"id": ["5"], "captions": ["a => b => c => d"], "image_url": ["u"]}
    pair = {"positive": ["a", "b", "c", "d"], "negative": ["1", "2", "3", "4"], "image_ref": "u", "source": "hierarcaps_release"}
    indexed = rows_to_dataset([{"id": "0", **pair}, {"id": "1", **pair}])
    assert rows_to_release(indexed).column_names == ["positive", "negative", "image_url"]
    named = rows_to_dataset([{"id": "cc-17", **pair}])
    release = rows_to_release(named)
    assert release.column_names == ["id", "positive", "negative", "image_url"]
    assert release_to_rows(release).to_dict() == named.to_dict()


def test_rows_to_release_refuses_to_lose_or_invent_negatives() -> None:
    mixed = rows_to_dataset([
        {"id": "0", "positive": ["a", "b", "c", "d"], "negative": ["1", "2", "3", "4"]},
        {"id": "1", "positive": ["a", "b", "c", "d"]},
    ])
    with pytest.raises(SchemaError, match="row 0 has negative tiers"):
        rows_to_release(mixed, layout="curated")
    with pytest.raises(SchemaError, match="row 1 has no negative tiers"):
        rows_to_release(mixed)
    with_delimiter = rows_to_dataset([{"id": "0", "positive": ["a => z", "b", "c", "d"]}])
    with pytest.raises(SchemaError, match="row 0, positive"):
        rows_to_release(with_delimiter)


# ---------------------------------------------------------------- rows_to_dataset


def test_rows_to_dataset_fills_defaults_and_serialises_provenance() -> None:
    ds = rows_to_dataset([{"id": 3, "positive": ("a", "b", "c", "d"), "provenance": {"nli": [0.9, 0.1], "attempt": 2}}])
    assert ds.features == FEATURES
    row = ds[0]
    assert row["id"] == "3" and row["caption"] == "d" and row["negative"] == []
    assert (row["image_ref"], row["source"]) == ("", "")
    assert json.loads(row["provenance"]) == {"attempt": 2, "nli": [0.9, 0.1]}


def test_rows_to_dataset_of_nothing_has_the_full_schema() -> None:
    ds = rows_to_dataset([])
    assert ds.num_rows == 0 and ds.features == FEATURES


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "0", "positive": ["a", "b", "c"]}, r"row 0, positive: expected 4 tier"),
        ({"id": "0", "positive": "a => b => c => d"}, r"row 0, positive: expected a list"),
        ({"id": "0", "positive": ["a", "b", "c", "d"], "negative": ["x"]}, r"negative: expected 0 or 4"),
        ({"positive": ["a", "b", "c", "d"]}, r"missing required fields \['id'\]"),
        ({"id": "0", "positive": ["a", "b", "c", "d"], "negatives": []}, r"unknown fields \['negatives'\]"),
        ({"id": "0", "positive": ["a", "b", "c", "d"], "provenance": "not json"}, r"provenance is not valid JSON"),
        ({"id": "0", "positive": ["a", "b", "c", "d"], "provenance": "[1]"}, r"must be a JSON object"),
        ({"id": "0", "positive": ["a", "b", "c", "d"], "caption": None}, r"caption must be a string"),
    ],
)
def test_rows_to_dataset_rejects_bad_rows_by_name(row: dict, message: str) -> None:
    good = {"id": "ok", "positive": ["a", "b", "c", "d"]}
    with pytest.raises(SchemaError, match=message.replace("row 0", "row 1")):
        rows_to_dataset([good, row])


def test_to_dataset_dict_accepts_release_tables_schema_tables_and_row_lists() -> None:
    release = Dataset.from_dict({"id": ["0"], "captions": ["a => b => c => d"], "image_url": ["u"]})
    schema = rows_to_dataset([{"id": "s", "positive": ["e", "f", "g", "h"], "source": "coco"}])
    splits = to_dataset_dict({"test": release, "train": schema, "extra": [{"id": "r", "positive": ["i", "j", "k", "l"]}]})
    assert {name: ds.features == FEATURES for name, ds in splits.items()} == {"test": True, "train": True, "extra": True}
    assert splits["test"][0]["positive"] == ["a", "b", "c", "d"]
    assert splits["train"][0]["source"] == "coco"
    assert splits["extra"][0]["id"] == "r"
