"""The replay buffer's config section.

Contract: `BufferConfig` is frozen and validated at start-up. The Redis password never lives in
the config (the resolved config is written into every checkpoint and flow run): it is read from
the environment variable named by `password_env` at connect time. A URL carrying a password is
refused with `PasswordInUrl`, which is deliberately *not* a `ValueError`: pydantic would wrap a
`ValueError` in a `ValidationError` whose text echoes the raw input, password included. Every
URL shown in a log line or an error goes through `offline.secrets.redact_url` first.

Redis Cluster is chosen with `cluster: true` beside an ordinary redis:// or rediss:// URL of any
node (a seed), not with a URL scheme of our own, so the same URL still works in `redis-cli -u`
and every other tool; a cluster has only database 0, so a URL naming another is refused here.
`allow_eviction` and `require_durable` govern the checks of `buffer/requirements.py`.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from offline.secrets import redact_url
from offline.section import Section

DEFAULT_PASSWORD_ENV = "TETHER_REDIS_PASSWORD"


class PasswordInUrl(Exception):
    """A Redis URL in the config carried a password (raised with the password redacted)."""


class BufferConfig(Section):
    """Where the replay buffer lives and how fresh and anchor pairs are kept and mixed."""

    url: str | None = Field(default=None, min_length=1)
    """redis:// or rediss:// URL without a password; None = start a local redis-server under the state dir."""
    password_env: str = Field(default=DEFAULT_PASSWORD_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable holding the Redis password (read at connect time, never logged)."""
    namespace: str = Field(default="tether", pattern=r"^[A-Za-z0-9_.\-]+$")
    """Key prefix of every key the buffer writes, so several buffers can share one Redis."""
    fresh_capacity: int = Field(default=50_000, gt=0)
    """Most fresh pairs kept; beyond it the oldest cycles' pairs are evicted (the anchor never is)."""
    appendfsync: Literal["always", "everysec"] = "everysec"
    """AOF fsync policy of the local redis-server: 'always' loses no acknowledged write, 'everysec' at most ~1 s."""
    recency_half_life_cycles: float | None = Field(default=None, gt=0)
    """Fresh pairs' sampling weight halves every this many cycles of age; None = uniform over fresh pairs."""
    stratify_by_category: bool = False
    """Split each pool's draw across categories in proportion to their size instead of sampling freely."""
    connect_retries: int = Field(default=5, ge=0, le=20)
    """Retries (exponential backoff, capped at 2 s) of a command that hit a connection error or timeout."""
    lock_ttl_s: int = Field(default=3600, gt=0)
    """Time-to-live of the cycle lock: a crashed holder's lock frees itself after this many seconds."""
    cluster: bool = False
    """buffer.url is one node of a Redis Cluster (a seed): connect with redis-py's RedisCluster client."""
    allow_eviction: bool = False
    """Accept a Redis whose maxmemory-policy evicts keys (allkeys-*, volatile-*) with a warning instead of refusing it."""
    require_durable: bool = False
    """Refuse a Redis that persists nothing (neither AOF nor RDB snapshots on) instead of warning."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            has_password = urlsplit(url).password is not None
        except ValueError:
            has_password = "@" in url  # unparseable: assume the worst, never echo it
        if has_password:
            raise PasswordInUrl(
                f"buffer.url {redact_url(url)} embeds a password; remove it from the URL and export "
                f"it as ${DEFAULT_PASSWORD_ENV} (or the variable named by buffer.password_env)"
            )
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"buffer.url must start with redis:// or rediss://, got {url!r}")
        return url

    @model_validator(mode="after")
    def _check_cluster(self) -> BufferConfig:
        if not self.cluster:
            return self
        if self.url is None:
            raise ValueError(
                "buffer.cluster: true needs buffer.url, the redis:// URL of one node of the cluster "
                "(the embedded redis-server is never a cluster)"
            )
        path = urlsplit(self.url).path.strip("/")
        if path not in ("", "0"):
            raise ValueError(
                f"buffer.url {redact_url(self.url)} names database {path!r}, but a Redis Cluster has only "
                f"database 0: drop the /{path} (or set buffer.cluster: false)"
            )
        return self
