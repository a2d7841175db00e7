"""Small helpers shared by the build stages (rows in, seeds per call, provenance)."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Sequence, TypeVar

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
    import numpy as np  # here, not at the top: the stage settings are read without numpy

    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] & 0x7FFFFFFF)


def model_id(component: Any) -> str:
    """The id a generator or scorer reports (``model_id``), else its class name."""
    return str(getattr(component, "model_id", None) or type(component).__name__)


#: stats key -> counter attribute, of the generating model and of the NLI scorer.
_GENERATOR_COUNTERS = {"generate_calls": "generate_calls", "prompt_tokens": "prompt_tokens",
                       "generated_tokens": "generated_tokens"}
_SCORER_COUNTERS = {"nli_pairs_scored": "pairs_scored", "nli_cache_hits": "cache_hits",
                    "nli_forward_calls": "forward_calls"}


def work_counters(generator: Any = None, scorer: Any = None) -> dict[str, int]:
    """The throughput counters (:data:`hierarcaps.stats.THROUGHPUT_COUNTERS`) of a generator and
    an NLI scorer so far; a component that is ``None`` is left out, a counter it lacks reads 0."""
    values: dict[str, int] = {}
    for component, counters in ((generator, _GENERATOR_COUNTERS), (scorer, _SCORER_COUNTERS)):
        if component is not None:
            values.update({key: int(getattr(component, attr, 0)) for key, attr in counters.items()})
    return values


def record_work(stats: Any, before: dict[str, int], generator: Any = None, scorer: Any = None) -> None:
    """Add what the components did since ``before`` (:func:`work_counters`) to ``stats.extra``."""
    for key, value in work_counters(generator, scorer).items():
        stats.extra[key] = stats.extra.get(key, 0) + value - before[key]


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
