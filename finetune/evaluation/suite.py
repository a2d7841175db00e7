"""One call that evaluates a checkpoint on every benchmark it has data for, and writes the reports.

The fine-tuning flow calls :func:`evaluate_checkpoint` on the starting model and on the trained
one, then :func:`compare_checkpoints` on the two metrics files, which gives the before/after table
of the paper's Table 1 (HierarCaps P/R/tau_d, HyperLex rho, text-to-image R@k, zero-shot accuracy,
taxonomy metrics), plus the radius and tau_d plots of each checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune.evaluation.common import Encoder, package_versions, write_atomic, write_json


@dataclass(frozen=True)
class SuiteSettings:
    """What to evaluate; a benchmark whose inputs are empty is skipped."""

    test_source: str = ""  # HierarCaps curated test CSV or dataset folder (retrieval + retention)
    images_dir: str = ""
    variant: str = "released"
    steps: int = 50
    hyperlex: str = ""
    zeroshot_labels: str = ""
    zeroshot_images: str = ""
    taxonomy_table: str = ""
    taxonomy_images: str = ""
    taxonomy_ranks: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
    taxonomy_image_column: str = "filepath"
    taxonomy_common_name_column: str = "common_name"
    taxonomy_style: str = "taxonomic"
    taxonomy_template: str = "{}"
    taxonomy_root_text: str = ""
    wordnet_dir: str = ""  # a WordNet 3.0 dict folder, e.g. /usr/share/wordnet
    wordnet_chains: int = 500
    draft_size: int | None = None
    text_batch_size: int | None = None  # None: 256 on a GPU, 64 on the CPU
    image_batch_size: int = 64
    workers: int = 0  # image-decoding worker processes
    image_cache: str = ""  # image-embedding cache folder ("" = no cache); see finetune.evaluation.image_cache


def evaluate_checkpoint(encoder: Encoder, out_dir: Path | str, settings: SuiteSettings, model: str | None = None) -> dict[str, Any]:
    """Run every configured benchmark; write ``metrics.json`` and the plots into ``out_dir``.

    Returns the metrics dict: one entry per benchmark (``hierarcaps``, ``retention``, ``hyperlex``,
    ``zeroshot``, ``taxonomy``, ``wordnet``) plus the settings, model and package versions.
    """
    from finetune.evaluation.lexical import evaluate_lexical
    from finetune.evaluation.report import plot_radius_by_tier, plot_tau_histogram
    from finetune.evaluation.retention import read_labels, text_to_image_retrieval, zero_shot_classification
    from finetune.evaluation.retrieval import run_metrics, run_retrieval
    from finetune.evaluation.taxonomy import evaluate_taxonomy
    from finetune.evaluation.wordnet import evaluate_wordnet

    out_dir = Path(out_dir)
    s = settings
    start = time.perf_counter()
    result: dict[str, Any] = {"model": model, "backend": getattr(encoder, "kind", None), "settings": asdict(s)}
    if s.test_source:
        from finetune.evaluation.image_cache import ImageEmbeddingCache

        cache = ImageEmbeddingCache(s.image_cache) if s.image_cache else None
        run = run_retrieval(encoder, s.test_source, s.images_dir, s.variant, s.steps,  # type: ignore[arg-type]
                            s.text_batch_size, s.image_batch_size, s.draft_size, s.workers, cache)
        result["hierarcaps"] = {k: v for k, v in run_metrics(run, model).items() if k != "versions"}
        label = model or "model"
        plot_radius_by_tier([(label, run)], out_dir / "radius_by_tier.png")
        plot_tau_histogram([(label, run)], out_dir / "tau_d_histogram.png")
        result["retention"] = _strip(text_to_image_retrieval(encoder, s.test_source, s.images_dir, model=model,
                                                             draft_size=s.draft_size, workers=s.workers, image_cache=cache))
    if s.hyperlex:
        result["hyperlex"] = _strip(evaluate_lexical(encoder, s.hyperlex, model=model))
    if s.zeroshot_labels and s.zeroshot_images:
        result["zeroshot"] = _strip(zero_shot_classification(encoder, read_labels(s.zeroshot_labels), s.zeroshot_images, model=model))
    if s.taxonomy_table and s.taxonomy_images:
        result["taxonomy"] = _strip(evaluate_taxonomy(
            encoder, s.taxonomy_table, s.taxonomy_images, s.taxonomy_style, s.taxonomy_template,  # type: ignore[arg-type]
            s.taxonomy_root_text, model, s.draft_size, s.taxonomy_ranks, s.taxonomy_image_column,
            s.taxonomy_common_name_column,
        ))
    if s.wordnet_dir:
        result["wordnet"] = _strip(evaluate_wordnet(encoder, s.wordnet_dir, s.wordnet_chains, model=model,
                                                    batch_size=s.text_batch_size))
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["versions"] = package_versions()
    write_json(out_dir / "metrics.json", result)
    return result


def _strip(metrics: dict[str, Any]) -> dict[str, Any]:
    """A benchmark's metrics without the per-benchmark copy of the package versions."""
    return {k: v for k, v in metrics.items() if k != "versions"}


def checkpoint_name(path: Path) -> str:
    """Column name for a metrics file: its folder's name for ``.../<name>/metrics.json``, else its stem."""
    return path.parent.name if path.name == "metrics.json" and path.parent.name else path.stem


def compare_checkpoints(metrics_files: Sequence[Path | str | tuple[str, Path | str]], out_path: Path | str) -> Path:
    """Write the markdown comparison of several metrics JSONs (``name=path`` pairs or paths)."""
    import json

    from finetune.evaluation.report import comparison_table

    named = []
    for item in metrics_files:
        name, path = item if isinstance(item, tuple) else (checkpoint_name(Path(item)), item)
        path = Path(path)
        try:
            named.append((name, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read a metrics JSON ({err})") from None
    return write_atomic(Path(out_path), comparison_table(named))
