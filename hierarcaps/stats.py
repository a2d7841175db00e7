"""Counts every stage reports: items in, kept, rejected per reason, seconds, throughput.

A user reads these to see where data is lost and where time goes; the build flow sums the
shards of a stage (:func:`merge_all`) into its summary table, card and manifest.

``extra`` holds further figures of a stage. Most are counts of work (summed when shards are
merged; integers stay integers). The few named in :data:`NOT_SUMMED` describe the stage rather
than count work (the number of seed hierarchies every shard was prompted with, a 0/1 flag), so
merging keeps their largest value instead of multiplying them by the shard count.

Throughput counters (:data:`THROUGHPUT_COUNTERS`, filled by
:func:`hierarcaps.stages._common.count_work`): ``generate_calls``, ``prompt_tokens``,
``generated_tokens`` (of the generating model), ``nli_pairs_scored``, ``nli_cache_hits``,
``nli_forward_calls`` (of the NLI scorer). :meth:`StageStats.throughput` adds the rates
``tokens_per_s`` (generated tokens) and ``pairs_per_s`` (NLI pairs run through the model) over
``seconds``, the time spent in the stage body (summed over shards: per-worker throughput).
Rates are derived from the summed counts, never summed themselves.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

#: ``extra`` figures that describe a stage (equal in every shard, or a 0/1 flag): merged by max.
NOT_SUMMED = frozenset({"seed_hierarchies", "stopped_early"})

#: Work counters every generating or NLI-scoring stage records in ``extra``.
THROUGHPUT_COUNTERS = (
    "generate_calls", "prompt_tokens", "generated_tokens", "nli_pairs_scored", "nli_cache_hits", "nli_forward_calls",
)


@dataclass
class StageStats:
    """Counts for one stage (or one shard of it)."""

    stage: str
    items_in: int = 0
    kept: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def reject(self, reason: str, n: int = 1) -> None:
        """Count ``n`` items rejected for ``reason`` (an enum value is stored by its value)."""
        self.rejected[getattr(reason, "value", reason)] += n

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``seconds``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def merge(self, other: "StageStats") -> "StageStats":
        """Two shards' stats as one: counts summed (ints stay ints), :data:`NOT_SUMMED` figures by max."""
        merged = StageStats(
            stage=self.stage,
            items_in=self.items_in + other.items_in,
            kept=self.kept + other.kept,
            rejected=self.rejected + other.rejected,
            seconds=self.seconds + other.seconds,
            extra=dict(self.extra),
        )
        for key, value in other.extra.items():
            if key not in merged.extra:
                merged.extra[key] = value
            elif key in NOT_SUMMED:
                merged.extra[key] = max(merged.extra[key], value)
            else:
                merged.extra[key] += value
        return merged

    def throughput(self) -> dict[str, float]:
        """``tokens_per_s`` and ``pairs_per_s`` over ``seconds`` (0 when nothing was timed or counted)."""
        def rate(count: str) -> float:
            return round(self.extra.get(count, 0) / self.seconds, 2) if self.seconds > 0 else 0.0

        return {"tokens_per_s": rate("generated_tokens"), "pairs_per_s": rate("nli_pairs_scored")}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to a stage's ``stats.json`` (rates included, derived)."""
        return {
            "stage": self.stage,
            "items_in": self.items_in,
            "kept": self.kept,
            "rejected": dict(sorted(self.rejected.items())),
            "seconds": round(self.seconds, 3),
            "extra": self.extra,
            "throughput": self.throughput(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageStats":
        """Inverse of :meth:`to_dict` (the derived ``throughput`` is recomputed, not read)."""
        return cls(
            stage=data["stage"],
            items_in=int(data["items_in"]),
            kept=int(data["kept"]),
            rejected=Counter(data.get("rejected", {})),
            seconds=float(data.get("seconds", 0.0)),
            extra=dict(data.get("extra", {})),
        )


def merge_all(stage: str, shards: Iterable[StageStats]) -> StageStats:
    """The stats of a sharded stage: its shards' stats merged (:meth:`StageStats.merge`)."""
    merged = StageStats(stage=stage)
    for shard in shards:
        merged = merged.merge(shard)
    return merged


#: Column name -> what it shows, of :func:`throughput_columns` (summary table, card).
THROUGHPUT_COLUMNS = {
    "gen_calls": "generate calls", "prompt_tok": "prompt tokens", "gen_tok": "generated tokens",
    "nli_pairs": "NLI pairs scored", "cache_hits": "NLI cache hits", "tok/s": "generated tokens/s",
    "pairs/s": "NLI pairs/s",
}


def throughput_columns(data: dict[str, Any]) -> dict[str, Any]:
    """A stage's throughput figures from its stats dict (:meth:`StageStats.to_dict`, old files too)."""
    stats = StageStats.from_dict(data)
    counts = [stats.extra.get(key, 0) for key in
              ("generate_calls", "prompt_tokens", "generated_tokens", "nli_pairs_scored", "nli_cache_hits")]
    rates = stats.throughput()
    return dict(zip(THROUGHPUT_COLUMNS, [*counts, rates["tokens_per_s"], rates["pairs_per_s"]]))
