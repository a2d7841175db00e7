"""Prefect flows: ``build-hierarcaps`` (:mod:`flows.build`, CLI :mod:`flows.cli`) and ``finetune``.

Prefect's own temporary API server (started when a flow runs without ``PREFECT_API_URL``, e.g.
``run_build`` called from Python or the ``finetune`` flow) must answer within
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``; its default of 20 s is missed on a busy
2-core machine. The same generous limit as the CLI's server is set here, before any of these
modules imports Prefect, unless the user set one.
"""

import os

from flows.server import DEFAULT_STARTUP_TIMEOUT_S, STARTUP_TIMEOUT_ENV

os.environ.setdefault(STARTUP_TIMEOUT_ENV, f"{DEFAULT_STARTUP_TIMEOUT_S:g}")
