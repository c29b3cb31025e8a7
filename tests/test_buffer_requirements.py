"""Redis as operators run it: eviction policies refused, persistence checked, a full Redis named,
old key names renamed. Real redis-servers with the settings in question (tests/_redis_cluster.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from _redis_cluster import NEEDS_REDIS, Server, plain_redis
from buffer import store
from buffer.config import BufferConfig
from buffer.connection import BufferFull, EvictingRedis, NotDurable, ReplayBufferError
from buffer.requirements import ServerFacts, assess, format_bytes, full_message
from buffer.server import LocalRedis
from buffer.store import ReplayBuffer
from offline.pairs import FreshPair, PreferencePair

pytestmark = NEEDS_REDIS


def fresh(cycle: int, n: int, pad: int = 0, tag: str = "f") -> list[FreshPair]:
    return [
        FreshPair(pair=PreferencePair(prompt=f"{tag}{cycle} {i} " + "x" * pad, chosen="good", rejected="bad",
                                      category=f"k{i % 3}"),
                  cycle=cycle, policy_version="v", judge="j", confidence=0.9)
        for i in range(n)
    ]  # fmt: skip


def anchor(n: int, pad: int = 0, tag: str = "a") -> list[PreferencePair]:
    return [PreferencePair(prompt=f"{tag} {i} " + "y" * pad, chosen="c", rejected="r") for i in range(n)]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "buffer.connection"]


# -- the decision, pure ---------------------------------------------------------------------------


def test_only_noeviction_passes_and_allow_eviction_turns_the_refusal_into_a_warning() -> None:
    for policy in ("allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-ttl", "volatile-lfu"):
        facts = [ServerFacts("h:1", policy=policy, policy_source="CONFIG GET", aof=True)]
        refused = assess(facts, allow_eviction=False, require_durable=False)
        assert [r.kind for r in refused.refusals] == ["eviction"] and not refused.warnings
        assert "maxmemory-policy noeviction" in refused.refusals[0].message
        assert "buffer.allow_eviction" in refused.refusals[0].message and policy in refused.refusals[0].message
        allowed = assess(facts, allow_eviction=True, require_durable=False)
        assert not allowed.refusals and len(allowed.warnings) == 1 and policy in allowed.warnings[0]
    ok = assess([ServerFacts("h:1", policy="noeviction", aof=True)], allow_eviction=False, require_durable=True)
    assert ok.refusals == [] and ok.warnings == []


def test_persistence_needs_aof_or_rdb_and_require_durable_refuses_what_it_cannot_verify() -> None:
    def verdict(aof: bool | None, rdb: bool | None, require: bool) -> tuple[list[str], int]:
        v = assess([ServerFacts("h:1", policy="noeviction", aof=aof, rdb=rdb, config_readable=rdb is not None)],
                   allow_eviction=False, require_durable=require)  # fmt: skip
        return [r.kind for r in v.refusals], len(v.warnings)

    assert verdict(True, False, True) == ([], 0)
    assert verdict(False, True, True) == ([], 0)  # RDB snapshots alone count
    assert verdict(False, False, False) == ([], 1)
    assert verdict(False, False, True) == (["durability"], 0)
    assert verdict(False, None, False) == ([], 1)  # CONFIG refused, no snapshot seen: unknown
    assert verdict(False, None, True) == (["durability"], 0)
    unreadable = assess([ServerFacts("h:1")], allow_eviction=False, require_durable=False)
    assert unreadable.refusals == [] and len(unreadable.warnings) == 2  # policy and persistence unknown
    assert "could not read maxmemory-policy" in unreadable.warnings[0]


def test_the_full_message_says_how_full_and_which_policy() -> None:
    facts = ServerFacts("redis://h:1/0", policy="noeviction", used_memory=2_130_000, maxmemory=2 * 1024 * 1024)
    text = full_message(facts)
    assert text.startswith("Redis is full: used 2.03 MiB of maxmemory 2.00 MiB (policy noeviction)")
    assert "maxmemory" in text and "buffer.fresh_capacity" in text
    assert "could not be read" in full_message(None)
    assert [format_bytes(n) for n in (512, 1536, 3 * 1024**3)] == ["512 B", "1.50 KiB", "3.00 GiB"]


# -- the checks against real servers ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_an_evicting_redis_is_refused_naming_the_setting(tmp_path: Path, policy: str) -> None:
    """The issue's server: `redis-server --maxmemory 2mb --maxmemory-policy allkeys-lru`."""
    with plain_redis(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", policy) as server:
        with pytest.raises(EvictingRedis) as err:
            ReplayBuffer.connect(BufferConfig(url=server.url, connect_retries=0))
        text = str(err.value)
        assert f"maxmemory-policy {policy}" in text and "`maxmemory-policy noeviction`" in text
        assert "buffer.allow_eviction: true" in text and server.url in text


def test_allow_eviction_connects_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with plain_redis(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lfu") as server:
        with ReplayBuffer.connect(BufferConfig(url=server.url, allow_eviction=True)) as buf:
            buf.seed_anchor(anchor(3), "fp")
            assert buf.count("anchor") == 3
    assert any("allkeys-lfu" in w and "buffer.allow_eviction is true" in w for w in warnings_of(caplog))


def test_a_redis_persisting_nothing_is_a_warning_or_refused_under_require_durable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with plain_redis(tmp_path, "--appendonly", "no", "--save", "") as server:
        with pytest.raises(NotDurable, match=r"persists nothing .* buffer\.require_durable is true"):
            ReplayBuffer.connect(BufferConfig(url=server.url, require_durable=True))
        ReplayBuffer.connect(BufferConfig(url=server.url)).close()
        assert any("persists nothing" in w and "--appendonly yes" in w for w in warnings_of(caplog))
        server.command("CONFIG", "SET", "save", "3600 1")  # RDB snapshots: durable enough
        ReplayBuffer.connect(BufferConfig(url=server.url, require_durable=True)).close()


def test_with_config_disabled_the_policy_is_read_from_info(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Managed Redis often forbids CONFIG: INFO memory still names the policy."""
    caplog.set_level(logging.WARNING)
    with plain_redis(tmp_path / "a", "--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", "") as server:
        with pytest.raises(EvictingRedis, match="read by INFO memory"):
            ReplayBuffer.connect(BufferConfig(url=server.url))
    with plain_redis(tmp_path / "b", "--appendonly", "no", "--rename-command", "CONFIG", "") as server:
        with pytest.raises(NotDurable, match="CONFIG is refused"):  # RDB save points unknowable
            ReplayBuffer.connect(BufferConfig(url=server.url, require_durable=True))
    with plain_redis(tmp_path / "c", "--appendonly", "yes", "--rename-command", "CONFIG", "") as server:
        ReplayBuffer.connect(BufferConfig(url=server.url, require_durable=True)).close()  # AOF shows in INFO


def test_unreadable_settings_warn_once_and_go_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with plain_redis(tmp_path, "--rename-command", "CONFIG", "", "--rename-command", "INFO", "") as server:
        for _ in range(3):
            with ReplayBuffer.connect(BufferConfig(url=server.url)) as buf:
                buf.seed_anchor(anchor(2), "fp")
    said = [w for w in warnings_of(caplog) if "could not read maxmemory-policy" in w]
    assert len(said) == 1 and server.url in said[0]


def test_the_embedded_redis_passes_the_checks_as_it_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with LocalRedis(tmp_path) as local:
        cfg = BufferConfig(require_durable=True)  # allow_eviction stays false
        with ReplayBuffer.connect(cfg, url=local.url) as buf:
            facts = buf.connection.facts()
            assert (facts.policy, facts.aof, facts.rdb) == ("noeviction", True, False)
    assert warnings_of(caplog) == []


# -- a full Redis ----------------------------------------------------------------------------------


def snapshot(server: Server, namespace: str = "tether") -> dict[str, Any]:
    """Every key of the namespace with its type and whole value (RESP, not redis-py)."""
    out: dict[str, Any] = {}
    for key in sorted(server.command("KEYS", f"{{{namespace}}}:*")):  # type: ignore[arg-type]
        kind = server.command("TYPE", key)
        if kind == "hash":  # as a dict: field order changes with the encoding, not the contents
            flat = server.command("HGETALL", key)
            value: Any = dict(zip(flat[::2], flat[1::2]))  # type: ignore[index]
        elif kind == "zset":
            value = server.command("ZRANGE", key, 0, -1, "WITHSCORES")
        else:
            value = server.command("GET", key)
        out[key] = (kind, value)
    return out


def fill_until_full(buf: ReplayBuffer, server: Server) -> tuple[dict[str, Any], BufferFull]:
    """Add cycles until Redis refuses one; the namespace as it was just before the refused write."""
    for cycle in range(1, 200):
        before = snapshot(server)
        try:
            buf.add_fresh(fresh(cycle, 50, pad=400))
        except BufferFull as e:
            return before, e
    raise AssertionError("Redis never filled up")


def test_a_full_redis_is_a_clear_error_and_the_refused_write_leaves_nothing(tmp_path: Path) -> None:
    with plain_redis(tmp_path, "--maxmemory", "3mb", "--maxmemory-policy", "noeviction", "--appendonly", "yes") as server:
        with ReplayBuffer.connect(BufferConfig(url=server.url)) as buf:
            before, err = fill_until_full(buf, server)
            assert str(err).startswith("Redis is full: used ") and "(policy noeviction)" in str(err)
            assert "of maxmemory 3.00 MiB" in str(err)
            assert snapshot(server) == before  # the refused add_fresh: nothing of it
            counts = (buf.count("anchor"), buf.count("fresh"))
            # Redis counted the refused call's own arguments as used memory: set the limit clearly
            # under what the data takes, so the smaller writes below are refused for certain.
            used = int(server.info("memory")["used_memory"])
            server.command("CONFIG", "SET", "maxmemory", used - 256 * 1024)

            with pytest.raises(BufferFull):  # a seed of one chunk is one script: nothing of it either
                buf.seed_anchor(anchor(200, pad=200), "dataset-1")
            assert snapshot(server) == before and server.command("EXISTS", "{tether}:anchor") == 0

            with pytest.raises(BufferFull):  # the registry mirror and the cycle lock say the same
                buf.pointers.set("current:demo", {"cycle": 1})
            with pytest.raises(BufferFull), buf.locks.hold("cycle:demo", blocking=False):
                pass
            assert snapshot(server) == before
            assert (buf.count("anchor"), buf.count("fresh")) == counts
            assert len(buf.sample(20, 0.0, seed=1).pairs) == 20  # reads still work


def test_a_long_seed_cut_by_a_full_redis_is_removed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seed of many chunks stored a few before Redis filled up: the call removes them, so the
    pairs, indexes, groups and the anchor record are as before. (The version token is new: it
    changes whenever membership does, here twice.)"""
    monkeypatch.setattr(store, "SEED_CHUNK", 100)
    with plain_redis(tmp_path, "--maxmemory", "3mb", "--appendonly", "yes") as server:
        with ReplayBuffer.connect(BufferConfig(url=server.url)) as buf:
            buf.add_fresh(fresh(1, 30))
            before = snapshot(server)
            with pytest.raises(BufferFull, match=r"Nothing of this seed of 'big' remains \(the [1-9]\d* pairs"):
                buf.seed_anchor(anchor(5_000, pad=400), "big")
            after = snapshot(server)
            assert {k: v for k, v in after.items() if k != "{tether}:version"} == \
                   {k: v for k, v in before.items() if k != "{tether}:version"}  # fmt: skip
            assert buf.count("anchor") == 0 and buf.count("fresh") == 30
            server.command("CONFIG", "SET", "maxmemory", "0")  # room again: the same seed now goes in whole
            assert buf.seed_anchor(anchor(5_000, pad=400), "big").added == 5_000


# -- keys written under the old names ---------------------------------------------------------------


def to_old_names(server: Server | LocalRedis, namespace: str = "tether") -> list[str]:
    """Rename every `{ns}:x` key back to the pre-hash-tag `ns:x`, as an older tether wrote them."""
    keys = sorted(server.command("KEYS", f"{{{namespace}}}:*"))  # type: ignore[arg-type]
    for key in keys:
        server.command("RENAME", key, f"{namespace}:{key[len(namespace) + 3:]}")
    return keys


def test_a_buffer_under_the_old_key_names_is_renamed_once_on_connect(tmp_path: Path) -> None:
    with LocalRedis(tmp_path) as local:
        cfg = BufferConfig()
        with ReplayBuffer.connect(cfg, url=local.url) as buf:
            buf.seed_anchor(anchor(20), "fp")
            buf.add_fresh(fresh(1, 12))
            buf.pointers.set("current:demo", {"cycle": 1})
            expected = buf.sample(10, 0.5, seed=3).pairs
        with ReplayBuffer.connect(cfg, url=local.url) as buf, buf.locks.hold("cycle:demo", ttl_s=600):
            keys = to_old_names(local)
            assert local.command("EXISTS", "tether:pairs") == 1 and local.command("TTL", "tether:lock:cycle:demo") > 0
            with ReplayBuffer.connect(cfg, url=local.url) as again:  # the rename, while the lock is held
                assert sorted(local.command("KEYS", "*")) == keys  # type: ignore[arg-type]
                assert local.command("TTL", "{tether}:lock:cycle:demo") > 0  # RENAME keeps the lock's TTL
                assert again.sample(10, 0.5, seed=3).pairs == expected
                assert again.pointers.get("current:demo") == {"cycle": 1}
                assert again.stats().anchor_fingerprint == "fp"


def test_old_and_new_key_names_together_are_refused_renaming_nothing(tmp_path: Path) -> None:
    with LocalRedis(tmp_path) as local:
        with ReplayBuffer.connect(BufferConfig(), url=local.url) as buf:
            buf.seed_anchor(anchor(5), "fp")
        to_old_names(local)
        local.command("SET", "{tether}:version", "x")  # as if a newer tether wrote here too
        before = sorted(local.command("KEYS", "*"))  # type: ignore[arg-type]
        with pytest.raises(ReplayBufferError, match=r"both the old key names \(tether:\*\) and the new") as err:
            ReplayBuffer.connect(BufferConfig(), url=local.url)
        assert "redis-cli --scan --pattern 'tether:*'" in str(err.value)
        assert sorted(local.command("KEYS", "*")) == before  # type: ignore[arg-type]
