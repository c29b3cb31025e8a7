"""The replay buffer's JSON-boundary types: a stored pair with its provenance, and write results.

Contract. `BufferedPair` is what Redis holds (as JSON, never pickle) and what `sample()` returns:
the `PreferencePair` plus where it came from. Its id is the pair's content hash, so the same
pair is stored once whichever cycle or dataset brings it. Records are validated strictly before
any write: a missing field or a wrong type (a cycle given as "3", a confidence of "high") is an
`InvalidRecord` naming the record and field, and nothing is written.

`BufferStats` and `format_stats_table` are what `tether buffer stats` prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.table import Table

from buffer.mixing import MixStats, Pool
from offline.pairs import PreferencePair

class InvalidRecord(ValueError):
    """A record failed validation; nothing was written."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


class BufferedPair(BaseModel):
    """A preference pair as the buffer stores it: the pair plus its provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    pair: PreferencePair
    """The preference pair itself (its `content_id` is this record's id)."""
    pool: Pool
    """'anchor' for the static offline dataset, 'fresh' for pairs labelled in an online cycle."""
    source: str = Field(min_length=1)
    """Dataset fingerprint (anchor) or cycle id (fresh) that produced the pair."""
    cycle: int | None = Field(default=None, ge=0, strict=True)
    """Index of the online cycle that produced a fresh pair (drives recency and eviction); None for the anchor."""
    policy_version: str | None = Field(default=None, min_length=1)
    """Checkpoint id of the policy that generated the responses; None for dataset pairs."""
    judge: str | None = Field(default=None, min_length=1)
    """Name of the judge that picked `chosen`; None for dataset pairs."""
    confidence: float | None = Field(default=None, ge=0.0, le=1.0, strict=True)
    """The judge's confidence in the verdict, in [0, 1]; None when it gave none."""
    created_at: AwareDatetime = Field(default_factory=_now)
    """When the pair entered the buffer (timezone-aware, UTC by default)."""

    @model_validator(mode="after")
    def _check(self) -> BufferedPair:
        if self.pair.chosen == self.pair.rejected:
            raise ValueError("chosen and rejected are identical: the pair states no preference")
        if self.pool == "fresh" and self.cycle is None:
            raise ValueError("a fresh pair needs its cycle index (cycle=...)")
        if self.pool == "anchor" and self.cycle is not None:
            raise ValueError("an anchor pair has no cycle (cycle=None)")
        return self

    @property
    def id(self) -> str:
        """The pair's content hash: the same pair has the same id in every pool and cycle."""
        return self.pair.content_id

    @property
    def category(self) -> str | None:
        return self.pair.category

    @classmethod
    def anchor(cls, pair: PreferencePair, fingerprint: str, **kw: Any) -> BufferedPair:
        """An anchor record for a pair of the offline dataset with this fingerprint."""
        return cls(pair=pair, pool="anchor", source=fingerprint, **kw)

    @classmethod
    def fresh(cls, pair: PreferencePair, *, cycle: int, source: str | None = None, **kw: Any) -> BufferedPair:
        """A fresh record for a pair labelled in online cycle `cycle` (source defaults to 'cycle-<n>')."""
        return cls(pair=pair, pool="fresh", cycle=cycle, source=source or f"cycle-{cycle}", **kw)


def validate_records(records: Iterable[BufferedPair | Mapping[str, Any]]) -> list[BufferedPair]:
    """Validate every record (dicts strictly, instances as they are) before anything is written."""
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, BufferedPair):
            out.append(rec)
            continue
        if not isinstance(rec, Mapping):
            raise InvalidRecord(f"record {i}: expected a BufferedPair or a mapping, got {type(rec).__name__}")
        try:
            out.append(BufferedPair.model_validate(rec))
        except ValidationError as e:
            raise InvalidRecord(f"record {i}: {describe_error(e)}") from None
    return out


def describe_error(e: ValidationError) -> str:
    """One line per error: 'field.path: message' (no input values: records may be large)."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or '<record>'}: {err['msg']}" for err in e.errors())


class AddResult(BaseModel):
    """What one atomic write did."""

    model_config = ConfigDict(frozen=True)

    added: int
    duplicates: int
    """Pairs already in the buffer (in either pool): adding them again is a no-op."""
    evicted: int
    """Oldest fresh pairs dropped to stay within `fresh_capacity`."""


class SeedResult(BaseModel):
    """What seeding the anchor did."""

    model_config = ConfigDict(frozen=True)

    fingerprint: str
    added: int
    existing: int
    """Pairs already present (re-seeding the same dataset: all of them)."""
    removed: int
    """Anchor pairs of a previous dataset dropped by `replace=True`."""


class Batch(BaseModel):
    """A sampled training batch and how it was mixed."""

    model_config = ConfigDict(frozen=True)

    pairs: list[BufferedPair]
    stats: MixStats


class BufferStats(BaseModel):
    """A snapshot of the buffer's contents, for `tether buffer stats` and the run log."""

    model_config = ConfigDict(frozen=True)

    url: str
    """Redacted URL of the Redis holding the buffer."""
    namespace: str
    anchor_fingerprint: str | None
    anchor: int
    fresh: int
    fresh_capacity: int
    per_cycle: dict[int, int]
    """Fresh pairs per cycle index."""
    per_category: dict[str, dict[str, int]]
    """Pairs per pool and category ('(none)' for uncategorised)."""
    oldest_age_s: float | None
    newest_age_s: float | None
    memory_bytes: int
    """Redis `used_memory` (the whole server, not only this namespace)."""


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def format_stats_table(stats: BufferStats) -> Table:
    """The stats as a two-column rich table."""
    table = Table(title=f"replay buffer {stats.namespace} @ {stats.url}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("anchor pairs", f"{stats.anchor:,}")
    table.add_row("anchor dataset", stats.anchor_fingerprint or "(not seeded)")
    table.add_row("fresh pairs", f"{stats.fresh:,} / {stats.fresh_capacity:,}")
    for cycle, count in sorted(stats.per_cycle.items()):
        table.add_row(f"  cycle {cycle}", f"{count:,}")
    for pool, cats in stats.per_category.items():
        for cat, count in sorted(cats.items()):
            table.add_row(f"{pool} / {cat}", f"{count:,}")
    table.add_row("oldest pair", _age(stats.oldest_age_s))
    table.add_row("newest pair", _age(stats.newest_age_s))
    table.add_row("redis memory", f"{stats.memory_bytes / 2**20:.1f} MiB")
    return table
