"""What an online cycle needs from the replay buffer, as a typed protocol.

Contract: `online/` never imports `buffer/` (both sit on `offline/`; only `orchestrator/` joins
them). A cycle talks to any object with these methods; `buffer.store.ReplayBuffer` is the one
implementation (Redis). The records that cross are `offline` types: `PreferencePair` for the
anchor and the draw, `FreshPair` (a pair plus where it came from) for a cycle's labels.
- `seed_anchor(pairs, fingerprint)`: make the static dataset the anchor pool, idempotently.
- `add_fresh(pairs)`: all of one cycle's labelled pairs in ONE atomic write (a re-run of the
  same cycle adds nothing twice).
- `sample(n, anchor_fraction, seed)`: `round(n * anchor_fraction)` anchor pairs, the rest
  fresh, reproducible for a seed and the same contents.
- `locks.hold(...)`: the family's cycle lock (TTL + heartbeat), so one cycle trains at a time.
- `pointers`: the mirror of the policy registry (`offline.registry.Mirror`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, Sequence

from offline.pairs import FreshPair, PreferencePair
from offline.registry import Mirror


class AnchorSeeded(Protocol):
    fingerprint: str
    added: int
    existing: int
    removed: int

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


class FreshAdded(Protocol):
    added: int
    duplicates: int

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


class MixStats(Protocol):
    def metrics(self) -> dict[str, float]: ...


class DrawnPair(Protocol):
    pair: PreferencePair
    pool: str  # "anchor" or "fresh"


class MixedDraw(Protocol):
    pairs: Sequence[DrawnPair]
    stats: MixStats


class Locks(Protocol):
    def hold(self, name: str, *, ttl_s: float | None, blocking: bool, timeout_s: float | None,
             heartbeat_s: float | None) -> AbstractContextManager[Any]: ...


class CycleBuffer(Protocol):
    """The replay buffer as a cycle uses it (see the module docstring)."""

    def seed_anchor(self, pairs: Sequence[PreferencePair], fingerprint: str) -> AnchorSeeded: ...
    def add_fresh(self, pairs: Sequence[FreshPair]) -> FreshAdded: ...
    def sample(self, n: int, anchor_fraction: float, seed: int) -> MixedDraw: ...
    @property
    def locks(self) -> Locks: ...
    @property
    def pointers(self) -> Mirror: ...
