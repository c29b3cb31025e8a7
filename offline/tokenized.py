"""A preference dataset as token ids, streamed into a memory-mapped store and cached on disk.

Contract: `load_tokenized_dataset(cfg, tokenizer, cache_dir)` returns a `TokenizedDataset`:
the train and held-out splits as `TokenizedPairs` (views of one `offline.token_store`
store), the dataset fingerprint, what was dropped at load (score-margin drops included), how
many pairs carry scores, and the raw token lengths the coverage report needs. Same pairs,
split, fingerprint, errors and token ids as `offline.data.load_preference_dataset` followed by
`offline.tokenize.tokenize_pairs`; it never holds the whole dataset's texts, only one batch of
them.

How (one recipe, three exits):
  1. source lookup: a local file is hashed (sha256 of its bytes) and looked up with the data
     config, tokenizer identity and limits in `cache_dir/sources/`; a hit names a stored
     entry, so nothing is parsed or tokenised (the "cached" run).
  2. pass 1, validate: stream the records (`offline.data.iter_pairs`), keep content ids and
     categories only; split and fingerprint from the ids. The entry key is (fingerprint,
     categories, tokenizer identity, max_length, max_prompt_length): an existing entry is
     used as is (the same pairs from another file, or a hub dataset read again).
  3. pass 2, tokenise: stream the records again, batch by batch through the fast tokenizer
     (`offline.tokenize.encode_batch`), the ids straight into `tokens.bin` of a temp dir that
     `offline.checkpoint.atomic_dir` renames into place when complete; a crash leaves no entry.
     Pass 2 checks it reads the same pairs as pass 1 (the file must not change in between).
Without `cache_dir` the two passes are one and the store lives in memory.

The source record beside an entry keeps what the load dropped and counted (skipped records
per reason, duplicates, pairs below `data.min_score_margin`, scored pairs), so a cached run's
coverage report equals the cold run's. Two processes building one entry at once do not clash
(`atomic_dir`): the first to publish wins, the other discards its copy and maps the winner's.

The cache holds no pickle: raw int32, `.npy` (`allow_pickle=False`) and JSON. Entries are never
evicted: delete `<state_dir>/cache/tokenized/` to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from offline.atomic import atomic_write_json
from offline.checkpoint import atomic_dir
from offline.config import HUB_PREFIX, DataConfig
from offline.data import DataError, LoadStats, PreferenceDataset, fingerprint_ids, heldout_ids, iter_pairs
from offline.pairs import PreferencePair
from offline.token_store import TOKENS_FILE, StoreBuilder, TokenizedPairs, TokenStore
from offline.tokenize import BATCH_PAIRS, check_limits, encode_batch, tokenizer_identity

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Bumped whenever what a cache entry holds or how its ids are made changes."""


@dataclass(frozen=True)
class TokenizedDataset:
    """A loaded, split dataset as token ids (memory-mapped when it came from the cache)."""

    train: TokenizedPairs
    heldout: TokenizedPairs
    fingerprint: str  # offline.data's dataset fingerprint (lineage records)
    skipped: Mapping[str, int]  # reason -> records skipped at load
    duplicates: int  # records dropped at load as duplicates
    source: str  # the path as given, or 'hf:<id>[<split>]'
    format: str  # the resolved record shape
    tokenizer: str  # the tokenizer's name (coverage report)
    max_length: int
    max_prompt_length: int
    cached: bool = False  # True when the ids came from the cache (no tokenizer call)
    below_min_score_margin: int = 0  # valid pairs dropped by data.min_score_margin
    min_score_margin: float | None = None  # the filter they were loaded with (None: none)
    scored_pairs: int = 0  # loaded pairs that carry a score margin (coverage report)

    @property
    def pairs(self) -> TokenizedPairs:
        """Every pair, train first (one view of the store, no copy)."""
        return self.train + self.heldout

    @property
    def store(self) -> TokenStore:
        return self.train.store

    @property
    def token_bytes(self) -> int:
        """Bytes of every pair's token ids."""
        return self.store.token_bytes


