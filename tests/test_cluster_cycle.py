"""One refresh cycle of the demo through the Prefect flow with its replay buffer on a real 3-node
Redis Cluster (tests/_redis_cluster.py): seed, atomic add, mixed draw and the cycle lock there."""

from __future__ import annotations

from pathlib import Path

from orchestrator.runtime import configure_prefect

configure_prefect()

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from _faults import CONFIG, prepare_state, small_overrides  # noqa: E402
from _redis_cluster import NEEDS_REDIS, Server, cluster_fixture  # noqa: E402, F401 (the `cluster` fixture)
from buffer.config import BufferConfig  # noqa: E402
from buffer.store import ReplayBuffer  # noqa: E402
from orchestrator import flows  # noqa: E402


@NEEDS_REDIS
def test_a_refresh_cycle_of_the_demo_runs_on_a_redis_cluster(cluster: list[Server], tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    overrides = small_overrides(state_dir, None, **{"buffer.url": cluster[0].url, "buffer.cluster": True})
    prepare_state(state_dir, overrides)
    with prefect_test_harness(server_startup_timeout=60):
        state = flows.refresh_cycle(str(CONFIG), overrides, run_label="cluster", progress=False, return_state=True)
    assert state.is_completed(), state
    report = state.result()
    assert report["index"] == 1 and not report["skipped"]
    assert report["mix"]["pairs_added"] > 0 and "buffer/anchor_fraction" in report["mix"]
    with ReplayBuffer.connect(BufferConfig(url=cluster[0].url, cluster=True)) as buf:
        stats = buf.stats()
        assert stats.anchor > 0 and stats.per_cycle.get(1, 0) > 0  # seeded, and cycle 1's pairs added
        home = buf.connection.home_node()
        assert home is not None
        for server in cluster:  # every key of the namespace on the node owning its slot, none elsewhere
            keys = server.command("KEYS", "{tether}:*")
            assert (len(keys) > 0) == (server.port == home.port), (server.port, keys)  # type: ignore[arg-type]
        assert buf.connection.client.get(buf.connection.key("lock:cycle:demo")) is None  # released
