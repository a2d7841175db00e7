"""Project each stage's wall time for the configured counts (``build-hierarcaps --dry-run --estimate``).

Every stage's stats record the time spent in its body and the work done (:mod:`hierarcaps.stats`).
A projection scales a stage's recorded *seconds per unit* to the configured number of units:

==============  ==========================  ===========================================
stage           unit                        configured units
==============  ==========================  ===========================================
captions        captions sampled            seed + train + test captions (time not scaled)
seeds           seed captions               ``captions.seed_captions``
augment         lines kept                  ``augment.target_count``
completer       optimizer steps             ceil(target_count / batch_size) x epochs
complete_train  train captions              ``captions.train_captions``
complete_test   test captions               ``captions.test_captions``
negatives       positive hierarchies        train captions x complete_train's keep rate
final           items assembled             negatives' and complete_test's kept items (not scaled)
==============  ==========================  ===========================================

Reading the caption files and assembling the dataset take mostly fixed time (the whole source
file is read; assembly writes a few files), so ``captions`` and ``final`` keep their recorded
seconds. A sharded stage runs ``sharding.concurrency`` shards at once, so its projected wall time is
divided by ``min(concurrency, shards)``. Model loading is not in the recorded seconds.

Where the figures come from, in this order (the report names the one used):

1. ``--estimate-from FOLDER``: a previous build's output folder (its finished stages and
   shards) or a ``manifest.json``;
2. ``--calibrate N``: a short calibration build with the configured models and settings on N
   captions (N augmented lines) into a temporary folder; needs the models to load here;
3. this build's own finished stages and shards (same settings, so the best figures);
4. :data:`BUILT_IN_FIGURES`, recorded from a smoke-profile build (tiny random models on a
   2-core CPU): they show how the work scales with the counts, not how long real models take.

Stages without figures in the chosen source are projected from the built-in ones, and said so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hierarcaps.stats import StageStats, merge_all

#: Figures of one smoke-profile build (``Pipeline(resolve_settings("smoke"), out).run()``, 2026-12-01,
#: a busy shared 2-core CPU, tiny primed models, NLI decided by the length rule), as
#: :func:`figures_from_folder` reads them. They show how work scales with the counts, not real time.
BUILT_IN_FIGURES: dict[str, dict[str, float]] = {
    "captions": {"seconds_per_unit": 3.75e-05, "seconds": 0.003, "keep_rate": 0.9097},
    "seeds": {"seconds_per_unit": 0.7517, "seconds": 18.04, "generated_tokens_per_unit": 88.42,
              "nli_pairs_per_unit": 7.5, "keep_rate": 0.08333},
    "augment": {"seconds_per_unit": 6.698, "seconds": 167.4, "generated_tokens_per_unit": 776.6,
                "keep_rate": 0.07812},
    "completer": {"seconds_per_unit": 0.5592, "seconds": 6.71},
    "complete_train": {"seconds_per_unit": 0.7389, "seconds": 26.6, "generated_tokens_per_unit": 755.6,
                       "nli_pairs_per_unit": 13.33, "keep_rate": 0.1111},
    "complete_test": {"seconds_per_unit": 0.6069, "seconds": 12.14, "generated_tokens_per_unit": 755.9,
                      "nli_pairs_per_unit": 11.5, "keep_rate": 0.2},
    "negatives": {"seconds_per_unit": 1.234, "seconds": 4.935, "generated_tokens_per_unit": 104.0,
                  "nli_pairs_per_unit": 13.0, "keep_rate": 1.0},
    "final": {"seconds_per_unit": 0.1416, "seconds": 1.133},
}
BUILT_IN_SOURCE = "built-in figures recorded from a smoke-profile build (tiny models, shared 2-core CPU)"


@dataclass(frozen=True)
class Figures:
    """One stage's recorded rates: seconds, generated tokens and NLI pairs per unit, and keep rate."""

    seconds_per_unit: float
    seconds: float = 0.0
    generated_tokens_per_unit: float = 0.0
    nli_pairs_per_unit: float = 0.0
    keep_rate: float = 1.0
    source: str = ""


