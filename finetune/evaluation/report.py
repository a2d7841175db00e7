"""Reports: the qualitative HTML page, plots, and a markdown table comparing checkpoints.

**Qualitative retrieval** (HierarCaps paper section 6.1, the released ``qual.py``): hierarchical
retrieval for each test image over an *expanded* candidate set (the distinct positive texts of
``hierarcaps_test_expanded.csv.gz``), global thresholds ``linspace(min R, max R, steps)`` over the
candidates' radii ``|e - r|``. (The released qualitative script measures genericness as
``1 - cos(e, r)``; both order texts the same way, only the spacing of thresholds differs.)
The page opens with a table of each model's P, R, F1 and tau_d (retrieval on the whole test set),
then the plots, then every image beside its ground-truth chain and the chain each model predicts,
with the predicted texts that are in the ground truth highlighted, so a fine-tuned model sits
next to its starting point.

**Plots**: the distribution of radii per tier (well-aligned models push T1 nearest the root and T4
farthest), and the histogram of per-row tau_d.

**Comparison**: :func:`comparison_table` turns several metrics JSONs (one per checkpoint) into a
markdown table, one row per metric, one column per checkpoint, plus the change from the first.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune.evaluation.common import Encoder, encode_image_files, encode_texts, text_root, write_atomic
from finetune.evaluation.image_cache import ImageEmbeddingCache
from hierarcaps.image_folder import ImageLocation, open_image, resolve_image_refs
from finetune.evaluation.retrieval import (
    RetrievalRun,
    global_thresholds,
    index_test_set,
    load_test_set,
    predicted_chains,
    read_test_csv,
    threshold_predictions,
)
from finetune.geometry import radius

# Images per block when scoring a large candidate set (bounds the similarity matrix's memory).
QUALITATIVE_BLOCK = 128
THUMBNAIL_PX = 224


@dataclass(frozen=True)
class QualitativeSet:
    """Images to show, their ground-truth chains, and the candidate texts to retrieve from."""

    image_paths: list[ImageLocation]  # image files, or members of fetch-images tar shards
    ground_truth: list[list[tuple[str, ...]]]  # per image: every reference chain
    candidates: list[str]
    image_refs: list[str] = field(default_factory=list)  # per image: its reference (names a tar member)


def qualitative_set(
    test_rows: Any, images_dir: Path | str, candidates_csv: Path | str | None = None, max_images: int | None = None
) -> QualitativeSet:
    """The first ``max_images`` unique test images with their chains; candidates are the distinct
    positives of ``candidates_csv`` (the expanded file) or, without it, of the test set itself."""
    test = load_test_set(test_rows)
    cand = index_test_set(test)
    n = len(cand.images) if max_images is None else min(max_images, len(cand.images))
    paths = resolve_image_refs(cand.images[:n], images_dir)
    truth = [[test.chains[r] for r in np.nonzero(cand.row_image == i)[0]] for i in range(n)]
    source = read_test_csv(Path(candidates_csv)) if candidates_csv is not None else test
    texts = list(dict.fromkeys(t for chain in source.chains for t in chain))
    return QualitativeSet(paths, truth, texts, cand.images[:n])


def qualitative_chains(
    encoder: Encoder,
    qset: QualitativeSet,
    steps: int = 50,
    draft_size: int | None = None,
    workers: int = 0,
    image_cache: ImageEmbeddingCache | None = None,
) -> list[list[str]]:
    """Each image's predicted chain (general to specific) over the candidate texts."""
    with torch.no_grad():
        root = text_root(encoder)
        text_emb = encode_texts(encoder, qset.candidates)
        image_emb = encode_image_files(encoder, qset.image_paths, draft_size=draft_size, workers=workers,
                                       cache=image_cache, model=getattr(encoder, "name", None))
    radii = radius(text_emb, root)
    thresholds = global_thresholds(radii, steps)
    chains: list[list[str]] = []
    for start in range(0, len(image_emb), QUALITATIVE_BLOCK):
        sim = image_emb[start : start + QUALITATIVE_BLOCK] @ text_emb.T
        chains += predicted_chains(threshold_predictions(sim, radii, thresholds).numpy(), qset.candidates)
    return chains


def _thumbnail_src(location: ImageLocation, html_dir: Path, embed: bool) -> str:
    """An <img> src: a relative path from the page, or an embedded JPEG thumbnail (always for an
    image inside a tar shard, which a page cannot link to)."""
    if not embed and isinstance(location, Path):
        return Path(os.path.relpath(location.resolve(), html_dir.resolve())).as_posix()
    img = open_image(location)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_name(location: ImageLocation, ref: str) -> str:
    """The name shown under a thumbnail: the file's name, or the reference's base name for a tar member."""
    return location.name if isinstance(location, Path) else ref.rstrip("/").rsplit("/", 1)[-1]


