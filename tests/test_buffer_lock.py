"""The cycle lock across real processes: exclusion, expiry after the holder dies, heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from buffer.config import BufferConfig
from buffer.lock import CycleLock, LockHeld, LockLost, LockTimeout, cycle_lock
from buffer.store import ReplayBuffer

REPO = Path(__file__).resolve().parents[1]

_HOLDER = """
import sys, time
from buffer.config import BufferConfig
from buffer.store import ReplayBuffer
buf = ReplayBuffer.connect(BufferConfig(url=sys.argv[1]))
with buf.locks.hold("cycle", ttl_s=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def buf(redis_url: str) -> Iterator[ReplayBuffer]:
    with ReplayBuffer.connect(BufferConfig(url=redis_url)) as b:
        yield b


def test_a_second_process_waits_and_gets_the_lock_once_the_killed_holder_expires(
    buf: ReplayBuffer, redis_url: str
) -> None:
    ttl = 1.5
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, redis_url, str(ttl)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=rf"held by .*:{holder.pid} \(expires in"):
            with buf.locks.hold("cycle", blocking=False):
                pass
        with pytest.raises(LockTimeout, match="still taken after 0.3 s"):
            with buf.locks.hold("cycle", timeout_s=0.3):
                pass
        os.kill(holder.pid, signal.SIGKILL)  # crashes without releasing
        killed = time.monotonic()
        with buf.locks.hold("cycle", timeout_s=ttl + 5) as held:
            waited = time.monotonic() - killed
            assert held.held()
        assert waited <= ttl + 1.0
    finally:
        holder.kill()
        holder.wait()
    assert buf.connection.client.get(buf.connection.key("lock:cycle")) is None  # released on exit


def test_only_the_holder_can_release_or_extend(buf: ReplayBuffer) -> None:
    with cycle_lock(buf.connection.client, "{tether}:lock:x", ttl_s=5, blocking=False) as held:
        impostor = CycleLock(buf.connection.client, "{tether}:lock:x", "someone:else:token", ttl_s=5)
        assert impostor.release() is False
        with pytest.raises(LockLost):
            impostor.extend()
        assert held.held()
        held.extend(30)
        assert buf.connection.client.pttl("{tether}:lock:x") > 20_000


def test_heartbeat_keeps_a_long_cycle_locked(buf: ReplayBuffer) -> None:
    with buf.locks.hold("long", ttl_s=0.6, heartbeat_s=0.1, blocking=False) as held:
        time.sleep(1.2)  # 2 TTLs
        assert held.held()
        with pytest.raises(LockHeld):
            with buf.locks.hold("long", blocking=False):
                pass


def test_losing_the_lock_mid_cycle_is_an_error(buf: ReplayBuffer) -> None:
    with pytest.raises(LockLost, match="another cycle may have run concurrently"):
        with buf.locks.hold("short", ttl_s=0.2, blocking=False):
            time.sleep(0.35)  # expired: someone else may now take it
            with buf.locks.hold("short", blocking=False):
                pass
