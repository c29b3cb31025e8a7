"""The buffer's Redis connection: connect, check the server, translate errors, run a local redis-server.

This is the only module in tether that imports `redis`. Contract:

- `BufferConnection.connect(cfg, url=None)` connects to `cfg.url` with the password from
  `$<cfg.password_env>` (or to `url`, a server tether started itself, without one), PINGs it,
  and checks what the buffer requires of the server (`buffer/requirements.py`): a
  `maxmemory-policy` that evicts is refused (`EvictingRedis`) unless `buffer.allow_eviction`,
  a server that persists nothing is a warning, or refused (`NotDurable`) under
  `buffer.require_durable`. With `buffer.cluster` the client is redis-py's `RedisCluster` and
  every node is checked. Nothing answering is `BufferUnavailable`, whose message says how to
  start a Redis. Then a namespace still under the old key names is renamed (`buffer/layout.py`).
- `errors()` (and `translating_errors` on a method) turns every redis-py exception into a
  `ReplayBufferError` (`BufferUnavailable` when Redis cannot be reached or refused the
  credentials; `BufferFull` for Redis' `OOM` reply, saying how full it is), with the password
  scrubbed from the text, so callers never need redis-py. Every command of the buffer runs
  under it.
- `key(name)` is `{<namespace>}:<name>`: the braces are Redis Cluster's hash tag, so every key
  of a namespace lives in one slot and each Lua script may touch all of them. The key layout
  itself is in `buffer/store.py`'s docstring.
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
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterError, RedisClusterException
from redis.retry import Retry

from buffer import layout
from buffer.config import BufferConfig
from buffer.requirements import ServerFacts, assess, full_message
from buffer.server import LocalRedis
from offline.secrets import redact_url

log = logging.getLogger(__name__)

Client = redis.Redis | RedisCluster
_WARNED: set[str] = set()  # warnings already logged by this process: each is said once

START_HINT = (
    "start one with `redis-server --port 6379 --appendonly yes`, leave buffer.url unset so "
    "tether starts a local redis-server under its state dir, or run `docker-compose up redis`"
)


class ReplayBufferError(RuntimeError):
    """Any failure of the replay buffer's Redis side."""


class BufferUnavailable(ReplayBufferError):
    """Redis cannot be reached (or refused our credentials); the message says how to start one."""


class BufferFull(ReplayBufferError):
    """Redis refused a write with `OOM` (used memory over maxmemory); nothing of that write was stored."""

    stored: int = 0
    """Pairs that earlier chunks of a chunked write (a long seed, a restore) stored before it."""


class EvictingRedis(ReplayBufferError):
    """Redis runs a maxmemory-policy that deletes keys when full (and buffer.allow_eviction is false)."""


class NotDurable(ReplayBufferError):
    """buffer.require_durable is set and Redis persists nothing (or cannot be shown to)."""


