"""``hierarcaps-eval``: evaluate CLIP-style checkpoints on hierarchy and retention benchmarks.

Subcommands (each writes a JSON file, or a report folder, atomically):

* ``retrieval``  HierarCaps hierarchical retrieval (precision, recall, tau_d);
* ``report``     qualitative HTML page + plots + comparison for one or more models;
* ``lexical``    HyperLex Spearman rho;
* ``wordnet``    WordNet hypernymy ordering (depth tau, hypernym-closer fraction, exterior-angle gap);
* ``retention``  text-to-image R@1/5/10 on the HierarCaps test images;
* ``zeroshot``   zero-shot classification from a label list and a labelled image folder;
* ``taxonomy``   taxonomy metrics from a taxonomy table (the one training reads) and its images;
* ``suite``      everything configured, for one checkpoint (as the fine-tuning flow does);
* ``compare``    markdown table comparing metrics JSONs.

See docs/evaluation.md for the file formats and examples.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from finetune.evaluation.common import write_json


def _model_args(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    p.add_argument("--backend", required=True, choices=("hf-clip", "open-clip", "text"), help="model family")
    if multiple:
        p.add_argument("--model", required=True, action="append",
                       help="hub id, folder or open_clip name; repeat (e.g. before, after); LABEL=MODEL names it")
    else:
        p.add_argument("--model", required=True, help="hub id, save_pretrained folder, or open_clip name/folder")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the checkpoint's)")


def _test_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-csv", required=True, help="curated test CSV (id,captions,image_url) or a dataset folder")
    p.add_argument("--images", required=True, help="folder with the test images: image files, or a hierarcaps fetch-images folder")
    p.add_argument("--draft-size", type=int, default=None,
                   help="decode JPEGs at reduced scale (>= N px); faster, approximate; default full decode")
    _image_args(p)


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding worker processes (default: usable CPU cores, at most 8; 0: none)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--image-cache", default=None, metavar="DIR",
                       help="image-embedding cache folder, reused while the image tower is unchanged "
                            "(default: $HIERARCAPS_IMAGE_CACHE, else $XDG_CACHE_HOME/hierarcaps/image-embeddings)")
    cache.add_argument("--no-image-cache", action="store_true", help="embed every image afresh, store nothing")


def _image_options(args: argparse.Namespace) -> dict[str, Any]:
    """``workers`` and ``image_cache`` keyword arguments from the command line."""
    from finetune.evaluation.common import default_workers
    from finetune.evaluation.image_cache import ImageEmbeddingCache, default_cache_dir

    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    workers = default_workers() if args.workers is None else args.workers
    cache = None if args.no_image_cache else ImageEmbeddingCache(args.image_cache or default_cache_dir())
    return {"workers": workers, "image_cache": cache}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hierarcaps-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("retrieval", help="HierarCaps hierarchical retrieval metrics")
    _model_args(p, multiple=True)
    _test_args(p)
    p.add_argument("--variant", choices=("released", "paper"), default="released",
                   help="released evaluator (global thresholds; default) or the paper's text (per-image thresholds)")
    p.add_argument("--steps", type=int, default=50, help="number of radius thresholds")
    p.add_argument("--batch-size", type=int, default=None,
                   help="texts per model call (default: 256 on a GPU, 64 on the CPU, where big batches run slower)")
    p.add_argument("--image-batch-size", type=int, default=64, help="images per model call")
    p.add_argument("--output", required=True,
                   help="metrics JSON to write; with several --model, a folder: LABEL.json each, then comparison.md")

    p = sub.add_parser("report", help="qualitative HTML report, plots and comparison")
    _model_args(p, multiple=True)
    _test_args(p)
    p.add_argument("--candidates", default=None, help="expanded CSV whose positives are the candidate texts")
    p.add_argument("--max-images", type=int, default=100, help="images shown on the page")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--variant", choices=("released", "paper"), default="released")
    p.add_argument("--embed-images", action="store_true", help="embed thumbnails instead of linking the files")
    p.add_argument("--output-dir", required=True)

    p = sub.add_parser("lexical", help="HyperLex Spearman rho from exterior angles")
    _model_args(p)
    p.add_argument("--hyperlex", required=True, help="hyperlex-all.txt (WORD1 WORD2 POS ... AVG_SCORE)")
    p.add_argument("--prompt", default="a picture of a {}")
    p.add_argument("--output", required=True)

    p = sub.add_parser("wordnet", help="WordNet noun hypernymy ordering check")
    _model_args(p)
    p.add_argument("--wordnet-dir", default="/usr/share/wordnet",
                   help="folder with WordNet 3.0 data.noun and index.noun (Debian wordnet-base, or Princeton dict/)")
    p.add_argument("--n-chains", type=int, default=500, help="hypernym chains sampled")
    p.add_argument("--min-depth", type=int, default=5, help="least number of edges from entity.n.01 to a sampled synset")
    p.add_argument("--seed", type=int, default=0, help="seed of the chain sample and the shuffled pairs")
    p.add_argument("--include-instances", action="store_true", help="also sample instances (Paris, Einstein) as leaves")
    p.add_argument("--prompt", default="a picture of a {}")
    p.add_argument("--batch-size", type=int, default=None,
                   help="texts per model call (default: 256 on a GPU, 64 on the CPU, where big batches run slower)")
    p.add_argument("--output", required=True)

    p = sub.add_parser("retention", help="text-to-image R@1/5/10 on the HierarCaps test images")
    _model_args(p)
    _test_args(p)
    p.add_argument("--output", required=True)

    p = sub.add_parser("zeroshot", help="zero-shot classification of DIR/<label>/* images")
    _model_args(p)
    p.add_argument("--labels", required=True, help="text file, one class label per line")
    p.add_argument("--images", required=True, help="folder with one subfolder per label")
    p.add_argument("--templates", default=None, help="text file of prompt templates with {} (default: CLIP's CIFAR ensemble)")
    p.add_argument("--output", required=True)

    p = sub.add_parser("taxonomy", help="taxonomy ordering, per-rank, top-down and nLCA metrics")
    _model_args(p)
    p.add_argument("--table", required=True,
                   help="CSV or Parquet: a column per rank (default kingdom,phylum,cls,order,family,genus,species), filepath")
    p.add_argument("--images", required=True, help="folder the table's image column is relative to")
    p.add_argument("--ranks", default="kingdom,phylum,class,order,family,genus,species",
                   help="rank columns, general to specific, comma-separated ('class' also matches 'cls')")
    p.add_argument("--image-column", default="filepath", help="column of image paths relative to --images")
    p.add_argument("--common-name-column", default="common_name", help="column of common names (style taxonomic+common)")
    p.add_argument("--style", choices=("taxonomic", "name", "taxonomic+common"), default="taxonomic",
                   help="label text per taxon")
    p.add_argument("--template", default="{}", help="wrap each label, e.g. 'a photo of {}.'")
    p.add_argument("--root-text", default="", help="text whose embedding is the root ('' or 'Eukarya')")
    p.add_argument("--draft-size", type=int, default=None)
    p.add_argument("--output", required=True)

    p = sub.add_parser("suite", help="every configured benchmark for one checkpoint")
    _model_args(p)
    p.add_argument("--test-csv", default="")
    p.add_argument("--images", default="")
    p.add_argument("--hyperlex", default="")
    p.add_argument("--zeroshot-labels", default="")
    p.add_argument("--zeroshot-images", default="")
    p.add_argument("--taxonomy-table", default="")
    p.add_argument("--taxonomy-images", default="")
    p.add_argument("--taxonomy-ranks", default="kingdom,phylum,class,order,family,genus,species",
                   help="the taxonomy table's rank columns, general to specific")
    p.add_argument("--taxonomy-style", choices=("taxonomic", "name", "taxonomic+common"), default="taxonomic")
    p.add_argument("--taxonomy-template", default="{}", help="wrap each taxon label, e.g. 'a photo of {}.'")
    p.add_argument("--taxonomy-root-text", default="", help="the taxonomy root's text ('' or 'Eukarya')")
    p.add_argument("--wordnet-dir", default="", help="a WordNet 3.0 dict folder, e.g. /usr/share/wordnet")
    p.add_argument("--variant", choices=("released", "paper"), default="released")
    p.add_argument("--draft-size", type=int, default=None)
    _image_args(p)
    p.add_argument("--output-dir", required=True)

    p = sub.add_parser("compare", help="markdown table comparing metrics JSONs")
    p.add_argument("metrics", nargs="+", help="metrics JSON files, optionally NAME=PATH")
    p.add_argument("--output", required=True, help="markdown file to write")
    return parser


def _load(args: argparse.Namespace, model: str) -> Any:
    from finetune.backends import load_backend

    return load_backend(args.backend, model, device=args.device, dtype=args.dtype)


def _labelled(spec: str) -> tuple[str, str]:
    """``LABEL=MODEL`` or ``MODEL`` (labelled by itself)."""
    label, sep, model = spec.partition("=")
    return (label, model) if sep and label and not Path(spec).exists() else (spec, spec)


def _ranks(text: str) -> list[str]:
    """Rank names from a comma-separated list."""
    return [r.strip() for r in text.split(",") if r.strip()]


def _finish(obj: dict[str, Any], output: str) -> int:
    write_json(Path(output), obj)
    shown = {k: v for k, v in obj.items() if not isinstance(v, (dict, list))}
    print(json.dumps(shown, indent=2, default=str))
    return 0


def _short_name(model: str) -> str:
    """An unlabelled model's label: the last part of its path or hub id (``runs/re/step-100`` -> ``step-100``)."""
    return model.rstrip("/").rsplit("/", 1)[-1] or model


