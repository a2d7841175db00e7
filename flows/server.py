"""Prefect's temporary API server for one ``build-hierarcaps`` run, out of reach of Ctrl-C.

Without ``PREFECT_API_URL``, Prefect 3 starts a temporary ("ephemeral") API server as a child
process when a flow first needs it. Two things go wrong with that in a terminal:

* the child is in the terminal's process group, so Ctrl-C kills it together with the build, and
  the flow then retries the dead server for minutes before it fails with "Connection refused";
* the server must answer within ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s by
  default), and it needs about 17 s on an idle 2-core machine, so a busy machine often misses it.

:class:`TemporaryServer` starts the same server (uvicorn on Prefect's ``create_app``, UI off,
the ephemeral set of services, the SQLite database under ``PREFECT_HOME``) itself, in its own
session, so that the terminal's Ctrl-C reaches only the build process, which then stops it. The
start-up limit is :data:`DEFAULT_STARTUP_TIMEOUT_S` unless the user set
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``. The command starts the server before it
imports Prefect and the models' libraries, so the server boots while the command loads.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 600.0
#: uvicorn's exit status when its port is taken (another process won the race for it).
_PORT_IN_USE = 3


class ServerStartError(RuntimeError):
    """Prefect's temporary API server did not start; the message says why and what to do."""


def startup_timeout() -> float:
    """The start-up limit in seconds: the user's ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, else 600."""
    value = os.environ.get(STARTUP_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_STARTUP_TIMEOUT_S
    try:
        return float(value)
    except ValueError:
        raise ServerStartError(f"{STARTUP_TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporaryServer:
    """One temporary Prefect API server on a free local port, in its own session."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()
        self._started = 0.0

    @property
    def api_url(self) -> str:
        """The ``PREFECT_API_URL`` of this server."""
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> "TemporaryServer":
        """Launch the server process (returns at once; :meth:`wait_ready` waits for it)."""
        self._launch()
        self._started = time.monotonic()
        atexit.register(self.stop)  # Prefect drains its log and event workers earlier (threading's exit hook)
        return self

    def _launch(self) -> None:
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C goes to the build's process group only
        )

    def wait_ready(self, timeout: float | None = None) -> str:
        """Wait until the server answers its health check; returns its API URL."""
        import urllib.error  # here, not at the top: a no-op rerun or a dry run imports this module, starting no server
        import urllib.request

        limit = startup_timeout() if timeout is None else timeout
        assert self.process is not None, "start() first"
        while True:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return self.api_url
            except (urllib.error.URLError, OSError):
                pass
            code = self.process.poll()
            if code == _PORT_IN_USE:
                self.port = _free_port()
                self._launch()
            elif code is not None:
                raise ServerStartError(f"Prefect's temporary API server exited with status {code}:\n{self._output()}")
            if time.monotonic() - self._started > limit:
                self.stop()
                raise ServerStartError(
                    f"Prefect's temporary API server did not answer within {limit:.0f} s ({STARTUP_TIMEOUT_ENV}); "
                    f"the machine may be very busy: set {STARTUP_TIMEOUT_ENV} higher, or start a server "
                    "(prefect server start) and set PREFECT_API_URL"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server (a no-op when it is not running)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-4000:]