@dataclass(frozen=True)
class Projection:
    """One stage of the estimate."""

    stage: str
    unit: str
    units: int
    wall_seconds: float | None
    generated_tokens: int | None
    nli_pairs: int | None
    source: str


# ---------------------------------------------------------------------------- units


def _recorded_units(stage: str, stats: StageStats) -> float:
    """How many units of ``stage`` the recorded stats did."""
    if stage == "augment":
        return stats.kept
    if stage == "completer":
        return stats.extra.get("steps", 0)
    if stage == "captions":
        return sum(v for k, v in stats.extra.items() if k.startswith("sampled_"))
    return stats.items_in


def configured_units(settings: Any, keep_rates: dict[str, float]) -> dict[str, tuple[str, int]]:
    """Per stage, (unit, count) the configured build will process; keep rates scale later stages."""
    c = settings.captions
    target = settings.augment.target_count
    train_kept = c.train_captions * keep_rates.get("complete_train", 1.0)
    test_kept = c.test_captions * keep_rates.get("complete_test", 1.0)
    negatives_kept = train_kept * keep_rates.get("negatives", 1.0)
    steps = math.ceil(target / settings.completer.batch_size) * settings.completer.epochs
    return {
        "captions": ("captions sampled", c.seed_captions + c.train_captions + c.test_captions),
        "seeds": ("seed captions", c.seed_captions),
        "augment": ("lines kept", target),
        "completer": ("optimizer steps", steps),
        "complete_train": ("train captions", c.train_captions),
        "complete_test": ("test captions", c.test_captions),
        "negatives": ("positive hierarchies", round(train_kept)),
        "final": ("items assembled", round(negatives_kept + test_kept)),
    }


def figures_of(stage: str, stats: StageStats, source: str) -> Figures | None:
    """A stage's per-unit figures from its (merged) stats; ``None`` when it did no unit of work."""
    units = _recorded_units(stage, stats)
    if units <= 0 or stats.seconds <= 0:
        return None
    return Figures(
        seconds_per_unit=stats.seconds / units,
        seconds=stats.seconds,
        generated_tokens_per_unit=stats.extra.get("generated_tokens", 0) / units,
        nli_pairs_per_unit=stats.extra.get("nli_pairs_scored", 0) / units,
        keep_rate=stats.kept / stats.items_in if stats.items_in else 1.0,
        source=source,
    )


# ---------------------------------------------------------------------------- figure sources

_STAGE_DIR = re.compile(r"^(?P<stage>.+)-v\d+-[0-9a-f]{12}$")


def _stage_of(name: str) -> str:
    """``captions_train`` -> ``captions`` (the caption stage reports one stats entry per split)."""
    return "captions" if name.startswith("captions_") else name


def _figures_from_stats(stats_by_stage: dict[str, list[StageStats]], source: str) -> dict[str, Figures]:
    out = {}
    for stage, entries in stats_by_stage.items():
        found = figures_of(stage, merge_all(stage, entries), source)
        if found is not None:
            out[stage] = found
    return out


