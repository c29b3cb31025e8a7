"""Tokenized pairs stored compactly: flat int32 token ids plus offsets, memory-mapped from disk.

Contract:
- `TokenStore` holds N pairs in one flat `tokens (T,) int32` array; pair i's prompt, chosen and
  rejected ids are `tokens[offsets[3i]:offsets[3i+1]]`, `[offsets[3i+1]:offsets[3i+2]]` and
  `[offsets[3i+2]:offsets[3i+3]]` (`offsets (3N+1,) int64`), after truncation, responses with
  their EOS. Per pair it also keeps the content id (`pair_ids`, fixed-width bytes), the category
  (`categories (N,) int32` codes into `category_names`, -1 = none), whether it is held out
  (`heldout (N,) bool`), whether truncation cut it (`truncated (N,) bool`) and its token lengths
  before truncation (`raw_lengths (N, 3) int32`: prompt, chosen, rejected, no EOS), which is all
  the coverage report needs. A Python tuple of ints costs ~36 bytes a token; this costs 4.
- On disk a store is one directory: `tokens.bin` (raw little-endian int32, streamed while
  tokenizing, so the ids never sit in memory all at once), the other arrays as `.npy`
  (`allow_pickle=False`: no pickle anywhere) and `store.json` (format, counts, names).
  `StoreBuilder.finish(directory)` writes it inside `offline.checkpoint.atomic_dir`: a crash
  leaves no directory under the final name, never half a store. `TokenStore.open` maps every
  array read-only (`mmap`), so opening costs no reading: pages come in as they are used and
  the kernel may drop them again.
- `TokenizedPairs` is a `Sequence[TokenizedPair]`: a view of some rows of a store. Indexing
  builds one `TokenizedPair` (tuples, as before) from the store's slices, so consumers
  (collate, reference log-probs, training) hold only the batch they work on; `lengths()`,
  `n_tokens()` and `pair_ids()` answer for all rows with array operations. Views of the same
  store concatenate without copying (`train + heldout`).
- `write_store(pairs, directory)` writes any pairs (a view: array-wise) as a store of their
  own; a launched job's ranks map the one its run directory holds (`offline.launch`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence, overload

import numpy as np

STORE_FORMAT = 1
TOKENS_FILE = "tokens.bin"
META_FILE = "store.json"
_ARRAYS = ("offsets", "raw_lengths", "pair_ids", "categories", "heldout", "truncated")


@dataclass(frozen=True, slots=True)
class TokenizedPair:
    """Token ids of one pair; responses include the trailing EOS (when it fits)."""

    pair_id: str
    category: str | None
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    truncated: bool

    @property
    def n_tokens(self) -> int:
        """Tokens the pair puts through the model (prompt counted once per response)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class TokenStore:
    """N tokenized pairs as flat arrays (see the module docstring for the layout)."""

    tokens: np.ndarray  # (T,) int32, every pair's prompt | chosen | rejected, back to back
    offsets: np.ndarray  # (3N+1,) int64, segment k is tokens[offsets[k]:offsets[k+1]]
    raw_lengths: np.ndarray  # (N, 3) int32, prompt/chosen/rejected tokens before truncation
    pair_ids: np.ndarray  # (N,) fixed-width bytes, the pairs' content ids
    categories: np.ndarray  # (N,) int32, index into category_names, -1 = no category
    heldout: np.ndarray  # (N,) bool, the pair is on the held-out side of the split
    truncated: np.ndarray  # (N,) bool, the truncation rule cut the prompt or a response
    category_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def token_bytes(self) -> int:
        """Bytes of the token ids themselves (what a tuple-of-ints layout multiplied by ~9)."""
        return int(self.tokens.nbytes)

    def pair(self, i: int) -> TokenizedPair:
        """Row i as a `TokenizedPair` (its ids copied out of the store into tuples)."""
        o = self.offsets[3 * i : 3 * i + 4].tolist()
        segment = self.tokens[o[0] : o[3]].tolist()  # one read of the pair's span
        a, b = o[1] - o[0], o[2] - o[0]
        code = int(self.categories[i])
        return TokenizedPair(
            pair_id=self.pair_ids[i].decode(),
            category=self.category_names[code] if code >= 0 else None,
            prompt_ids=tuple(segment[:a]),
            chosen_ids=tuple(segment[a:b]),
            rejected_ids=tuple(segment[b:]),
            truncated=bool(self.truncated[i]),
        )

    def lengths(self) -> np.ndarray:
        """`(N, 3)` kept lengths: prompt, chosen (with EOS), rejected (with EOS)."""
        return np.diff(self.offsets).reshape(-1, 3)

    @classmethod
    def open(cls, directory: Path) -> TokenStore:
        """Map a store written by `StoreBuilder.finish` read-only; ValueError if it is not one."""
        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(f"{directory} holds token store format {meta.get('format')!r}, not {STORE_FORMAT}")
        n_tokens, n_pairs = int(meta["n_tokens"]), int(meta["n_pairs"])
        # np.memmap refuses a zero-length map; an empty store has no ids to map anyway
        tokens = (np.memmap(directory / TOKENS_FILE, dtype="<i4", mode="r", shape=(n_tokens,))
                  if n_tokens else np.zeros(0, dtype=np.int32))
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _ARRAYS}
        store = cls(tokens=tokens, category_names=tuple(meta["category_names"]), **arrays)
        if len(store.offsets) != 3 * n_pairs + 1 or len(store) != n_pairs or int(store.offsets[-1]) != n_tokens:
            raise ValueError(f"{directory}: arrays disagree with {META_FILE} (a damaged store; delete it)")
        return store


