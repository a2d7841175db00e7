"""``build-hierarcaps``: build a HierarCaps dataset, or publish a finished build.

Build (resumable: rerun the same command after a failure or Ctrl-C)::

    build-hierarcaps --output-dir OUT [--profile paper|smoke] [--config FILE.toml|.yaml]
                     [--set key=value ...] [--dry-run]
                     [--estimate [--estimate-from FOLDER | --calibrate N]]
                     [--task-runner thread|dask] [--dask-address tcp://HOST:PORT]

Publish to the Hugging Face Hub (private unless ``--public``)::

    build-hierarcaps publish OUT --repo-id ORG/NAME [--public] [--token TOKEN] [--dry-run FOLDER]

Fine-tune on the finished build (Prefect flow ``finetune``; with a test set, HierarCaps retrieval
is evaluated before and after training)::

    build-hierarcaps finetune OUT --model openai/clip-vit-base-patch32 --run-dir runs/re \
        [--test-csv hierarcaps_test.csv --images test_imgs/] [--config run.toml] [--set key=value ...]

See ``docs/build.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from hierarcaps.estimate import add_estimate_arguments, print_estimate
from hierarcaps.models import quiet_library_progress
from hierarcaps.settings import PROFILES, SettingsError, resolve_settings

RESUME_HINT = "rerun the same command to resume"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build-hierarcaps",
        description="Build a HierarCaps-style dataset (captions -> seeds -> augmentation -> completer -> "
        "positives -> negatives -> DatasetDict). Rerun the same command to resume. "
        "Subcommands: 'build-hierarcaps publish OUTPUT_DIR --repo-id ORG/NAME', "
        "'build-hierarcaps finetune OUTPUT_DIR --model M' (see their --help).",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for every output of the build")
    parser.add_argument("--profile", default="paper", choices=PROFILES,
                        help="built-in settings: paper (default; the paper's models and counts) or smoke "
                        "(tiny local models, offline plumbing check, not usable data)")
    parser.add_argument("--config", type=Path, help="settings file (TOML or YAML) applied over the profile")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set seeds.temperature=1.1 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    add_estimate_arguments(parser)
    parser.add_argument("--task-runner", default="thread", choices=("thread", "dask"),
                        help="run shards in local threads (default) or on a Dask cluster")
    parser.add_argument("--dask-address", help="scheduler address for --task-runner dask, e.g. tcp://10.0.0.1:8786 "
                        "(without it a local cluster of sharding.concurrency workers is started)")
    return parser


def publish_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="build-hierarcaps publish",
                                     description="Push a finished build's DatasetDict, card and manifest to the Hub.")
    parser.add_argument("output_dir", type=Path, help="the --output-dir of a finished build")
    parser.add_argument("--repo-id", required=True, help="dataset repository ORG/NAME")
    parser.add_argument("--public", action="store_true", help="make the repository public (default: private)")
    parser.add_argument("--token", help="Hugging Face token (default: your login or HF_TOKEN)")
    parser.add_argument("--dry-run", type=Path, metavar="FOLDER",
                        help="write exactly the files that would be uploaded into FOLDER; upload nothing")
    return parser


def finetune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build-hierarcaps finetune",
        description="Prefect flow 'finetune': train on a finished build's dataset (settings as hierarcaps-finetune); "
        "with --test-csv and --images, evaluate HierarCaps retrieval before and after training.",
    )
    parser.add_argument("output_dir", type=Path, help="the --output-dir of a finished build")
    parser.add_argument("--config", type=Path, help="fine-tuning settings file (.toml, .yaml)")
    parser.add_argument("--model", help="model.name_or_path: hub id, folder or open_clip name")
    parser.add_argument("--backend", choices=("hf-clip", "open-clip", "text"), help="model.backend")
    parser.add_argument("--run-dir", help="run.output_dir: where checkpoints, logs and evaluations go")
    parser.add_argument("--test-csv", help="eval.test_source: curated test CSV (or dataset folder) for before/after")
    parser.add_argument("--images", help="eval.images_dir: the test images")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one fine-tuning setting, e.g. --set loss.name=rcme (repeatable)")
    return parser


def describe_plan(settings, output_dir: Path) -> str:  # noqa: ANN001 - BuildSettings
    """The resolved plan: settings file, then each stage, its folder and whether it will run."""
    from hierarcaps.pipeline import Pipeline

    pipe = Pipeline(settings, output_dir)
    lines = [f"output dir: {pipe.output_dir}", f"profile: {settings.profile}"]
    if settings.plumbing_check:
        lines.append("SMOKE PROFILE: a plumbing check with tiny random models, NOT usable data")
    for stage in pipe.plan():
        if stage.done:
            state = "done (skipped)"
        elif stage.sharded and stage.shards_done:
            state = f"will run ({stage.shards_done} shards already done)"
        else:
            state = "will run"
        lines.append(f"  {stage.name:<15} {state:<34} {stage.dir.path}")
    return "\n".join(lines)


def main_build(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if (args.estimate or args.estimate_from or args.calibrate is not None) and not args.dry_run:
        build_parser().error("--estimate, --estimate-from and --calibrate need --dry-run (nothing is built)")
    try:
        settings = resolve_settings(args.profile, args.config, args.overrides)
    except SettingsError as err:
        print(f"build-hierarcaps: settings error: {err}", file=sys.stderr)
        return 2
    from hierarcaps.pipeline import BuildError, check_caption_sources

    try:
        check_caption_sources(settings)
    except BuildError as err:
        if not args.dry_run:
            print(f"build-hierarcaps: settings error: {err}", file=sys.stderr)
            return 2
        print(f"warning: {err}")
    if args.dry_run:
        print(describe_plan(settings, args.output_dir))
        wants_estimate = args.estimate or args.estimate_from is not None or args.calibrate is not None
        return print_estimate(settings, args.output_dir, args) if wants_estimate else 0
    from flows.build import run_build

    try:
        run_build(settings, args.output_dir, task_runner=args.task_runner, dask_address=args.dask_address)
    except KeyboardInterrupt:
        print(f"\nbuild-hierarcaps: interrupted; finished stages and shards are kept: {RESUME_HINT}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - any failure ends the same way for the user
        print(f"build-hierarcaps: the build failed: {type(err).__name__}: {err}\n"
              f"Finished stages and shards are kept: {RESUME_HINT}.", file=sys.stderr)
        return 1
    print(f"build-hierarcaps: done. Dataset: {Path(args.output_dir).resolve() / 'final'}")
    return 0


def main_publish(argv: Sequence[str]) -> int:
    from hierarcaps.publish import PublishError, publish

    args = publish_parser().parse_args(argv)
    try:
        result = publish(args.output_dir, args.repo_id, public=args.public, token=args.token, dry_run_dir=args.dry_run)
    except PublishError as err:
        print(f"build-hierarcaps publish: {err}", file=sys.stderr)
        return 1
    if result.dry_run_dir is not None:
        print(f"dry run: {len(result.files)} files for {result.repo_id} written to {result.dry_run_dir}")
    else:
        visibility = "private" if result.private else "public"
        print(f"published {len(result.files)} files to https://huggingface.co/datasets/{result.repo_id} ({visibility})")
    for name in result.files:
        print(f"  {name}")
    return 0


def main_finetune(argv: Sequence[str]) -> int:
    from finetune.config import load_settings
    from flows.finetune import build_dataset_dir, finetune_flow

    args = finetune_parser().parse_args(argv)
    shortcuts = {
        "model.name_or_path": args.model, "model.backend": args.backend, "run.output_dir": args.run_dir,
        "eval.test_source": args.test_csv, "eval.images_dir": args.images,
    }
    try:
        dataset = build_dataset_dir(args.output_dir)
        overrides = [f"data.source={dataset}"] + [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
        settings = load_settings(args.config, overrides + list(args.overrides))
    except SettingsError as err:
        print(f"build-hierarcaps finetune: settings error: {err}", file=sys.stderr)
        return 2
    try:
        result = finetune_flow(args.output_dir, settings)
    except Exception as err:  # noqa: BLE001 - any failure ends the same way for the user
        print(f"build-hierarcaps finetune: failed: {type(err).__name__}: {err}\n"
              f"Checkpoints are kept: add --set run.resume=true to continue.", file=sys.stderr)
        return 1
    print(f"build-hierarcaps finetune: {result['train']['steps']} steps; model in {result['train']['final_dir']}")
    for when in ("before", "after"):
        metrics = (result[when] or {}).get("hierarcaps")
        if metrics:
            print(f"  {when:<6} precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}  "
                  f"tau_d {metrics['tau_d']:.4f}")
    if result["after"]:
        print(f"  before/after table: {Path(settings.run.output_dir) / 'eval' / 'comparison.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_progress()
    if argv and argv[0] == "publish":
        return main_publish(argv[1:])
    if argv and argv[0] == "finetune":
        return main_finetune(argv[1:])
    return main_build(argv)


if __name__ == "__main__":
    sys.exit(main())
