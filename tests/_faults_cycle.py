"""Run one plain refresh cycle in its own process, for the fault suite to SIGKILL.

    python tests/_faults_cycle.py OVERRIDES.json EVENTS.jsonl [--go FILE] [--hang-in-save]

The cycle is `tests/_faults.locked_cycle` (the plain `run_cycle` under the cycle lock, as
`tether cycle` takes it, without Prefect) on configs/demo.yaml with the JSON overrides, against
the Redis at `buffer.url`. Progress goes to EVENTS as JSON lines, each flushed, so the parent
knows when to strike and what the buffer acknowledged: ready, acquired, added (pair ids),
trained (resumed_from_step), saving, done / skipped. `--go FILE` waits for FILE to exist
before taking the lock (two processes start their cycles at once); `--hang-in-save` stops
inside `save_checkpoint`, after every file and the completion marker are written into the temp
dir and before it is renamed into place, so a kill lands exactly there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", type=Path)
    ap.add_argument("events", type=Path)
    ap.add_argument("--go", type=Path, default=None)
    ap.add_argument("--hang-in-save", action="store_true")
    args = ap.parse_args()
    out = open(args.events, "a", encoding="utf-8")

    def emit(event: str, **data) -> None:
        out.write(json.dumps({"event": event, "t": time.time(), **data}) + "\n")
        out.flush()

    from _faults import CONFIG, around_fresh_add, locked_cycle

    import offline.checkpoint as checkpoint
    # Modules that bind `atomic_dir` by name (train's resume snapshots, the model builders) are
    # imported BEFORE the patch below, so only save_checkpoint (which looks it up on the module
    # at call time) hangs; a snapshot written through the patched one would hang mid-training.
    import offline.demo_task  # noqa: F401
    import offline.models  # noqa: F401
    import offline.train  # noqa: F401
    from buffer.store import ReplayBuffer
    from orchestrator.config import load_config

    cfg = load_config(CONFIG, json.loads(args.overrides.read_text()))
    buf = ReplayBuffer.connect(cfg.buffer)
    if args.hang_in_save:
        # Only save_checkpoint looks atomic_dir up in offline.checkpoint; train's snapshots and
        # the model builders hold their own reference, so they are not held up.
        atomic_dir = checkpoint.atomic_dir

        @contextlib.contextmanager
        def hang(final: Path, overwrite: bool = False):
            with atomic_dir(final, overwrite) as tmp:
                yield tmp
                emit("saving", dir=str(tmp))
                time.sleep(600)

        checkpoint.atomic_dir = hang

    def announce(add, records):
        result = add(records)  # returned = acknowledged by Redis
        emit("added", ids=[r.pair.content_id for r in records], result=result.model_dump(mode="json"))
        return result

    spy = around_fresh_add(announce)

    def step(name: str, fn):
        if name == "update-buffer":
            return spy(name, fn)
        if name == "train":
            def train(*a, **k):
                result = fn(*a, **k)
                emit("trained", steps=result.steps, resumed_from_step=result.resumed_from_step)
                return result
            return train
        return fn

    emit("ready")
    if args.go is not None:
        while not args.go.exists():
            time.sleep(0.005)
    report = locked_cycle(cfg, buf, step=step, on_acquired=lambda: emit("acquired"))
    if report is None:
        emit("skipped")
    else:
        emit("done", index=report.index, promoted=report.promoted, checkpoint=report.checkpoint.model_dump(mode="json"),
             pairs_added=report.mix.get("pairs_added"))
    buf.close()


if __name__ == "__main__":
    main()