def split_store(store: TokenStore, **summary: Any) -> TokenizedDataset:
    """The dataset over `store`: train = rows not held out, held-out = the rest, in load order."""
    rows = np.arange(len(store), dtype=np.int64)
    held = np.asarray(store.heldout, dtype=bool)
    return TokenizedDataset(
        train=TokenizedPairs(store, rows[~held]), heldout=TokenizedPairs(store, rows[held]), **summary
    )


def tokenize_dataset(
    dataset: PreferenceDataset, tokenizer: Any, max_length: int, max_prompt_length: int
) -> TokenizedDataset:
    """An already loaded dataset, tokenised into an in-memory store (no cache)."""
    eos_id = check_limits(tokenizer, max_length, max_prompt_length)
    builder = StoreBuilder()
    pairs = dataset.pairs
    for start in range(0, len(pairs), BATCH_PAIRS):
        _append(builder, tokenizer, pairs[start : start + BATCH_PAIRS], None, eos_id, max_length, max_prompt_length)
    held = np.zeros(len(pairs), dtype=bool)
    held[len(dataset.train) :] = True
    return split_store(
        builder.finish(heldout=held), fingerprint=dataset.fingerprint, skipped=dict(dataset.skipped),
        duplicates=dataset.duplicates, source=dataset.source, format=dataset.format,
        tokenizer=tokenizer_identity(tokenizer)["name"], max_length=max_length,
        max_prompt_length=max_prompt_length, below_min_score_margin=dataset.below_min_score_margin,
        min_score_margin=dataset.min_score_margin,
        scored_pairs=sum(p.score_margin is not None for p in pairs),
    )


