"""Crashes: a cycle's pairs are all there or none, and AOF keeps every acknowledged pair.

Each test runs its own redis-server (appendfsync always) in a tmp dir, so it can kill it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from buffer.config import BufferConfig
from buffer.records import BufferedPair
from buffer.server import LocalRedis, resp_command
from buffer.connection import BufferUnavailable
from buffer.store import ReplayBuffer
from offline.pairs import PreferencePair

REPO = Path(__file__).resolve().parents[1]


def cycle(n: int, c: int, pad: int = 0) -> list[BufferedPair]:
    return [
        BufferedPair.fresh(PreferencePair(prompt=f"c{c} q{i} " + "x" * pad, chosen=f"y{i}", rejected=f"n{i}"), cycle=c)
        for i in range(n)
    ]


def assert_consistent(buf: ReplayBuffer) -> None:
    """Every index agrees with the pair hash: no half-written cycle anywhere."""
    groups, _ = buf.groups()
    key = buf.connection.key
    pairs = buf.connection.client.hlen(key("pairs"))
    assert sum(g.size for g in groups) == pairs
    indexed = sum(buf.connection.client.zcard(k) for k in buf.connection.client.scan_iter(match=key("idx:*")))
    assert indexed == pairs
    assert buf.connection.client.zcard(key("fresh:order")) == sum(g.size for g in groups if g.pool == "fresh")


def test_acknowledged_pairs_survive_sigkill_with_appendfsync_always(tmp_path: Path) -> None:
    cfg = BufferConfig(appendfsync="always")
    with LocalRedis(tmp_path, appendfsync="always") as server:
        buf = ReplayBuffer.connect(cfg, url=server.url)
        buf.seed_anchor([PreferencePair(prompt=f"a{i}", chosen="y", rejected="n") for i in range(200)], "fp")
        recs = cycle(300, 0) + cycle(300, 1)
        buf.add(recs[:300])
        buf.add(recs[300:])
        buf.pointers.set("current_policy", {"checkpoint": "ckpt-1"})
        before = buf.sample(64, 0.5, seed=1)
        buf.close()
        server.kill()  # SIGKILL: no shutdown, no final fsync
    with LocalRedis(tmp_path, appendfsync="always") as server:
        buf = ReplayBuffer.connect(cfg, url=server.url)
        assert (buf.count("anchor"), buf.count("fresh")) == (200, 600)
        assert buf.get([r.id for r in recs]) == recs
        assert buf.pointers.get("current_policy") == {"checkpoint": "ckpt-1"}
        assert buf.sample(64, 0.5, seed=1) == before
        assert_consistent(buf)
        buf.close()


def two_cycles_then_sigkill(tmp_path: Path, cfg: BufferConfig) -> tuple[Path, bytes, int]:
    """Cycle 0 (100 pairs) and cycle 1 (1000) written, then redis-server SIGKILLed: the AOF's
    incr file, its bytes, and where the last cycle's MULTI starts in them."""
    with LocalRedis(tmp_path, appendfsync="always") as server:
        buf = ReplayBuffer.connect(cfg, url=server.url)
        buf.add(cycle(100, 0))
        buf.add(cycle(1000, 1))
        buf.close()
        server.kill()
    (aof,) = (tmp_path / "appendonlydir").glob("*.incr.aof")
    data = aof.read_bytes()
    return aof, data, data.rindex(b"MULTI")


def tear_inside_multi(aof: Path, data: bytes, start: int) -> None:
    """Cut the AOF inside the transaction at `start`, in its second command: MULTI and the first
    write (the pair hash) whole, the index writes torn, as a crash mid-append can leave it."""
    second = data.index(b"\r\n*", data.index(b"HSET", start)) + 2  # the command after the HSET
    aof.write_bytes(data[: second + 40])


