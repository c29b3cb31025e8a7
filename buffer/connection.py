"""The buffer's Redis connection: connect, translate errors, and run a local redis-server if asked.

This is the only module in tether that imports `redis`. Contract:

- `BufferConnection.connect(cfg, url=None)` connects to `cfg.url` with the password from
  `$<cfg.password_env>` (or to `url`, a server tether started itself, without one), PINGs it,
  and warns when the server runs without an AOF. Nothing answering is `BufferUnavailable`, whose
  message says how to start a Redis.
- `errors()` (and `translating_errors` on a method) turns every redis-py exception into a
  `ReplayBufferError` (`BufferUnavailable` when Redis cannot be reached or refused the
  credentials), with the password scrubbed from the text, so callers never need redis-py.
- `key(name)` is `<namespace>:<name>`: the key layout itself is in `buffer/store.py`'s docstring.
- `open_connection(cfg, state_dir)` connects to `cfg.url` if set, else starts a
  `buffer.server.LocalRedis` under `<state_dir>/redis/` for the block and stops it after.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from buffer.config import BufferConfig
from buffer.server import LocalRedis
from offline.secrets import redact_url

log = logging.getLogger(__name__)

START_HINT = (
    "start one with `redis-server --port 6379 --appendonly yes`, leave buffer.url unset so "
    "tether starts a local redis-server under its state dir, or run `docker-compose up redis`"
)


class ReplayBufferError(RuntimeError):
    """Any failure of the replay buffer's Redis side."""


class BufferUnavailable(ReplayBufferError):
    """Redis cannot be reached (or refused our credentials); the message says how to start one."""


class BufferConnection:
    """A redis-py client bound to one buffer namespace; build with `connect()` or `open_connection()`."""

    def __init__(self, client: redis.Redis, cfg: BufferConfig, *, url: str, password: str | None = None) -> None:
        self.client = client
        self.cfg = cfg
        self.url = redact_url(url)
        self.namespace = cfg.namespace
        self._password = password  # only to scrub it from error text, never shown

    @classmethod
    def connect(cls, cfg: BufferConfig, *, url: str | None = None) -> BufferConnection:
        """Connect to `cfg.url` (password from `$<cfg.password_env>`), or to `url` without one.

        The explicit `url` is for a server tether started itself (`LocalRedis`). Raises
        `BufferUnavailable` (saying how to start a Redis) when nothing answers PING.
        """
        target = url if url is not None else cfg.url
        if target is None:
            raise ValueError("no Redis URL: set buffer.url or use open_buffer() to start a local redis-server")
        password = (os.environ.get(cfg.password_env) or None) if url is None else None
        client = redis.Redis.from_url(
            target,
            password=password,
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), cfg.connect_retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            socket_connect_timeout=5.0,
            socket_timeout=60.0,  # replacing a large anchor is one long script
            health_check_interval=30,
        )
        conn = cls(client, cfg, url=target, password=password)
        try:
            with conn.errors():
                client.ping()
        except BufferUnavailable:
            client.close()
            raise
        conn._warn_if_not_durable()
        log.info("replay buffer %s at %s", cfg.namespace, conn.url)
        return conn

    def __repr__(self) -> str:
        return f"BufferConnection(url={self.url!r}, namespace={self.namespace!r})"

    def key(self, name: str) -> str:
        """The Redis key `<namespace>:<name>`."""
        return f"{self.namespace}:{name}"

    def close(self) -> None:
        self.client.close()

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Re-raise redis-py exceptions from the block as `ReplayBufferError`s that say what to fix."""
        try:
            yield
        except redis.AuthenticationError as e:
            raise BufferUnavailable(
                f"Redis at {self.url} refused the credentials ({self._scrub(e)}); set "
                f"${self.cfg.password_env} to its password, or unset it if the server has none"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise BufferUnavailable(
                f"Redis for the replay buffer at {self.url} is unreachable "
                f"({type(e).__name__}: {self._scrub(e)}); {START_HINT}"
            ) from None
        except redis.ResponseError as e:
            raise ReplayBufferError(f"Redis at {self.url} answered an error: {self._scrub(e)}") from e

    def _scrub(self, e: BaseException) -> str:
        text = str(e)
        return text.replace(self._password, "***") if self._password else text

    def _warn_if_not_durable(self) -> None:
        try:
            mode = self.client.config_get("appendonly").get("appendonly")
        except redis.RedisError:  # CONFIG is often disabled on managed Redis: nothing to check
            return
        if mode == "no":
            log.warning(
                "Redis at %s has appendonly off: a crash loses buffered pairs; "
                "run it with --appendonly yes", self.url
            )


class _Connected(Protocol):
    connection: BufferConnection


F = TypeVar("F", bound=Callable[..., Any])


def translating_errors(method: F) -> F:
    """Run a method of an object holding a `connection` under `connection.errors()`."""

    @wraps(method)
    def wrapper(self: _Connected, *args: Any, **kwargs: Any) -> Any:
        with self.connection.errors():
            return method(self, *args, **kwargs)

    return cast(F, wrapper)


@contextmanager
def open_connection(cfg: BufferConfig, state_dir: Path) -> Iterator[BufferConnection]:
    """A connection to `cfg.url` if set, else to a local redis-server under `<state_dir>/redis/`.

    The local server (127.0.0.1, free port, AOF with `cfg.appendfsync`) is stopped on exit; its
    data stays, so the next run finds the same buffer.
    """
    if cfg.url is not None:
        with closing(BufferConnection.connect(cfg)) as conn:
            yield conn
        return
    with LocalRedis(Path(state_dir) / "redis", appendfsync=cfg.appendfsync) as local:
        with closing(BufferConnection.connect(cfg, url=local.url)) as conn:
            yield conn
