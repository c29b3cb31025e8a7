"""The replay buffer on a real 3-node Redis Cluster (tests/_redis_cluster.py starts it on loopback):
every key of a namespace in one slot, every script and command the cycle uses working there."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from _redis_cluster import NEEDS_REDIS, Server, cluster_fixture  # noqa: F401 (the `cluster` fixture)
from buffer import connection
from buffer.config import BufferConfig
from buffer.connection import BufferFull, BufferUnavailable, NotDurable
from buffer.export import export_buffer, import_buffer
from buffer.lock import LockHeld
from buffer.store import ReplayBuffer
from offline.pairs import FreshPair, PreferencePair

pytestmark = NEEDS_REDIS


def config(servers: list[Server], namespace: str, **kw: object) -> BufferConfig:
    return BufferConfig(url=servers[0].url, cluster=True, namespace=namespace, **kw)  # type: ignore[arg-type]


def fresh(cycle: int, n: int, categories: int = 3, tag: str = "f") -> list[FreshPair]:
    return [
        FreshPair(pair=PreferencePair(prompt=f"{tag}{cycle} q{i}", chosen=f"good {i}", rejected=f"bad {i}",
                                      category=f"{tag}{i % categories}"),
                  cycle=cycle, policy_version=f"v{cycle}", judge="j", confidence=0.8)
        for i in range(n)
    ]  # fmt: skip


def anchor(n: int, tag: str = "a") -> list[PreferencePair]:
    return [PreferencePair(prompt=f"{tag} {i}", chosen="c", rejected="r", category=f"a{i % 2}") for i in range(n)]


def keys_by_node(servers: list[Server], namespace: str) -> dict[int, list[str]]:
    """The namespace's keys on each node that holds any (KEYS on each node, not through the cluster)."""
    out = {}
    for s in servers:
        keys = sorted(s.command("KEYS", f"{{{namespace}}}:*"))  # type: ignore[arg-type]
        if keys:
            out[s.port] = keys
    return out


def assert_consistent(buf: ReplayBuffer) -> None:
    groups, _ = buf.groups()
    client, key = buf.connection.client, buf.connection.key
    pairs = client.hlen(key("pairs"))
    assert sum(g.size for g in groups) == pairs
    assert sum(client.zcard(k) for k in client.scan_iter(match=key("idx:*"))) == pairs
    assert client.zcard(key("fresh:order")) == sum(g.size for g in groups if g.pool == "fresh")


def test_cluster_needs_a_url_of_database_0() -> None:
    with pytest.raises(ValidationError, match="needs buffer.url"):
        BufferConfig(cluster=True)
    with pytest.raises(ValidationError, match="only database 0"):
        BufferConfig(url="redis://h:7000/2", cluster=True)
    assert BufferConfig(url="redis://h:7000/0", cluster=True).cluster


def test_the_cycle_protocol_runs_on_a_cluster(cluster: list[Server], tmp_path: Path) -> None:
    cfg = config(cluster, "proto", fresh_capacity=40)
    with ReplayBuffer.connect(cfg) as buf:
        assert buf.connection.cluster
        seeded = buf.seed_anchor(anchor(30), "dataset-1")
        assert (seeded.added, buf.seed_anchor(anchor(30), "dataset-1").existing) == (30, 30)
        added = [buf.add_fresh(fresh(c, 15)) for c in (1, 2, 3)]
        assert [a.added for a in added] == [15, 15, 15] and added[-1].evicted == 5  # capacity 40
        assert buf.add_fresh(fresh(3, 15)).duplicates == 15
        batch = buf.sample(24, 0.25, seed=7)
        assert (batch.stats.anchor, batch.stats.fresh) == (6, 18)
        assert [p.id for p in buf.sample(24, 0.25, seed=7).pairs] == [p.id for p in batch.pairs]  # reproducible
        assert buf.get([batch.pairs[0].id])[0] == batch.pairs[0]
        stats = buf.stats()
        assert (stats.anchor, stats.fresh, stats.anchor_fingerprint) == (30, 40, "dataset-1")
        assert stats.memory_bytes > 0 and set(stats.per_cycle) == {1, 2, 3} and stats.per_cycle[1] == 10

        buf.pointers.set("current:demo", {"cycle": 3, "path": "/x"})
        assert buf.pointers.get("current:demo") == {"cycle": 3, "path": "/x"}
        with buf.locks.hold("cycle:demo", ttl_s=30, blocking=False, heartbeat_s=5) as held:
            assert held.held()
            with pytest.raises(LockHeld), buf.locks.hold("cycle:demo", ttl_s=30, blocking=False):
                pass
        with buf.locks.hold("cycle:demo", ttl_s=30, blocking=False):  # released: free again
            pass

        snapshot = tmp_path / "snap.jsonl"
        assert export_buffer(buf, snapshot) == 70
        replaced = buf.seed_anchor(anchor(4, tag="b"), "dataset-2", replace=True)
        assert (replaced.added, replaced.removed, buf.count("anchor")) == (4, 30, 4)
        assert_consistent(buf)
        assert buf.clear() > 0 and keys_by_node(cluster, "proto") == {}
        seeded_back, restored = import_buffer(buf, snapshot)
        assert seeded_back is not None and seeded_back.added == 30 and restored.added == 40
        assert (buf.count("anchor"), buf.count("fresh")) == (30, 40)
        assert_consistent(buf)


