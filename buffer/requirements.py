"""What the replay buffer requires of a Redis, decided from what the server reports: pure functions.

Contract. `buffer/connection.py` reads each node's settings into a `ServerFacts` at connect
time (no redis-py here) and `assess(facts, allow_eviction=..., require_durable=...)` says
what to refuse and what to warn about:

- Eviction. Any `maxmemory-policy` other than `noeviction` (`allkeys-*`, `volatile-*`) lets a
  full Redis delete keys at random: buffered pairs, an index, the anchor record (a seed then
  fails as "re-seeded by someone else"), the cycle lock (`volatile-*` picks exactly the keys
  with a TTL). Refused, naming the setting to change, unless `buffer.allow_eviction` (then a
  warning). A policy nobody could read (CONFIG and INFO both refused) is a warning.
- Persistence. Neither AOF (`aof_enabled`) nor RDB snapshots (`save` points, or a snapshot
  taken since start-up when CONFIG is refused) on means a restart loses the buffer: a warning,
  or a refusal under `buffer.require_durable`, which also refuses what cannot be verified.

`full_message(facts)` is the text of `BufferFull`, the error a write refused with Redis' `OOM`
reply becomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SAFE_POLICY = "noeviction"


@dataclass(frozen=True)
class ServerFacts:
    """One Redis node's memory and persistence settings as read at connect (None: unreadable)."""

    node: str
    """Where the node is (a redacted URL or host:port), for messages."""
    policy: str | None = None
    policy_source: str | None = None
    """How `policy` was read: 'CONFIG GET' or 'INFO memory'."""
    used_memory: int | None = None
    maxmemory: int | None = None
    aof: bool | None = None
    rdb: bool | None = None
    """RDB snapshots configured (save points), or, with CONFIG refused, a snapshot taken since start."""
    config_readable: bool = True


@dataclass(frozen=True)
class Refusal:
    kind: Literal["eviction", "durability"]
    message: str


@dataclass(frozen=True)
class Verdict:
    refusals: list[Refusal] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def evicts(policy: str) -> bool:
    """Whether a `maxmemory-policy` may delete keys when Redis is full (anything but noeviction)."""
    return policy.strip().lower() != SAFE_POLICY


def assess(facts: list[ServerFacts], *, allow_eviction: bool, require_durable: bool) -> Verdict:
    """What to refuse and what to warn about, over every node that may hold the buffer."""
    refusals: list[Refusal] = []
    warnings: list[str] = []
    for f in facts:
        if f.policy is None:
            warnings.append(
                f"could not read maxmemory-policy of Redis at {f.node} (CONFIG GET and INFO memory were "
                f"refused); make sure it is `maxmemory-policy {SAFE_POLICY}`: an evicting policy drops "
                f"buffered pairs and the cycle lock when Redis is full"
            )
        elif evicts(f.policy):
            risk = (
                f"Redis at {f.node} runs maxmemory-policy {f.policy} (read by {f.policy_source}): when full "
                f"it deletes keys (buffered pairs, indexes, the anchor record, the cycle lock), which corrupts "
                f"the replay buffer"
            )
            if allow_eviction:
                warnings.append(f"{risk}; accepted because buffer.allow_eviction is true")
            else:
                refusals.append(Refusal("eviction", (
                    f"{risk}. Set `maxmemory-policy {SAFE_POLICY}` on it (redis.conf, `CONFIG SET "
                    f"maxmemory-policy {SAFE_POLICY}`, or the managed service's parameter group), or set "
                    f"buffer.allow_eviction: true to accept the risk"
                )))  # fmt: skip
        durable = f.aof is True or f.rdb is True
        if durable:
            continue
        if f.aof is False and f.rdb is False:
            problem = (
                f"Redis at {f.node} persists nothing (appendonly no, no RDB save points): a restart "
                f"loses every buffered pair"
            )
            fix = "run it with `--appendonly yes` (or RDB save points)"
        else:
            unread = "AOF" if f.aof is None else "RDB snapshots"
            problem = (
                f"could not tell whether Redis at {f.node} persists the buffer (AOF {_state(f.aof)}, "
                f"RDB snapshots {_state(f.rdb)}; {unread} unreadable"
                f"{': CONFIG is refused' if not f.config_readable else ''})"
            )
            fix = "make sure AOF (`appendonly yes`) or RDB snapshots are on"
        if require_durable:
            refusals.append(Refusal("durability", (
                f"{problem}, and buffer.require_durable is true: {fix}, or set buffer.require_durable: false"
            )))  # fmt: skip
        else:
            warnings.append(f"{problem}; {fix}")
    return Verdict(refusals, warnings)


def _state(value: bool | None) -> str:
    return "unknown" if value is None else ("on" if value else "off")


def format_bytes(n: int) -> str:
    """1536 -> '1.50 KiB' (binary units, as Redis' own `*_human` fields; two decimals, so a used
    memory just over maxmemory does not print as equal to it)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"


def full_message(facts: ServerFacts | None) -> str:
    """`Redis is full: used X of maxmemory Y (policy P)` and what to do about it."""
    if facts is None or facts.used_memory is None or facts.maxmemory is None:
        where = "" if facts is None else f" at {facts.node}"
        head = f"Redis{where} is full (it answered OOM; INFO memory could not be read)"
    else:
        head = (
            f"Redis is full: used {format_bytes(facts.used_memory)} of maxmemory {format_bytes(facts.maxmemory)} "
            f"(policy {facts.policy or 'unknown'}) at {facts.node}"
        )
    return (
        f"{head}; the write was refused. Raise maxmemory (redis.conf or `CONFIG SET maxmemory ...`), "
        f"lower buffer.fresh_capacity, or move the buffer to a larger Redis"
    )