def figures_from_folder(path: Path) -> dict[str, Figures]:
    """Figures of a previous build: a ``manifest.json`` file, or a build folder's finished stages
    and shards (``stages/``, the newest folder per stage, and ``final/``)."""
    path = Path(path)
    stats: dict[str, list[StageStats]] = {}
    if path.is_file():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["stages"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--estimate-from {path}: not a build manifest.json ({err})") from err
        for entry in entries:
            stats.setdefault(_stage_of(entry["stage"]), []).append(StageStats.from_dict(entry))
        return _figures_from_stats(stats, f"figures recorded in {path}")
    if not (path / "stages").is_dir():
        raise FileNotFoundError(f"--estimate-from {path}: neither a manifest.json nor a build folder with stages/")
    newest: dict[str, Path] = {}
    for folder in (path / "stages").iterdir():
        match = _STAGE_DIR.match(folder.name)
        if match and folder.is_dir():
            stage = match["stage"]
            if stage not in newest or folder.stat().st_mtime > newest[stage].stat().st_mtime:
                newest[stage] = folder
    for stage, folder in {**newest, "final": path / "final"}.items():
        stats[stage] = _recorded_stats(folder)
    return _figures_from_stats(stats, f"figures recorded in {path}")


def _recorded_stats(folder: Path) -> list[StageStats]:
    """Stats of a finished stage folder, or of the finished shards of an unfinished one."""
    success = folder / "_SUCCESS"
    if success.is_file():
        return [StageStats.from_dict(s) for s in json.loads(success.read_text(encoding="utf-8")).get("stats", [])]
    shards = sorted((folder / "shards").glob("*/_SUCCESS")) if (folder / "shards").is_dir() else []
    return [StageStats.from_dict(json.loads(s.read_text(encoding="utf-8"))["stats"]) for s in shards]


def figures_from_pipeline(pipe: Any) -> dict[str, Figures]:
    """Figures of the build's own finished stages and shards (same settings and models)."""
    stats: dict[str, list[StageStats]] = {}
    for name, stage_dir in pipe.dirs.items():
        if stage_dir.path.is_dir():
            stats[name] = _recorded_stats(stage_dir.path)
    return _figures_from_stats(stats, f"figures recorded by this build in {pipe.output_dir}")


def calibration_settings(settings: Any, n: int) -> Any:
    """The configured settings with every count cut to ``n`` (one shard per stage)."""
    captions = dataclasses.replace(settings.captions, seed_captions=n, train_captions=n, test_captions=n)
    return dataclasses.replace(
        settings, captions=captions, augment=dataclasses.replace(settings.augment, target_count=n, max_calls=None),
        sharding=dataclasses.replace(settings.sharding, shard_size=max(n, settings.sharding.shard_size)),
    )


def figures_from_calibration(settings: Any, n: int) -> dict[str, Figures]:
    """Run a short build (:func:`calibration_settings`) in a temporary folder and take its figures.

    When a stage of so small a build keeps nothing for the next one (e.g. no seed hierarchy out
    of a few captions), the stages finished so far give figures and the reason is printed.
    """
    from hierarcaps.pipeline import BuildError, Pipeline

    with tempfile.TemporaryDirectory(prefix="hierarcaps-calibrate-") as tmp:
        pipe = Pipeline(calibration_settings(settings, n), tmp)
        try:
            pipe.run()
        except BuildError as err:
            print(f"calibration stopped early ({err}); later stages use other figures: "
                  "a larger --calibrate N may get further", file=sys.stderr)
        found = figures_from_pipeline(pipe)
    return {stage: dataclasses.replace(f, source=f"a calibration build of {n} captions with the configured models")
            for stage, f in found.items()}


def built_in_figures() -> dict[str, Figures]:
    """:data:`BUILT_IN_FIGURES` as :class:`Figures`."""
    return {stage: Figures(**values, source=BUILT_IN_SOURCE) for stage, values in BUILT_IN_FIGURES.items()}


# ---------------------------------------------------------------------------- projection


#: Stages whose time does not grow with the counts (see the module docstring).
UNSCALED = ("captions", "final")


def project(settings: Any, figures: dict[str, Figures]) -> list[Projection]:
    """Per stage: configured units, projected wall seconds, generated tokens and NLI pairs."""
    from hierarcaps.pipeline import ORDER, STAGES

    keep_rates = {stage: f.keep_rate for stage, f in figures.items()}
    units = configured_units(settings, keep_rates)
    out = []
    for stage in ORDER:
        unit, count = units[stage]
        found = figures.get(stage)
        if found is None:
            out.append(Projection(stage, unit, count, None, None, None, "no figures"))
            continue
        if stage in UNSCALED:
            out.append(Projection(stage, unit, count, found.seconds, 0, 0, found.source))
            continue
        parallel = 1
        if STAGES[stage].sharded:
            parallel = max(1, min(settings.sharding.concurrency, math.ceil(count / settings.sharding.shard_size)))
        out.append(Projection(
            stage, unit, count,
            wall_seconds=count * found.seconds_per_unit / parallel,
            generated_tokens=round(count * found.generated_tokens_per_unit),
            nli_pairs=round(count * found.nli_pairs_per_unit),
            source=found.source,
        ))
    return out


def choose_figures(settings: Any, output_dir: Path, *, estimate_from: Path | None = None,
                   calibrate: int | None = None) -> dict[str, Figures]:
    """The figures of the first source that applies (see the module docstring), gaps filled from
    the built-in figures."""
    from hierarcaps.pipeline import Pipeline

    if estimate_from is not None:
        chosen = figures_from_folder(estimate_from)
    elif calibrate is not None:
        chosen = figures_from_calibration(settings, calibrate)
    else:
        chosen = figures_from_pipeline(Pipeline(settings, output_dir))
    return {**built_in_figures(), **chosen}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def render_estimate(projections: list[Projection]) -> str:
    """The estimate as a text table, its total, and the source of each stage's figures."""
    header = ("stage", "units", "unit", "projected wall", "generated tokens", "NLI pairs")
    rows = [(p.stage, str(p.units), p.unit, _duration(p.wall_seconds),
             "?" if p.generated_tokens is None else str(p.generated_tokens),
             "?" if p.nli_pairs is None else str(p.nli_pairs)) for p in projections]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["estimate (model loading not included):",
             "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    known = [p.wall_seconds for p in projections if p.wall_seconds is not None]
    missing = [p.stage for p in projections if p.wall_seconds is None]
    lines.append(f"total projected wall time: {_duration(sum(known))}"
                 + (f" (without {', '.join(missing)}: no figures)" if missing else ""))
    sources: dict[str, list[str]] = {}
    for p in projections:
        sources.setdefault(p.source, []).append(p.stage)
    lines += [f"figures for {', '.join(stages)}: {source}" for source, stages in sources.items()]
    if any(p.source == BUILT_IN_SOURCE for p in projections):
        lines.append("built-in figures do not say how long real models take: for that, calibrate on the build "
                     "machine (--calibrate N) or pass a previous build (--estimate-from FOLDER)")
    return "\n".join(lines)


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """``--estimate``, ``--estimate-from`` and ``--calibrate`` of ``build-hierarcaps``."""
    parser.add_argument("--estimate", action="store_true",
                        help="with --dry-run: project each stage's wall time for the configured counts")
    parser.add_argument("--estimate-from", type=Path, metavar="FOLDER",
                        help="with --dry-run --estimate: take the figures from a previous build folder or its "
                        "manifest.json")
    parser.add_argument("--calibrate", type=int, metavar="N",
                        help="with --dry-run --estimate: take the figures from a short build of N captions with "
                        "the configured models (they must load here)")


def print_estimate(settings: Any, output_dir: Path, args: argparse.Namespace) -> int:
    """Print what ``--dry-run --estimate`` shows; the exit code (2 with a one-line error)."""
    from hierarcaps.pipeline import BuildError

    try:
        if args.calibrate is not None and args.calibrate < 1:
            raise ValueError(f"--calibrate must be at least 1 caption, got {args.calibrate}")
        figures = choose_figures(settings, output_dir, estimate_from=args.estimate_from, calibrate=args.calibrate)
    except (ValueError, OSError, BuildError) as err:
        print(f"build-hierarcaps: estimate: {err}", file=sys.stderr)
        return 2
    print(render_estimate(project(settings, figures)))
    return 0