class StoreBuilder:
    """Builds a `TokenStore` batch by batch: token ids go straight to `tokens.bin` (or to memory
    when no directory is given); the small per-pair arrays are gathered and written at the end."""

    def __init__(self, tokens_file: IO[bytes] | None = None) -> None:
        self._file = tokens_file
        self._chunks: list[np.ndarray] = []  # token chunks, in memory mode only
        self._lengths: list[np.ndarray] = []  # (B, 3) kept lengths per batch
        self._raw: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []  # fixed-width bytes per batch: 32 B a content id, not ~80
        self._codes: list[np.ndarray] = []  # category codes per batch
        self._names: dict[str, int] = {}  # category -> code, in order of first appearance
        self._truncated: list[np.ndarray] = []
        self.n_tokens = 0
        self.n_pairs = 0

    def __len__(self) -> int:
        return self.n_pairs

    def append(
        self, tokens: np.ndarray, lengths: np.ndarray, raw_lengths: np.ndarray, truncated: np.ndarray,
        pair_ids: Sequence[str], categories: Sequence[str | None],
    ) -> None:
        """Add B pairs: `tokens` their kept ids back to back, `lengths`/`raw_lengths` (B, 3)."""
        tokens = np.ascontiguousarray(tokens, dtype="<i4")
        if self._file is not None:
            view = memoryview(tokens).cast("B")
            while view:  # an unbuffered file may take less than all of it
                view = view[self._file.write(view) :]
        else:
            self._chunks.append(tokens)
        self.n_tokens += len(tokens)
        self._lengths.append(np.asarray(lengths, dtype=np.int64).reshape(-1, 3))
        self._raw.append(np.asarray(raw_lengths, dtype=np.int32).reshape(-1, 3))
        self._truncated.append(np.asarray(truncated, dtype=bool))
        encoded = [s.encode() for s in pair_ids]
        self._ids.append(np.array(encoded, dtype=f"S{max(map(len, encoded), default=1) or 1}"))
        names = self._names
        self._codes.append(np.array([-1 if c is None else names.setdefault(c, len(names)) for c in categories],
                                    dtype=np.int32))
        self.n_pairs += len(encoded)

    def finish(self, heldout: np.ndarray | None = None, directory: Path | None = None) -> TokenStore:
        """The store (in memory; with `directory`, also written there: the caller's `tokens_file`
        must be `directory / TOKENS_FILE`, flushed here). `heldout` defaults to all False."""
        n = self.n_pairs
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros((0, 3), np.int64)
        offsets = np.zeros(3 * n + 1, dtype=np.int64)
        np.cumsum(lengths.reshape(-1), out=offsets[1:])
        names = tuple(self._names)
        arrays = {
            "offsets": offsets,
            "raw_lengths": np.concatenate(self._raw) if self._raw else np.zeros((0, 3), np.int32),
            "pair_ids": np.concatenate(self._ids) if self._ids else np.zeros(0, dtype="S1"),
            "categories": np.concatenate(self._codes) if self._codes else np.zeros(0, np.int32),
            "heldout": np.zeros(n, bool) if heldout is None else np.asarray(heldout, dtype=bool),
            "truncated": np.concatenate(self._truncated) if self._truncated else np.zeros(0, bool),
        }
        if len(arrays["heldout"]) != n:
            raise ValueError(f"heldout has {len(arrays['heldout'])} entries for {n} pairs")
        if directory is None:
            tokens = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int32)
            return TokenStore(tokens=tokens, category_names=names, **arrays)
        directory = Path(directory)
        if self._file is not None:
            self._file.flush()
        for name, array in arrays.items():
            np.save(directory / f"{name}.npy", array, allow_pickle=False)
        meta = {"format": STORE_FORMAT, "n_pairs": n, "n_tokens": self.n_tokens, "category_names": list(names)}
        (directory / META_FILE).write_text(json.dumps(meta))
        return TokenStore.open(directory)


