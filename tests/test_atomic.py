"""Atomic file writes (offline/atomic.py): all or nothing, durable, no temp files left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from offline import checkpoint
from offline.atomic import atomic_open, atomic_path, atomic_write, atomic_write_json, fsync_tree
from offline.checkpoint import atomic_dir


class Boom(Exception):
    pass


def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record (st_dev, st_ino) of everything fsynced from now on, in order."""
    seen: list[tuple[int, int]] = []
    real = os.fsync

    def recording(fd: int) -> None:
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_bytes_text_and_json_round_trip(tmp_path: Path) -> None:
    assert atomic_write(tmp_path / "b.bin", b"\x00\xff raw") == tmp_path / "b.bin"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff raw"
    atomic_write(tmp_path / "t.txt", "caf\u00e9\n")
    assert (tmp_path / "t.txt").read_bytes() == "caf\u00e9\n".encode()
    obj = {"b": [1, 2.5, None], "a": "\u00e9"}
    # Exactly json.dumps with the caller's arguments: each caller keeps its on-disk format.
    for kwargs in ({}, {"indent": 2, "sort_keys": True}, {"separators": (",", ":")}):
        atomic_write_json(tmp_path / "o.json", obj, **kwargs)
        assert (tmp_path / "o.json").read_text(encoding="utf-8") == json.dumps(obj, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "o.json", "t.txt"]


def test_streamed_and_named_writers_and_a_missing_parent(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "deep" / "er" / "lines.jsonl") as fh:
        fh.write('{"a": 1}\n')
        fh.write('{"a": 2}\n')
        assert not (tmp_path / "deep" / "er" / "lines.jsonl").exists()  # nothing visible mid-write
    assert (tmp_path / "deep" / "er" / "lines.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'
    with atomic_path(tmp_path / "named.bin") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".named.bin.") and tmp.exists()
        tmp.write_bytes(b"by name")
    assert (tmp_path / "named.bin").read_bytes() == b"by name"
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass


@pytest.mark.parametrize("how", ["writer raises", "replace fails", "interrupted"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    target = tmp_path / "pointer.json"
    atomic_write_json(target, {"v": 1})
    if how == "replace fails":
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    error = KeyboardInterrupt if how == "interrupted" else (OSError if how == "replace fails" else Boom)
    with pytest.raises(error):
        with atomic_open(target) as fh:
            fh.write('{"v": 2, "torn')
            if how != "replace fails":
                raise error()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["pointer.json"]


def test_a_failing_named_writer_leaves_no_temp_file(tmp_path: Path) -> None:
    def write_table(dest: Path) -> None:  # stands in for pq.write_table dying half-way
        dest.write_bytes(b"PAR1 half a footer")
        raise Boom()

    with pytest.raises(Boom):
        with atomic_path(tmp_path / "snap.parquet") as tmp:
            write_table(tmp)
    assert list(tmp_path.iterdir()) == []


def test_the_file_then_its_directory_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = fsynced(monkeypatch)
    atomic_write(tmp_path / "f.txt", "data")
    # The file's data before the rename, then the directory entry the rename changed.
    assert seen == [inode(tmp_path / "f.txt"), inode(tmp_path)]


def test_a_new_file_gets_the_mode_a_plain_open_would_give(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "f", "x")
        with open(tmp_path / "plain", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o640


def test_fsync_tree_flushes_every_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    for p in ("a.safetensors", "config.json", "sub/tokenizer.json"):
        (tmp_path / p).write_text(p)
    (tmp_path / "link").symlink_to("a.safetensors")
    seen = fsynced(monkeypatch)
    fsync_tree(tmp_path)
    want = {inode(tmp_path / p) for p in ("a.safetensors", "config.json", "sub/tokenizer.json", "sub", ".")}
    assert set(seen) == want and len(seen) == len(want)
    assert seen.index(inode(tmp_path / "sub/tokenizer.json")) < seen.index(inode(tmp_path / "sub"))
    assert seen[-1] == inode(tmp_path)


def test_atomic_dir_fsyncs_its_files_and_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Path]] = []
    monkeypatch.setattr(checkpoint, "fsync_tree", lambda d: calls.append(("tree", Path(d))))
    monkeypatch.setattr(checkpoint, "fsync_dir", lambda d: calls.append(("dir", Path(d))))
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
        assert calls == []
    # The files before the rename publishes them, then the parent whose entry the rename changed.
    assert calls == [("tree", tmp), ("dir", tmp_path)]
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == b"w"
