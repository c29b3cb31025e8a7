"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Contract: every file tether replaces while another process (or a restart) may read it is
written through here, in one way:

1. create a temp file `.<name>.<random>.tmp` beside the target (same directory, so the same
   filesystem and an atomic rename; dot-prefixed, so globs like `step-*` skip it), with the
   permissions a plain `open(path, "w")` would give (0666 minus the umask);
2. write it (`atomic_write` bytes or text, `atomic_write_json`, `atomic_open` for streamed
   writers, `atomic_path` for writers that want a file name, e.g. `pq.write_table`);
3. flush and fsync the file, `os.replace` it over the target, then fsync the directory, so
   the rename itself survives a power cut.

On any exception (KeyboardInterrupt included) the temp file is removed, the target is left as
it was and the exception propagates. The parent directory is created when missing.

`fsync_dir` and `fsync_tree` are the same guarantees for whole directories; directories are
renamed into place by `offline.checkpoint.atomic_dir`, which calls them.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator, Literal


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush `directory`'s entries (creations, renames) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike[str]) -> None:
    """Flush every file under `directory`, then every directory's entries, deepest first.

    Called before a directory is renamed into place: a power cut must not publish a directory
    whose files are holes.
    """
    root = Path(directory)
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_symlink():
            continue  # a link has no data of its own; its entry is flushed with its directory
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield the name of an empty temp file beside `path`; on clean exit it replaces `path`.

    For writers that open the file themselves by name (`pq.write_table(table, tmp)`, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL on a fresh random name is what mkstemp does, minus its 0600 mode: these files are
    # data (caches, pointers, metadata), readable like any other file the user writes.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # fsync is per inode: it flushes what any descriptor wrote
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: Literal["w", "wb"] = "w", encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """`open(path, mode)` whose writes appear at `path` all at once, when the block exits cleanly."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole new file: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if mode == "wb" else encoding) as fh:
            yield fh


def atomic_write(path: str | os.PathLike[str], data: bytes | str, encoding: str = "utf-8") -> Path:
    """Replace `path` with `data` (text is encoded with `encoding`); returns `path`."""
    with atomic_open(path, "wb") as fh:
        fh.write(data.encode(encoding) if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **json_kwargs: Any) -> Path:
    """Replace `path` with exactly `json.dumps(obj, **json_kwargs)` (no trailing newline added)."""
    return atomic_write(path, json.dumps(obj, **json_kwargs))
