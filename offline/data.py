"""Static preference data: a local file or hub id -> validated `PreferencePair`s -> train/held-out.

Contract:
- Sources: `.jsonl`, `.jsonl.gz`, `.parquet` (relative paths resolve against the current
  directory; errors show the path as given), or `hf:<hub id>` read with
  `datasets.load_dataset(id, split=hub_split)`, refused with a clear error when offline.
- Record shapes (`offline.formats`, one normaliser each, one pair type): explicit, implicit,
  chat, chat_implicit, ultrafeedback, hh. `format: auto` picks the shape per file from the
  first JSON object; conversational shapes need the policy's tokenizer (its chat template).
  Optional `category`, `id` (-> `source_id`) and scores (`score_chosen`/`score_rejected`,
  `margin`) are kept; other keys are ignored. With `min_score_margin` set, pairs whose
  `score_margin` is below it are dropped and counted (`below_min_score_margin`).
- Bad records raise `DataError` naming file, line (JSONL, 1-based) or row (Parquet/hub,
  0-based) and field: `data/x.jsonl:17: field 'chosen': expected a non-empty string, got int`.
  With `on_bad_record: skip` they are counted per reason (`BAD_RECORD_REASONS`) instead.
  A file-level problem (missing/unreadable/empty file, unknown layout, chat data without a
  chat template, every record skipped) is always an error. Blank lines are ignored.
- Duplicates (same `content_id`) are dropped at load, first one kept, and counted.
- The split is a pure function of (content_id, seed): independent of record order and stable
  as a dataset grows. The fingerprint hashes the resolved format and every pair's content id
  with its split, in load order (the order the trainer sees).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from offline.atomic import atomic_open
from offline.config import HUB_PREFIX, DataConfig
from offline.formats import (
    BAD_RECORD_REASONS,
    CONVERSATIONAL,
    LAYOUTS,
    BadRecord,
    detect_format,
    normaliser,
    type_name,
)
from offline.pairs import PreferencePair

__all__ = [
    "BAD_RECORD_REASONS", "DataError", "LoadStats", "LoadedPairs", "PreferenceDataset",
    "dataset_fingerprint", "fingerprint_ids", "heldout_ids", "iter_pairs", "load_pairs",
    "load_preference_dataset", "split_pairs", "write_jsonl",
]

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


class DataError(ValueError):
    """A dataset problem: `file`, `line` (1-based) or `row` (0-based), `field`, `reason`."""

    def __init__(
        self,
        file: str,
        reason: str,
        detail: str,
        *,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file, self.reason, self.detail = file, reason, detail
        self.line, self.row, self.field = line, row, field
        where = file
        if line is not None:
            where = f"{file}:{line}"
        elif row is not None:
            where = f"{file}:row {row}"
        what = f"field '{field}': {detail}" if field else detail
        super().__init__(f"{where}: {what}")


@dataclass(frozen=True)
class LoadedPairs:
    """Validated, de-duplicated pairs of one source, in file order, with what was dropped."""

    pairs: tuple[PreferencePair, ...]
    skipped: Mapping[str, int]  # reason -> records skipped (empty unless on_bad_record=skip)
    duplicates: int  # records dropped because their content_id was already loaded
    source: str  # the path as given, or 'hf:<id>[<split>]'
    format: str  # the resolved shape (offline.formats.Format)
    below_min_score_margin: int = 0  # valid pairs dropped by data.min_score_margin
    content_ids: tuple[str, ...] = ()  # each pair's content_id, computed once at load


@dataclass(frozen=True)
class PreferenceDataset:
    """A loaded, split dataset; `fingerprint` identifies it in every lineage record."""

    train: tuple[PreferencePair, ...]
    heldout: tuple[PreferencePair, ...]
    fingerprint: str  # 64 hex digits, see dataset_fingerprint
    skipped: Mapping[str, int]
    duplicates: int
    source: str
    format: str
    below_min_score_margin: int = 0  # valid pairs dropped by data.min_score_margin
    min_score_margin: float | None = None  # the filter they were loaded with (None: none)

    @property
    def pairs(self) -> tuple[PreferencePair, ...]:
        """Every pair, train first."""
        return self.train + self.heldout


# ---------------------------------------------------------------- reading records


def _jsonl_records(path: Path, display: str) -> Iterator[tuple[int, Any]]:
    """(1-based line, JSON object or BadRecord) per non-blank line; bytes split on b'\\n' only."""
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    text = raw.rstrip(b"\r\n").decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    yield lineno, BadRecord("invalid_utf8", None, f"invalid UTF-8 at byte {exc.start}")
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield lineno, BadRecord(
                        "malformed_json", None, f"malformed JSON: {exc.msg} (column {exc.colno})"
                    )
                    continue
                if not isinstance(obj, dict):
                    yield lineno, BadRecord(
                        "not_an_object", None, f"expected a JSON object, got {type_name(obj)}"
                    )
                    continue
                yield lineno, obj
    except (OSError, EOFError, zlib.error) as exc:
        # A truncated or corrupt .gz, or an unreadable file: nothing after this point is usable.
        raise DataError(
            display, "unreadable", f"cannot read the file after line {lineno}: {exc}"
        ) from exc


def _parquet_records(path: Path, display: str) -> Iterator[tuple[int, Any]]:
    """(0-based row, dict) per Parquet row; nested columns come back as lists/dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        row = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield row, record
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(display, "unreadable", f"cannot read the Parquet file: {exc}") from exc


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for k in flags)


