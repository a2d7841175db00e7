"""Prefect flow ``finetune``: from a ``build-hierarcaps`` output folder to an aligned model.

``finetune_flow(build_output_dir, settings)`` trains on ``<build_output_dir>/final/dataset`` (the
``DatasetDict`` a finished build saves there; the ``final`` folder itself is accepted too) with
:func:`finetune.train.train`; with ``build_output_dir=None`` it trains on ``settings.data.source``
as is (a taxonomy table, a release CSV, ...). When
``settings.eval`` names benchmark inputs (test CSV and images; a HyperLex file; a WordNet folder;
a taxonomy table and its images, read with the run's ``taxonomy.*`` settings),
it runs the evaluation suite (:func:`finetune.evaluation.suite.evaluate_checkpoint`) on the model
before and after training, into ``<run>/eval/before/`` and ``<run>/eval/after/`` (metrics.json and
plots), and writes the before/after table ``<run>/eval/comparison.md``.
Each part is a task; the library functions it calls work without Prefect.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, get_run_logger, task

from finetune.config import FinetuneSettings, SettingsError
from hierarcaps.settings import apply_override


@task(name="evaluate")
def evaluate_task(backend_kind: str, model: str, settings: FinetuneSettings, out_dir: Path) -> dict[str, Any]:
    """Every benchmark configured in ``settings.eval`` for ``model``; metrics and plots go to ``out_dir``."""
    from finetune.backends import load_backend
    from finetune.evaluation.common import default_workers
    from finetune.evaluation.suite import SuiteSettings, evaluate_checkpoint

    backend = load_backend(backend_kind, model, device=_device(settings))
    e = settings.eval
    t = settings.taxonomy
    # Before and after share the cache: after text-only training (RE) no test image is embedded again.
    suite = SuiteSettings(
        test_source=e.test_source, images_dir=e.images_dir, variant=e.variant, hyperlex=e.hyperlex,
        wordnet_dir=e.wordnet_dir, text_batch_size=e.batch_size, workers=default_workers(),
        image_cache=e.image_cache or str(Path(out_dir).parent / "image-cache"),
        taxonomy_table=e.taxonomy_table, taxonomy_images=e.taxonomy_images, taxonomy_ranks=tuple(t.ranks),
        taxonomy_image_column=t.image_column, taxonomy_common_name_column=t.common_name_column,
        taxonomy_style=t.style, taxonomy_template=t.template, taxonomy_root_text=t.root_text,
    )
    return evaluate_checkpoint(backend, out_dir, suite, model=model)


@task(name="train")
def train_task(settings: FinetuneSettings) -> dict[str, Any]:
    """Run :func:`finetune.train.train`; returns the result's paths and step count."""
    from finetune.train import train

    result = train(settings)
    return {"final_dir": str(result.final_dir), "steps": result.steps, "output_dir": str(result.output_dir)}


@task(name="compare")
def compare_task(eval_dir: Path) -> Path:
    """The before/after markdown table, ``eval_dir/comparison.md``."""
    from finetune.evaluation.suite import compare_checkpoints

    return compare_checkpoints(
        [("before", eval_dir / "before" / "metrics.json"), ("after", eval_dir / "after" / "metrics.json")],
        eval_dir / "comparison.md",
    )


def _device(settings: FinetuneSettings) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not settings.run.cpu else "cpu"


def build_dataset_dir(build_output_dir: Path) -> Path:
    """The ``DatasetDict`` folder of a finished build: ``OUT/final/dataset`` (``OUT`` = ``--output-dir``).

    The build's ``final`` folder is accepted as well. A build without the ``_SUCCESS`` marker of
    its final stage is unfinished (or failed) and is refused (:func:`finetune.data.build_dataset_dir`).
    """
    from finetune.data import TrainDataError, build_dataset_dir as find_dataset

    try:
        return find_dataset(build_output_dir)
    except TrainDataError as err:
        raise SettingsError(str(err)) from None


def _with_dataset(build_output_dir: Path, settings: FinetuneSettings) -> FinetuneSettings:
    dataset = build_dataset_dir(build_output_dir)
    return dataclasses.replace(settings, data=dataclasses.replace(settings.data, source=str(dataset)))


@flow(name="finetune", validate_parameters=False)
def finetune_flow(
    build_output_dir: str | Path | None,
    settings: FinetuneSettings | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train on a build's dataset (or ``settings.data.source`` when ``build_output_dir`` is None);
    evaluate before and after when benchmark inputs are set.

    ``overrides`` are ``a.b=c`` texts applied on top of ``settings`` (default settings if None).
    Returns ``{"train": {...}, "before": metrics | None, "after": metrics | None}``.
    """
    logger = get_run_logger()
    settings = settings or FinetuneSettings()
    for text in overrides:
        settings = apply_override(settings, text)
    if build_output_dir is not None:
        settings = _with_dataset(Path(build_output_dir), settings)
    from finetune.data import plumbing_check_warning

    warning = plumbing_check_warning(settings.data.source)
    if warning:
        logger.warning(warning)
    eval_dir = Path(settings.run.output_dir) / "eval"
    e = settings.eval
    evaluate = bool((e.test_source and e.images_dir) or e.hyperlex or e.wordnet_dir or (e.taxonomy_table and e.taxonomy_images))
    before = after = None
    if evaluate:
        before = evaluate_task(settings.model.backend, settings.model.name_or_path, settings, eval_dir / "before")
        logger.info("before training: %s", before.get("hierarcaps", before))
    trained = train_task(settings)
    if evaluate:
        after = evaluate_task(settings.model.backend, trained["final_dir"], settings, eval_dir / "after")
        logger.info("after training: %s", after.get("hierarcaps", after))
        compare_task(eval_dir)
    return {"train": trained, "before": before, "after": after}
