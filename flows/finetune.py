"""Prefect flow ``finetune``: from a ``build-hierarcaps`` output folder to an aligned model.

``finetune_flow(build_output_dir, settings)`` trains on ``<build_output_dir>/final/dataset``
(the ``DatasetDict`` a finished build saves there; the ``final`` folder itself is accepted too) with :func:`finetune.train.train`. When
``settings.eval.test_source`` and ``settings.eval.images_dir`` are set, it runs HierarCaps
hierarchical retrieval (:func:`finetune.evaluation.retrieval.evaluate_retrieval`) on the model
before and after training and writes ``eval_before.json`` / ``eval_after.json`` beside the run.
Each part is a task; the library functions it calls work without Prefect.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, get_run_logger, task

from finetune.config import FinetuneSettings, SettingsError
from hierarcaps.pipeline import FINAL
from hierarcaps.settings import apply_override
from hierarcaps.stagedir import SUCCESS


@task(name="evaluate-retrieval")
def evaluate_task(backend_kind: str, model: str, settings: FinetuneSettings, out_path: Path) -> dict[str, Any]:
    """Retrieval metrics of ``model`` on the configured test set, written to ``out_path``."""
    from finetune.backends import load_backend
    from finetune.evaluation.common import write_json
    from finetune.evaluation.retrieval import evaluate_retrieval

    backend = load_backend(backend_kind, model, device=_device(settings))
    metrics = evaluate_retrieval(
        backend, settings.eval.test_source, settings.eval.images_dir, model=model,
        text_batch_size=settings.eval.batch_size,
    )
    write_json(out_path, metrics)
    return metrics


@task(name="train")
def train_task(settings: FinetuneSettings) -> dict[str, Any]:
    """Run :func:`finetune.train.train`; returns the result's paths and step count."""
    from finetune.train import train

    result = train(settings)
    return {"final_dir": str(result.final_dir), "steps": result.steps, "output_dir": str(result.output_dir)}


def _device(settings: FinetuneSettings) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not settings.run.cpu else "cpu"


def build_dataset_dir(build_output_dir: Path) -> Path:
    """The ``DatasetDict`` folder of a finished build: ``OUT/final/dataset`` (``OUT`` = ``--output-dir``).

    The build's ``final`` folder is accepted as well. A build without the ``_SUCCESS`` marker of
    its final stage is unfinished (or failed) and is refused.
    """
    for final in (build_output_dir / FINAL, build_output_dir):
        if (final / "dataset").is_dir():
            if not (final / SUCCESS).is_file():
                raise SettingsError(
                    f"{final}: the build is unfinished (no {SUCCESS}); rerun the same build-hierarcaps command first"
                )
            return final / "dataset"
    raise SettingsError(
        f"{build_output_dir}: no {FINAL}/dataset folder; give the --output-dir of a finished build-hierarcaps run"
    )


def _with_dataset(build_output_dir: Path, settings: FinetuneSettings) -> FinetuneSettings:
    dataset = build_dataset_dir(build_output_dir)
    return dataclasses.replace(settings, data=dataclasses.replace(settings.data, source=str(dataset)))


@flow(name="finetune", validate_parameters=False)
def finetune_flow(
    build_output_dir: str | Path,
    settings: FinetuneSettings | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train on a build's dataset; evaluate before and after when a test set and images are set.

    ``overrides`` are ``a.b=c`` texts applied on top of ``settings`` (default settings if None).
    Returns ``{"train": {...}, "before": metrics | None, "after": metrics | None}``.
    """
    logger = get_run_logger()
    settings = settings or FinetuneSettings()
    for text in overrides:
        settings = apply_override(settings, text)
    settings = _with_dataset(Path(build_output_dir), settings)
    out = Path(settings.run.output_dir)
    evaluate = bool(settings.eval.test_source and settings.eval.images_dir)
    before = after = None
    if evaluate:
        before = evaluate_task(settings.model.backend, settings.model.name_or_path, settings, out / "eval_before.json")
        logger.info("before training: %s", {k: before.get(k) for k in ("precision", "recall", "tau_d")})
    trained = train_task(settings)
    if evaluate:
        after = evaluate_task(settings.model.backend, trained["final_dir"], settings, out / "eval_after.json")
        logger.info("after training: %s", {k: after.get(k) for k in ("precision", "recall", "tau_d")})
    return {"train": trained, "before": before, "after": after}
