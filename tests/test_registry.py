"""The policy registry: the pointer file is the truth, the Redis mirror is written after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offline.checkpoint import COMPLETE_MARKER, CheckpointRef
from offline.registry import CycleState, NoCurrentPolicy, PolicyRegistry


def checkpoint(root: Path, name: str, complete: bool = True) -> CheckpointRef:
    path = root / name
    path.mkdir(parents=True)
    ref = CheckpointRef(path=str(path), id=name[-4:].rjust(16, "0"), name=name)
    if complete:
        (path / COMPLETE_MARKER).write_text(ref.model_dump_json(exclude={"path"}))
    return ref


class DictMirror:
    """A mirror in memory (the Redis one is `buffer.pointers.Pointers`, tested with a real server)."""

    def __init__(self) -> None:
        self.data: dict[str, dict] = {}
        self.fail_sets = False

    def set(self, name: str, value: dict) -> None:
        if self.fail_sets:
            raise ConnectionError("redis went away")
        self.data[name] = json.loads(json.dumps(value))

    def get(self, name: str) -> dict | None:
        return self.data.get(name)


def test_nothing_promoted_yet_says_what_to_run(tmp_path):
    registry = PolicyRegistry(tmp_path, "fam")
    assert registry.current_or_none() is None
    with pytest.raises(NoCurrentPolicy, match="run the offline baseline first"):
        registry.current()


def test_promote_writes_the_file_then_the_mirror(tmp_path):
    mirror = DictMirror()
    registry = PolicyRegistry(tmp_path, "fam", mirror=mirror)
    ref = checkpoint(tmp_path / "ckpt", "offline-0001")
    record = registry.promote(ref, kind="offline")
    on_disk = json.loads(registry.pointer_path.read_text())
    assert on_disk["checkpoint"]["path"] == ref.path and on_disk["kind"] == "offline"
    assert mirror.data["current:fam"] == on_disk
    assert PolicyRegistry(tmp_path, "fam").current() == record


def test_an_incomplete_checkpoint_is_never_promoted(tmp_path):
    registry = PolicyRegistry(tmp_path, "fam")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        registry.promote(checkpoint(tmp_path / "ckpt", "cycle-0002", complete=False), kind="cycle")
    assert registry.current_or_none() is None


def test_a_crash_between_the_two_writes_leaves_the_file_right_and_the_mirror_repaired(tmp_path):
    mirror = DictMirror()
    registry = PolicyRegistry(tmp_path, "fam", mirror=mirror)
    first = checkpoint(tmp_path / "ckpt", "offline-0001")
    registry.promote(first, kind="offline")
    second = checkpoint(tmp_path / "ckpt", "cycle-0001")
    mirror.fail_sets = True  # the process dies between the file's replace and the mirror's SET
    with pytest.raises(ConnectionError):
        registry.promote(second, kind="cycle", cycle=1)
    assert mirror.data["current:fam"]["checkpoint"]["path"] == first.path  # stale mirror
    mirror.fail_sets = False
    restarted = PolicyRegistry(tmp_path, "fam", mirror=mirror)
    current = restarted.current()
    assert current.checkpoint.path == second.path and current.cycle == 1  # the file is the truth
    assert mirror.data["current:fam"]["checkpoint"]["path"] == second.path  # ...and the mirror caught up


def test_an_offline_rerun_after_cycles_is_current(tmp_path):
    """Before: the newer of file and Redis by `seq` won, and an offline promote had no seq, so a
    fresh offline baseline lost to an older cycle's pointer. The file is now the only truth."""
    mirror = DictMirror()
    registry = PolicyRegistry(tmp_path, "fam", mirror=mirror)
    registry.promote(checkpoint(tmp_path / "ckpt", "cycle-0003"), kind="cycle", cycle=3)
    rerun = checkpoint(tmp_path / "ckpt", "offline-0002")
    PolicyRegistry(tmp_path, "fam").promote(rerun, kind="offline")  # offline: no Redis at all
    assert registry.current().checkpoint.path == rerun.path


def test_cycle_state_defaults_then_records_and_trims_history(tmp_path):
    mirror = DictMirror()
    registry = PolicyRegistry(tmp_path, "fam", mirror=mirror)
    state = registry.cycle_state(anchor_fraction=0.5, beta=0.1)
    assert (state.completed, state.anchor_fraction, state.beta, state.history) == (0, 0.5, 0.1, [])
    rows = [{"index": i} for i in range(250)]
    registry.record_cycle(CycleState(completed=250, anchor_fraction=0.3, beta=0.2, history=rows))
    again = PolicyRegistry(tmp_path, "fam").cycle_state(anchor_fraction=0.5, beta=0.1)
    assert (again.completed, again.anchor_fraction, again.beta) == (250, 0.3, 0.2)
    assert [r["index"] for r in again.history] == list(range(50, 250))
    assert mirror.data["cycle-state:fam"]["completed"] == 250
    assert registry.history() == again.history
