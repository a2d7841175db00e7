"""The dataset card (``README.md`` with YAML metadata) of a built HierarCaps dataset.

The card is what a reader of the Hub page sees first, so it says: what the data is, its
license, task categories, source datasets and sizes (YAML metadata the Hub indexes), how it was
built (the stages and their counts), which models (with revisions), sampling settings (library,
temperature, top-k, top-p per generating stage) and settings were used, and how to cite the
HierarCaps paper. A build made with the smoke profile says at the top, in bold,
that it is a plumbing check and not usable data.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import yaml

from hierarcaps.stats import THROUGHPUT_COLUMNS, throughput_columns

CITATION = """@inproceedings{alper2024emergent,
  title     = {Emergent Visual-Semantic Hierarchies in Image-Text Representations},
  author    = {Alper, Morris and Averbuch-Elor, Hadar},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}"""

PLUMBING_WARNING = (
    "**PLUMBING CHECK, NOT USABLE DATA.** This dataset was built with the `smoke` profile: tiny "
    "random models created locally and NLI decisions replaced by a length rule, only to prove "
    "that every stage of the build runs. Its hierarchies are meaningless. Do not train or evaluate on it."
)

#: Caption source format -> Hugging Face ``source_datasets`` value.
SOURCE_DATASETS = {"cc_tsv": "extended|conceptual_captions", "coco_json": "extended|coco"}


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` items."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    for bound, label in bounds:
        if n < bound:
            return label
    return "1M<n<10M"


def card_metadata(settings: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, Any]:
    """The YAML front matter: license, tasks, sources, sizes, data files per split."""
    captions = settings["captions"]
    sources = sorted(
        {SOURCE_DATASETS.get(captions[split]["format"], "original") for split in ("train", "test")}
    )
    tags = ["hierarchy", "entailment", "hierarcaps", "synthetic", "image-text"]
    if settings.get("plumbing_check"):
        tags.append("plumbing-check-not-usable")
    return {
        "license": settings["output"]["license"],
        "language": ["en"],
        "pretty_name": settings["output"]["pretty_name"],
        "task_categories": ["image-to-text", "text-to-image", "zero-shot-classification"],
        "source_datasets": sources,
        "size_categories": [size_category(sum(counts.values()))],
        "tags": tags,
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*"} for split in counts],
            }
        ],
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_card(
    *,
    settings: Mapping[str, Any],
    counts: Mapping[str, int],
    models: Mapping[str, Mapping[str, Any]],
    stages: Sequence[Mapping[str, Any]],
    sampling: Mapping[str, Mapping[str, Any]] | None = None,
    reviews: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The full ``README.md`` text.

    Args:
        settings: the resolved settings tree (:func:`hierarcaps.settings.to_dict`).
        counts: items per split of the final dataset, e.g. ``{"train": 73000, "test": 1000}``.
        models: per role (chat_lm, base_lm, nli, completer) what was loaded (id, revision, ...).
        stages: per stage ``{"stage", "dir", "items_in", "kept", "rejected", "seconds", "extra"}``
            (:func:`hierarcaps.pipeline.stage_summaries`); throughput comes from ``extra``.
        sampling: per generating stage ``{"role", "backend", "temperature", "top_k", "top_p"}``.
        reviews: per split, the statistics of a human review
            (:func:`hierarcaps.review.export.review_statistics`), shown under "Human review".
    """
    front = yaml.safe_dump(card_metadata(settings, counts), sort_keys=False, allow_unicode=True)
    parts = [f"---\n{front}---", f"# {settings['output']['pretty_name']}"]
    if settings.get("plumbing_check"):
        parts.append(PLUMBING_WARNING)
    parts.append(
        "Images paired with four-tier caption hierarchies T1 (most general) → T4 (the original "
        "caption), each tier entailed by every later one and not entailing it; train items also "
        "carry a contradicting negative hierarchy N1..N4. Built with "
        "the hierarcaps toolkit following the recipe of the HierarCaps paper "
        "(Alper and Averbuch-Elor, ECCV 2024, supplementary B.1). Images are not included: "
        "`image_ref` holds the source's URL or id."
    )
    parts.append("## Splits\n\n" + _table(["split", "items"], [[k, v] for k, v in counts.items()]))
    parts.append(
        "## Fields\n\n"
        + _table(
            ["field", "meaning"],
            [
                ["id", "item id"],
                ["positive", "tiers T1..T4, general to specific (T4 = caption)"],
                ["negative", "tiers N1..N4 (train); N_i contradicts T_i, N_i entails T_(i-1); [] in test"],
                ["caption", "the source caption"],
                ["image_ref", "image URL or id in the source dataset"],
                ["source", "source dataset"],
                ["provenance", "JSON: models, attempts and NLI probabilities behind the item"],
            ],
        )
    )
    stage_rows = [
        [s["stage"], s.get("items_in", ""), s.get("kept", ""), _rejections(s.get("rejected", {})), s.get("seconds", "")]
        for s in stages
    ]
    parts.append(
        "## How it was built\n\n"
        "Captions → seed hierarchies (chat LLM, NLI filter) → few-shot augmentation (base LLM) → "
        "completer distillation → positive completion (train and test captions) → negative "
        "hallucination (train) → assembly and validation.\n\n"
        + _table(["stage", "in", "kept", "rejected (reason: n)", "seconds"], stage_rows)
    )
    parts.append(
        "## Throughput\n\nWork and speed per stage (seconds: time in the stage body, summed over "
        "shards; rates are per worker).\n\n"
        + _table(["stage", *THROUGHPUT_COLUMNS.values(), "seconds"],
                 [[s["stage"], *throughput_columns(s).values(), s.get("seconds", "")] for s in stages])
    )
    model_rows = [
        [role, m.get("id", m.get("name_or_path", "")), m.get("revision") or "", m.get("quantization") or ""]
        for role, m in models.items()
    ]
    parts.append("## Models\n\n" + _table(["role", "model", "revision", "quantization"], model_rows))
    if sampling:
        parts.append(sampling_section(sampling))
    parts.append(
        "## Settings\n\nThe resolved settings of the build (also in `manifest.json`):\n\n```json\n"
        + json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False)
        + "\n```"
    )
    if reviews:
        parts.append(review_section(reviews))
    parts.append(
        "## Limitations\n\nHierarchies are produced by language models and filtered by an NLI "
        "model; the paper's authors found about 75% of automatically built items fully valid. "
        "Captions inherit the biases of their source datasets."
    )
    parts.append(f"## Citation\n\n```bibtex\n{CITATION}\n```")
    return "\n\n".join(parts) + "\n"


