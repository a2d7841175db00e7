"""``hierarcaps review``: serve the review page; ``hierarcaps review export``: the curated split.

Errors about the input (no such source, a missing split, a database started with other options,
nothing decided yet, a port in use) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from hierarcaps.review.items import ImageIndex, open_review, resolve_source
from hierarcaps.review.store import ReviewError
from hierarcaps.schema import SchemaError


def review_parser() -> argparse.ArgumentParser:
    """The options of ``hierarcaps review``."""
    review = argparse.ArgumentParser(
        prog="hierarcaps review",
        description="Serve a local page to review a split item by item: per-tier verdicts, edits, accept/fix/reject. "
        "`hierarcaps review export SOURCE` writes the curated split and the agreement statistics.",
    )
    _review_arguments(review)
    review.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port; default 8765)")
    review.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; anyone with the URL's token can write verdicts)",
    )
    review.add_argument("--images", help="folder with the images: a fetch-images folder, or image files named as in the URLs")
    return review


def _review_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="a build's --output-dir, a dataset folder, or a release CSV")
    parser.add_argument("--split", default="test", help="the split to review (default: test)")
    parser.add_argument("--sample", type=int, help="review N items drawn at random (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument(
        "--db", help="the review database (default: SOURCE/review/SPLIT.sqlite for a build, else beside SOURCE)"
    )


def export_parser() -> argparse.ArgumentParser:
    """The options of ``hierarcaps review export``."""
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


def review_main(argv: Sequence[str]) -> int:
    """``hierarcaps review ...`` and ``hierarcaps review export ...`` (``argv`` after ``review``); the exit status."""
    exporting = bool(argv) and argv[0] == "export"
    parser = export_parser() if exporting else review_parser()
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
