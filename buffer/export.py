"""Snapshot the replay buffer to JSONL or Parquet, and restore it from one.

Contract. `export_buffer(buf, path)` writes every pair with its provenance; the format follows
the suffix (`.jsonl` or `.parquet`). The file appears atomically (`offline.atomic`: written
beside it, fsynced, renamed), so a crash never leaves half a snapshot under the final name.
`import_buffer(buf, path)` validates every record before writing any and then restores them
through `ReplayBuffer.restore`, so importing the same snapshot twice adds nothing.

JSONL lines are `BufferedPair` JSON. Parquet has one flat column per field (`id`, `pool`,
`source`, `cycle`, `policy_version`, `judge`, `confidence`, `created_at`, `prompt`, `chosen`,
`rejected`, `category`, `source_id`). Snapshots written while the buffer also cached reference
log-probs carry a `reference_logps` field (JSONL) or column (Parquet): reading drops it, since
those numbers now live only in `offline/reference.py`'s on-disk cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from buffer.records import AddResult, BufferedPair, InvalidRecord, SeedResult
from buffer.store import ReplayBuffer
from offline.atomic import atomic_open, atomic_path

_PAIR_FIELDS = ("prompt", "chosen", "rejected", "category", "source_id")
_RECORD_FIELDS = ("pool", "source", "cycle", "policy_version", "judge", "confidence", "created_at")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".parquet"):
        return suffix[1:]
    raise ValueError(f"snapshot {path} must end in .jsonl or .parquet")


def _row(rec: BufferedPair) -> dict[str, Any]:
    row: dict[str, Any] = {"id": rec.id}
    row.update({k: getattr(rec.pair, k) for k in _PAIR_FIELDS})
    row.update({k: getattr(rec, k) for k in _RECORD_FIELDS})
    return row


def _from_row(row: dict[str, Any]) -> dict[str, Any]:
    rec = {k: row[k] for k in _RECORD_FIELDS}
    rec["pair"] = {k: row[k] for k in _PAIR_FIELDS}
    return rec


def export_buffer(buf: ReplayBuffer, path: Path | str) -> int:
    """Write every record of the buffer to `path` (.jsonl or .parquet); returns how many."""
    path = Path(path)
    fmt = _format(path)
    records = sorted(buf.iter_records(), key=lambda r: (r.pool, r.cycle or 0, r.id))  # stable diffs
    if fmt == "jsonl":
        with atomic_open(path, "w") as f:
            for rec in records:
                f.write(rec.model_dump_json() + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [("id", pa.string())]
            + [(k, pa.string()) for k in _PAIR_FIELDS]
            + [
                ("pool", pa.string()), ("source", pa.string()), ("cycle", pa.int64()),
                ("policy_version", pa.string()), ("judge", pa.string()), ("confidence", pa.float64()),
                ("created_at", pa.timestamp("us", tz="UTC")),
            ]
        )  # fmt: skip

        with atomic_path(path) as tmp:
            pq.write_table(pa.Table.from_pylist([_row(r) for r in records], schema=schema), tmp)
    return len(records)


def read_snapshot(path: Path | str) -> Iterator[BufferedPair]:
    """Validated records of a snapshot; `InvalidRecord` names the line/row and field at fault."""
    path = Path(path)
    if _format(path) == "jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    if isinstance(data, dict):
                        data.pop("reference_logps", None)  # an older snapshot's (see the docstring)
                    rec = BufferedPair.model_validate(data)
                except ValueError as e:  # a ValidationError, or JSON that does not parse
                    raise InvalidRecord(f"{path}:{line_no}: {_errors(e)}") from None
                yield rec
    else:
        import pyarrow.parquet as pq

        for row_no, row in enumerate(pq.read_table(path).to_pylist()):
            try:
                rec = BufferedPair.model_validate(_from_row(row))
            except (ValidationError, KeyError, ValueError, TypeError) as e:
                raise InvalidRecord(f"{path} row {row_no}: {_errors(e)}") from None
            if row.get("id") not in (None, rec.id):
                raise InvalidRecord(f"{path} row {row_no}: id {row['id']} does not match the pair's content hash")
            yield rec


def _errors(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or '<record>'}: {err['msg']}" for err in e.errors())
    return f"{type(e).__name__}: {e}"


def import_buffer(buf: ReplayBuffer, path: Path | str) -> tuple[SeedResult | None, AddResult]:
    """Restore a snapshot into `buf`: all records validated first, then written; idempotent."""
    records = list(read_snapshot(path))
    return buf.restore(records)
