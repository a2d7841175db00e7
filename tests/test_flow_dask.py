"""The Dask task runner path of ``build-hierarcaps`` (``--task-runner dask --dask-address ...``).

ONE flow run on an in-process Dask cluster (``LocalCluster(processes=False)``) whose scheduler and
worker talk over TCP on 127.0.0.1, so every shard task, its arguments and its result are pickled
and sent through Dask as on a real cluster. The model-backed stage bodies are the deterministic
test doubles of ``test_resume`` (the dispatch is under test here, and worker processes with real
tiny models take minutes; the real multi-process cluster with a Prefect server is the manual check
in ``docs/build.md``). The in-process worker shares this process's Prefect ephemeral API, so no
server is started here.
"""

from __future__ import annotations

import threading

import pytest

from hierarcaps import pipeline
from hierarcaps.pipeline import Pipeline
from tests.test_resume import _dataset, _settings, fakes  # noqa: F401 - the fixture is used by name

distributed = pytest.importorskip("distributed", reason="distributed (Dask) is not installed: pip install prefect-dask")
pytest.importorskip("prefect_dask", reason="prefect-dask is not installed: pip install prefect-dask")


def test_dask_runner_runs_shards_on_workers_and_builds_the_same_dataset(tmp_path, fakes, monkeypatch):  # noqa: F811
    from flows.build import run_build

    reference = tmp_path / "thread"
    Pipeline(_settings(), reference).run()

    ran_on: dict[str, str] = {}
    run_shard = Pipeline.run_shard

    def recording_run_shard(self: Pipeline, name: str, index: int) -> dict:
        worker = distributed.get_worker()  # raises ValueError outside a Dask worker
        ran_on[f"{name}/{index}"] = f"{worker.address} {threading.current_thread().name}"
        return run_shard(self, name, index)

    monkeypatch.setattr(pipeline.Pipeline, "run_shard", recording_run_shard)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=":0") as cluster:
        out = tmp_path / "dask"
        result = run_build(_settings("sharding.concurrency=2"), out, task_runner="dask",
                           dask_address=cluster.scheduler_address)
        worker_address = next(iter(cluster.scheduler_info["workers"]))

    shards = {f"{s}/{i}" for s in ("seeds", "augment", "complete_train", "complete_test", "negatives")
              for i in range(Pipeline(_settings(), out).shard_count(s))}
    assert set(ran_on) == shards, "every shard ran as a task on the Dask worker"
    assert all(where.startswith(worker_address) for where in ran_on.values())
    assert result["final"] == str(out / "final")
    assert _dataset(out) == _dataset(reference)


# Flows run here report to one session-wide Prefect API (conftest.prefect_server).
pytestmark = pytest.mark.usefixtures("prefect_server")
