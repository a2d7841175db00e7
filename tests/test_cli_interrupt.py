"""Ctrl-C on a real ``build-hierarcaps`` run: prompt exit 130, kept work listed, rerun resumes.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group. The test starts the
real command (smoke profile, tiny local models, fewer augmentations so it ends sooner) in a process
group of its own, waits until the first seeds shard is finished, and sends SIGINT to that group,
exactly as a terminal does. Prefect's temporary API server must be out of that group's reach:
the command must stop within seconds (not retry a dead server for minutes), exit 130, name the
finished stages and shards, leave no server process behind, and a rerun must skip the finished
work and complete the build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: Fewer augmentations than the smoke profile; shards of 4 so that the seeds stage has 6 (24 seed captions).
OVERRIDES = ["augment.target_count=16", "sharding.shard_size=4"]
STOP_WITHIN_S = 10.0


def _command(out: Path) -> list[str]:
    args = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())",
            "--profile", "smoke", "--output-dir", str(out)]
    return args + [a for o in OVERRIDES for a in ("--set", o)]


def _env(prefect_home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PREFECT_HOME": str(prefect_home), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # the command starts its own temporary server
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)  # and must need no setting for it
    return env


def _wait_for(pattern: str, root: Path, process: subprocess.Popen, log: Path, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"the build ended (status {process.returncode}) before {pattern} appeared:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"no {pattern} after {timeout} s")


def _servers_of(prefect_home: Path) -> list[int]:
    """Pids of Prefect API servers started with this PREFECT_HOME (none may outlive the command)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in cmdline and f"PREFECT_HOME={prefect_home}".encode() in environ:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to look for a left-over server process")
def test_ctrl_c_stops_at_once_with_130_and_a_rerun_resumes(tmp_path):
    out, home = tmp_path / "out", tmp_path / "prefect"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:  # a file, not a pipe: a full pipe would stall the build
        build = subprocess.Popen(_command(out), env=_env(home), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                 stderr=stderr_file, start_new_session=True)
    first_shard = _wait_for("stages/seeds-*/shards/00000/_SUCCESS", out, build, log, timeout=1500)[0]
    os.killpg(build.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    sent = time.monotonic()
    try:
        build.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(build.pid, signal.SIGKILL)
        pytest.fail("build-hierarcaps did not stop within 60 s of Ctrl-C")
    stopped_after = time.monotonic() - sent
    stderr = log.read_text()
    assert build.returncode == 130, stderr[-3000:]
    assert stopped_after < STOP_WITHIN_S, f"took {stopped_after:.1f} s to stop"
    print(f"stopped {stopped_after:.1f} s after Ctrl-C")
    assert "interrupted" in stderr and "Connection refused" not in stderr
    assert "finished and kept: captions" in stderr
    assert "unfinished stage, finished shards kept: seeds: " in stderr and " of 6 shards" in stderr
    assert "rerun the same command to resume" in stderr
    time.sleep(1)
    assert _servers_of(home) == []  # the temporary server was stopped, not orphaned

    captions_record = next(out.glob("stages/captions-*/_SUCCESS")).read_text()
    shard_record = first_shard.read_text()
    rerun = subprocess.run(_command(out), env=_env(home), cwd=tmp_path, text=True, capture_output=True, timeout=1800)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert next(out.glob("stages/captions-*/_SUCCESS")).read_text() == captions_record  # not rerun
    assert first_shard.read_text() == shard_record  # the finished shard was kept, not redone
    summary = rerun.stdout[rerun.stdout.index("Build summary"):]
    assert "captions_train  done before" in summary and "negatives" in summary
    assert (out / "final" / "_SUCCESS").is_file()
    assert json.loads((out / "final" / "manifest.json").read_text())["plumbing_check"] is True
    assert _servers_of(home) == []

    started = time.monotonic()
    noop = subprocess.run(_command(out), env=_env(home), cwd=tmp_path, text=True, capture_output=True, timeout=600)
    assert noop.returncode == 0 and "nothing to do, every stage is finished" in noop.stdout  # no server started
    assert "captions_train  done before" in noop.stdout  # the summary table is printed all the same
    print(f"no-op rerun: {time.monotonic() - started:.1f} s")
