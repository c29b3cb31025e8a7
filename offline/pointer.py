"""The promoted-policy pointer file: which checkpoint is "current".

One small JSON file per run family, replaced atomically (write a temp file in the same
directory, fsync, `os.replace`), so a reader sees the old pointer or the new one, never a torn
one; and it is only ever pointed at a checkpoint that `is_complete`. Online cycles mirror it
into Redis (see `buffer.store`), the file stays the source a human can `cat`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from offline.checkpoint import CheckpointRef, is_complete


def pointer_path(state_dir: Path, name: str) -> Path:
    """Where the current-policy pointer of run family `name` lives."""
    return state_dir / "pointers" / f"{name}.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def promote(state_dir: Path, name: str, ref: CheckpointRef, **extra: Any) -> dict[str, Any]:
    """Point run family `name` at checkpoint `ref` (refuses an incomplete checkpoint)."""
    if not is_complete(Path(ref.path)):
        raise ValueError(f"refusing to promote {ref.path}: it is not a complete checkpoint")
    record = {"checkpoint": ref.model_dump(mode="json"), **extra}
    write_json_atomic(pointer_path(state_dir, name), record)
    return record


def read_current(state_dir: Path, name: str) -> dict[str, Any] | None:
    """The current pointer record of `name`, or None before anything was promoted."""
    path = pointer_path(state_dir, name)
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
