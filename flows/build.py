"""The ``build-hierarcaps`` Prefect flow: the HierarCaps build end to end, resumable and sharded.

The flow walks the stage graph of :mod:`hierarcaps.pipeline` in order (captions, seeds,
augmentation, completer training, positive completion of train and test captions, negatives,
assembly with validation, card and manifest). Whether a stage or shard must run is decided by
its directory's ``_SUCCESS`` marker (:mod:`hierarcaps.stagedir`), never by Prefect's result
cache, whose default key includes the flow-run id and whose source hashing misses helper edits.

Long stages are mapped as one Prefect task per unfinished shard; ``sharding.concurrency`` shards
run at once on the default thread-pool task runner, or on a Dask cluster with
``task_runner="dask"`` (prefect-dask; see ``docs/build.md`` for the scheduler, workers and the
Prefect server it needs). A shard task receives only plain values (the resolved settings as a
dict, the output folder, the stage and shard index), so it runs the same in a thread or on a
remote worker that sees the output folder.

By default no server is needed: ``build-hierarcaps`` starts Prefect's temporary API on SQLite
under ``PREFECT_HOME``, out of reach of the terminal's Ctrl-C (:mod:`flows.server`). At the end
a summary (counts per stage, rejections per reason, seconds) is printed and saved as a Prefect
table artifact, with each stage's throughput (generate calls, prompt and generated tokens, NLI
pairs and cache hits, tokens/s, pairs/s).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.context import refresh_global_settings_context
from prefect.futures import as_completed, wait
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from flows.server import TemporaryServer
from hierarcaps.pipeline import FINAL, ORDER, STAGES, Pipeline, release_models
from hierarcaps.settings import BuildSettings, from_dict, to_dict
from hierarcaps.summary import format_table, summary_rows

PLUMBING_BANNER = "SMOKE PROFILE: this build is a PLUMBING CHECK with tiny random models, NOT usable data."


def _pipeline(settings: dict[str, Any], output_dir: str) -> Pipeline:
    return Pipeline(from_dict(settings), output_dir)


@task(name="shard", task_run_name="{stage}-{index:05d}")
def shard_task(settings: dict[str, Any], output_dir: str, stage: str, index: int) -> dict[str, Any]:
    """One shard of a long stage (skipped inside when its ``_SUCCESS`` exists)."""
    return _pipeline(settings, output_dir).run_shard(stage, index)


@task(name="stage", task_run_name="{stage}")
def stage_task(settings: dict[str, Any], output_dir: str, stage: str) -> list[dict[str, Any]]:
    """A whole stage: unsharded stages, and the merge of a sharded stage's finished shards."""
    pipe = _pipeline(settings, output_dir)
    try:
        return pipe.merge_shards(stage) if STAGES[stage].sharded else pipe.run_stage(stage)
    finally:
        release_models()


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shard", leave=True)


def run_sharded(
    pipe: Pipeline, settings: dict[str, Any], stage: str, progress: Callable[[int, str], Any] = _progress_bar
) -> None:
    """Submit one task per unfinished shard; wait for all (so finished shards persist), then merge."""
    n = pipe.shard_count(stage)
    todo = [i for i in range(n) if not pipe.dirs[stage].shard(i).is_done()]
    bar = progress(n, stage)
    bar.update(n - len(todo))
    futures = [shard_task.submit(settings, str(pipe.output_dir), stage, i) for i in todo]
    failures: list[BaseException] = []
    for future in as_completed(futures):
        try:
            future.result()
            bar.update(1)
        except Exception as err:  # noqa: BLE001 - collected; the other shards still finish and persist
            failures.append(err)
    wait(futures)
    bar.close()
    if failures:
        raise failures[0]
    stage_task(settings, str(pipe.output_dir), stage)


