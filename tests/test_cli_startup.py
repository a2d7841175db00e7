"""Start-up of ``build-hierarcaps``: Prefect's temporary server, the no-op rerun and the dry run.

The server is started for real (``flows.server.TemporaryServer``) where the test is about how it
is started; the no-op rerun uses the test doubles of ``test_resume`` to finish a build quickly.
A no-op rerun and a dry run load no model, so they import neither torch, transformers nor Prefect
(seconds each): checked in a fresh interpreter.
"""

from __future__ import annotations

import json
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


#: Runs ``build-hierarcaps ARGS`` (flows.cli.main) and then prints which heavy libraries it imported.
_MAIN_THEN_IMPORTS = """
import json, sys
from flows.cli import main
code = main(sys.argv[1:])
print("IMPORTED " + json.dumps(sorted(m for m in ("torch", "transformers", "prefect") if m in sys.modules)))
sys.exit(code)
"""


def _main_in_fresh_process(args: list[str]) -> tuple[int, str, list[str]]:
    """Exit status, output (without the last line) and the heavy libraries imported by ``main(args)``."""
    # An API address where nothing answers: a command that wrongly went on to build fails, starting no server.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    result = subprocess.run([sys.executable, "-c", _MAIN_THEN_IMPORTS, *args], env=env, capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    stdout, _, last = result.stdout.rstrip("\n").rpartition("\n")
    assert last.startswith("IMPORTED "), result.stdout + result.stderr
    return result.returncode, stdout + "\n", json.loads(last.removeprefix("IMPORTED "))


def test_noop_rerun_imports_no_model_library_nor_prefect(tmp_path, fakes, capsys):  # noqa: F811
    out = tmp_path / "out"
    Pipeline(_settings(), out).run()
    args = ["--profile", "smoke", "--output-dir", str(out)] + [a for o in OVERRIDES[:-1] for a in ("--set", o)]
    code, stdout, imported = _main_in_fresh_process(args)
    assert (code, imported) == (0, [])
    assert "nothing to do, every stage is finished" in stdout
    capsys.readouterr()
    assert main(args) == 0
    assert stdout == capsys.readouterr().out  # the same summary as in a process that has them all


def test_dry_run_imports_no_model_library_nor_prefect(tmp_path, capsys):
    args = ["--dry-run", "--profile", "smoke", "--output-dir", str(tmp_path / "out")]
    code, stdout, imported = _main_in_fresh_process(args)
    assert (code, imported) == (0, [])
    assert stdout.rstrip().endswith("checked: settings, caption files, local model folders (no model was loaded)")
    assert main(args) == 0
    assert stdout == capsys.readouterr().out


@pytest.mark.parametrize("case", ["transformers later", "transformers first", "user shows hub bars"])
def test_library_progress_bars_stay_quiet_when_transformers_is_imported_later(case):
    """quiet_library_progress imports no transformers; its bars are off whenever transformers is imported."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    if case == "user shows hub bars":
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "0"
    code = (("import transformers\n" if case == "transformers first" else "")
            + "import sys\nfrom hierarcaps.models import quiet_library_progress\nquiet_library_progress()\n"
            "imported = 'transformers' in sys.modules\n"
            "from transformers.utils import logging\nfrom huggingface_hub.utils import are_progress_bars_disabled\n"
            "bars = (logging.is_progress_bar_enabled(), are_progress_bars_disabled())\n"
            "quiet_library_progress()  # again, as build-hierarcaps does before the flow starts workers\n"
            "import os\nprint(imported, *bars, logging.is_progress_bar_enabled(), are_progress_bars_disabled(),\n"
            "      os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))\n")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    imported, transformers_bars, hub_bars_off, *after_second_call, variable = result.stdout.split()
    assert transformers_bars == "False"  # transformers' own bars: always off
    assert hub_bars_off == ("False" if case == "user shows hub bars" else "True")  # the user's choice wins
    assert imported == ("False" if case == "transformers later" else "True")
    assert after_second_call == [transformers_bars, hub_bars_off]
    # the variable set for huggingface_hub's import is dropped once read: child processes do not inherit it
    assert variable == ("0" if case == "user shows hub bars" else "None")


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
