"""Assembly of the final ``DatasetDict``, its validation and its exports.

The last build stage turns the rows of the positive-completion (test) and negative (train)
stages into schema rows (:data:`hierarcaps.schema.FEATURES`), checks them
(:func:`validate_dataset`), and writes:

* ``dataset/``: the ``DatasetDict`` (``save_to_disk``; ``datasets.load_from_disk`` reads it),
* ``data/<split>-00000-of-00001.parquet``: the Hub's Parquet layout (what ``push_to_hub`` uploads),
* ``release/<split>.csv``: the authors' release CSV layouts (train: ``positive,negative,image_url``;
  test: ``id,captions,image_url``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from datasets import DatasetDict

from hierarcaps.formats import write_release_csv
from hierarcaps.hierarchy import N_TIERS
from hierarcaps.schema import COLUMNS, rows_to_dataset

#: Problems listed in full in a validation report before the rest are only counted.
MAX_LISTED_PROBLEMS = 20


def to_schema_rows(rows: Sequence[Mapping[str, Any]], split: str) -> list[dict[str, Any]]:
    """Keep the schema's fields of stage rows; give rows without an id ``<split>-<index:06d>``.

    Train rows keep their ``negative`` tiers; test rows get ``[]``.
    """
    out = []
    for index, row in enumerate(rows):
        item = {key: row[key] for key in COLUMNS if key in row}
        item.setdefault("id", f"{split}-{index:06d}")
        if split != "train":
            item["negative"] = []
        out.append(item)
    return out


def assemble_dataset(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> DatasetDict:
    """A schema ``DatasetDict`` from stage rows per split (``{"train": [...], "test": [...]}``)."""
    return DatasetDict({name: rows_to_dataset(to_schema_rows(rows, name)) for name, rows in splits.items()})


@dataclass
class ValidationReport:
    """The result of :func:`validate_dataset`: ``ok`` when no problem was found."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    more: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(problem)
        else:
            self.more += 1

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "more_problems": self.more, "counts": self.counts}

    def message(self) -> str:
        lines = [f"  - {p}" for p in self.problems]
        if self.more:
            lines.append(f"  ... and {self.more} more")
        return "\n".join(lines)


def validate_dataset(dataset: DatasetDict, required_splits: Sequence[str] = ("train", "test")) -> ValidationReport:
    """Check the assembled dataset; every problem names the split and row.

    Checks: the required splits exist and are non-empty; ids are unique within a split; every
    positive tier is non-empty and adjacent tiers differ; ``caption`` equals T4; train rows have
    four non-empty negative tiers, none equal to the positive tier it negates; test rows have
    no negatives. (Field types and the JSON provenance are checked when the rows are built.)
    """
    report = ValidationReport(counts={name: split.num_rows for name, split in dataset.items()})
    for name in required_splits:
        if name not in dataset:
            report.add(f"split {name!r} is missing")
        elif dataset[name].num_rows == 0:
            report.add(f"split {name!r} is empty: no caption survived the build (see the summary's rejections)")
    for name, split in dataset.items():
        seen: set[str] = set()
        for index, row in enumerate(split):
            where = f"{name} row {index} (id {row['id']!r})"
            if row["id"] in seen:
                report.add(f"{where}: duplicate id")
            seen.add(row["id"])
            _check_row(row, name, where, report)
    return report


def _check_row(row: Mapping[str, Any], split: str, where: str, report: ValidationReport) -> None:
    positive, negative = row["positive"], row["negative"]
    if any(not t.strip() for t in positive):
        report.add(f"{where}: empty positive tier")
    if any(a == b for a, b in zip(positive, positive[1:])):
        report.add(f"{where}: identical adjacent positive tiers")
    if row["caption"] != positive[-1]:
        report.add(f"{where}: caption differs from T4")
    if split == "train":
        if len(negative) != N_TIERS or any(not t.strip() for t in negative):
            report.add(f"{where}: train items need {N_TIERS} non-empty negative tiers, got {negative!r}")
        elif any(n == p for n, p in zip(negative, positive)):
            report.add(f"{where}: a negative tier equals the positive tier it should contradict")
    elif negative:
        report.add(f"{where}: {split} items carry no negatives")


def parquet_name(split: str) -> str:
    """The Hub's file name for a one-shard split."""
    return f"{split}-00000-of-00001.parquet"


def export_dataset(dataset: DatasetDict, out_dir: Path, *, parquet: bool = True, release_csv: bool = True) -> list[Path]:
    """Write ``dataset/`` (always), ``data/*.parquet`` and ``release/*.csv`` (when asked) under ``out_dir``.

    ``out_dir`` is expected to be a temporary build directory (the caller renames it into place).
    """
    out_dir = Path(out_dir)
    written = [out_dir / "dataset"]
    dataset.save_to_disk(str(out_dir / "dataset"))
    for name, split in dataset.items():
        if parquet:
            path = out_dir / "data" / parquet_name(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            split.to_parquet(str(path))
            written.append(path)
        if release_csv:
            layout = "expanded" if name == "train" else "curated"
            written.append(write_release_csv(split, out_dir / "release" / f"{name}.csv", layout=layout))
    return written
