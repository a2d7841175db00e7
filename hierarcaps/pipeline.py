"""The build pipeline without an orchestrator: stage graph, resumable stage runs, shards.

A build is this chain of stages (SPEC section 2), each a plain function over batches from
``hierarcaps.stages``; this module decides where each stage's output lives and whether it must
run, and loads the models it needs::

    captions ─┬─> seeds ─> augment ─> completer ─┬─> complete_train ─> negatives ─┐
              └──────────────────────────────────┴─> complete_test ───────────────┴─> final

Every stage writes ``<output-dir>/stages/<stage>-v<code version>-<fingerprint>/`` (see
:mod:`hierarcaps.stagedir`): ``rows.parquet`` (or ``<split>.parquet``, or a ``model/`` folder
for the completer), ``stats.json`` and ``_SUCCESS``. The fingerprint covers the stage's
settings, the specs of the models it uses, the build seed, the shard size of sharded stages and
the directory names of its upstream stages, so a changed setting reruns that stage and all
that follows. The last stage writes the fixed folder ``<output-dir>/final`` and records its
fingerprint in ``_SUCCESS``.

Long stages (seeds, augment, positive completion, negatives) run in shards of
``sharding.shard_size`` items, each a resumable directory of its own; shard ``i`` uses the
stage seed plus ``i``. :class:`Pipeline` is what the Prefect flow (``flows/build.py``) maps
over, and :meth:`Pipeline.run` runs everything in this process without Prefect.

Models are loaded once per stage per process through :class:`ModelCache` (which holds one
stage's models at a time) and released when the stage ends.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gc
import math
import random
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hierarcaps.stagedir import (
    StageDir,
    count_rows,
    read_rows,
    stage_dir_name,
    to_jsonable,
    write_json_atomic,
    write_rows,
)
from hierarcaps.stats import StageStats, merge_all

if TYPE_CHECKING:
    from hierarcaps.settings import BuildSettings

# numpy and torch are imported where a stage uses them, not here: planning a build, a dry run
# and a no-op rerun need neither.

FINAL = "final"
STAGES_DIR = "stages"
TINY_MODELS_DIR = "tiny-models"
TINY_PREFIX = "tiny:"
PRIMED_PREFIX = "tiny-primed:"
RESOURCE_PREFIX = "resources:"
SETTINGS_FILE = "settings.json"
#: Splits of the captions stage: seed captions (T4 of seed hierarchies), train and test captions.
CAPTION_SPLITS = ("seed", "train", "test")


class BuildError(RuntimeError):
    """A stage cannot run (missing input, nothing survived a filter, bad setting)."""


class InputError(BuildError):
    """Bad input or settings: rerunning the same command cannot help until the cause is fixed."""


@dataclass(frozen=True)
class StageSpec:
    """A stage of the graph: its code version, upstream stages, settings and models."""

    name: str
    code_version: int
    upstream: tuple[str, ...]
    sections: tuple[str, ...]  # settings sections in the fingerprint
    models: tuple[str, ...]  # model roles in the fingerprint (``settings.models.<role>``)
    sharded: bool = False


#: Bump a ``code_version`` whenever a change to the stage's code changes its output.
STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("captions", 1, (), ("captions",), ()),
        StageSpec("seeds", 2, ("captions",), ("seeds", "nli", "generation"), ("chat_lm", "nli"), sharded=True),
        StageSpec("augment", 1, ("seeds",), ("augment", "generation"), ("base_lm",), sharded=True),
        StageSpec("completer", 2, ("augment",), ("completer",), ("completer",)),
        StageSpec("complete_train", 2, ("captions", "completer"), ("complete", "nli", "generation"), ("nli",),
                  sharded=True),
        StageSpec("complete_test", 2, ("captions", "completer"), ("complete", "nli", "generation"), ("nli",),
                  sharded=True),
        StageSpec("negatives", 2, ("complete_train", "completer"), ("negatives", "nli", "generation"), ("nli",),
                  sharded=True),
        StageSpec(FINAL, 1, ("negatives", "complete_test"), ("output",), ()),
    )
}
ORDER: tuple[str, ...] = tuple(STAGES)


@dataclass(frozen=True)
class PlannedStage:
    """A stage of one build: its directory and whether it is finished."""

    name: str
    dir: StageDir
    done: bool
    sharded: bool
    shards_done: int = 0


def resolve_path(path: str) -> Path:
    """A source path; ``resources:demo/x.tsv`` names a file shipped in ``hierarcaps.resources``."""
    if path.startswith(RESOURCE_PREFIX):
        return Path(str(resources.files("hierarcaps.resources") / path[len(RESOURCE_PREFIX):]))
    return Path(path).expanduser()


def check_caption_sources(settings: "BuildSettings") -> None:
    """Raise :class:`BuildError` naming the setting when a caption file is unset or missing."""
    examples = {"train": "/data/cc_train.tsv", "test": "/data/annotations/captions_val2014.json"}
    for split, example in examples.items():
        path = getattr(settings.captions, split).path
        if not path:
            raise InputError(
                f"captions.{split}.path is not set: give the {split} caption file, "
                f"e.g. --set captions.{split}.path={example}"
            )
        if not resolve_path(path).is_file():
            raise InputError(f"captions.{split}.path = {path!r}: no such file")


class Pipeline:
    """One build: resolved settings and an output folder; plans and runs stages and shards."""

    def __init__(self, settings: "BuildSettings", output_dir: Path | str) -> None:
        self.settings = settings
        self.output_dir = Path(output_dir).resolve()
        self.dirs = self._stage_dirs()

    # ------------------------------------------------------------------ planning
    def _stage_dirs(self) -> dict[str, StageDir]:
        dirs: dict[str, StageDir] = {}
        for name, spec in STAGES.items():
            dir_name = stage_dir_name(
                name, spec.code_version, self._fingerprint_settings(spec), self._model_specs(spec),
                [dirs[u].name for u in spec.upstream],
            )
            if name == FINAL:
                dirs[name] = StageDir(self.output_dir, FINAL)
                self.final_name = dir_name
            else:
                dirs[name] = StageDir(self.output_dir / STAGES_DIR, dir_name)
        return dirs

    def _fingerprint_settings(self, spec: StageSpec) -> dict[str, Any]:
        s = self.settings
        data: dict[str, Any] = {key: getattr(s, key) for key in spec.sections}
        data["seed"] = s.seed
        if spec.sharded:
            data["shard_size"] = s.sharding.shard_size
        if spec.name == "captions":
            data["source_sizes"] = {
                split: _file_size(getattr(s.captions, split).path) for split in ("train", "test")
            }
        if spec.name == FINAL:
            data["plumbing_check"] = s.plumbing_check
        if "completer" in spec.upstream:  # the trained completer samples in batches of this size
            data["completer_batch_size"] = s.models.completer.batch_size
        return data

    def _model_specs(self, spec: StageSpec) -> dict[str, Any]:
        specs = {role: getattr(self.settings.models, role) for role in spec.models}
        if spec.name == "completer":  # training: models.completer.batch_size only batches its sampling
            specs["completer"] = dataclasses.replace(specs["completer"], batch_size=None)
        return specs

    def is_done(self, name: str) -> bool:
        """Finished: ``_SUCCESS`` exists (and, for ``final``, records the current fingerprint)."""
        stage_dir = self.dirs[name]
        if not stage_dir.is_done():
            return False
        return name != FINAL or stage_dir.record().get("fingerprint") == self.final_name

    def plan(self) -> list[PlannedStage]:
        """Every stage in order, its directory and whether it is done (shards done so far)."""
        planned = []
        for name, spec in STAGES.items():
            stage_dir = self.dirs[name]
            shards = stage_dir.path / "shards"
            n_done = sum(1 for d in shards.iterdir() if (d / "_SUCCESS").is_file()) if shards.is_dir() else 0
            planned.append(PlannedStage(name, stage_dir, self.is_done(name), spec.sharded, n_done))
        return planned

    def upstream_dir(self, name: str, upstream: str) -> Path:
        """The finished directory of an upstream stage (a clear error when it is not finished)."""
        if upstream not in STAGES[name].upstream:
            raise BuildError(f"stage {name} does not read {upstream}")
        if not self.is_done(upstream):
            raise BuildError(f"stage {name} needs {upstream}, which is not finished; rerun the build")
        return self.dirs[upstream].path

    # ------------------------------------------------------------------ shards
    def shard_count(self, name: str) -> int:
        """Number of shards of a sharded stage (its upstream must be finished)."""
        size = self.settings.sharding.shard_size
        if name == "augment":
            return math.ceil(self.settings.augment.target_count / size)
        return math.ceil(count_rows(self._shard_input(name)) / size)

    def _shard_input(self, name: str) -> Path:
        """The upstream rows a sharded stage reads in slices (written in row groups of one shard)."""
        if name == "seeds":
            return self.upstream_dir(name, "captions") / "seed.parquet"
        if name == "complete_train":
            return self.upstream_dir(name, "captions") / "train.parquet"
        if name == "complete_test":
            return self.upstream_dir(name, "captions") / "test.parquet"
        if name == "negatives":
            return self.upstream_dir(name, "complete_train") / "rows.parquet"
        raise BuildError(f"stage {name} has no row input to shard")

    def run_shard(self, name: str, index: int) -> dict[str, Any]:
        """Run shard ``index`` of a sharded stage unless it is finished; returns its stats."""
        shard = self.dirs[name].shard(index)
        if shard.is_done():
            return shard.record()["stats"]
        shard.clean_temporaries()
        _MODELS.enter_stage(name)
        size = self.settings.sharding.shard_size
        with shard.build({"stage": name, "shard": index, "lineage": self._lineage(name)}) as out:
            if name == "augment":
                rows, stats = _augment_shard(self, index)
            else:
                part = read_rows(self._shard_input(name), index * size, (index + 1) * size)
                rows, stats = SHARD_RUNNERS[name](self, part, index)
            write_rows(out.path / "rows.parquet", rows)
            out.record["stats"] = stats.to_dict()
            out.record["loaded_models"] = dict(_MODELS.described)
            write_json_atomic(out.path / "stats.json", stats.to_dict())
        return stats.to_dict()

    def merge_shards(self, name: str) -> dict[str, Any]:
        """Concatenate the finished shards of a stage into its rows; mark the stage done."""
        stage_dir = self.dirs[name]
        started = time.time()
        n = self.shard_count(name)
        missing = [i for i in range(n) if not stage_dir.shard(i).is_done()]
        if missing:
            raise BuildError(f"stage {name}: shards {missing[:10]} are not finished; rerun the build")
        rows: list[dict[str, Any]] = []
        shard_stats: list[StageStats] = []
        loaded: dict[str, Any] = {}
        for i in range(n):
            record = stage_dir.shard(i).record()
            rows += read_rows(stage_dir.shard(i).path / "rows.parquet")
            shard_stats.append(StageStats.from_dict(record["stats"]))
            loaded.update(record.get("loaded_models", {}))
        stats = merge_all(name, shard_stats)
        if name == "augment":
            rows = _drop_cross_shard_duplicates(rows, stats)
        stats.kept = len(rows)
        write_rows(stage_dir.path / "rows.parquet", rows, row_group_size=self.settings.sharding.shard_size)
        write_json_atomic(stage_dir.path / "stats.json", stats.to_dict())
        stage_dir.mark_success(self._record(name, [stats.to_dict()], loaded, n_shards=n), started)
        return stats.to_dict()

    # ------------------------------------------------------------------ whole stages
    def run_stage(self, name: str, progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
        """Run a stage (all its unfinished shards in this process) unless it is done; returns its stats."""
        stage_dir = self.dirs[name]
        if self.is_done(name):
            return stage_dir.record()["stats"]
        stage_dir.clean_temporaries()
        try:
            if STAGES[name].sharded:
                n = self.shard_count(name)
                for i in range(n):
                    self.run_shard(name, i)
                    if progress:
                        progress(i + 1, n)
                return [self.merge_shards(name)]
            _MODELS.enter_stage(name)
            with stage_dir.build({}) as out:
                stats = WHOLE_RUNNERS[name](self, out.path)
                out.record.update(self._record(name, [s.to_dict() for s in stats], dict(_MODELS.described)))
                if name == FINAL:
                    out.record["fingerprint"] = self.final_name
            return [s.to_dict() for s in stats]
        finally:
            release_models()

    def run(self, progress: Callable[[str, int, int], None] | None = None) -> dict[str, list[dict[str, Any]]]:
        """Run every unfinished stage in order, in this process; returns stats per stage."""
        self.write_settings()
        return {
            name: self.run_stage(name, (lambda i, n, s=name: progress(s, i, n)) if progress else None)
            for name in ORDER
        }

    def write_settings(self) -> Path:
        """Write the resolved settings to ``<output-dir>/settings.json``."""
        from hierarcaps.settings import to_dict

        path = self.output_dir / SETTINGS_FILE
        write_json_atomic(path, to_dict(self.settings))
        return path

    def _lineage(self, name: str) -> dict[str, Any]:
        return {
            "dir": self.dirs[name].name,
            "upstream": {u: self.dirs[u].name for u in STAGES[name].upstream},
        }

    def _record(
        self, name: str, stats: list[dict[str, Any]], loaded_models: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        spec = STAGES[name]
        return {
            "stage": name,
            "code_version": spec.code_version,
            "settings": to_jsonable(self._fingerprint_settings(spec)),
            "models": to_jsonable(self._model_specs(spec)),
            "loaded_models": loaded_models,
            "lineage": self._lineage(name),
            "stats": stats,
            **extra,
        }

    # ------------------------------------------------------------------ model access
    def model_spec(self, role: str) -> Any:
        """The spec of a model role, with ``tiny:<kind>`` resolved to a locally built tiny model."""
        spec = getattr(self.settings.models, role)
        for prefix, primed in ((TINY_PREFIX, False), (PRIMED_PREFIX, True)):
            if spec.name_or_path.startswith(prefix):
                kind = spec.name_or_path[len(prefix):]
                folder = self.output_dir / TINY_MODELS_DIR / (f"{kind}-primed" if primed else kind)
                ensure_tiny_model(kind, folder, self._priming_captions() if primed else None)
                return dataclasses.replace(spec, name_or_path=str(folder))
        return spec

    def _priming_captions(self) -> list[str]:
        """Captions of the train source that smoke-profile models are primed on (see :mod:`hierarcaps.smoke`)."""
        from hierarcaps.sources import iter_captions

        source = self.settings.captions.train
        rows = iter_captions(resolve_path(source.path), source.format, column=source.column,
                             min_words=source.min_words)
        return [row.caption for _, row in zip(range(200), rows)]

    def scorer(self) -> Any:
        """The NLI scorer of this build (cached per process)."""
        settings = self.settings
        spec = self.model_spec("nli")

        def load() -> Any:
            from hierarcaps.nli import NLIScorer

            cache = self.output_dir / "cache" / "nli.sqlite" if settings.nli.cache else None
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
            scorer = NLIScorer.from_spec(spec, template=settings.nli.template, batch_size=spec.batch_size,
                                         max_batch_tokens=settings.nli.max_batch_tokens, cache_path=cache)
            return LengthRuleScorer(scorer) if settings.nli.decision == "length_rule" else scorer

        return _MODELS.get(("nli", spec, settings.nli.template, settings.nli.decision), self._naming_setting("nli", load))

    def backend(self, role: str, spec: Any) -> str:
        """``hf`` or ``vllm``: the library that samples from the model of ``role`` (``generation.*``).

        The completer follows ``generation.completer_backend``, or when that is unset
        ``generation.backend`` if it is decoder-only and ``hf`` if it is an encoder-decoder (T5)
        model, which vLLM cannot run; asking for ``vllm`` with a T5 completer is an error.
        """
        g = self.settings.generation
        if role not in ("completer", "trained_completer"):
            return g.backend
        if g.completer_backend is not None:
            if g.completer_backend == "vllm" and is_encoder_decoder(spec):
                from hierarcaps.vllm_backend import refuse_encoder_decoder

                refuse_encoder_decoder(spec, "models.completer")
            return g.completer_backend
        return "hf" if g.backend == "hf" or is_encoder_decoder(spec) else g.backend

    def generator(self, role: str, spec: Any | None = None, name: str | None = None) -> Any:
        """A :class:`~hierarcaps.generation.TextGenerator` over the model of ``role`` (cached per process).

        Its ``model_id`` (what provenance records) is :func:`~hierarcaps.models.provenance_id`
        of the spec; ``name`` names a local model (default: its folder's name).
        ``models.<role>.batch_size`` caps the sequences per model call; the library is
        :meth:`backend` (vLLM: :class:`hierarcaps.vllm_backend.VLLMGenerator`).
        """
        spec = spec or self.model_spec(role)
        backend = self.backend(role, spec)

        def load() -> Any:
            from hierarcaps.models import provenance_id

            if backend == "vllm":
                from hierarcaps.vllm_backend import VLLMGenerator

                generator = VLLMGenerator.from_spec(spec, f"models.{role.removeprefix('trained_')}",
                                                    gpu_memory_utilization=self.settings.generation.gpu_memory_utilization)
                generator.model_id = provenance_id(spec, name)
                return generator
            from hierarcaps.generation import TextGenerator

            model, tokenizer = load_lm(spec)
            model_id = provenance_id(spec, name, commit=getattr(model.config, "_commit_hash", None))
            return TextGenerator(model, tokenizer, model_id=model_id, batch_size=spec.batch_size)

        return _MODELS.get((role, spec, backend), self._naming_setting(role, load))

    def _naming_setting(self, role: str, load: Callable[[], Any]) -> Callable[[], Any]:
        """``load`` whose :class:`~hierarcaps.models.ModelLoadError` names the setting ``models.<role>.name_or_path``."""
        from hierarcaps.models import ModelLoadError

        def named() -> Any:
            try:
                return load()
            except ModelLoadError as err:
                if not hasattr(self.settings.models, role):  # the completer trained by this build
                    raise
                setting = f"models.{role}.name_or_path = {getattr(self.settings.models, role).name_or_path!r}"
                raise ModelLoadError(f"{setting}: {err}") from err

        return named


# ---------------------------------------------------------------------- stage bodies


def _captions(pipe: Pipeline, out: Path) -> list[StageStats]:
    """Sample seed, train (disjoint, from the train source) and test captions."""
    from hierarcaps.sources import SourceFormatError, iter_captions, sample_captions

    check_caption_sources(pipe.settings)
    c = pipe.settings.captions
    stats = []
    for split in ("train", "test"):
        source = getattr(c, split)
        split_stats = StageStats(stage=f"captions_{split}")
        with split_stats.timed():
            rows = iter_captions(resolve_path(source.path), source.format, column=source.column,
                                 min_words=source.min_words, stats=split_stats)
            wanted = c.seed_captions + c.train_captions if split == "train" else c.test_captions
            try:
                sample = [dataclasses.asdict(r) for r in sample_captions(rows, wanted, seed=c.seed + pipe.settings.seed)]
            except SourceFormatError as err:
                raise InputError(f"captions.{split}.format = {source.format!r}: {err}") from None
        if not sample or (split == "train" and len(sample) <= c.seed_captions):
            raise InputError(no_usable_captions(split, source, split_stats, c.seed_captions))
        if split == "train":
            random.Random(c.seed).shuffle(sample)
            parts = {"seed": sample[:c.seed_captions], "train": sample[c.seed_captions:]}
        else:
            parts = {"test": sample}
        for name, part in parts.items():
            for index, row in enumerate(part):
                row["id"] = f"{name}-{index:06d}"
            write_rows(out / f"{name}.parquet", part, row_group_size=pipe.settings.sharding.shard_size)
        split_stats.extra.update({f"sampled_{name}": len(part) for name, part in parts.items()})
        stats.append(split_stats)
    return stats


def no_usable_captions(split: str, source: Any, stats: StageStats, seed_captions: int = 0) -> str:
    """Why a caption source gave too few usable captions: the file, counts per reason, the fix."""
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.rejected.items())) or "none"
    need = f"more than captions.seed_captions = {seed_captions}" if split == "train" else "at least one"
    head = (f"captions.{split}.path = {source.path!r} ({resolve_path(source.path)}): {stats.kept} usable captions "
            f"of {stats.items_in} records read, {need} needed; rejected: {reasons}")
    top = stats.rejected.most_common(1)[0][0] if stats.rejected else None
    if stats.items_in == 0:
        fix = "the file holds no records; give a caption file that is not empty"
    elif top == "too_short":
        fix = (f"captions shorter than captions.{split}.min_words = {source.min_words} words are dropped; "
               f"lower it (e.g. --set captions.{split}.min_words=3) or use a file of longer captions")
    elif top == "malformed":
        fix = (f"the records do not match captions.{split}.format = {source.format!r} (see docs/formats.md: "
               "cc_tsv is 'caption<TAB>url' per line); set the format that matches the file")
    elif top == "empty":
        fix = f"the caption fields are empty; check captions.{split}.format and captions.{split}.column"
    else:
        fix = "give a file with more distinct captions, or lower captions.seed_captions"
    return f"{head}. Fix: {fix}"


def _shard_settings(settings: Any, index: int) -> Any:
    return dataclasses.replace(settings, seed=settings.seed + index)


def _seeds_shard(pipe: Pipeline, rows: list[dict[str, Any]], index: int) -> tuple[list[dict[str, Any]], StageStats]:
    from hierarcaps.stages.seeds import generate_seeds

    generator, scorer = pipe.generator("chat_lm"), pipe.scorer()
    return generate_seeds([r["caption"] for r in rows], generator, scorer, _shard_settings(pipe.settings.seeds, index))


def _augment_shard(pipe: Pipeline, index: int) -> tuple[list[dict[str, Any]], StageStats]:
    from hierarcaps.stages.augment import augment_hierarchies

    settings = pipe.settings.augment
    size = pipe.settings.sharding.shard_size
    target = min(size, settings.target_count - index * size)
    seeds = [r["tiers"] for r in read_rows(pipe.upstream_dir("augment", "seeds") / "rows.parquet")]
    if not seeds:
        raise BuildError("the seeds stage kept no seed hierarchy, so augmentation has no examples; "
                         "see the seeds stage's rejections (more seed_captions or seeds.attempts may help)")
    max_calls = None if settings.max_calls is None else math.ceil(settings.max_calls * target / settings.target_count)
    shard_settings = dataclasses.replace(_shard_settings(settings, index), target_count=target, max_calls=max_calls)
    return augment_hierarchies(seeds, pipe.generator("base_lm"), shard_settings)


def _drop_cross_shard_duplicates(rows: list[dict[str, Any]], stats: StageStats) -> list[dict[str, Any]]:
    seen: set[tuple[str, ...]] = set()
    kept = []
    for row in rows:
        key = tuple(row["tiers"])
        if key in seen:
            stats.reject("duplicate")
            continue
        seen.add(key)
        kept.append(row)
    return kept


def _completer(pipe: Pipeline, out: Path) -> list[StageStats]:
    """Fine-tune the completer on the synthetic hierarchies (a fresh copy of the base model)."""
    from hierarcaps.stages.completer import train_completer

    hierarchies = [r["tiers"] for r in read_rows(pipe.upstream_dir("completer", "augment") / "rows.parquet")]
    if not hierarchies:
        raise BuildError("the augment stage produced no synthetic hierarchy to train the completer on; "
                         "see its rejections")
    spec = pipe.model_spec("completer")
    pipe.backend("completer", spec)  # a vLLM completer must be decoder-only: fail before training
    model, tokenizer = pipe._naming_setting("completer", lambda: load_lm(spec))()
    _MODELS.described["completer_base"] = _describe(model)
    import torch

    torch.manual_seed(pipe.settings.completer.seed)
    stats = train_completer(hierarchies, model, tokenizer, pipe.settings.completer, out / "model")
    del model
    return [stats]


def _completer_generator(pipe: Pipeline, stage: str) -> Any:
    from hierarcaps.models import ModelSpec

    base = pipe.model_spec("completer")
    folder = pipe.upstream_dir(stage, "completer") / "model"
    spec = ModelSpec(str(folder), dtype=base.dtype, device=base.device, batch_size=base.batch_size)
    return pipe.generator("trained_completer", spec, name="completer")


def _complete_shard(stage: str) -> Callable[..., tuple[list[dict[str, Any]], StageStats]]:
    def run(pipe: Pipeline, rows: list[dict[str, Any]], index: int) -> tuple[list[dict[str, Any]], StageStats]:
        from hierarcaps.stages.complete import complete_positives

        out, stats = complete_positives(
            rows, _completer_generator(pipe, stage), pipe.scorer(), _shard_settings(pipe.settings.complete, index)
        )
        stats.stage = stage
        return out, stats

    return run


def _negatives_shard(pipe: Pipeline, rows: list[dict[str, Any]], index: int) -> tuple[list[dict[str, Any]], StageStats]:
    from hierarcaps.stages.negatives import hallucinate_negatives

    return hallucinate_negatives(
        rows, _completer_generator(pipe, "negatives"), pipe.scorer(), _shard_settings(pipe.settings.negatives, index)
    )


def _final(pipe: Pipeline, out: Path) -> list[StageStats]:
    """Assemble, validate and export the dataset; write the card and the manifest."""
    from hierarcaps.assemble import assemble_dataset, export_dataset, validate_dataset
    from hierarcaps.card import render_card
    from hierarcaps.manifest import build_manifest, write_manifest
    from hierarcaps.settings import to_dict

    stats = StageStats(stage=FINAL)
    with stats.timed():
        train = read_rows(pipe.upstream_dir(FINAL, "negatives") / "rows.parquet")
        test = read_rows(pipe.upstream_dir(FINAL, "complete_test") / "rows.parquet")
        stats.items_in = len(train) + len(test)
        dataset = assemble_dataset({"train": train, "test": test})
        report = validate_dataset(dataset)
        if not report.ok:
            raise BuildError(f"the assembled dataset failed validation:\n{report.message()}")
        export_dataset(dataset, out, parquet=pipe.settings.output.parquet, release_csv=pipe.settings.output.release_csv)
        settings = to_dict(pipe.settings)
        counts = {name: split.num_rows for name, split in dataset.items()}
        summary = stage_summaries(pipe)
        models = models_used(pipe)
        sampling = sampling_used(pipe)
        (out / "README.md").write_text(
            render_card(settings=settings, counts=counts, models=models, stages=summary, sampling=sampling),
            encoding="utf-8",
        )
        write_manifest(out, build_manifest(out, settings=settings, counts=counts, models=models,
                                           stages=summary, validation=report.to_dict(), sampling=sampling))
    stats.kept = sum(counts.values())
    return [stats]


SHARD_RUNNERS: dict[str, Callable[..., tuple[list[dict[str, Any]], StageStats]]] = {
    "seeds": _seeds_shard,
    "complete_train": _complete_shard("complete_train"),
    "complete_test": _complete_shard("complete_test"),
    "negatives": _negatives_shard,
}
WHOLE_RUNNERS: dict[str, Callable[[Pipeline, Path], list[StageStats]]] = {
    "captions": _captions,
    "completer": _completer,
    FINAL: _final,
}


def stage_summaries(pipe: Pipeline) -> list[dict[str, Any]]:
    """Per finished stage (and caption split): dir, items in, kept, rejected per reason, seconds,
    ``extra`` counts and ``throughput`` (tokens/s, pairs/s; recomputed, so older records get it too)."""
    rows = []
    for name in ORDER:
        if name == FINAL or not pipe.dirs[name].is_done():
            continue
        record = pipe.dirs[name].record()
        for stats in record["stats"]:
            stats = {**stats, "stage": stats.get("stage", name)}
            rows.append({**StageStats.from_dict(stats).to_dict(), "dir": record["lineage"]["dir"],
                         "wall_seconds": record.get("seconds")})
    return rows


def sampling_used(pipe: Pipeline) -> dict[str, dict[str, Any]]:
    """Per generating stage: model role, library (``hf``/``vllm``), temperature, top_k and top_p."""
    from hierarcaps.settings import GENERATING_STAGES

    used = {}
    for stage, role in GENERATING_STAGES.items():
        sampling = getattr(pipe.settings, stage)
        used[stage] = {"role": role, "backend": pipe.backend(role, pipe.model_spec(role)),
                       "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
    return used


def models_used(pipe: Pipeline) -> dict[str, Any]:
    """Per model role: the spec from the settings and what the stages recorded loading."""
    used: dict[str, Any] = {}
    for role in ("chat_lm", "base_lm", "nli", "completer"):
        used[role] = to_jsonable(getattr(pipe.settings.models, role))
        used[role]["id"] = used[role]["name_or_path"]
    for name in ORDER:
        if name != FINAL and pipe.dirs[name].is_done():
            for key, described in pipe.dirs[name].record().get("loaded_models", {}).items():
                used.setdefault(key, {}).update(loaded=described)
    return used


# ---------------------------------------------------------------------- models


def _file_size(path: str) -> int | None:
    if not path:
        return None
    resolved = resolve_path(path)
    return resolved.stat().st_size if resolved.is_file() else None


def is_encoder_decoder(spec: Any) -> bool:
    """Whether the model of ``spec`` is an encoder-decoder (T5) model, from its config.

    ``False`` when the config cannot be read (the model loader then raises the helpful error).
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError):
        return False
    return bool(getattr(config, "is_encoder_decoder", False))