def _chain_html(chain: Sequence[str], truth: set[str] | None = None) -> str:
    """An ordered list; predictions found in the ground truth get ``class="hit"`` (highlighted)."""
    items = []
    for t in chain:
        attr = ' class="hit" title="in the ground truth"' if truth is not None and t in truth else ""
        items.append(f"<li{attr}>{html.escape(t)}</li>")
    return "<ol>" + "".join(items) + "</ol>"


METRIC_COLUMNS = (("precision", "P"), ("recall", "R"), ("f1", "F1"), ("tau_d", "τ_d"))


def _metrics_table(metrics: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One row per model: P, R, F1 and tau_d of HierarCaps retrieval (``-`` where absent)."""
    head = "".join(f"<th>{name}</th>" for _, name in METRIC_COLUMNS)
    rows = []
    for label, m in metrics:
        cells = "".join(
            f"<td>{m[key]:.4f}</td>" if isinstance(m.get(key), (int, float)) else "<td>-</td>" for key, _ in METRIC_COLUMNS
        )
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return f'<table class="metrics"><thead><tr><th>model</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:6px;vertical-align:top;max-width:28em}"
    "table.metrics td{text-align:right;font-variant-numeric:tabular-nums}"
    "img.thumb{max-width:224px}figure{display:inline-block;margin:1em}"
    ".hit{background:#c8efc8;color:#0a5c0a;font-weight:bold}li.hit::after{content:' \\2713'}"
)


def render_html(
    out_path: Path | str,
    qset: QualitativeSet,
    predictions: Sequence[tuple[str, Sequence[Sequence[str]]]],
    title: str = "HierarCaps qualitative retrieval",
    plots: Sequence[Path] = (),
    notes: Sequence[str] = (),
    embed_images: bool = False,
    metrics: Sequence[tuple[str, dict[str, Any]]] = (),
) -> Path:
    """Write the qualitative page, top to bottom: the metrics table (P, R, F1, tau_d per model),
    the plots, then one table row per image (thumbnail and file name, ground truth, one column per
    model, with the predicted texts that are in the ground truth highlighted). Text is escaped;
    the file is written atomically."""
    out_path = Path(out_path)
    html_dir = out_path.parent
    html_dir.mkdir(parents=True, exist_ok=True)
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in predictions)
    rows = []
    for i, location in enumerate(qset.image_paths):
        truth = {t for chain in qset.ground_truth[i] for t in chain}
        gt = "".join(_chain_html(chain) for chain in qset.ground_truth[i])
        cells = "".join(f"<td>{_chain_html(chains[i], truth)}</td>" for _, chains in predictions)
        src = html.escape(_thumbnail_src(location, html_dir, embed_images), quote=True)
        name = html.escape(_image_name(location, qset.image_refs[i] if qset.image_refs else ""))
        rows.append(
            f'<tr id="img-{i}"><td><img class="thumb" src="{src}" alt="{name}"><br><code>{name}</code></td>'
            f"<td>{gt}</td>{cells}</tr>"
        )
    figures = "".join(
        f'<figure><img src="{html.escape(Path(os.path.relpath(p.resolve(), html_dir.resolve())).as_posix(), quote=True)}"'
        f' alt="{html.escape(p.stem)}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in plots
    )
    notes_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    sections = []
    if metrics:
        sections.append(f'<section id="metrics"><h2>Metrics</h2>{_metrics_table(metrics)}</section>')
    if figures:
        sections.append(f'<section id="plots"><h2>Plots</h2>{figures}</section>')
    sections.append(
        '<section id="rows"><h2>Retrieved chains</h2><p>Predicted texts found in the image\'s ground truth are '
        '<span class="hit">highlighted</span>.</p>'
        f"<table><thead><tr><th>image</th><th>ground truth</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )
    page = (
        f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{notes_html}{''.join(sections)}</body></html>\n"
    )
    return write_atomic(out_path, page)


def _save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG through a temporary file, then close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_radius_by_tier(runs: Sequence[tuple[str, RetrievalRun]], path: Path | str) -> Path:
    """Histograms of the radius |e - r| of tiers T1..T4 over the test rows, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False, sharex=True)
    for ax, (label, run) in zip(axes[0], runs):
        per_tier = run.text_radii[run.candidates.chain_ids]  # (n_rows, 4)
        for k in range(per_tier.shape[1]):
            ax.hist(per_tier[:, k], bins=40, alpha=0.5, label=f"T{k + 1}")
        ax.set_title(label)
        ax.set_xlabel("radius |e - r|")
        ax.legend()
    return _save_figure(fig, Path(path))