def test_a_write_torn_by_a_crash_is_dropped_whole(tmp_path: Path) -> None:
    """A crash in the middle of appending a cycle to the AOF: on restart, none of it is there."""
    cfg = BufferConfig(appendfsync="always")
    aof, data, start = two_cycles_then_sigkill(tmp_path, cfg)
    aof.write_bytes(data[: start + (len(data) - start) // 2])  # the crash cut it in half
    with LocalRedis(tmp_path, appendfsync="always") as server:
        buf = ReplayBuffer.connect(cfg, url=server.url)
        assert buf.stats().per_cycle == {0: 100}
        assert_consistent(buf)
        buf.close()


def test_a_torn_write_stays_dropped_after_the_next_write_and_restart(tmp_path: Path) -> None:
    """redis-server cuts a torn AOF tail at the last whole command, which can leave the file
    ending in the torn transaction's open MULTI. The next write's MULTI...EXEC, appended after
    it, then replays the torn half at the following restart (pairs with no index entries: the
    fault suite found it; valkey-io/valkey#4342). LocalRedis compacts such an AOF on start."""
    cfg = BufferConfig(appendfsync="always")
    tear_inside_multi(*two_cycles_then_sigkill(tmp_path, cfg))
    with LocalRedis(tmp_path, appendfsync="always") as server:
        buf = ReplayBuffer.connect(cfg, url=server.url)
        assert buf.stats().per_cycle == {0: 100}
        buf.add(cycle(50, 2))  # the next write, appended after whatever the tail is
        buf.close()
    with LocalRedis(tmp_path, appendfsync="always") as server:
        buf = ReplayBuffer.connect(cfg, url=server.url)
        assert buf.stats().per_cycle == {0: 100, 2: 50}
        assert buf.connection.client.hlen(buf.connection.key("pairs")) == 150  # no torn half of cycle 1
        assert_consistent(buf)
        buf.close()
    assert "MULTI calls can not be nested" not in (tmp_path / "redis.log").read_text()


def test_redis_killed_while_running_a_cycle_write_keeps_all_or_nothing(tmp_path: Path) -> None:
    cfg = BufferConfig(appendfsync="always", connect_retries=0)
    n = 5000
    records = cycle(n, 0, pad=200)
    with LocalRedis(tmp_path, appendfsync="always") as server:
        buf = ReplayBuffer.connect(cfg, url=server.url)
        acked: list[bool] = []

        def write() -> None:
            try:
                buf.add(records)
                acked.append(True)
            except BufferUnavailable:
                acked.append(False)

        writer = threading.Thread(target=write)
        writer.start()
        # Redis runs one script at a time: when PING stops answering, the cycle's script is running.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and writer.is_alive():
            try:
                resp_command(server.port, "PING", timeout_s=0.1)
            except OSError:
                break
        server.kill()
        writer.join(timeout=30)
        buf.close()
    with LocalRedis(tmp_path, appendfsync="always") as server:
        buf = ReplayBuffer.connect(cfg, url=server.url)
        assert buf.count("fresh") in (0, n)
        if acked == [True]:
            assert buf.count("fresh") == n  # acknowledged means durable
        assert_consistent(buf)
        buf.close()


# The child sends the first half of one cycle's write command, then waits to be killed.
_WRITER = r"""
import socket, sys
from buffer.config import BufferConfig
from buffer.records import BufferedPair
from buffer.scripts import ADD_LUA
from buffer.store import ReplayBuffer
from offline.pairs import PreferencePair
recs = [BufferedPair.fresh(PreferencePair(prompt=f"big {i}", chosen="y", rejected="n"), cycle=0) for i in range(500)]
buf = ReplayBuffer.connect(BufferConfig(url=sys.argv[1]))
keys, argv = buf._add_call(recs, guard="")
args = ["EVAL", ADD_LUA, len(keys), *keys, *argv]
blob = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (str(x).encode() for x in args))
sock = socket.create_connection((buf.connection.client.connection_pool.connection_kwargs["host"],
                                 buf.connection.client.connection_pool.connection_kwargs["port"]))
sock.sendall(blob if sys.argv[2] == "all" else blob[: len(blob) // 2])
print("sent", flush=True)
print(sock.recv(100) if sys.argv[2] == "all" else "", flush=True)
sys.stdin.read()
"""


def _run_writer(redis_url: str, how: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, redis_url, how],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "sent"
    if how == "all":
        assert child.stdout.readline().startswith("b'*3")  # the script's reply: added, dup, evicted
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def test_writer_killed_mid_write_leaves_nothing(redis_url: str) -> None:
    _run_writer(redis_url, "half")  # killed with half the command sent
    with ReplayBuffer.connect(BufferConfig(url=redis_url)) as buf:
        assert buf.count() == 0
        assert_consistent(buf)
    _run_writer(redis_url, "all")  # control: the same write, completed, is all there
    with ReplayBuffer.connect(BufferConfig(url=redis_url)) as buf:
        assert buf.count("fresh") == 500
        assert_consistent(buf)
