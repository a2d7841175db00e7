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
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from flows.server import ServerStartError, TemporaryServer
from hierarcaps.estimate import add_estimate_arguments, print_estimate
from hierarcaps.summary import format_table, kept_work, summary_rows

# Prefect, torch and transformers take seconds to import (tens of seconds on a busy machine): a dry
# run and a no-op rerun import none of them (hierarcaps.settings, .models and .pipeline import them
# only where a model is loaded), and a build that will run imports them in _run, after it has
# started Prefect's temporary server, so that the server boots meanwhile.

RESUME_HINT = "rerun the same command to resume"
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build-hierarcaps",
        description="Build a HierarCaps-style dataset (captions -> seeds -> augmentation -> completer -> "
        "positives -> negatives -> DatasetDict). Rerun the same command to resume. "
        "Subcommands: 'build-hierarcaps publish OUTPUT_DIR --repo-id ORG/NAME', "
        "'build-hierarcaps finetune OUTPUT_DIR --model M' (see their --help).",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for every output of the build")
    parser.add_argument("--profile", default="paper", metavar="{paper,smoke}",
                        help="built-in settings: paper (default; the paper's models and counts) or smoke "
                        "(tiny local models, offline plumbing check, not usable data)")
    parser.add_argument("--config", type=Path, help="settings file (TOML or YAML) applied over the profile")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set seeds.temperature=1.1 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved plan, check the settings, caption files and local model folders "
                        "(no model is loaded), and exit (status 2 when a check fails)")
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
    parser.add_argument("--images", help="eval.images_dir: the test images (a folder of image files or a hierarcaps fetch-images folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one fine-tuning setting, e.g. --set loss.name=rcme (repeatable)")
    return parser


def describe_plan(pipe) -> str:  # noqa: ANN001 - hierarcaps.pipeline.Pipeline
    """The resolved plan: output folder, profile, then each stage, its folder and whether it will run."""
    settings = pipe.settings
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


class _Interruptible:
    """Ctrl-C during a build: stop the temporary server, say what is kept, exit 130 at once.

    Every stage and shard is written to a temporary folder and renamed when finished, so
    leaving mid-shard loses only that shard's partial work; waiting for running shards (or for
    Prefect to report the cancellation) would keep the user waiting for minutes.
    """

    def __init__(self, pipe, server: TemporaryServer | None) -> None:  # noqa: ANN001 - Pipeline
        self.pipe, self.server = pipe, server
        self.previous: Any = None

    def __enter__(self) -> "_Interruptible":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._stop)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _stop(self, signum: int, frame: object) -> None:
        try:
            kept = kept_work(self.pipe)
        except Exception as err:  # noqa: BLE001 - the exit must not depend on reading the folders
            kept = f"(could not list the finished stages: {err})"
        message = f"\nbuild-hierarcaps: interrupted.\n{kept}\nNothing finished is lost: {RESUME_HINT}.\n"
        with contextlib.suppress(Exception):  # the main thread may be inside a write to stdout
            sys.stdout.flush()
        os.write(sys.stderr.fileno(), message.encode("utf-8", "replace"))  # unbuffered: safe inside a handler
        if self.server is not None:
            self.server.stop()
        os._exit(INTERRUPTED)


def _report(problems: list[str]) -> bool:
    """Print each input problem as one line; true when there is any."""
    for problem in problems:
        print(f"build-hierarcaps: error: {problem}", file=sys.stderr)
    return bool(problems)


def _cannot_resume(err: BaseException) -> bool:
    """Errors a plain rerun cannot fix (bad input, settings or model paths): no resume hint for them."""
    from hierarcaps.models import ModelLoadError
    from hierarcaps.pipeline import InputError
    from hierarcaps.sources import SourceFormatError

    from hierarcaps.settings import SettingsError

    return isinstance(err, (InputError, ModelLoadError, SettingsError, SourceFormatError))


def _server() -> TemporaryServer | None:
    """Start Prefect's temporary API server, unless the user points Prefect at one (``PREFECT_API_URL``)."""
    return None if os.environ.get("PREFECT_API_URL") else TemporaryServer().start()


