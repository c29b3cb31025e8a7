"""The policy registry: which checkpoint is a run family's current policy, and where its
online cycles stand.

Contract:
- One source of truth: two small JSON files under `<state_dir>/pointers/`, `<name>.json` (the
  promoted checkpoint) and `<name>.cycles.json` (completed cycles, the controller's mix, the
  KL/reward history), each replaced atomically, so a reader sees the old record or the new
  one, never a torn one. The offline flow needs no Redis, and `cat` shows a human the truth.
- An optional mirror (the Redis buffer's `pointers`: `set(name, value)`/`get(name)`) is written AFTER the
  file, for readers that only reach Redis. A crash between the two writes leaves a stale mirror,
  never a wrong current policy: `current()` reads the file and repairs the mirror when it
  differs. The mirror is never read as the truth (before, the newer of file and Redis by a `seq`
  field won, so an offline re-run, written with no `seq`, lost to an older cycle's pointer).
- `promote` refuses a checkpoint that is not complete (`offline.checkpoint.is_complete`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from offline.atomic import atomic_write_json
from offline.checkpoint import CheckpointRef, is_complete


class NoCurrentPolicy(RuntimeError):
    """A cycle needs a promoted policy to start from; there is none (or it is incomplete)."""


class PolicyRecord(BaseModel):
    """The promoted policy of a run family."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    checkpoint: CheckpointRef
    kind: str
    """"offline" or "cycle"."""
    cycle: int | None = None
    """The cycle that produced it (None for the offline baseline)."""
    promoted_at: float = Field(default_factory=time.time)


class CycleState(BaseModel):
    """Where a run family's online cycles stand (first cycle: the config's mix)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    completed: int = Field(default=0, ge=0)
    anchor_fraction: float
    beta: float
    history: list[dict[str, Any]] = []
    """One row per finished cycle (the last 200): what it measured and decided."""


class Mirror(Protocol):
    """Where copies of the records go for readers that only reach it (the Redis buffer)."""

    def set(self, name: str, value: dict[str, Any]) -> None: ...
    def get(self, name: str) -> dict[str, Any] | None: ...


HISTORY_ROWS = 200


class PolicyRegistry:
    """`current()`, `promote(ref)`, `cycle_state()`, `record_cycle(state)` for one run family."""

    def __init__(self, state_dir: Path, name: str, mirror: Mirror | None = None) -> None:
        self.state_dir, self.name, self.mirror = Path(state_dir), name, mirror

    @property
    def pointer_path(self) -> Path:
        return self.state_dir / "pointers" / f"{self.name}.json"

    @property
    def cycles_path(self) -> Path:
        return self.state_dir / "pointers" / f"{self.name}.cycles.json"

    # -- the current policy ------------------------------------------------------------------

    def current_or_none(self) -> PolicyRecord | None:
        """The promoted policy, or None before anything was promoted."""
        data = _read(self.pointer_path)
        if data is None:
            return None
        record = PolicyRecord.model_validate(data)
        self._sync_mirror(f"current:{self.name}", record.model_dump(mode="json"))
        return record

    def current(self) -> PolicyRecord:
        """The promoted policy; NoCurrentPolicy if there is none or it is not complete."""
        record = self.current_or_none()
        if record is None:
            raise NoCurrentPolicy(
                f"no promoted policy for {self.name!r} yet: run the offline baseline first "
                "(tether offline --config ...)"
            )
        if not is_complete(Path(record.checkpoint.path)):
            raise NoCurrentPolicy(f"the current policy {record.checkpoint.path} is not a complete checkpoint")
        return record

    def promote(self, ref: CheckpointRef, *, kind: str, cycle: int | None = None) -> PolicyRecord:
        """Make `ref` the current policy: the file (atomic replace), then the mirror."""
        if not is_complete(Path(ref.path)):
            raise ValueError(f"refusing to promote {ref.path}: it is not a complete checkpoint")
        record = PolicyRecord(checkpoint=ref, kind=kind, cycle=cycle)
        data = record.model_dump(mode="json")
        atomic_write_json(self.pointer_path, data, indent=2, sort_keys=True)
        if self.mirror is not None:
            self.mirror.set(f"current:{self.name}", data)
        return record

    # -- cycle state -------------------------------------------------------------------------

    def cycle_state(self, anchor_fraction: float, beta: float) -> CycleState:
        """Completed cycles and the controller's mix; before any cycle, the given defaults."""
        data = _read(self.cycles_path)
        if data is None:
            return CycleState(anchor_fraction=anchor_fraction, beta=beta)
        state = CycleState.model_validate(data)
        self._sync_mirror(f"cycle-state:{self.name}", state.model_dump(mode="json"))
        return state

    def history(self) -> list[dict[str, Any]]:
        """The finished cycles' rows, oldest first (empty before the first cycle)."""
        data = _read(self.cycles_path)
        return CycleState.model_validate(data).history if data is not None else []

    def record_cycle(self, state: CycleState) -> None:
        """Store the state after a cycle (history trimmed to the last rows), then mirror it."""
        state = state.model_copy(update={"history": state.history[-HISTORY_ROWS:]})
        data = state.model_dump(mode="json")
        atomic_write_json(self.cycles_path, data, indent=2, sort_keys=True)
        if self.mirror is not None:
            self.mirror.set(f"cycle-state:{self.name}", data)

    def _sync_mirror(self, key: str, data: dict[str, Any]) -> None:
        """Rewrite a mirror entry that a crash between the two writes left stale."""
        if self.mirror is not None and self.mirror.get(key) != data:
            self.mirror.set(key, data)


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
