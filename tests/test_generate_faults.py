"""A refresh cycle whose generation server replies badly stops in `generate`, before anything
reaches the Redis buffer, and the same cycle re-runs to completion once the server is fixed.

Real parts: the demo policy (built once per process, ~30 s), the session's redis-server, the
plain `run_cycle` under the cycle lock (tests/_faults.py), and the loopback OpenAI-compatible
server of tests/fake_openai_server.py as the generation server (its faults are the point).
Slow: it runs three real cycles.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from fake_openai_server import FakeOpenAIServer

from _faults import CONFIG, locked_cycle, prepare_state, small_overrides

pytestmark = pytest.mark.slow


def buffer_snapshot(url: str) -> dict[bytes, bytes]:
    """Every key's serialised value (Redis DUMP), lock keys aside (a cycle holds and frees one)."""
    client = redis.Redis.from_url(url)
    try:
        return {k: client.dump(k) for k in sorted(client.keys("*")) if b":lock:" not in k}
    finally:
        client.close()


def test_a_cycle_failing_in_generate_leaves_the_buffer_unchanged_and_reruns(tmp_path: Path, redis_url: str) -> None:
    from buffer.store import ReplayBuffer
    from offline.registry import PolicyRegistry
    from online.generate import GenerationError
    from orchestrator.config import load_config

    state = tmp_path / "state"
    base = small_overrides(state, redis_url, **{"online.prompts.sample_per_cycle": 24, "online.train_pairs": 32})
    cfg = prepare_state(state, base)
    buf = ReplayBuffer.connect(cfg.buffer)
    try:
        first = locked_cycle(cfg, buf)  # the hf backend: the buffer now holds anchor and fresh pairs
        assert first is not None and first.index == 1 and first.mix["pairs_added"] > 0
        before = buffer_snapshot(redis_url)
        assert any(b":pairs" in k for k in before)

        def served(url: str):
            return load_config(CONFIG, small_overrides(state, redis_url, **{
                "online.prompts.sample_per_cycle": 24, "online.train_pairs": 32,
                "online.generation": {"backend": "openai", "base_url": url, "model": "policy",
                                      "max_retries": 1, "retry_backoff_s": 0.0, "concurrency": 2},
            }))

        # Every reply is a models listing: the server at base_url is not a completions endpoint.
        with FakeOpenAIServer(storm={"wrong_object": 1.0}) as bad:
            with pytest.raises(GenerationError, match=r"/v1/completions: HTTP 200 reply does not have the "
                                                      r"expected shape after 2 tries: ReplyError: `object` is 'list'"):
                locked_cycle(served(bad.base_url), buf)
            assert bad.n_requests >= 2
        assert buffer_snapshot(redis_url) == before  # nothing half-written, not even the anchor seed
        assert PolicyRegistry(state, cfg.name).cycle_state(0.5, 0.1).completed == 1  # the cycle did not count

        with FakeOpenAIServer(storm={"truncated": 1.0}) as bad:  # a body cut mid-JSON
            with pytest.raises(GenerationError, match="reply is not JSON after 2 tries"):
                locked_cycle(served(bad.base_url), buf)
        assert buffer_snapshot(redis_url) == before

        with FakeOpenAIServer() as good:  # the server fixed: the same cycle runs through
            rerun = locked_cycle(served(good.base_url), buf)
            assert good.n_requests >= 24  # its samples came from the server
        assert rerun is not None and rerun.index == 2
        assert PolicyRegistry(state, cfg.name).cycle_state(0.5, 0.1).completed == 2
    finally:
        buf.close()