def _hub_records(cfg: DataConfig) -> Iterator[tuple[int, Any]]:
    """(0-based row, dict) per row of a hub dataset split."""
    hub_id = cfg.path[len(HUB_PREFIX) :]
    if _hub_offline():
        raise DataError(
            cfg.path,
            "offline",
            "cannot read a hub dataset while offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): "
            "export it to a local .jsonl/.parquet file and point data.path at that",
        )
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split=cfg.hub_split)
    except Exception as exc:  # network, auth, missing split: all end here, say which and why
        raise DataError(
            cfg.path, "hub_error", f"datasets.load_dataset({hub_id!r}, split={cfg.hub_split!r}) "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc
    for row, record in enumerate(ds):
        if not isinstance(record, dict):
            record = BadRecord("not_an_object", None, f"expected a record, got {type_name(record)}")
        yield row, record


def _open_records(cfg: DataConfig) -> tuple[Iterator[tuple[int, Any]], str]:
    """The source's records and the unit their positions are in ('line' or 'row')."""
    if cfg.path.startswith(HUB_PREFIX):
        return _hub_records(cfg), "row"
    path = Path(cfg.path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "no such file"
        raise DataError(cfg.path, "missing_file", f"{what} (looked for {path.resolve()})")
    if path.name.endswith(".parquet"):
        return _parquet_records(path, cfg.path), "row"
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_records(path, cfg.path), "line"
    accepted = ", ".join(SUFFIXES)
    raise DataError(cfg.path, "unsupported_file", f"unsupported file type; expected {accepted}")


# ---------------------------------------------------------------- public API


def _check_chat_tokenizer(tokenizer: Any, display: str) -> None:
    """Conversations are rendered with a chat template: refuse the file once, up front, without one."""
    if tokenizer is None:
        raise DataError(
            display,
            "no_tokenizer",
            "chat-shaped records (conversations: lists of messages) are rendered with a chat "
            "template: pass the policy's tokenizer to load_preference_dataset(cfg, tokenizer)",
        )
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            display,
            "no_chat_template",
            f"the tokenizer ({name}) has no chat_template to render chat-shaped records: set "
            "tokenizer.chat_template or convert the data to prompt/chosen/rejected strings",
        )


@dataclass
class LoadStats:
    """What one pass of `iter_pairs` resolved and dropped; complete once the pass has ended."""

    source: str = ""  # the path as given, or 'hf:<id>[<split>]'
    format: str | None = None  # the resolved shape, set by the first record
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> records skipped
    duplicates: int = 0  # records dropped because their content_id was already loaded
    below_min_score_margin: int = 0  # valid pairs dropped by data.min_score_margin
    scored: int = 0  # pairs yielded that carry a score margin (coverage: scored_pairs)
    records: int = 0  # records read (valid or not)


def _config(source: DataConfig | str | os.PathLike, config: Mapping[str, Any]) -> DataConfig:
    if isinstance(source, DataConfig):
        return DataConfig(**{**source.model_dump(), **config}) if config else source
    return DataConfig(path=os.fspath(source), **config)


def iter_pairs(
    source: DataConfig | str | os.PathLike, tokenizer: Any = None, stats: LoadStats | None = None,
    **config: Any,
) -> Iterator[tuple[str, PreferencePair]]:
    """(content_id, pair) of every valid, distinct record of one source, in file order.

    Streams: it keeps the content ids it has seen, never the pairs, so a large dataset can be
    tokenised pair batch by pair batch (`offline.tokenized`). Raises exactly what `load_pairs`
    raises (record errors at the record, file-level ones when the source ends); `stats` is
    filled as it goes.
    """
    cfg = _config(source, config)
    stats = stats if stats is not None else LoadStats()
    stats.source = f"{cfg.path}[{cfg.hub_split}]" if cfg.path.startswith(HUB_PREFIX) else cfg.path
    records, unit = _open_records(cfg)
    fmt: str | None = None if cfg.format == "auto" else cfg.format
    normalise: Callable[[dict], PreferencePair] | None = None
    seen: set[str] = set()  # content ids of the pairs yielded so far
    skipped = stats.skipped
    id_positions: dict[str, object] = {}  # source id -> where it was first seen
    for position, record in records:
        stats.records += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            if normalise is None:
                fmt = fmt or detect_format(record)
                if fmt is None:
                    raise DataError(
                        cfg.path,
                        "unknown_layout",
                        f"unknown column layout: found columns {sorted(record)}; accepted "
                        f"layouts: {LAYOUTS}",
                        **{unit: position},
                    )
                if fmt in CONVERSATIONAL:
                    _check_chat_tokenizer(tokenizer, cfg.path)
                normalise = normaliser(fmt, tokenizer)
                stats.format = fmt
            pair = normalise(record)
            if pair.source_id is not None and pair.source_id in id_positions:
                first = id_positions[pair.source_id]
                if pair.content_id not in seen:  # same id, other content (a true duplicate is dropped below)
                    raise BadRecord("duplicate_id", "id", f"duplicate id {pair.source_id!r}: already used by a different record at {unit} {first}")
            margin = pair.score_margin
            if cfg.min_score_margin is not None and margin is None:
                raise BadRecord(
                    "missing_field", "score_chosen",
                    "missing (data.min_score_margin is set, so every record needs "
                    "score_chosen/score_rejected or margin)",
                )
        except BadRecord as bad:
            if cfg.on_bad_record == "error":
                raise DataError(
                    cfg.path, bad.reason, bad.detail, field=bad.field, **{unit: position}
                ) from bad.__cause__
            skipped[bad.reason] += 1
            continue
        if cfg.min_score_margin is not None and margin < cfg.min_score_margin:
            stats.below_min_score_margin += 1
            continue
        content_id = pair.content_id  # a hash: compute once
        if content_id in seen:
            stats.duplicates += 1
            continue
        seen.add(content_id)
        stats.scored += margin is not None
        if pair.source_id is not None:
            id_positions[pair.source_id] = position
        yield content_id, pair
        if cfg.limit is not None and len(seen) >= cfg.limit:
            break
    if stats.records == 0:
        raise DataError(cfg.path, "empty_file", "no records: the source is empty")
    if not seen:
        dropped = {**skipped, **({"below_min_score_margin": stats.below_min_score_margin}
                                 if stats.below_min_score_margin else {})}
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
        raise DataError(
            cfg.path, "no_valid_records", f"all {stats.records} records were skipped ({counts})"
        )


def load_pairs(
    source: DataConfig | str | os.PathLike, tokenizer: Any = None, **config: Any
) -> LoadedPairs:
    """Read, validate, normalise and de-duplicate one source.

    `source` is a DataConfig, or a path / 'hf:<id>' with DataConfig fields as keywords
    (`format=`, `on_bad_record=`, `limit=`, ...). `tokenizer` is needed only for
    conversations (their chat template).
    """
    stats = LoadStats()
    items = list(iter_pairs(_config(source, config), tokenizer, stats))
    assert stats.format is not None  # set when the first record was normalised
    return LoadedPairs(
        pairs=tuple(pair for _, pair in items),
        skipped=dict(sorted(stats.skipped.items())),
        duplicates=stats.duplicates,
        source=stats.source,
        format=stats.format,
        below_min_score_margin=stats.below_min_score_margin,
        content_ids=tuple(content_id for content_id, _ in items),
    )


def _split_key(content_id: str, seed: int) -> float:
    """Uniform in [0, 1), a pure function of (content_id, seed)."""
    digest = hashlib.sha256(f"{seed}:{content_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_ids(content_ids: Sequence[str], heldout_fraction: float, seed: int) -> set[str]:
    """The content ids on the held-out side: those whose key < heldout_fraction.

    The key depends only on the pair's content and the seed, so a pair's side does not change
    when records are reordered or added. With at least two distinct pairs, neither side is left
    empty: the pair with the lowest (highest) key moves over, which is still order-independent.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    keys = {cid: _split_key(cid, seed) for cid in content_ids}
    heldout = {cid for cid, key in keys.items() if key < heldout_fraction}
    if len(keys) >= 2 and not heldout:
        heldout = {min(keys, key=lambda cid: (keys[cid], cid))}
    if len(keys) >= 2 and len(heldout) == len(keys):
        heldout.discard(max(keys, key=lambda cid: (keys[cid], cid)))
    return heldout


def split_pairs(
    pairs: Sequence[PreferencePair], heldout_fraction: float, seed: int
) -> tuple[tuple[PreferencePair, ...], tuple[PreferencePair, ...]]:
    """(train, heldout), each in input order; a pair is held out iff its key < heldout_fraction
    (`heldout_ids`: order-independent, stable as a dataset grows, neither side left empty)."""
    ids = [p.content_id for p in pairs]  # computed once: content_id hashes on every access
    heldout = heldout_ids(ids, heldout_fraction, seed)
    train = tuple(p for p, cid in zip(pairs, ids) if cid not in heldout)
    held = tuple(p for p, cid in zip(pairs, ids) if cid in heldout)
    return train, held


def fingerprint_ids(train_ids: Iterable[str], heldout_ids: Iterable[str], format: str) -> str:
    """sha256 (64 hex) of the resolved format and each content id with its side, in order."""
    digest = hashlib.sha256(f"tether-dataset-v1\nformat {format}\n".encode())
    for side, ids in (("train", train_ids), ("heldout", heldout_ids)):
        for cid in ids:
            digest.update(f"{side} {cid}\n".encode())
    return digest.hexdigest()


def dataset_fingerprint(
    train: Sequence[PreferencePair], heldout: Sequence[PreferencePair], format: str
) -> str:
    """sha256 (64 hex) of the resolved format and each pair's content id and side, in order."""
    return fingerprint_ids((p.content_id for p in train), (p.content_id for p in heldout), format)


def load_preference_dataset(cfg: DataConfig, tokenizer: Any = None) -> PreferenceDataset:
    """Load, validate, de-duplicate and split the configured dataset (tokenizer: chat data only)."""
    loaded = load_pairs(cfg, tokenizer)
    ids = loaded.content_ids  # hashed once at load, reused by the split and the fingerprint
    held = heldout_ids(ids, cfg.heldout_fraction, cfg.split_seed)
    train = tuple(p for p, c in zip(loaded.pairs, ids) if c not in held)
    heldout = tuple(p for p, c in zip(loaded.pairs, ids) if c in held)
    return PreferenceDataset(
        train=train,
        heldout=heldout,
        fingerprint=fingerprint_ids(
            (c for c in ids if c not in held), (c for c in ids if c in held), loaded.format
        ),
        skipped=loaded.skipped,
        duplicates=loaded.duplicates,
        source=loaded.source,
        format=loaded.format,
        below_min_score_margin=loaded.below_min_score_margin,
        min_score_margin=cfg.min_score_margin,
    )


def write_jsonl(pairs: Sequence[PreferencePair], path: str | os.PathLike) -> Path:
    """Write pairs as explicit-format JSONL (gzipped if the name ends in .gz), atomically.

    Keys: prompt, chosen, rejected, plus category, id, score_chosen, score_rejected and margin
    when set, so the file loads back to the same pairs. The file appears complete
    or not at all: it is written to a temporary file beside it, then renamed over.
    """
    path = Path(path)
    with atomic_open(path, "wb") as raw:
        # mtime=0 and no file name (else the temp file's random one) keep a .gz byte-identical.
        gz = path.name.endswith(".gz")
        out = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) if gz else raw
        for pair in pairs:
            record: dict[str, str | float] = {
                "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected
            }
            if pair.category is not None:
                record["category"] = pair.category
            if pair.source_id is not None:
                record["id"] = pair.source_id
            for key in ("score_chosen", "score_rejected", "margin"):
                if (value := getattr(pair, key)) is not None:
                    record[key] = value
            out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        if out is not raw:
            out.close()  # writes the gzip trailer; `raw` stays open for atomic_open to finish
    return path
