"""Start-up of ``build-hierarcaps``: Prefect's temporary server and the no-op rerun.

The server is started for real (``flows.server.TemporaryServer``) where the test is about how it
is started; the no-op rerun uses the test doubles of ``test_resume`` to finish a build quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import server as server_module
from flows.cli import main
from flows.server import STARTUP_TIMEOUT_ENV, ServerStartError, TemporaryServer, startup_timeout
from hierarcaps.pipeline import Pipeline
from tests.test_resume import _settings, fakes  # noqa: F401 - the fixture is used by name
from tests.test_flow_build import OVERRIDES


def test_startup_limit_is_generous_unless_the_user_sets_one(monkeypatch):
    monkeypatch.delenv(STARTUP_TIMEOUT_ENV, raising=False)
    assert startup_timeout() == 600.0  # Prefect's own default of 20 s fails on a busy 2-core machine
    monkeypatch.setenv(STARTUP_TIMEOUT_ENV, "45")
    assert startup_timeout() == 45.0
    monkeypatch.setenv(STARTUP_TIMEOUT_ENV, "soon")
    with pytest.raises(ServerStartError, match=f"{STARTUP_TIMEOUT_ENV}='soon' is not a number"):
        startup_timeout()


def test_server_runs_in_its_own_session_out_of_reach_of_ctrl_c():
    server = TemporaryServer().start()
    try:
        assert server.process is not None and server.process.poll() is None
        # a terminal signals its foreground process group; the server leads a session and group of its own
        assert os.getsid(server.process.pid) == server.process.pid != os.getsid(0)
        assert os.getpgid(server.process.pid) != os.getpgid(0)
    finally:
        server.stop()
    assert server.process is None


def test_server_that_does_not_answer_in_time_is_a_clear_error(monkeypatch):
    server = TemporaryServer().start()
    with pytest.raises(ServerStartError, match=f"did not answer within 0 s \\({STARTUP_TIMEOUT_ENV}\\)"):
        server.wait_ready(timeout=0.0)
    assert server.process is None  # stopped


def test_noop_rerun_prints_the_summary_without_starting_prefect(tmp_path, fakes, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "out"
    Pipeline(_settings(), out).run()
    monkeypatch.delenv("PREFECT_API_URL", raising=False)

    def no_server(*args, **kwargs):
        raise AssertionError("a temporary server was started for a finished build")

    monkeypatch.setattr(server_module.TemporaryServer, "start", no_server)
    monkeypatch.setattr("flows.build.run_build", no_server)
    args = ["--profile", "smoke", "--output-dir", str(out)] + [a for o in OVERRIDES[:-1] for a in ("--set", o)]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "nothing to do, every stage is finished" in stdout
    assert "captions_train  done before" in stdout and "negatives" in stdout


@pytest.mark.parametrize(("user_value", "expected"), [(None, "600.0"), ("45", "45.0")])
def test_prefects_own_server_gets_the_generous_limit_unless_the_user_set_one(user_value, expected):
    """Flows run from Python (or the finetune flow) use Prefect's own server; importing flows sets its limit."""
    env = {k: v for k, v in os.environ.items() if k != STARTUP_TIMEOUT_ENV}
    if user_value is not None:
        env[STARTUP_TIMEOUT_ENV] = user_value
    code = ("import flows.build; from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; "
            "print(float(s.value()))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
