"""Shared test set-up: an isolated Prefect home, no telemetry, no hub access, tiny models.

The environment is set before anything imports Prefect or huggingface_hub (both read it at
import time), hence the imports below the settings.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="hierarcaps-prefect-"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test models are tiny: one intra-op thread beats thread hand-offs on a 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Commands that cache image embeddings by default do so in a session folder, not in ~/.cache.
os.environ.setdefault("HIERARCAPS_IMAGE_CACHE", tempfile.mkdtemp(prefix="hierarcaps-image-cache-"))
# Prefect's ephemeral API server may take longer than its 20 s default to start on a loaded machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from pathlib import Path  # noqa: E402  (after the environment settings above)
from typing import Callable  # noqa: E402

import pytest  # noqa: E402

from hierarcaps.tiny_models import build_tiny_model  # noqa: E402

REAL_TEST_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "hierarcaps" / "hierarcaps_test.csv"


@pytest.fixture
def real_test_rows(tmp_path: Path) -> Callable[[int], Path]:
    """``write(n)``: the header and first ``n`` rows of the real curated test CSV, as a file under
    ``tmp_path``. Skips the test where ``../shared/data`` is absent."""
    if not REAL_TEST_CSV.is_file():
        pytest.skip(f"real HierarCaps data not found at {REAL_TEST_CSV.parent}")

    def write(n: int) -> Path:
        out = tmp_path / f"test-{n}.csv"
        out.write_text("".join(REAL_TEST_CSV.read_text().splitlines(keepends=True)[: n + 1]))
        return out

    return write


# Tiny random models with real architectures (hierarcaps.tiny_models), built once per test
# session into a temporary folder; each fixture returns the save_pretrained folder.


def _tiny(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    return build_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama causal LM, no chat template, no pad token (like Llama-2 base)."""
    return _tiny(tmp_path_factory, "causal_lm")


@pytest.fixture(scope="session")
def tiny_chat_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama causal LM with a Llama-2-style [INST] chat template."""
    return _tiny(tmp_path_factory, "chat_lm")


@pytest.fixture(scope="session")
def tiny_seq2seq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """T5 seq2seq LM; its tokenizer lacks → and ← (they map to <unk>)."""
    return _tiny(tmp_path_factory, "seq2seq")


@pytest.fixture(scope="session")
def tiny_nli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BART NLI classifier, id2label {0: contradiction, 1: neutral, 2: entailment}."""
    return _tiny(tmp_path_factory, "nli")


@pytest.fixture(scope="session")
def tiny_nli_shuffled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny NLI network with permuted head rows and id2label {0: ENTAILMENT, 1: Contradiction, 2: neutral}."""
    return _tiny(tmp_path_factory, "nli_shuffled")


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers CLIPModel + CLIPProcessor (32x32 images, 77 text positions)."""
    return _tiny(tmp_path_factory, "hf_clip")


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """open_clip CLIP folder: load with open_clip.create_model_and_transforms("local-dir:" + str(path))."""
    return _tiny(tmp_path_factory, "open_clip")


@pytest.fixture(scope="session")
def tiny_text_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small BertModel + WordPiece tokenizer."""
    return _tiny(tmp_path_factory, "text_encoder")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop Prefect's ephemeral API servers while pytest's output streams are still open.

    Prefect stops them at interpreter exit otherwise, and its farewell log line then hits a
    closed stream ("Logging error ... I/O operation on closed file").
    """
    import sys

    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is not None:
        # Send the flows' pending log records while the API can still take them.
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        for server in list(server_module.SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture(scope="session")
def smoke_build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke-profile build (its own tiny models; a few minutes), made once per test session.

    Tests that change the build copy what they change (e.g. ``final/``) first.
    """
    from hierarcaps.pipeline import Pipeline
    from hierarcaps.settings import resolve_settings

    out = tmp_path_factory.mktemp("smoke-build")
    Pipeline(resolve_settings("smoke"), out).run()
    return out


@pytest.fixture(scope="session")
def prefect_server() -> str:
    """One Prefect API for every flow run in-process by the tests (:func:`flows.build.prefect_api`).

    Flows called directly would otherwise start Prefect's own temporary server, which cannot start
    where img2dataset's requirement installed the ``dataclasses`` backport (see ``prefect_api``).
    """
    from flows.build import prefect_api

    with prefect_api() as api_url:
        yield api_url