def load_tokenized_dataset(
    cfg: DataConfig, tokenizer: Any, cache_dir: Path | None = None, progress: bool = False
) -> TokenizedDataset:
    """Load, validate, split, fingerprint and tokenise `cfg`'s dataset (see the module docstring).

    `tokenizer` renders chat records and makes the ids; `cache_dir` (e.g.
    `<state_dir>/cache/tokenized`) keeps the store so the next run skips the tokenizer.
    """
    eos_id = check_limits(tokenizer, cfg.max_length, cfg.max_prompt_length)
    tok = tokenizer_identity(tokenizer)
    common = dict(tokenizer=tok["name"], max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  min_score_margin=cfg.min_score_margin)
    if cache_dir is None:  # one pass, into memory
        builder, stats = StoreBuilder(), LoadStats()
        ids = _tokenize_source(cfg, tokenizer, eos_id, builder, stats, None, progress)
        return _finish(builder, ids, stats, cfg, **common)

    cache_dir = Path(cache_dir)
    source_key = _source_key(cfg, tok["id"])
    hit = _lookup_source(cache_dir, source_key) if source_key else None
    if hit is not None:
        store, record = hit
        log.info("tokenized dataset from the cache (%s): %d pairs, no parsing", record["entry"][:12], len(store))
        return split_store(store, fingerprint=record["fingerprint"], skipped=record["skipped"],
                           duplicates=record["duplicates"], source=_source_name(cfg),
                           format=record["data_format"], cached=True,
                           below_min_score_margin=record["below_min_score_margin"],
                           scored_pairs=record["scored_pairs"], **common)

    # pass 1: validate, keep ids and categories only
    stats = LoadStats()
    ids: list[str] = []
    names: dict[str | None, int] = {}
    codes = array("i")
    for content_id, pair in iter_pairs(cfg, tokenizer, stats):
        ids.append(content_id)
        codes.append(names.setdefault(pair.category, len(names)))
    held = heldout_ids(ids, cfg.heldout_fraction, cfg.split_seed)
    assert stats.format is not None
    fingerprint = fingerprint_ids((c for c in ids if c not in held), (c for c in ids if c in held), stats.format)
    categories = hashlib.sha256(json.dumps([list(names), codes.tolist()]).encode()).hexdigest()
    del names, codes
    entry = _key(format=CACHE_FORMAT, fingerprint=fingerprint, categories=categories, tokenizer=tok["id"],
                 max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    final = cache_dir / entry
    store = _open_entry(final)
    cached = store is not None
    if store is None:  # pass 2: tokenise into the entry, published whole or not at all
        damaged = final.exists()  # there but unreadable above: ours replaces it
        try:
            # A missing entry stays missing until ours is complete. Another process building
            # the same entry at the same time is no clash (atomic_dir): whichever publishes
            # first wins, the other's copy (same content, same key) is discarded and the
            # winner's entry read instead.
            with atomic_dir(final, overwrite=damaged) as tmp, open(tmp / TOKENS_FILE, "wb", buffering=0) as fh:
                builder = StoreBuilder(fh)
                _tokenize_source(cfg, tokenizer, eos_id, builder, LoadStats(), ids, progress)
                builder.finish(heldout=np.fromiter((c in held for c in ids), dtype=bool, count=len(ids)),
                               directory=tmp)
        except FileExistsError:  # another process published the same entry first: same content
            log.info("tokenized cache entry %s was published by another process meanwhile; using it", entry[:12])
        store = TokenStore.open(final)
    summary = {"fingerprint": fingerprint, "skipped": dict(sorted(stats.skipped.items())),
               "duplicates": stats.duplicates, "data_format": stats.format,
               "below_min_score_margin": stats.below_min_score_margin, "scored_pairs": stats.scored}
    if source_key:
        atomic_write_json(cache_dir / "sources" / f"{source_key}.json",
                          {"format": CACHE_FORMAT, "entry": entry, **summary})
    log.info("tokenized dataset %s: %d pairs (%s)", entry[:12], len(store), "cached" if cached else "tokenized")
    return split_store(store, fingerprint=fingerprint, skipped=summary["skipped"], duplicates=stats.duplicates,
                       source=_source_name(cfg), format=stats.format, cached=cached,
                       below_min_score_margin=stats.below_min_score_margin, scored_pairs=stats.scored, **common)


# ---------------------------------------------------------------- the passes


def _append(
    builder: StoreBuilder, tokenizer: Any, pairs: Sequence[PreferencePair], ids: Sequence[str] | None,
    eos_id: int, max_length: int, max_prompt_length: int,
) -> None:
    enc = encode_batch(tokenizer, [(p.prompt, p.chosen, p.rejected) for p in pairs], eos_id, max_length,
                       max_prompt_length)
    builder.append(enc.tokens, enc.lengths, enc.raw_lengths, enc.truncated,
                   ids if ids is not None else [p.content_id for p in pairs], [p.category for p in pairs])


def _batches(items: Iterator[tuple[str, PreferencePair]], size: int) -> Iterator[list[tuple[str, PreferencePair]]]:
    batch: list[tuple[str, PreferencePair]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenize_source(
    cfg: DataConfig, tokenizer: Any, eos_id: int, builder: StoreBuilder, stats: LoadStats,
    expect: Sequence[str] | None, progress: bool,
) -> list[str]:
    """Stream `cfg`'s valid pairs through the tokenizer into `builder`; returns their content
    ids. With `expect` (pass 1's ids) the pairs must be exactly those, in that order.

    One worker thread tokenises batch k (the Rust tokenizer releases the GIL) while this thread
    parses and validates batch k+1; batches are appended in order.
    """
    ids: list[str] = []
    bar = tqdm(total=len(expect) if expect is not None else None, desc="tokenize", unit="pair",
               disable=not progress)

    def tokenize(batch: list[tuple[str, PreferencePair]]) -> Any:
        pairs = [pair for _, pair in batch]
        return pairs, encode_batch(tokenizer, [(p.prompt, p.chosen, p.rejected) for p in pairs], eos_id,
                                   cfg.max_length, cfg.max_prompt_length)

    def append(batch_ids: list[str], future: Future) -> None:
        pairs, enc = future.result()  # re-raises the worker's exception here
        builder.append(enc.tokens, enc.lengths, enc.raw_lengths, enc.truncated, batch_ids,
                       [p.category for p in pairs])
        bar.update(len(batch_ids))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as worker:
        pending: tuple[list[str], Future] | None = None
        for batch in _batches(iter_pairs(cfg, tokenizer, stats), BATCH_PAIRS):
            batch_ids = [content_id for content_id, _ in batch]
            if expect is not None and batch_ids != list(expect[len(ids) : len(ids) + len(batch_ids)]):
                raise DataError(cfg.path, "changed", "the source changed while it was being read: run again")
            ids.extend(batch_ids)
            submitted = (batch_ids, worker.submit(tokenize, batch))
            if pending is not None:
                append(*pending)
            pending = submitted
        if pending is not None:
            append(*pending)
    bar.close()
    if expect is not None and len(ids) != len(expect):
        raise DataError(cfg.path, "changed", "the source changed while it was being read: run again")
    return ids


def _finish(
    builder: StoreBuilder, ids: list[str], stats: LoadStats, cfg: DataConfig, **common: Any
) -> TokenizedDataset:
    """The in-memory dataset of a single pass: split and fingerprint from the ids it read."""
    held = heldout_ids(ids, cfg.heldout_fraction, cfg.split_seed)
    assert stats.format is not None
    store = builder.finish(heldout=np.fromiter((c in held for c in ids), dtype=bool, count=len(ids)))
    fingerprint = fingerprint_ids((c for c in ids if c not in held), (c for c in ids if c in held), stats.format)
    return split_store(store, fingerprint=fingerprint, skipped=dict(sorted(stats.skipped.items())),
                       duplicates=stats.duplicates, source=_source_name(cfg), format=stats.format,
                       below_min_score_margin=stats.below_min_score_margin, scored_pairs=stats.scored, **common)


# ---------------------------------------------------------------- cache keys and lookups


def _key(**parts: Any) -> str:
    """32 hex digits naming `parts` (JSON with sorted keys, so the order never matters)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _source_name(cfg: DataConfig) -> str:
    return f"{cfg.path}[{cfg.hub_split}]" if cfg.path.startswith(HUB_PREFIX) else cfg.path


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (the data itself decides a hit, not its name or mtime)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _source_key(cfg: DataConfig, tokenizer_id: str) -> str | None:
    """The key of a local file's bytes under this data config (every field but the path, so a
    moved file still hits) and tokenizer; None for a hub source (no bytes to hash)."""
    if cfg.path.startswith(HUB_PREFIX) or not Path(cfg.path).is_file():
        return None  # a hub dataset, or a missing file (pass 1 says so with the usual error)
    config = cfg.model_dump(exclude={"path"})
    return _key(format=CACHE_FORMAT, file=file_digest(Path(cfg.path)), config=config, tokenizer=tokenizer_id)


def _open_entry(final: Path) -> TokenStore | None:
    """The entry at `final`, or None when there is none (or it cannot be read: rebuilt then)."""
    if not final.is_dir():
        return None
    try:
        return TokenStore.open(final)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable tokenized cache entry %s: %s", final, exc)
        return None


def _lookup_source(cache_dir: Path, source_key: str) -> tuple[TokenStore, dict] | None:
    path = cache_dir / "sources" / f"{source_key}.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable tokenized cache record %s: %s", path, exc)
        return None
    if record.get("format") != CACHE_FORMAT:
        return None
    store = _open_entry(cache_dir / str(record.get("entry")))
    return (store, record) if store is not None else None


def cache_dir_of(state_dir: Path) -> Path:
    """Where the tokenized cache lives under a state dir."""
    return Path(state_dir) / "cache" / "tokenized"