@flow(name="build-hierarcaps", task_runner=ThreadPoolTaskRunner(max_workers=1))
def build_hierarcaps(settings: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """Build a HierarCaps dataset into ``output_dir``; rerunning resumes where it stopped.

    ``settings`` is the resolved settings tree as a dict (:func:`hierarcaps.settings.to_dict`).
    Returns ``{"final": <path>, "summary": [rows]}``.
    """
    logger = get_run_logger()
    pipe = _pipeline(settings, output_dir)
    if pipe.settings.plumbing_check:
        logger.warning(PLUMBING_BANNER)
    pipe.write_settings()
    status: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name in ORDER:
        if pipe.is_done(name):
            logger.info("stage %s: done before (%s), skipped", name, pipe.dirs[name].name)
            continue
        start = time.perf_counter()
        logger.info("stage %s: running into %s", name, pipe.dirs[name].path)
        if STAGES[name].sharded:
            run_sharded(pipe, settings, name)
        else:
            stage_task(settings, str(pipe.output_dir), name)
        status[name] = "ran"
        seconds[name] = time.perf_counter() - start
    rows = summary_rows(pipe, status, seconds)
    table = format_table(rows)
    print(f"Build summary ({pipe.output_dir}):\n{table}")
    create_table_artifact(key="build-hierarcaps-summary", table=rows,
                          description=f"Counts, rejections, time and throughput per stage of {pipe.output_dir}")
    if pipe.settings.plumbing_check:
        print(PLUMBING_BANNER)
    return {"final": str(pipe.dirs[FINAL].path), "summary": rows}


def run_build(
    settings: BuildSettings,
    output_dir: Path | str,
    *,
    task_runner: str = "thread",
    dask_address: str | None = None,
    api_url: str | None = None,
) -> dict[str, Any]:
    """Run the flow with the chosen task runner (``thread`` or ``dask``).

    ``api_url``: the Prefect API to report to (the CLI's :class:`flows.server.TemporaryServer`);
    ``None``: ``PREFECT_API_URL`` if set, else a temporary server (:func:`prefect_api`).
    """
    concurrency = settings.sharding.concurrency
    if task_runner == "thread":
        runner: Any = ThreadPoolTaskRunner(max_workers=concurrency)
    elif task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=dask_address) if dask_address else DaskTaskRunner(
            cluster_kwargs={"n_workers": concurrency, "threads_per_worker": 1, "processes": True}
        )
    else:
        raise ValueError(f"--task-runner must be 'thread' or 'dask', got {task_runner!r}")
    with prefect_api(api_url):
        return build_hierarcaps.with_options(task_runner=runner)(to_dict(settings), str(Path(output_dir).resolve()))


@contextlib.contextmanager
def prefect_api(api_url: str | None = None) -> Iterator[str]:
    """Point this process (every thread) and the processes it starts at a Prefect API; yield its URL.

    ``api_url`` given: that one. Else the configured ``PREFECT_API_URL``, if any. Else a
    :class:`flows.server.TemporaryServer` started here, never Prefect's own temporary server: that
    one runs uvicorn with ``--app-dir site-packages``, which puts every top-level module installed
    there ahead of the standard library; img2dataset's requirement installs the Python 3.6
    ``dataclasses`` backport, and with it Prefect's own server exits at start-up (``TypeError:
    dataclass() got an unexpected keyword argument 'slots'``). Our server runs uvicorn without it.

    The URL stays set after the block: Prefect's log and event workers send what they still hold
    when the interpreter exits, and a worker that found no API then would start a server of its own;
    a server started here stops when the interpreter exits.
    """
    if api_url is None:
        api_url = PREFECT_API_URL.value() or None
    if api_url is None:
        api_url = TemporaryServer().start().wait_ready()
    os.environ["PREFECT_API_URL"] = api_url
    refresh_global_settings_context()  # Prefect read the environment when it was imported
    with temporary_settings(updates={PREFECT_API_URL: api_url}):  # over a settings context already entered
        yield api_url