class TokenizedPairs(Sequence[TokenizedPair]):
    """Some rows of a `TokenStore`, in order, as a read-only sequence of `TokenizedPair`s."""

    def __init__(self, store: TokenStore, rows: np.ndarray | None = None) -> None:
        self.store = store
        self.rows = np.arange(len(store), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> TokenizedPair: ...
    @overload
    def __getitem__(self, i: slice) -> TokenizedPairs: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return TokenizedPairs(self.store, self.rows[i])
        return self.store.pair(int(self.rows[i]))

    def __iter__(self) -> Iterator[TokenizedPair]:
        for row in self.rows.tolist():
            yield self.store.pair(row)

    def __add__(self, other: object) -> TokenizedPairs:
        if isinstance(other, TokenizedPairs) and other.store is self.store:
            return TokenizedPairs(self.store, np.concatenate([self.rows, other.rows]))
        return NotImplemented

    def __repr__(self) -> str:
        return f"TokenizedPairs({len(self)} pairs, {self.token_bytes:,} token bytes)"

    @property
    def token_bytes(self) -> int:
        """Bytes of these pairs' token ids in the store."""
        return int(self.lengths().sum()) * self.store.tokens.itemsize

    def lengths(self) -> np.ndarray:
        """`(n, 3)` kept lengths (prompt, chosen with EOS, rejected with EOS) of these rows."""
        return self.store.lengths()[self.rows]

    def n_tokens(self) -> np.ndarray:
        """`(n,)` `TokenizedPair.n_tokens` of each row, without building the pairs."""
        lengths = self.lengths()
        return 2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2]

    def pair_ids(self) -> list[str]:
        """The rows' pair ids, without building the pairs."""
        return [s.decode() for s in self.store.pair_ids[self.rows].tolist()]

    def categories(self) -> list[str | None]:
        """The rows' categories, without building the pairs."""
        names = self.store.category_names
        return [names[c] if c >= 0 else None for c in self.store.categories[self.rows].tolist()]


def write_store(pairs: Sequence[TokenizedPair], directory: Path, batch_pairs: int = 4096) -> TokenStore:
    """Write `pairs` as a store at `directory` (published whole by `offline.checkpoint.atomic_dir`)
    and map it back. A `TokenizedPairs` view is copied array-wise from its store (raw lengths
    and all); other pairs are copied tuple by tuple, with their kept lengths standing in for the
    raw ones (which a tuple does not carry). Held-out flags are all False: a written set of pairs
    is one side. This is how a launched job's ranks share one set of pairs through the page
    cache instead of each holding its own copy (offline.launch)."""
    from offline.checkpoint import atomic_dir  # light module; imported here to keep this one leaf

    directory = Path(directory)
    with atomic_dir(directory) as tmp, open(tmp / TOKENS_FILE, "wb", buffering=0) as fh:
        builder = StoreBuilder(fh)
        for start in range(0, len(pairs), batch_pairs):
            part = pairs[start : start + batch_pairs]
            if isinstance(part, TokenizedPairs):
                store, rows = part.store, part.rows
                spans = store.offsets[3 * rows], store.offsets[3 * rows + 3]
                tokens = (np.concatenate([store.tokens[a:b] for a, b in zip(*spans)]) if len(rows)
                          else np.zeros(0, np.int32))
                builder.append(tokens, part.lengths(), store.raw_lengths[rows], store.truncated[rows],
                               part.pair_ids(), part.categories())
            else:
                segments = [s for p in part for s in (p.prompt_ids, p.chosen_ids, p.rejected_ids)]
                lengths = np.array([len(s) for s in segments], dtype=np.int64).reshape(-1, 3)
                tokens = np.fromiter((t for s in segments for t in s), dtype=np.int32, count=int(lengths.sum()))
                builder.append(tokens, lengths, lengths, [p.truncated for p in part],
                               [p.pair_id for p in part], [p.category for p in part])
        builder.finish(directory=tmp)
    return TokenStore.open(directory)


def pair_lengths(pairs: Sequence[TokenizedPair]) -> np.ndarray:
    """`(n, 3)` kept lengths of any sequence of pairs (array-fast for `TokenizedPairs`)."""
    if isinstance(pairs, TokenizedPairs):
        return pairs.lengths()
    return np.array([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs],
                    dtype=np.int64).reshape(-1, 3)


def pair_ids(pairs: Sequence[TokenizedPair]) -> list[str]:
    """The pair ids of any sequence of pairs (without building them for `TokenizedPairs`)."""
    return pairs.pair_ids() if isinstance(pairs, TokenizedPairs) else [p.pair_id for p in pairs]
