"""What a build has finished: the summary table and the list of kept stages and shards.

``build-hierarcaps`` prints the table (items in, kept, rejected per reason, seconds, throughput, per stage)
at the end of every run, successful or not, and the list of finished stages and shards when it
is interrupted. Both are read from the stage folders' ``_SUCCESS`` records, so they need no
orchestrator and describe exactly what a rerun will skip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from hierarcaps.pipeline import Pipeline


def summary_rows(
    pipe: "Pipeline", status: Mapping[str, str] | None = None, seconds: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """One row per finished stage (and per caption split): status, counts, rejections, seconds, throughput.

    ``status`` and ``seconds`` hold the stages run by this command; the others are "done before".
    Throughput (:func:`hierarcaps.stats.throughput_columns`): generate calls, prompt and generated
    tokens, NLI pairs scored and cache hits, generated tokens/s and NLI pairs/s over the time spent
    in the stage body (summed over shards).
    """
    from hierarcaps.pipeline import ORDER
    from hierarcaps.stats import throughput_columns

    status, seconds = status or {}, seconds or {}
    rows = []
    for name in ORDER:
        if not pipe.is_done(name):
            continue
        for stats in pipe.dirs[name].record()["stats"]:
            rejected = stats.get("rejected", {})
            rows.append({
                "stage": stats.get("stage", name),
                "status": status.get(name, "done before"),
                "in": stats.get("items_in", 0),
                "kept": stats.get("kept", 0),
                "rejected": sum(rejected.values()),
                "reasons": ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "-",
                "seconds": round(seconds.get(name, stats.get("seconds", 0.0)), 1),
                **throughput_columns(stats),
            })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of summary rows."""
    if not rows:
        return "(no stage finished)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys), "  ".join("-" * widths[k] for k in keys)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def kept_work(pipe: "Pipeline") -> str:
    """The finished stages and, for an unfinished sharded stage, its finished shards (kept on disk)."""
    done, partial = [], []
    for stage in pipe.plan():
        if stage.done:
            done.append(stage.name)
        elif stage.shards_done:
            partial.append(f"{stage.name}: {stage.shards_done} of {_shard_count(pipe, stage.name)} shards")
    lines = [f"finished and kept: {', '.join(done) if done else 'no stage'}"]
    lines += [f"unfinished stage, finished shards kept: {text}" for text in partial]
    return "\n".join(lines)


def _shard_count(pipe: "Pipeline", name: str) -> str:
    try:
        return str(pipe.shard_count(name))
    except Exception:  # noqa: BLE001 - only for a message; the count needs the upstream's rows
        return "?"