def load_lm(spec: Any) -> tuple[Any, Any]:
    """Load a causal or seq2seq LM, choosing by the config's ``is_encoder_decoder``."""
    from hierarcaps.models import load_causal_lm, load_seq2seq_lm

    return load_seq2seq_lm(spec) if is_encoder_decoder(spec) else load_causal_lm(spec)


def ensure_tiny_model(kind: str, folder: Path, priming_captions: Sequence[str] | None = None) -> Path:
    """Build a tiny random model of ``kind`` into ``folder`` once (atomically) and return it.

    With ``priming_captions`` the model is then trained to write the stages' formats
    (:func:`hierarcaps.smoke.prime_tiny_model`; smoke profile only). Concurrent shards (threads,
    or Dask worker processes sharing the output folder) wait on a lock file beside ``folder``:
    one builds, the others then find it finished, so no one replaces a folder another is loading.
    """
    from hierarcaps.stagedir import atomic_path
    from hierarcaps.tiny_models import build_tiny_model

    marker = folder / "_SUCCESS"
    if marker.is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.is_file():
            with atomic_path(folder) as tmp:
                build_tiny_model(kind, tmp)
                if priming_captions is not None:
                    from hierarcaps.smoke import prime_tiny_model

                    prime_tiny_model(kind, tmp, priming_captions)
                (tmp / "_SUCCESS").write_text(kind, encoding="utf-8")
    return folder


