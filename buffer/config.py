"""The replay buffer's config section.

Contract: `BufferConfig` is frozen and validated at start-up. The Redis password never lives in
the config (the resolved config is written into every checkpoint and flow run): it is read from
the environment variable named by `password_env` at connect time. A URL carrying a password is
refused with `PasswordInUrl`, which is deliberately *not* a `ValueError`: pydantic would wrap a
`ValueError` in a `ValidationError` whose text echoes the raw input, password included. Every
URL shown in a log line or an error goes through `offline.secrets.redact_url` first.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

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
