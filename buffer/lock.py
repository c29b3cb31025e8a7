"""A named Redis lock with a TTL: one training cycle at a time, and a crashed holder frees it.

Contract. `cycle_lock(client, name, ttl_s)` is a context manager holding key `name` with a
random token (`SET name token NX PX ttl`). Only the holder's token can release or extend it
(compare-and-delete / compare-and-expire in Lua). If the holder dies, the key expires after
`ttl_s` and the next cycle may start. Long cycles keep it with `held.extend()` or the
`heartbeat_s` thread. If the lock was lost anyway (expired, taken over), leaving the block
raises `LockLost`: another cycle may have run concurrently, which must not pass silently.

Every step is safe to retry after a dropped connection (redis-py retries): a retried
acquire that finds our own token counts as acquired. `client` is a redis-py client, used
through the small `LockClient` protocol, so this module does not import redis.

`Locks(connection).hold(name)` is `cycle_lock` on the buffer namespace's key `{<ns>}:lock:<name>`,
with `buffer.lock_ttl_s` as the default TTL and Redis errors raised as `ReplayBufferError`s;
the replay buffer hands one out as `ReplayBuffer.locks`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from buffer.connection import BufferConnection

# KEYS[1] = lock key; ARGV[1] = token (ARGV[2] = ttl in ms for extend)
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_EXTEND_LUA = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)


class LockClient(Protocol):
    def set(self, name: str, value: str, *, nx: bool = ..., px: int | None = ...) -> Any: ...
    def get(self, name: str) -> Any: ...
    def pttl(self, name: str) -> Any: ...
    def eval(self, script: str, numkeys: int, *keys_and_args: str | int) -> Any: ...


class LockHeld(RuntimeError):
    """Someone else holds the lock (non-blocking acquire)."""


class LockTimeout(LockHeld):
    """The lock stayed taken for the whole `timeout_s` (blocking acquire)."""


class LockLost(RuntimeError):
    """The lock expired or was taken over while we believed we held it."""


def _holder(token: str | None) -> str:
    """'host:pid' from a token, for error messages."""
    return token.rsplit(":", 1)[0] if token else "nobody"


class CycleLock:
    """A held lock: `extend()` it during long work; `release()` happens when the block exits."""

    def __init__(self, client: LockClient, name: str, token: str, ttl_s: float) -> None:
        self.client = client
        self.name = name
        self.token = token
        self.ttl_s = ttl_s
        self.lost = False

    def __repr__(self) -> str:
        return f"CycleLock({self.name!r}, holder={_holder(self.token)!r}, ttl_s={self.ttl_s})"

    def extend(self, ttl_s: float | None = None) -> None:
        """Reset the TTL to `ttl_s` (default: the original) from now; raises LockLost if not ours."""
        ok = self.client.eval(_EXTEND_LUA, 1, self.name, self.token, int((ttl_s or self.ttl_s) * 1000))
        if not ok:
            self.lost = True
            raise LockLost(
                f"lock {self.name!r} is no longer held by this process (it expired after {self.ttl_s:g} s "
                f"or was taken over); raise buffer.lock_ttl_s or extend it more often"
            )

    def held(self) -> bool:
        """Whether the key still carries our token."""
        return bool(self.client.get(self.name) == self.token)

    def release(self) -> bool:
        """Delete the key if it is still ours; True if it was."""
        return bool(self.client.eval(_RELEASE_LUA, 1, self.name, self.token))


def _try_acquire(client: LockClient, name: str, token: str, ttl_ms: int) -> bool:
    if client.set(name, token, nx=True, px=ttl_ms):
        return True
    # A retried SET after a lost reply fails NX on our own key: that still means we hold it.
    return bool(client.get(name) == token)


def _busy_message(client: LockClient, name: str, what: str) -> str:
    owner = client.get(name)
    ttl_ms = client.pttl(name)
    expires = f"expires in {ttl_ms / 1000:.1f} s" if isinstance(ttl_ms, int) and ttl_ms > 0 else "expiring"
    return (
        f"lock {name!r} {what}: held by {_holder(owner)} ({expires}); another training cycle is running. "
        f"Wait for it; if its process died the lock frees itself when the TTL runs out"
    )


@contextmanager
def cycle_lock(
    client: LockClient,
    name: str,
    ttl_s: float,
    blocking: bool = True,
    timeout_s: float | None = None,
    *,
    heartbeat_s: float | None = None,
    poll_s: float = 0.05,
) -> Iterator[CycleLock]:
    """Hold the lock `name` for the block; expire it after `ttl_s` if the holder dies.

    blocking=False raises `LockHeld` at once if taken; blocking=True waits (polling, up to
    `timeout_s`, forever when None) and raises `LockTimeout`. With `heartbeat_s`, a daemon
    thread extends the TTL that often (pick well under `ttl_s`).
    """
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    ttl_ms = max(1, int(ttl_s * 1000))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delay = poll_s
    while not _try_acquire(client, name, token, ttl_ms):
        if not blocking:
            raise LockHeld(_busy_message(client, name, "is taken"))
        if deadline is not None and time.monotonic() >= deadline:
            raise LockTimeout(_busy_message(client, name, f"still taken after {timeout_s:g} s"))
        pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)
        delay = min(delay * 1.5, 0.25)  # a freed lock is noticed within 0.25 s
    held = CycleLock(client, name, token, ttl_s)
    stop = threading.Event()
    beat = None
    if heartbeat_s is not None:

        def heartbeat() -> None:
            while not stop.wait(heartbeat_s):
                try:
                    held.extend()
                except LockLost:
                    return
                except Exception:  # a blip: the next beat retries before the TTL runs out
                    continue

        beat = threading.Thread(target=heartbeat, name=f"lock-heartbeat:{name}", daemon=True)
        beat.start()
    ok = False
    try:
        yield held
        ok = True
    finally:
        stop.set()
        if beat is not None:
            beat.join()
        released = held.release()
        if ok and (held.lost or not released):
            raise LockLost(
                f"lock {name!r} expired or was taken over before the block finished (ttl {ttl_s:g} s); "
                f"another cycle may have run concurrently: raise buffer.lock_ttl_s or use heartbeat_s"
            )


class Locks:
    """The buffer namespace's named locks (`{<ns>}:lock:<name>`)."""

    def __init__(self, connection: BufferConnection) -> None:
        self.connection = connection

    @contextmanager
    def hold(
        self,
        name: str = "cycle",
        *,
        ttl_s: float | None = None,
        blocking: bool = True,
        timeout_s: float | None = None,
        heartbeat_s: float | None = None,
    ) -> Iterator[CycleLock]:
        """`cycle_lock` on `{<ns>}:lock:<name>`, with the configured TTL unless `ttl_s` is given."""
        conn = self.connection
        with conn.errors():
            with cycle_lock(
                conn.client, conn.key(f"lock:{name}"), ttl_s or conn.cfg.lock_ttl_s,
                blocking=blocking, timeout_s=timeout_s, heartbeat_s=heartbeat_s,
            ) as held:  # fmt: skip
                yield held