def main_build(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if (args.estimate or args.estimate_from or args.calibrate is not None) and not args.dry_run:
        build_parser().error("--estimate, --estimate-from and --calibrate need --dry-run (nothing is built)")
    # Without a finished final stage the build will run: the server boots while the libraries load.
    # With one, it may be a no-op rerun, which starts no server at all.
    server = None if args.dry_run or (args.output_dir / "final" / "_SUCCESS").is_file() else _server()
    code = _prepare_and_run(args, server)
    if server is not None and code == 2:  # refused before the flow: nothing to report to the server
        server.stop()
    return code


def _prepare_and_run(args: argparse.Namespace, server: TemporaryServer | None) -> int:
    from hierarcaps.models import quiet_library_progress
    from hierarcaps.settings import SettingsError, resolve_settings

    quiet_library_progress()
    try:
        settings = resolve_settings(args.profile, args.config, args.overrides)
    except SettingsError as err:
        print(f"build-hierarcaps: settings error: {err}", file=sys.stderr)
        return 2
    from hierarcaps.pipeline import ORDER, Pipeline
    from hierarcaps.preflight import check_caption_files, check_inputs, check_model_paths

    pipe = Pipeline(settings, args.output_dir)
    read_captions = not pipe.is_done("captions")
    if args.dry_run:
        print(describe_plan(pipe))
        problems = check_inputs(settings, read_captions=read_captions)
        if args.estimate or args.estimate_from is not None or args.calibrate is not None:
            # an estimate needs only the configured counts: a build plan without its caption files yet is fine
            for problem in problems:
                print(f"build-hierarcaps: warning (the build needs it, the estimate does not): {problem}", file=sys.stderr)
            return print_estimate(settings, args.output_dir, args)
        if _report(problems):
            return 2
        print("checked: settings, caption files, local model folders (no model was loaded)")
        return 0
    if all(pipe.is_done(name) for name in ORDER):
        print(f"Build summary ({pipe.output_dir}):\n{format_table(summary_rows(pipe))}")
        print(f"build-hierarcaps: nothing to do, every stage is finished. Dataset: {pipe.dirs['final'].path}")
        return 0
    if _report((check_caption_files(settings) if read_captions else []) + check_model_paths(settings)):
        return 2
    server = server or _server()
    with _Interruptible(pipe, server):
        return _run(pipe, args, server, read_captions)


def _run(pipe, args: argparse.Namespace, server: TemporaryServer | None, read_captions: bool) -> int:  # noqa: ANN001
    """Read the caption files and import Prefect while the server starts, then run the flow; report the end.

    Once the flow has run, the server stays up until the interpreter exits (it stops itself then):
    Prefect's log and event workers send what they still hold at exit, before that.
    """
    from hierarcaps.preflight import check_caption_content

    if read_captions and _report(check_caption_content(pipe.settings)):
        return 2
    from flows.build import run_build
    import torch  # noqa: F401 - the stages' libraries: loaded here, while the server boots
    import transformers  # noqa: F401

    from hierarcaps.models import quiet_library_progress

    quiet_library_progress()  # again, transformers imported: before the flow starts worker processes

    try:
        api_url = server.wait_ready() if server is not None else None
        run_build(pipe.settings, pipe.output_dir, task_runner=args.task_runner, dask_address=args.dask_address,
                  api_url=api_url)
    except ServerStartError as err:
        print(f"build-hierarcaps: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - any failure ends the same way for the user
        print(f"Build summary so far ({pipe.output_dir}):\n{format_table(summary_rows(pipe))}")
        hint = "" if _cannot_resume(err) else f"\nFinished stages and shards are kept: {RESUME_HINT}."
        print(f"build-hierarcaps: the build failed: {type(err).__name__}: {err}{hint}", file=sys.stderr)
        return 1
    print(f"build-hierarcaps: done. Dataset: {pipe.output_dir / 'final'}")
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
    from finetune.config import SettingsError, load_settings, validate
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
        validate(settings)  # before the flow starts: a bad value is a one-line error, not a traceback mid-run
    except SettingsError as err:
        print(f"build-hierarcaps finetune: settings error: {err}", file=sys.stderr)
        return 2
    from flows.build import prefect_api

    try:
        with prefect_api():  # our temporary server unless PREFECT_API_URL is set (see prefect_api)
            result = finetune_flow(args.output_dir, settings)
    except ServerStartError as err:
        print(f"build-hierarcaps finetune: {err}", file=sys.stderr)
        return 1
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
    try:
        if argv and argv[0] in ("publish", "finetune"):
            from hierarcaps.models import quiet_library_progress

            quiet_library_progress()
            return (main_publish if argv[0] == "publish" else main_finetune)(argv[1:])
        return main_build(argv)
    except KeyboardInterrupt:  # before a build started, or in publish / finetune
        print("\nbuild-hierarcaps: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