def _describe(model: Any) -> dict[str, Any]:
    from hierarcaps.models import describe_model

    return describe_model(model)


class ModelCache:
    """Loaded models of the current stage, shared by the shards that run in this process.

    Holds one stage's models at a time: :func:`release_models` (called when a stage ends)
    drops them and frees GPU memory. Thread-safe, so concurrent shard threads load once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[Any, Any] = {}
        self.described: dict[str, Any] = {}
        self.stage: str | None = None

    def enter_stage(self, stage: str) -> None:
        """Release the models of another stage before this one loads its own."""
        if stage != self.stage:
            self.release()
            self.stage = stage

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._items:
                item = load()
                self._items[key] = item
                model = getattr(item, "model", None) or getattr(getattr(item, "scorer", None), "model", None)
                if model is not None:
                    self.described[str(key[0])] = _describe(model)
            return self._items[key]

    def release(self) -> None:
        with self._lock:
            for item in self._items.values():
                close = getattr(item, "close", None)  # a vLLM engine holds GPU memory, the NLI cache a database
                if callable(close):
                    close()
            self._items.clear()
            self.described = {}
            self.stage = None
        gc.collect()
        torch = sys.modules.get("torch")  # not imported: no model was loaded, nothing is cached on a GPU
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


_MODELS = ModelCache()


def release_models() -> None:
    """Drop every model loaded by this process's pipeline (end of a stage)."""
    _MODELS.release()


class LengthRuleScorer:
    """SMOKE PROFILE ONLY (``nli.decision = "length_rule"``): a stand-in for NLI decisions.

    The random tiny NLI model of the smoke profile decides nothing meaningful, so no data
    would flow. This wrapper still runs the real scorer on every pair (model loading, batching,
    label order, caching are exercised), then answers by a rule instead: ``a`` entails ``b``
    when ``a`` is longer, and ``a`` contradicts ``b`` when the texts differ. Data built so is a
    plumbing check, and the build's card, manifest and console say so.
    """

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.model = scorer.model
        self.model_id = f"{scorer.model_id} (length rule: plumbing check)"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scorer, name)

    def score(self, pairs: Sequence[tuple[str, str]]) -> Any:
        import numpy as np

        scores = self.scorer.score(pairs)
        entail = np.array([1.0 if len(a) > len(b) else 0.0 for a, b in pairs])
        contradict = np.array([0.0 if a == b else 1.0 for a, b in pairs])
        return dataclasses.replace(scores, entailment=entail, contradiction=contradict, neutral=np.zeros(len(pairs)))