def _output_files(folder: Path, labels: Sequence[str]) -> list[Path]:
    """``folder/<label>.json`` for each model label (characters other than letters, digits, ``.``,
    ``_`` and ``-`` become ``_``). Raises ``ValueError`` when ``folder`` is a file or two labels
    would write the same file."""
    if folder.is_file():
        raise ValueError(f"--output {folder} is a file; with several --model it is the folder for one JSON per model")
    paths = [folder / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('._') or 'model'}.json" for label in labels]
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise ValueError(f"two --model values would both write {path}: name each as LABEL=MODEL with distinct labels")
    return paths


def _retrieval(args: argparse.Namespace) -> int:
    """``retrieval`` for each ``--model`` in turn, in this one process.

    Start-up, imports and reading the test set are paid once, and checkpoints whose image tower
    is unchanged (text-only fine-tuning) read the image embeddings the first one cached. With one
    model ``--output`` is its metrics JSON; with several it is a folder that gets ``<label>.json``
    as each model finishes (a later failure keeps them) and then ``comparison.md``; a model given
    without ``LABEL=`` is labelled by the last part of its path or hub id.
    """
    import gc

    from finetune.evaluation.retrieval import evaluate_retrieval, load_test_set
    from finetune.evaluation.suite import compare_checkpoints

    models = [(label if label != model else _short_name(model), model) for label, model in map(_labelled, args.model)]
    outputs = [Path(args.output)] if len(models) == 1 else _output_files(Path(args.output), [m[0] for m in models])
    options = _image_options(args)
    test = load_test_set(args.test_csv)
    for i, ((label, model), output) in enumerate(zip(models, outputs), 1):
        encoder = _load(args, model)
        start = time.perf_counter()
        metrics = evaluate_retrieval(encoder, test, args.images, args.variant, args.steps, model, args.batch_size,
                                     args.image_batch_size, args.draft_size, **options)
        metrics.setdefault("seconds", round(time.perf_counter() - start, 3))
        if len(models) == 1:
            return _finish(metrics, args.output)
        write_json(output, metrics)
        print(f"[{i}/{len(models)}] {label}: precision {metrics['precision']:.4f}, recall {metrics['recall']:.4f}, "
              f"tau_d {metrics['tau_d']:.4f} ({metrics['seconds']} s) -> {output}", file=sys.stderr)
        del encoder
        gc.collect()  # one model in memory at a time
    table = compare_checkpoints(list(zip([m[0] for m in models], outputs)), Path(args.output) / "comparison.md")
    print(table.read_text(encoding="utf-8"))
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed command line; returns the exit status."""
    if args.command == "compare":
        from finetune.evaluation.suite import compare_checkpoints

        items = [_labelled(m) if "=" in m else m for m in args.metrics]
        out = compare_checkpoints(items, args.output)
        print(out.read_text(encoding="utf-8"))
        return 0
    if args.command == "report":
        from finetune.evaluation.report import qualitative_report

        options = _image_options(args)
        encoders = [(label, _load(args, model)) for label, model in map(_labelled, args.model)]
        written = qualitative_report(
            encoders, args.test_csv, args.images, args.output_dir, args.candidates, args.max_images,
            args.steps, args.variant, args.draft_size, args.embed_images, **options,
        )
        print(f"report written to {written['html']}")
        return 0
    if args.command == "retrieval":
        return _retrieval(args)
    if args.command == "wordnet":
        from finetune.evaluation.wordnet import wordnet_files

        wordnet_files(args.wordnet_dir)  # fail on missing data before loading the model
    options = _image_options(args) if args.command in ("retention", "suite") else {}
    encoder = _load(args, args.model)
    start = time.perf_counter()
    if args.command == "lexical":
        from finetune.evaluation.lexical import evaluate_lexical

        metrics = evaluate_lexical(encoder, args.hyperlex, args.prompt, args.model)
    elif args.command == "wordnet":
        from finetune.evaluation.wordnet import evaluate_wordnet

        metrics = evaluate_wordnet(encoder, args.wordnet_dir, args.n_chains, args.min_depth, args.seed, args.prompt,
                                   args.model, args.batch_size, args.include_instances)
    elif args.command == "retention":
        from finetune.evaluation.retention import text_to_image_retrieval

        metrics = text_to_image_retrieval(encoder, args.test_csv, args.images, model=args.model, draft_size=args.draft_size,
                                          **options)
    elif args.command == "zeroshot":
        from finetune.evaluation.retention import CIFAR_TEMPLATES, read_labels, zero_shot_classification

        templates = read_labels(args.templates) if args.templates else CIFAR_TEMPLATES
        metrics = zero_shot_classification(encoder, read_labels(args.labels), args.images, templates, args.model)
    elif args.command == "taxonomy":
        from finetune.evaluation.taxonomy import evaluate_taxonomy

        metrics = evaluate_taxonomy(encoder, args.table, args.images, args.style, args.template, args.root_text,
                                    args.model, args.draft_size, _ranks(args.ranks),
                                    args.image_column, args.common_name_column)
    else:  # suite
        from finetune.evaluation.suite import SuiteSettings, evaluate_checkpoint

        settings = SuiteSettings(args.test_csv, args.images, args.variant, hyperlex=args.hyperlex,
                                 zeroshot_labels=args.zeroshot_labels, zeroshot_images=args.zeroshot_images,
                                 taxonomy_table=args.taxonomy_table, taxonomy_images=args.taxonomy_images,
                                 taxonomy_ranks=tuple(_ranks(args.taxonomy_ranks)),
                                 taxonomy_style=args.taxonomy_style, taxonomy_template=args.taxonomy_template,
                                 taxonomy_root_text=args.taxonomy_root_text,
                                 wordnet_dir=args.wordnet_dir, draft_size=args.draft_size, workers=options["workers"],
                                 image_cache=str(options["image_cache"].directory) if options["image_cache"] else "")
        result = evaluate_checkpoint(encoder, args.output_dir, settings, args.model)
        print(f"metrics written to {Path(args.output_dir) / 'metrics.json'} ({result['seconds']} s)")
        return 0
    metrics.setdefault("seconds", round(time.perf_counter() - start, 3))
    return _finish(metrics, args.output)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: parse, run, and turn input errors into one clear line and exit code 2."""
    from finetune.backends import BackendError
    from hierarcaps.models import quiet_library_progress

    args = build_parser().parse_args(argv)
    quiet_library_progress()
    try:
        return run(args)
    except (FileNotFoundError, ValueError, BackendError) as err:
        print(f"hierarcaps-eval {args.command}: error: {err}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``hierarcaps-eval`` command: :func:`main`, then exit without tearing down the interpreter.

    Freeing the ~3,000 modules that torch and transformers load takes about 2 s at exit (a
    seventh of a warm ``retrieval``) and serves nothing: every output is written (atomically) and
    closed by then. So the exit handlers run, the streams are flushed, and the process ends at once.
    """
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
