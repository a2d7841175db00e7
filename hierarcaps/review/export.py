"""Agreement statistics of a review and the curated export (``hierarcaps review export``).

Statistics are over the decided items (accepted, fixed or rejected): the fraction of fully valid
items (all four tiers judged valid, none edited; the HierarCaps authors report 75% for their
automatic test items) and, per tier, the fraction judged valid among the items with a verdict on
that tier. Every fraction carries a 95% Wilson score interval (Wilson 1927; it stays inside
[0, 1] and keeps its coverage for small samples and fractions near 0 or 1, where the normal
approximation does not).

The curated split keeps accepted and fixed items (fixed tiers applied; T4 edits also become the
caption, which is T4 by the schema) and drops rejected and undecided ones; each kept row's
provenance gains a ``review`` record (decision, verdicts, original tiers of edited ones). It is
written as a release CSV (curated layout for test items, expanded for train items) and as a
``DatasetDict`` folder with the same split name. For a build, the card (``final/README.md``) is
re-rendered with a "Human review" section and the manifest gains ``review`` and fresh file
hashes, so ``build-hierarcaps publish`` ships both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from datasets import DatasetDict

from hierarcaps.formats import save_dataset_dict, write_release_csv
from hierarcaps.hierarchy import N_TIERS
from hierarcaps.review.store import ItemState, ReviewError, ReviewStore
from hierarcaps.schema import rows_to_dataset
from hierarcaps.stagedir import write_json_atomic

#: The standard normal quantile of a two-sided 95% interval.
Z_95 = 1.959963984540054
STATS_FILE = "review_stats.json"


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial fraction; ``(0.0, 1.0)`` when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _fraction(successes: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(successes, n)
    return {"valid": successes, "n": n, "fraction": successes / n if n else None, "ci95": [low, high]}


def review_statistics(states: Sequence[ItemState], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Counts, fully valid fraction and per-tier valid fractions (95% Wilson intervals) of a review."""
    decided = [s for s in states if s.decision is not None]
    tiers = {}
    for i in range(N_TIERS):
        judged = [s.verdicts[i] for s in decided if s.verdicts[i] is not None]
        tiers[f"T{i + 1}"] = _fraction(sum(v == "valid" for v in judged), len(judged))
    return {
        "split": meta.get("split"),
        "source": meta.get("source"),
        "sample": meta.get("sample"),
        "seed": meta.get("seed"),
        "items": len(states),
        "reviewed": len(decided),
        "decisions": {d: sum(s.decision == d for s in decided) for d in ("accept", "fix", "reject")},
        "fully_valid": _fraction(sum(s.fully_valid for s in decided), len(decided)),
        "tiers": tiers,
        "interval": "95% Wilson score interval",
    }


def curated_rows(store: ReviewStore, states: Sequence[ItemState]) -> list[dict[str, Any]]:
    """Accepted and fixed items with their edits applied, in review order."""
    rows = []
    for row, state in zip(store.rows, states):
        if state.decision not in ("accept", "fix"):
            continue
        positive = [e if e is not None else t for t, e in zip(row["positive"], state.edits)]
        provenance = json.loads(row.get("provenance") or "{}")
        provenance["review"] = {
            "decision": state.decision,
            "verdicts": state.verdicts,
            "original_tiers": {f"T{i + 1}": t for i, (t, e) in enumerate(zip(row["positive"], state.edits)) if e is not None},
        }
        rows.append({**row, "positive": positive, "caption": positive[-1], "provenance": json.dumps(provenance, ensure_ascii=False)})
    return rows


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it says."""

    csv: Path
    dataset: Path
    stats_path: Path
    stats: dict[str, Any]
    kept: int
    card: Path | None


def export_review(store: ReviewStore, output_dir: Path, build_dir: Path | None = None) -> ExportResult:
    """Write the curated split (CSV and dataset folder) and the statistics; record them in a build's card."""
    states = store.states()
    stats = review_statistics(states, store.meta)
    if stats["reviewed"] == 0:
        raise ReviewError(f"{store.path}: no item has been decided yet; review some items before exporting")
    split = store.meta["split"]
    rows = curated_rows(store, states)
    if not rows:
        raise ReviewError(f"{store.path}: every decided item was rejected; the curated split would be empty")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = rows_to_dataset(rows)
    csv_path = write_release_csv(dataset, output_dir / f"{split}.csv")
    folder = save_dataset_dict(DatasetDict({split: dataset}), output_dir / "dataset")
    stats_path = output_dir / STATS_FILE
    write_json_atomic(stats_path, stats)
    card = record_in_build(build_dir, stats) if build_dir is not None else None
    return ExportResult(csv_path, folder, stats_path, stats, len(rows), card)


def record_in_build(build_dir: Path, stats: Mapping[str, Any]) -> Path:
    """Re-render the build's card with the review section; add ``review`` and new hashes to its manifest."""
    from hierarcaps.card import render_card
    from hierarcaps.manifest import MANIFEST, file_hashes, write_manifest
    from hierarcaps.publish import CARD, FINAL_DIR
    from hierarcaps.stagedir import atomic_path

    final = Path(build_dir) / FINAL_DIR
    manifest_path = final / MANIFEST
    if not manifest_path.is_file():
        raise ReviewError(f"{manifest_path} is missing: the build is not finished; finish it, then export again")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    reviews = {**manifest.get("review", {}), stats["split"]: dict(stats)}
    card_text = render_card(
        settings=manifest["settings"], counts=manifest["counts"], models=manifest["models"],
        stages=manifest["stages"], sampling=manifest.get("sampling"), reviews=reviews,
    )
    with atomic_path(final / CARD) as tmp:
        tmp.write_text(card_text, encoding="utf-8")
    manifest["review"] = reviews
    manifest["files"] = file_hashes(final)
    write_manifest(final, manifest)
    return final / CARD
