"""Snapshots: JSONL and Parquet round trips keep provenance; imports are idempotent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from buffer.config import BufferConfig
from buffer.export import export_buffer, import_buffer
from buffer.records import BufferedPair, InvalidRecord
from buffer.store import ReplayBuffer
from offline.pairs import PreferencePair


@pytest.fixture
def buf(redis_url: str) -> Iterator[ReplayBuffer]:
    with ReplayBuffer.connect(BufferConfig(url=redis_url)) as b:
        yield b


def fill(buf: ReplayBuffer) -> list[BufferedPair]:
    anchor = [PreferencePair(prompt=f"a{i}", chosen="y", rejected="n", category="math") for i in range(20)]
    buf.seed_anchor(anchor, "fp-7")
    buf.add([
        BufferedPair.fresh(PreferencePair(prompt=f"f{c}-{i} é ✓", chosen="y", rejected="n", source_id=f"s{i}"), cycle=c,
                           policy_version=f"ckpt-{c}", judge="gpt-judge", confidence=0.75)
        for c in range(2) for i in range(15)
    ])  # fmt: skip
    return sorted(buf.iter_records(), key=lambda r: r.id)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_import_round_trip(buf: ReplayBuffer, tmp_path: Path, suffix: str) -> None:
    before = fill(buf)
    path = tmp_path / f"snap{suffix}"
    assert export_buffer(buf, path) == 50
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    buf.clear()
    assert buf.count() == 0
    seeded, added = import_buffer(buf, path)
    assert seeded is not None and (seeded.fingerprint, seeded.added) == ("fp-7", 20)
    assert added.added == 30
    assert sorted(buf.iter_records(), key=lambda r: r.id) == before  # provenance and times
    seeded, added = import_buffer(buf, path)  # idempotent
    assert (seeded.added if seeded else 0, added.added) == (0, 0)
    assert buf.count() == 50


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_snapshot_that_still_carries_reference_logps_imports_without_them(
    buf: ReplayBuffer, tmp_path: Path, suffix: str
) -> None:
    """Snapshots written while the buffer cached reference log-probs have a `reference_logps`
    field per record; those numbers live in offline/reference.py's cache now, so reading drops them."""
    before = fill(buf)
    path = tmp_path / f"snap{suffix}"
    export_buffer(buf, path)
    old = '{"ref-a": [-1.5, -2.25]}'
    if suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "reference_logps": json.loads(old)}) + "\n" for r in records))
    else:
        table = pq.read_table(path)
        pq.write_table(table.append_column("reference_logps", pa.array([old] * table.num_rows)), path)
    buf.clear()
    seeded, added = import_buffer(buf, path)
    assert seeded is not None and (seeded.added, added.added) == (20, 30)
    assert sorted(buf.iter_records(), key=lambda r: r.id) == before


def test_a_bad_snapshot_line_is_named_and_nothing_is_written(buf: ReplayBuffer, tmp_path: Path) -> None:
    fill(buf)
    path = tmp_path / "snap.jsonl"
    export_buffer(buf, path)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace('"pool":', '"pool_typo":')
    path.write_text("\n".join(lines) + "\n")
    buf.clear()
    with pytest.raises(InvalidRecord, match=r"snap.jsonl:4: .*pool"):
        import_buffer(buf, path)
    assert buf.count() == 0
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        export_buffer(buf, tmp_path / "snap.csv")
