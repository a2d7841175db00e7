"""The ``hierarcaps`` command line: dataset utilities (the build itself is ``build-hierarcaps``).

``hierarcaps convert IN OUT`` converts between the authors' release CSV and our dataset folder:

* ``hierarcaps convert hierarcaps_test.csv out/`` writes a ``DatasetDict`` folder
  (``save_to_disk``) with the split ``test`` (curated layout) or ``train`` (expanded layout),
  or the split named by ``--split``; an existing folder gains the split;
* ``hierarcaps convert out/ test.csv --split test`` writes one split back as a release CSV
  (``.csv.gz`` compresses); ``--layout`` forces ``curated``, ``expanded`` or ``expanded_id``.

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

from hierarcaps.schema import RELEASE_LAYOUTS, SchemaError


def _parser() -> argparse.ArgumentParser:
    from hierarcaps.tiny_models import KINDS  # imports torch: not for `hierarcaps review`

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
    tiny = commands.add_parser(
        "tiny-model",
        help="write a tiny random model (offline plumbing checks)",
        description="Write a tiny random model with its tokenizer into OUT, for offline plumbing checks. "
        "Its outputs are meaningless.",
    )
    tiny.add_argument("kind", metavar="KIND", choices=KINDS, help=f"one of: {', '.join(KINDS)}")
    tiny.add_argument("output", metavar="OUT", help="folder to create (must not exist or be empty)")
    _review_parser(commands.add_parser("review", help="judge built hierarchies in a local web page (then: review export)"))
    return parser


def _review_parser(review: argparse.ArgumentParser) -> argparse.ArgumentParser:
    review.description = (
        "Serve a local page to review a split item by item: per-tier verdicts, edits, accept/fix/reject. "
        "`hierarcaps review export SOURCE` writes the curated split and the agreement statistics."
    )
    _review_arguments(review)
    review.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port; default 8765)")
    review.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; anyone with the URL's token can write verdicts)",
    )
    review.add_argument("--images", help="folder with the images (file names as in the URLs, or an img2dataset folder)")
    return review


def _review_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="a build's --output-dir, a dataset folder, or a release CSV")
    parser.add_argument("--split", default="test", help="the split to review (default: test)")
    parser.add_argument("--sample", type=int, help="review N items drawn at random (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument(
        "--db", help="the review database (default: SOURCE/review/SPLIT.sqlite for a build, else beside SOURCE)"
    )


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hierarcaps review export",
        description="Write the curated split (release CSV and dataset folder, fixes applied, rejected items dropped) "
        "and the agreement statistics; for a build, record them in its card and manifest.",
    )
    _review_arguments(parser)
    parser.add_argument(
        "--output", help="folder to write (default: the database's folder, in export-SPLIT/)"
    )
    return parser


def _review(argv: Sequence[str]) -> int:
    from hierarcaps.review.items import ImageIndex, open_review, resolve_source
    from hierarcaps.review.store import ReviewError

    exporting = bool(argv) and argv[0] == "export"
    parser = _export_parser() if exporting else _review_parser(argparse.ArgumentParser(prog="hierarcaps review"))
    args = parser.parse_args(argv[1:] if exporting else argv)
    name = "hierarcaps review export" if exporting else "hierarcaps review"
    try:
        source = resolve_source(args.source, args.split)
        db = Path(args.db) if args.db else source.default_db()
        if exporting and not db.is_file():
            raise ReviewError(f"{db}: no review database; review first with `hierarcaps review {args.source} ...`")
        store = open_review(source, db, args.sample, args.seed)
        if exporting:
            from hierarcaps.review.export import export_review

            output = Path(args.output) if args.output else store.path.parent / f"export-{args.split}"
            result = export_review(store, output, source.build_dir)
        else:
            from hierarcaps.review.server import serve

            images = ImageIndex(Path(args.images) if args.images else None, source.path.parent)
            serve(store, images, host=args.host, port=args.port)
            return 0
    except (ReviewError, SchemaError, OSError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    stats = result.stats
    valid = stats["fully_valid"]
    low, high = valid["ci95"]
    print(
        f"kept {result.kept} of {stats['reviewed']} reviewed items; fully valid {valid['valid']}/{valid['n']} = "
        f"{100 * valid['fraction']:.1f}% (95% Wilson CI {100 * low:.1f}-{100 * high:.1f}%)"
    )
    print(f"wrote {result.csv}, {result.dataset} (split {args.split!r}) and {result.stats_path}")
    if result.card is not None:
        print(f"recorded the review in {result.card} and its manifest")
    return 0


def _tiny_model(kind: str, output: str) -> int:
    from hierarcaps.tiny_models import build_tiny_model

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
        return _review(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "tiny-model":
        return _tiny_model(args.kind, args.output)
    if args.command == "convert":
        from hierarcaps.formats import convert

        try:
            result = convert(args.input, args.output, args.split, layout=args.layout, overwrite=args.overwrite)
        except SchemaError as err:
            print(f"hierarcaps convert: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {result.rows} rows ({result.layout} layout, split {result.split!r}) to {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
