"""Small helpers shared by the build stages (rows in, seeds per call, provenance)."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def as_rows(rows: Any) -> list[dict[str, Any]]:
    """Rows as a list of dicts, from a list of dicts or a ``datasets.Dataset``."""
    return [dict(r) for r in rows]


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def call_seed(*keys: int) -> int:
    """A 31-bit seed derived from integer keys (stage seed, attempt, step, batch ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] & 0x7FFFFFFF)


def model_id(component: Any) -> str:
    """The id a generator or scorer reports (``model_id``), else its class name."""
    return str(getattr(component, "model_id", None) or type(component).__name__)


def nli_pairs_counter(scorer: Any) -> int:
    """Pairs the scorer has run through its model so far (0 if it does not count)."""
    return int(getattr(scorer, "pairs_scored", 0))


def dump(obj: Any) -> str:
    """Compact JSON for a row's ``provenance`` string."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=float)


def rounded(values: Iterable[float]) -> list[float]:
    """Probabilities rounded for provenance (6 digits)."""
    return [round(float(v), 6) for v in values]


def load_provenance(row: dict[str, Any]) -> dict[str, Any]:
    """A row's provenance as a dict (empty when absent); stages add their own key to it."""
    text = row.get("provenance") or "{}"
    try:
        value = json.loads(text) if isinstance(text, str) else dict(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"row provenance is not JSON ({error}): {text[:80]!r}") from error
    return value if isinstance(value, dict) else {"upstream": value}
