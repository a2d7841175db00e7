"""The ``hierarcaps`` command line: dataset utilities (the build itself is ``build-hierarcaps``).

``hierarcaps convert IN OUT`` converts between the authors' release CSV and our dataset folder:

* ``hierarcaps convert hierarcaps_test.csv out/`` writes a ``DatasetDict`` folder
  (``save_to_disk``) with the split ``test`` (curated layout) or ``train`` (expanded layout),
  or the split named by ``--split``; an existing folder gains the split;
* ``hierarcaps convert out/ test.csv --split test`` writes one split back as a release CSV
  (``.csv.gz`` compresses); ``--layout`` forces ``curated``, ``expanded`` or ``expanded_id``.

``hierarcaps fetch-images SOURCE --output DIR`` downloads the images of a build output, dataset
folder or release CSV with img2dataset and writes the mapping ``DIR/images.parquet`` that
``hierarcaps-finetune --set data.images_dir=DIR`` reads (see :mod:`hierarcaps.images`); a rerun
fetches only what is missing.

``hierarcaps tiny-model KIND OUT`` writes a tiny random model (``hf_clip``, ``open_clip``,
``nli``, ...) into OUT: an offline stand-in for plumbing checks of ``hierarcaps-finetune`` and
``hierarcaps-eval`` on machines that cannot download weights. Its numbers mean nothing.

``hierarcaps review SOURCE --split test [--sample N --seed S] [--port P] [--images DIR]`` serves a
local page to judge a build's (or dataset folder's, or release CSV's) items tier by tier;
``hierarcaps review export SOURCE --split test`` writes the curated split and its agreement
statistics (:mod:`hierarcaps.review`).

Errors about the input (wrong header, a hierarchy without four tiers, a missing split) print one
line naming the file and line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from hierarcaps.formats import convert
from hierarcaps.images import OUTPUT_FORMATS, RESIZE_MODES, FetchSettings, fetch_images
from hierarcaps.image_folder import FetchError
from hierarcaps.schema import RELEASE_LAYOUTS, SchemaError
from hierarcaps.tiny_models import KINDS, build_tiny_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hierarcaps", description="HierarCaps dataset utilities.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conv = commands.add_parser(
        "convert",
        help="release CSV <-> dataset folder",
        description="Convert a HierarCaps release CSV (.csv/.csv.gz) to a DatasetDict folder, or a folder's split to a CSV.",
    )
    conv.add_argument("input", metavar="IN", help="a release CSV (.csv, .csv.gz) or a dataset folder")
    conv.add_argument("output", metavar="OUT", help="a dataset folder (from a CSV) or a .csv/.csv.gz file (from a folder)")
    conv.add_argument(
        "--split",
        help="CSV -> folder: the split to write (default: test for the curated layout, train otherwise); "
        "folder -> CSV: the split to export (needed when the folder has several)",
    )
    conv.add_argument(
        "--layout",
        choices=sorted(RELEASE_LAYOUTS),
        help="folder -> CSV only: the release layout (default: curated when no row has negatives, else expanded)",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output CSV or split")
    _fetch_parser(commands)
    tiny = commands.add_parser(
        "tiny-model",
        help="write a tiny random model (offline plumbing checks)",
        description="Write a tiny random model with its tokenizer into OUT, for offline plumbing checks. "
        "Its outputs are meaningless.",
    )
    tiny.add_argument("kind", metavar="KIND", choices=KINDS, help=f"one of: {', '.join(KINDS)}")
    tiny.add_argument("output", metavar="OUT", help="folder to create (must not exist or be empty)")
    # listed for --help; `hierarcaps review ...` is parsed by hierarcaps.review.cli
    commands.add_parser("review", help="judge built hierarchies in a local web page (then: review export)")
    return parser


def _fetch_parser(commands: argparse._SubParsersAction) -> None:
    defaults = FetchSettings()
    fetch = commands.add_parser(
        "fetch-images",
        help="download a dataset's images (img2dataset)",
        description="Download every distinct image reference of a build output (OUT or OUT/final), a dataset "
        "folder or a release CSV with img2dataset; write DIR/images.parquet (image_ref -> file, status) and "
        "DIR/fetch_report.json (counts per failure reason). A rerun fetches only what is missing.",
    )
    fetch.add_argument("source", metavar="SOURCE", help="build output folder, dataset folder or release CSV")
    fetch.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the images, mapping and report")
    fetch.add_argument("--split", help="only this split of a dataset folder (default: every split)")
    fetch.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default=defaults.output_format,
                       help="image files in shard folders, or webdataset tar shards (default: %(default)s)")
    fetch.add_argument("--image-size", type=int, default=defaults.image_size,
                       help="resize larger images to this size (default: %(default)s)")
    fetch.add_argument("--resize-mode", choices=RESIZE_MODES, default=defaults.resize_mode,
                       help="img2dataset resize mode; keep_ratio: shorter side = image size (default: %(default)s)")
    fetch.add_argument("--min-image-size", type=int, default=defaults.min_image_size,
                       help="reject images whose shorter side is smaller, reason too_small (default: %(default)s)")
    fetch.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per request (default: %(default)s)")
    fetch.add_argument("--retries", type=int, default=defaults.retries, help="retries per URL (default: %(default)s)")
    fetch.add_argument("--processes", type=int, default=defaults.processes, help="download processes (default: %(default)s)")
    fetch.add_argument("--threads", type=int, default=defaults.threads, help="threads per process (default: %(default)s)")
    fetch.add_argument("--shard-size", type=int, default=defaults.shard_size, help="images per shard (default: %(default)s)")
    fetch.add_argument("--retry-failed", action="store_true",
                       help="also retry not_found, not_an_image, too_small and disallowed images (transient failures "
                       "are always retried)")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fetch_images(args: argparse.Namespace) -> int:
    names = ("output_format", "image_size", "resize_mode", "min_image_size", "timeout", "retries", "processes",
             "threads", "shard_size")
    settings = FetchSettings(**{name: getattr(args, name) for name in names})
    try:
        result = fetch_images(args.source, args.output, settings, args.split, args.retry_failed, not args.no_progress)
    except FetchError as err:
        print(f"hierarcaps fetch-images: error: {err}", file=sys.stderr)
        return 2
    failed = sum(result.failed.values())
    reasons = ", ".join(f"{reason} {n}" for reason, n in result.failed.items())
    print(f"{result.ok} of {result.refs} images fetched ({result.requested} requested this run)"
          + (f"; {failed} failed: {reasons}" if failed else ""))
    print(f"mapping {result.mapping}; report {result.report}")
    return 0


def _tiny_model(kind: str, output: str) -> int:
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        print(f"hierarcaps tiny-model: error: {out} is not empty; choose a new folder", file=sys.stderr)
        return 2
    build_tiny_model(kind, out)
    print(f"wrote a tiny random {kind} model to {out} (for plumbing checks only: its outputs mean nothing)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hierarcaps`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["review"]:
        from hierarcaps.review.cli import review_main

        return review_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "fetch-images":
        return _fetch_images(args)
    if args.command == "tiny-model":
        return _tiny_model(args.kind, args.output)
    if args.command == "convert":
        try:
            result = convert(args.input, args.output, args.split, layout=args.layout, overwrite=args.overwrite)
        except SchemaError as err:
            print(f"hierarcaps convert: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {result.rows} rows ({result.layout} layout, split {result.split!r}) to {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