def plot_tau_histogram(runs: Sequence[tuple[str, RetrievalRun]], path: Path | str) -> Path:
    """Histogram of the per-row Kendall tau_d, one bar series per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(-1, 1, 14)
    ax.hist([run.tau[~np.isnan(run.tau)] for _, run in runs], bins=bins, label=[label for label, _ in runs])
    ax.set_xlabel("tau_d per row")
    ax.set_ylabel("rows")
    ax.legend()
    return _save_figure(fig, Path(path))


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict, with dotted keys (counts, timings, versions left out)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key in ("versions", "seconds", "steps") or key.startswith("n_"):
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def comparison_table(named_metrics: Sequence[tuple[str, dict[str, Any]]], digits: int = 4) -> str:
    """Markdown table: one row per metric, one column per checkpoint, plus the change from the
    first checkpoint when there are several. Metrics absent from a checkpoint show as ``-``."""
    if not named_metrics:
        raise ValueError("nothing to compare: give at least one metrics JSON")
    flats = [(name, _flatten(m)) for name, m in named_metrics]
    keys = list(dict.fromkeys(k for _, f in flats for k in f))
    delta = len(flats) > 1
    header = ["metric", *[n for n, _ in flats]] + ([f"Δ ({flats[-1][0]} - {flats[0][0]})"] if delta else [])
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        values = [f.get(key) for _, f in flats]
        cells = [key] + ["-" if v is None or np.isnan(v) else f"{v:.{digits}f}" for v in values]
        if delta:
            first, last = values[0], values[-1]
            cells.append("-" if first is None or last is None else f"{last - first:+.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def qualitative_report(
    encoders: Sequence[tuple[str, Encoder]],
    test_rows: Any,
    images_dir: Path | str,
    out_dir: Path | str,
    candidates_csv: Path | str | None = None,
    max_images: int | None = 100,
    steps: int = 50,
    variant: str = "released",
    draft_size: int | None = None,
    embed_images: bool = False,
    workers: int = 0,
    image_cache: ImageEmbeddingCache | None = None,
) -> dict[str, Path]:
    """The full report for one or more models (e.g. before and after fine-tuning).

    Writes into ``out_dir``: ``index.html`` (qualitative chains over the candidate set, side by
    side), ``radius_by_tier.png``, ``tau_d_histogram.png`` (from retrieval on the whole test set),
    ``metrics_<i>.json`` per model and ``comparison.md``. Returns the written paths by name.
    """
    from finetune.evaluation.common import write_json
    from finetune.evaluation.retrieval import run_metrics, run_retrieval

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    qset = qualitative_set(test_rows, images_dir, candidates_csv, max_images)
    predictions, runs, written = [], [], {}
    for i, (label, encoder) in enumerate(encoders):
        predictions.append((label, qualitative_chains(encoder, qset, steps, draft_size, workers, image_cache)))
        run = run_retrieval(encoder, test_rows, images_dir, variant, steps, draft_size=draft_size,  # type: ignore[arg-type]
                            workers=workers, image_cache=image_cache)
        runs.append((label, run))
        written[f"metrics_{i}"] = write_json(out_dir / f"metrics_{i}.json", run_metrics(run, model=label))
    written["radius_by_tier"] = plot_radius_by_tier(runs, out_dir / "radius_by_tier.png")
    written["tau_d_histogram"] = plot_tau_histogram(runs, out_dir / "tau_d_histogram.png")
    named_metrics = [(label, run_metrics(run)) for label, run in runs]
    table = comparison_table(named_metrics)
    written["comparison"] = write_atomic(out_dir / "comparison.md", table)
    source = str(candidates_csv) if candidates_csv is not None else "the test set's own texts"
    notes = [
        f"Candidates: {len(qset.candidates)} distinct texts from {source}; {steps} global radius thresholds.",
        f"Plots and metrics: {variant} retrieval on all {len(runs[0][1].test)} test rows.",
    ]
    written["html"] = render_html(
        out_dir / "index.html", qset, predictions, plots=[written["radius_by_tier"], written["tau_d_histogram"]],
        notes=notes, embed_images=embed_images, metrics=named_metrics,
    )
    return written
