"""The row schema of every hierarcaps dataset split, and its mapping to the authors' release CSVs.

One :data:`FEATURES` serves all splits (``train``, ``test``, ``test_expanded``), so a model
trained on our output reads any split the same way:

========== ======================= ==================================================
column     type                    meaning
========== ======================= ==================================================
id         string                  item id (the release's ``id``, else the row index)
positive   Sequence(string, 4)     positive tiers T1..T4, general -> specific
negative   Sequence(string)        negative tiers N1..N4 (train), ``[]`` (test)
caption    string                  the source caption (= T4)
image_ref  string                  image URL or id
source     string                  ``conceptual_captions``, ``coco``, ``hierarcaps_release``
provenance string                  a JSON object: models, attempt indices, NLI scores
========== ======================= ==================================================

The authors' release (SPEC section 1) has two CSV layouts, both with tiers joined by
``" => "``: the curated test set ``id, captions, image_url`` (:data:`CURATED_COLUMNS`) and the
expanded / train sets ``positive, negative, image_url`` (:data:`EXPANDED_COLUMNS`, optionally
preceded by ``id``). :func:`release_to_rows` and :func:`rows_to_release` convert between a
release table and schema rows without changing a character of any tier: tiers are split on the
exact delimiter and kept verbatim (the expanded release has T4 captions with trailing spaces
and newlines, which must survive a round trip).
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from hierarcaps.hierarchy import N_TIERS, RELEASE_DELIMITER

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, Features

COLUMNS: tuple[str, ...] = ("id", "positive", "negative", "caption", "image_ref", "source", "provenance")


@functools.cache
def schema_features() -> Features:
    """:data:`FEATURES`, built on first use: importing ``datasets`` takes seconds, and reading a
    release CSV (``hierarcaps-eval retrieval``) needs none of it."""
    from datasets import Features, Sequence, Value

    types = {"positive": Sequence(Value("string"), length=N_TIERS), "negative": Sequence(Value("string"))}
    return Features({name: types.get(name, Value("string")) for name in COLUMNS})


def __getattr__(name: str) -> Any:
    """``FEATURES``: the ``datasets.Features`` of every split (see :func:`schema_features`)."""
    if name == "FEATURES":
        return schema_features()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SOURCE_RELEASE = "hierarcaps_release"
SOURCE_CONCEPTUAL_CAPTIONS = "conceptual_captions"
SOURCE_COCO = "coco"

CURATED_COLUMNS: tuple[str, ...] = ("id", "captions", "image_url")
EXPANDED_COLUMNS: tuple[str, ...] = ("positive", "negative", "image_url")
EXPANDED_ID_COLUMNS: tuple[str, ...] = ("id", *EXPANDED_COLUMNS)
RELEASE_LAYOUTS: dict[str, tuple[str, ...]] = {
    "curated": CURATED_COLUMNS,
    "expanded": EXPANDED_COLUMNS,
    "expanded_id": EXPANDED_ID_COLUMNS,
}
ReleaseLayout = Literal["curated", "expanded", "expanded_id"]

_REQUIRED = ("id", "positive")
_DEFAULTS: dict[str, Any] = {"negative": [], "image_ref": "", "source": "", "provenance": "{}"}


class SchemaError(ValueError):
    """A row or table does not fit the hierarcaps schema or a release layout."""


def split_release_tiers(cell: str, where: str) -> list[str]:
    """Split one release cell on ``" => "`` into exactly four verbatim tiers.

    ``where`` names the cell for the error message (file and line, or row and column).
    """
    if not isinstance(cell, str):
        raise SchemaError(f"{where}: expected a hierarchy text, got {cell!r}")
    tiers = cell.split(RELEASE_DELIMITER)
    if len(tiers) != N_TIERS:
        raise SchemaError(
            f"{where}: a hierarchy needs {N_TIERS} tiers joined by {RELEASE_DELIMITER!r}, "
            f"found {len(tiers)} in {cell!r}"
        )
    return tiers


def join_release_tiers(tiers: Sequence[str], where: str) -> str:
    """Inverse of :func:`split_release_tiers`; refuses tiers that would not split back."""
    if len(tiers) != N_TIERS or any(RELEASE_DELIMITER in t for t in tiers):
        raise SchemaError(
            f"{where}: cannot write {list(tiers)!r} as a release hierarchy: it needs {N_TIERS} tiers, "
            f"none containing {RELEASE_DELIMITER!r}"
        )
    return RELEASE_DELIMITER.join(tiers)


def release_layout(columns: Sequence[str], where: str = "release table") -> ReleaseLayout:
    """Name the release layout of a header, or raise naming the layouts we know."""
    for name, expected in RELEASE_LAYOUTS.items():
        if tuple(columns) == expected:
            return name  # type: ignore[return-value]
    known = "; ".join(f"{name}: {','.join(cols)}" for name, cols in RELEASE_LAYOUTS.items())
    raise SchemaError(f"{where}: columns {','.join(columns)} match no release layout (expected one of {known})")


def _provenance_text(value: Any, where: str) -> str:
    """Provenance as a JSON object text; a dict is serialised with sorted keys."""
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if not isinstance(value, str):
        raise SchemaError(f"{where}: provenance must be a JSON object text or a dict, got {type(value).__name__}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise SchemaError(f"{where}: provenance is not valid JSON ({err}): {value[:80]!r}") from None
    if not isinstance(parsed, dict):
        raise SchemaError(f"{where}: provenance must be a JSON object, got {value[:80]!r}")
    return value


def _tiers(value: Any, allowed: tuple[int, ...], where: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise SchemaError(f"{where}: expected a list of tier strings, got {value!r}")
    tiers = list(value)
    if len(tiers) not in allowed or not all(isinstance(t, str) for t in tiers):
        raise SchemaError(f"{where}: expected {' or '.join(map(str, allowed))} tier strings, got {tiers!r}")
    return tiers


def normalize_row(row: Mapping[str, Any], index: int = 0) -> dict[str, Any]:
    """Check one row against the schema and fill the optional fields.

    Required: ``id`` and ``positive`` (four tiers). Defaults: ``negative`` ``[]``, ``caption``
    T4, ``image_ref`` and ``source`` ``""``, ``provenance`` ``"{}"`` (a dict is serialised).
    Unknown keys are an error, so a misspelt field never vanishes silently.
    """
    where = f"row {index}"
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise SchemaError(f"{where}: unknown fields {sorted(unknown)}; the schema has {list(COLUMNS)}")
    missing = [k for k in _REQUIRED if k not in row]
    if missing:
        raise SchemaError(f"{where}: missing required fields {missing}")
    out = {**_DEFAULTS, **row}
    out["id"] = str(out["id"])
    out["positive"] = _tiers(out["positive"], (N_TIERS,), f"{where}, positive")
    out["negative"] = _tiers(out["negative"], (0, N_TIERS), f"{where}, negative")
    out.setdefault("caption", out["positive"][-1])
    for key in ("caption", "image_ref", "source"):
        if not isinstance(out[key], str):
            raise SchemaError(f"{where}: {key} must be a string, got {out[key]!r}")
    out["provenance"] = _provenance_text(out["provenance"], where)
    return {key: out[key] for key in COLUMNS}


def rows_to_dataset(rows: Sequence[Mapping[str, Any]]) -> Dataset:
    """Build a schema :class:`~datasets.Dataset` (``FEATURES``) from row dicts.

    Each row is checked and completed by :func:`normalize_row`; an empty list gives an empty
    dataset with the full schema.
    """
    columns: dict[str, list[Any]] = {key: [] for key in COLUMNS}
    for index, row in enumerate(rows):
        for key, value in normalize_row(row, index).items():
            columns[key].append(value)
    from datasets import Dataset

    return Dataset.from_dict(columns, features=schema_features())


def release_to_rows(release: Dataset, source: str = SOURCE_RELEASE) -> Dataset:
    """Map a release table (any layout, as read by ``formats.read_release_csv``) to schema rows.

    Curated: ``positive`` from ``captions``, ``negative`` ``[]``, ``id`` from ``id``.
    Expanded / train: ``id`` is the row index as a string unless the table has an ``id``
    column. Everywhere ``caption`` = T4, ``image_ref`` = ``image_url``, ``provenance`` ``"{}"``.
    """
    layout = release_layout(release.column_names)
    table = release.to_dict()
    n = release.num_rows
    positive_column = "captions" if layout == "curated" else "positive"
    positive = [
        split_release_tiers(cell, f"row {i}, column {positive_column}")
        for i, cell in enumerate(table[positive_column])
    ]
    if layout == "curated":
        negative: list[list[str]] = [[] for _ in range(n)]
    else:
        negative = [split_release_tiers(cell, f"row {i}, column negative") for i, cell in enumerate(table["negative"])]
    ids = [str(i) for i in table["id"]] if "id" in table else [str(i) for i in range(n)]
    columns = {
        "id": ids,
        "positive": positive,
        "negative": negative,
        "caption": [tiers[-1] for tiers in positive],
        "image_ref": list(table["image_url"]),
        "source": [source] * n,
        "provenance": ["{}"] * n,
    }
    from datasets import Dataset

    return Dataset.from_dict(columns, features=schema_features())


def rows_to_release(rows: Dataset, layout: ReleaseLayout | None = None) -> Dataset:
    """Inverse of :func:`release_to_rows`: schema rows to a release table of string columns.

    ``layout=None`` picks ``curated`` when no row has negatives, else ``expanded`` when the ids
    are the row indices ``0..n-1`` (they carry no information) and ``expanded_id`` otherwise.
    Curated output refuses rows with negatives (they would be lost).
    """
    missing = [c for c in COLUMNS if c not in rows.column_names]
    if missing:
        raise SchemaError(f"not a hierarcaps schema table: columns {missing} are missing")
    table = rows.to_dict()
    has_negatives = [bool(neg) for neg in table["negative"]]
    if layout is None:
        if not any(has_negatives):
            layout = "curated"
        elif table["id"] == [str(i) for i in range(rows.num_rows)]:
            layout = "expanded"
        else:
            layout = "expanded_id"
    positive = [join_release_tiers(t, f"row {i}, positive") for i, t in enumerate(table["positive"])]
    if layout == "curated":
        if any(has_negatives):
            first = has_negatives.index(True)
            raise SchemaError(f"row {first} has negative tiers, which the curated layout cannot hold; use 'expanded'")
        out = {"id": table["id"], "captions": positive, "image_url": table["image_ref"]}
    elif layout in ("expanded", "expanded_id"):
        if not all(has_negatives):
            first = has_negatives.index(False)
            raise SchemaError(f"row {first} has no negative tiers, which the {layout} layout needs; use 'curated'")
        negative = [join_release_tiers(t, f"row {i}, negative") for i, t in enumerate(table["negative"])]
        out = {"positive": positive, "negative": negative, "image_url": table["image_ref"]}
        if layout == "expanded_id":
            out = {"id": table["id"], **out}
    else:
        raise SchemaError(f"unknown release layout {layout!r}; expected one of {list(RELEASE_LAYOUTS)}")
    from datasets import Dataset, Features, Value

    return Dataset.from_dict(out, features=Features({c: Value("string") for c in out}))


def to_dataset_dict(splits: Mapping[str, Dataset | Sequence[Mapping[str, Any]]], source: str = SOURCE_RELEASE) -> DatasetDict:
    """A schema :class:`~datasets.DatasetDict` from per-split tables.

    Each split may be a release table (mapped by :func:`release_to_rows` with ``source``), a
    schema ``Dataset``, or a list of row dicts (checked by :func:`rows_to_dataset`).
    """
    from datasets import Dataset, DatasetDict

    out = {}
    for name, split in splits.items():
        if not isinstance(split, Dataset):
            out[name] = rows_to_dataset(split)
        elif set(COLUMNS) <= set(split.column_names):
            out[name] = split.select_columns(list(COLUMNS)).cast(schema_features())
        else:
            out[name] = release_to_rows(split, source=source)
    return DatasetDict(out)