class BufferConnection:
    """A redis-py client bound to one buffer namespace; build with `connect()` or `open_connection()`."""

    def __init__(self, client: Client, cfg: BufferConfig, *, url: str, password: str | None = None) -> None:
        self.client = client
        self.cfg = cfg
        self.url = redact_url(url)
        self.namespace = cfg.namespace
        self._password = password  # only to scrub it from error text, never shown

    @property
    def cluster(self) -> bool:
        """Whether the client is redis-py's RedisCluster (`buffer.cluster`)."""
        return isinstance(self.client, RedisCluster)

    @classmethod
    def connect(cls, cfg: BufferConfig, *, url: str | None = None) -> BufferConnection:
        """Connect to `cfg.url` (password from `$<cfg.password_env>`), or to `url` without one.

        The explicit `url` is for a server tether started itself (`LocalRedis`). Raises
        `BufferUnavailable` (saying how to start a Redis) when nothing answers PING, and
        `EvictingRedis` / `NotDurable` when the server is unfit (see the module docstring).
        """
        target = url if url is not None else cfg.url
        if target is None:
            raise ValueError("no Redis URL: set buffer.url or use open_buffer() to start a local redis-server")
        password = (os.environ.get(cfg.password_env) or None) if url is None else None
        conn = cls(cast(Client, None), cfg, url=target, password=password)
        try:
            with conn.errors():  # also around building the client: RedisCluster reads the slot map then
                conn.client = _client(target, password, cfg, cluster=cfg.cluster and url is None)
                conn.client.ping()
                conn._check_server()
                if not conn.cluster:  # the old layout never ran on a cluster (its scripts could not)
                    layout.migrate_legacy_keys(conn)
        except BaseException:
            if conn.client is not None:
                conn.client.close()
            raise
        log.info("replay buffer %s at %s%s", cfg.namespace, conn.url, " (cluster)" if conn.cluster else "")
        return conn

    def __repr__(self) -> str:
        return f"BufferConnection(url={self.url!r}, namespace={self.namespace!r})"

    def key(self, name: str) -> str:
        """The Redis key `{<namespace>}:<name>` (hash-tagged: one cluster slot per namespace)."""
        return f"{{{self.namespace}}}:{name}"

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
        except redis.OutOfMemoryError:
            raise BufferFull(full_message(self._facts_or_none())) from None
        except redis.ResponseError as e:
            raise ReplayBufferError(f"Redis at {self.url} answered an error: {self._scrub(e)}") from e
        except (RedisClusterException, ClusterError) as e:
            raise BufferUnavailable(
                f"Redis Cluster for the replay buffer at {self.url} is unusable ({type(e).__name__}: "
                f"{self._scrub(e)}); buffer.cluster: true needs buffer.url to name a node of a cluster in "
                f"state ok (`redis-cli -u URL cluster info`), or set buffer.cluster: false for a single Redis"
            ) from None

    def _scrub(self, e: BaseException) -> str:
        text = str(e)
        return text.replace(self._password, "***") if self._password else text

    # -- the server's settings -------------------------------------------------------------------

    def home_node(self) -> ClusterNode | None:
        """The cluster node holding this namespace's slot (None on a single Redis)."""
        if isinstance(self.client, RedisCluster):
            return cast(ClusterNode, self.client.get_node_from_key(self.key("pairs")))
        return None

    def info(self, section: str, node: ClusterNode | None = None) -> dict[str, Any]:
        """`INFO <section>` of `node`, or of the node holding the namespace (the server, unclustered)."""
        if isinstance(self.client, RedisCluster):
            return cast("dict[str, Any]", self.client.info(section, target_nodes=node or self.home_node()))
        return cast("dict[str, Any]", self.client.info(section))

    def facts(self, node: ClusterNode | None = None) -> ServerFacts:
        """What `node` (default: the namespace's) reports of its memory and persistence settings."""
        where = self.url if node is None else node.name
        kw: dict[str, Any] = {} if node is None else {"target_nodes": node}
        config: dict[str, str] | None = {}
        try:
            config = self.client.config_get("maxmemory-policy", **kw) | self.client.config_get("save", **kw)
        except redis.ResponseError:  # managed services often disable CONFIG (or an ACL forbids it)
            config = None
        memory = self._info_or_empty("memory", node)
        persistence = self._info_or_empty("persistence", node)
        policy, source = (config or {}).get("maxmemory-policy"), "CONFIG GET"
        if policy is None and "maxmemory_policy" in memory:
            policy, source = str(memory["maxmemory_policy"]), "INFO memory"
        if config is not None and "save" in config:
            rdb: bool | None = bool(str(config["save"]).strip())
        else:  # CONFIG refused: a snapshot taken since start-up shows RDB is on; none shows nothing
            rdb = True if int(persistence.get("rdb_saves", 0) or 0) > 0 else None
        aof = None if "aof_enabled" not in persistence else bool(int(persistence["aof_enabled"]))
        return ServerFacts(
            node=where, policy=policy, policy_source=source if policy is not None else None,
            used_memory=_int_or_none(memory.get("used_memory")), maxmemory=_int_or_none(memory.get("maxmemory")),
            aof=aof, rdb=rdb, config_readable=config is not None,
        )  # fmt: skip

    def _info_or_empty(self, section: str, node: ClusterNode | None) -> dict[str, Any]:
        try:
            return self.info(section, node)
        except redis.ResponseError:
            return {}

    def _facts_or_none(self) -> ServerFacts | None:
        """The namespace node's facts for an error message, or None if even INFO fails now."""
        try:
            return self.facts(self.home_node())
        except Exception:  # an error message must not raise: say less instead
            return None

    def _check_server(self) -> None:
        """Refuse an evicting or (under require_durable) non-persistent Redis; warn once otherwise."""
        if isinstance(self.client, RedisCluster):
            facts = [self.facts(node) for node in self.client.get_nodes()]
        else:
            if int(self._info_or_empty("cluster", None).get("cluster_enabled", 0) or 0):
                raise BufferUnavailable(
                    f"Redis at {self.url} is a node of a Redis Cluster: set buffer.cluster: true so tether "
                    f"uses the cluster client (a plain client gets MOVED for keys on other nodes)"
                )
            facts = [self.facts()]
        verdict = assess(facts, allow_eviction=self.cfg.allow_eviction, require_durable=self.cfg.require_durable)
        for refusal in verdict.refusals:
            raise (EvictingRedis if refusal.kind == "eviction" else NotDurable)(refusal.message)
        for text in verdict.warnings:
            if text not in _WARNED:
                _WARNED.add(text)
                log.warning("%s", text)


def _client(url: str, password: str | None, cfg: BufferConfig, *, cluster: bool) -> Client:
    """A redis-py client for `url`: retries with backoff, timeouts, str replies."""
    options: dict[str, Any] = dict(
        password=password,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), cfg.connect_retries),
        socket_connect_timeout=5.0,
        socket_timeout=60.0,  # replacing a large anchor is one long script
        health_check_interval=30,
    )
    if cluster:
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, retry_on_error=[redis.ConnectionError, redis.TimeoutError], **options)


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


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