def test_a_namespace_lives_on_one_node_and_namespaces_spread_over_the_nodes(cluster: list[Server]) -> None:
    homes: dict[str, int] = {}
    for i in range(40):  # find two namespaces whose slots two different nodes own
        with ReplayBuffer.connect(config(cluster, f"ns{i}")) as buf:
            node = buf.connection.home_node()
            assert node is not None
            if node.port not in homes.values():
                buf.seed_anchor(anchor(5), "fp")
                buf.add_fresh(fresh(1, 6))
                buf.pointers.set("p", {"a": 1})
                homes[f"ns{i}"] = node.port
        if len(homes) == 2:
            break
    assert len(homes) == 2
    for namespace, port in homes.items():
        placed = keys_by_node(cluster, namespace)
        assert list(placed) == [port]  # all of it on the node owning its slot
        assert {k.split(":", 1)[1].split(":")[0] for k in placed[port]} >= {"pairs", "groups", "anchor", "idx", "pointer"}


def test_a_category_only_another_client_knows_is_handed_to_the_write(cluster: list[Server]) -> None:
    """Eviction may pop pairs of a fresh category this client never saw (another writer added it);
    the script names the index key it was not handed, writes nothing, and the retry succeeds."""
    cfg = config(cluster, "two-writers", fresh_capacity=20)
    with ReplayBuffer.connect(cfg) as first, ReplayBuffer.connect(cfg) as second:
        first.add_fresh(fresh(1, 10, categories=1, tag="x"))
        second.add_fresh(fresh(2, 10, categories=1, tag="y"))  # a category `first` has not seen
        unseen = second.connection.key("idx:fresh:c:y0")
        assert unseen not in first._index_keys
        result = first.add_fresh(fresh(3, 15, categories=1, tag="z"))  # evicts all of x and half of y
        assert (result.added, result.evicted) == (15, 15) and unseen in first._index_keys
        assert first.stats().per_cycle == {2: 5, 3: 15}
        assert_consistent(first)


def test_the_checks_cover_every_node(
    cluster: list[Server], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(connection, "_WARNED", set())  # earlier tests' connects said it already
    with pytest.raises(NotDurable, match=r"127\.0\.0\.1:\d+ persists nothing"):
        ReplayBuffer.connect(config(cluster, "checks", require_durable=True))
    ReplayBuffer.connect(config(cluster, "checks")).close()
    warned = {r.getMessage().split()[2] for r in caplog.records if "persists nothing" in r.getMessage()}
    assert warned == {f"127.0.0.1:{s.port}" for s in cluster}  # the test cluster keeps nothing: said per node


def test_a_full_cluster_node_is_named(cluster: list[Server]) -> None:
    with ReplayBuffer.connect(config(cluster, "full")) as buf:
        buf.add_fresh(fresh(1, 5))
        node = buf.connection.home_node()
        home = next(s for s in cluster if s.port == node.port)  # type: ignore[union-attr]
        home.command("CONFIG", "SET", "maxmemory", 1)
        try:
            with pytest.raises(BufferFull, match=rf"Redis is full: used .* of maxmemory 1 B \(policy noeviction\) "
                                                 rf"at 127\.0\.0\.1:{home.port}"):  # fmt: skip
                buf.add_fresh(fresh(2, 5))
            assert buf.count("fresh") == 5
        finally:
            home.command("CONFIG", "SET", "maxmemory", 0)


def test_the_wrong_client_for_the_server_says_which_to_use(cluster: list[Server], redis_url: str) -> None:
    with pytest.raises(BufferUnavailable, match="is a node of a Redis Cluster: set buffer.cluster: true"):
        ReplayBuffer.connect(BufferConfig(url=cluster[0].url))
    with pytest.raises(BufferUnavailable, match="buffer.cluster: false for a single Redis"):
        ReplayBuffer.connect(BufferConfig(url=redis_url, cluster=True))