def sampling_section(sampling: Mapping[str, Mapping[str, Any]]) -> str:
    """The card's table of how each generating stage sampled (``none``: that filter was off)."""
    rows = [
        [stage, s["role"], s["backend"], s["temperature"], _or_none(s.get("top_k")), _or_none(s.get("top_p"))]
        for stage, s in sampling.items()
    ]
    plain = all(s.get("top_k") is None and s.get("top_p") is None for s in sampling.values())
    note = ("Every stage used plain temperature sampling, as the paper describes." if plain else
            "Stages with a top-k or top-p filter differ from the paper's plain temperature sampling.")
    return "## Sampling\n\n" + _table(["stage", "model", "library", "temperature", "top_k", "top_p"], rows) + f"\n\n{note}"


def _or_none(value: Any) -> str:
    return "none" if value is None else str(value)


def _percent_ci(entry: Mapping[str, Any]) -> str:
    if not entry["n"]:
        return "-"
    low, high = entry["ci95"]
    return f"{100 * entry['fraction']:.1f}% ({100 * low:.1f}–{100 * high:.1f}%)"


def review_section(reviews: Mapping[str, Mapping[str, Any]]) -> str:
    """The "Human review" section: per reviewed split, the fully valid and per-tier valid fractions."""
    lines = ["## Human review\n"]
    for split, stats in reviews.items():
        d = stats["decisions"]
        lines.append(
            f"**{split}:** a reviewer judged {stats['reviewed']} of {stats['items']} sampled items tier by tier "
            f"(accepted {d['accept']}, fixed {d['fix']}, rejected {d['reject']}). "
            f"**Fully valid: {_percent_ci(stats['fully_valid'])}** of reviewed items "
            f"(all four tiers valid as built; 95% Wilson score intervals in parentheses).\n"
        )
        rows = [[tier, entry["valid"], entry["n"], _percent_ci(entry)] for tier, entry in stats["tiers"].items()]
        rows.append(["all four", stats["fully_valid"]["valid"], stats["fully_valid"]["n"], _percent_ci(stats["fully_valid"])])
        lines.append(_table(["tier", "valid", "judged", "valid fraction (95% CI)"], rows) + "\n")
    lines.append(
        "Verdicts per tier: valid, wrong tier (true but at the wrong level of generality), not entailed, "
        "and for train items contradiction fails (the negative does not contradict). The curated split "
        "made from the review (`hierarcaps review export`) applies the reviewer's fixes and drops rejected items."
    )
    return "\n".join(lines)


def _rejections(rejected: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "-"
