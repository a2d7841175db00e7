"""Counts every stage reports: items in, kept, rejected per reason, seconds.

A user reads these to see where data is lost; the build flow sums them into its summary table.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator
from contextlib import contextmanager


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
        """Sum two shards' counts (extra figures are summed too)."""
        merged = StageStats(
            stage=self.stage,
            items_in=self.items_in + other.items_in,
            kept=self.kept + other.kept,
            rejected=self.rejected + other.rejected,
            seconds=self.seconds + other.seconds,
            extra=dict(self.extra),
        )
        for key, value in other.extra.items():
            merged.extra[key] = merged.extra.get(key, 0.0) + value
        return merged

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to a stage's ``stats.json``."""
        return {
            "stage": self.stage,
            "items_in": self.items_in,
            "kept": self.kept,
            "rejected": dict(sorted(self.rejected.items())),
            "seconds": round(self.seconds, 3),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageStats":
        """Inverse of :meth:`to_dict`."""
        return cls(
            stage=data["stage"],
            items_in=int(data["items_in"]),
            kept=int(data["kept"]),
            rejected=Counter(data.get("rejected", {})),
            seconds=float(data.get("seconds", 0.0)),
            extra=dict(data.get("extra", {})),
        )
