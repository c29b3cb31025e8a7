"""The Redis replay buffer: anchor and fresh preference pairs, atomic cycle writes, seeded mixing.

Every Redis error leaves it as a `ReplayBufferError` (`BufferUnavailable` when Redis cannot be
reached): the connection and that translation are `buffer/connection.py`'s, the namespace's
pointers are `buffer/pointers.py`'s and its locks `buffer/lock.py`'s. Contract:

- `add(records)` writes one cycle's fresh pairs in one Lua script: Redis runs it atomically and
  logs its effects to the AOF as one MULTI/EXEC, which a crash truncates as a whole on reload
  (`aof-load-truncated`; `buffer.server.LocalRedis` also rewrites an AOF whose torn tail Redis
  7.0 cut inside a MULTI, which a later restart would otherwise half-replay), so a cycle's
  pairs are all there or none are. The same script evicts
  the oldest cycles' fresh pairs beyond `fresh_capacity`. Pair id = content hash: re-adding is a
  no-op, which also makes redis-py's retry-after-disconnect safe.
  `add_fresh(pairs)` does the same for `offline.pairs.FreshPair`s, the type `online/` hands
  over (`online/replay.py` is the protocol a cycle sees; this class implements it).
- `seed_anchor(pairs, fingerprint)` is idempotent; another fingerprint is `AnchorMismatch`
  unless `replace=True`. The anchor is never evicted.
- `sample(n, anchor_fraction, seed)` draws the mix planned by `buffer.mixing.plan_sample` and
  is reproducible for the same seed and contents.

Redis holds pairs and small state only, not reference log-probs: those have one home, the
on-disk cache of `offline/reference.py`, kept beside the reference checkpoint they depend on and
read by the offline phase and every cycle; a second copy here could only go stale or disagree.

Key layout (`{ns}` = `BufferConfig.namespace` in braces, Redis Cluster's hash tag, so all of a
namespace's keys share one slot and every script runs on a cluster; `cat` = `c:<category>`, or
`none` without one):

    {ns}:pairs               HASH   id -> BufferedPair JSON
    {ns}:idx:<pool>:<cat>    ZSET   ids of one pool and category, score = cycle (anchor 0):
                                    rank order (cycle, id) is what mixing.Pick.rank indexes
    {ns}:groups              HASH   "<pool>|<cycle>|<cat>" -> pair count (anchor: empty cycle)
    {ns}:fresh:order         ZSET   fresh ids by cycle: ZPOPMIN evicts the oldest cycle first
    {ns}:group_times         HASH   same fields -> "<min created_at> <max created_at>" (epoch s),
                                    for stats' oldest/newest age (a partly evicted cycle keeps
                                    its old minimum until it is gone)
    {ns}:anchor              HASH   fingerprint, seeded_at, complete ("1" once a seed finished)
    {ns}:version             STRING random token replaced by every change of membership; a
                                    sample planned on older contents is re-planned
    {ns}:pointer:<name>      STRING JSON object: the policy registry's mirror (current policy,
                                    cycle state; buffer/pointers.py)
    {ns}:lock:<name>         STRING lock token with a TTL (buffer/lock.py)

Scripts get every key in KEYS (see `buffer/scripts.py`). Keys written under the old names
(`ns:pairs`, ...) are renamed once on connect (`buffer/layout.py`).

A full Redis refuses a write with OOM, raised as `BufferFull`: `add`/`add_fresh` and a seed of
up to SEED_CHUNK pairs are one script, so nothing of them is stored. A longer seed goes in
chunks; if Redis fills up part way, the chunks this call stored are removed again when the call
began the seed (a seed it resumed stays incomplete, as it was), and the error says which.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import TypeAdapter, ValidationError

from buffer import scripts
from buffer.config import BufferConfig
from buffer.connection import BufferConnection, BufferFull, ReplayBufferError, open_connection, translating_errors
from buffer.lock import Locks
from buffer.mixing import POOLS, Group, NotEnoughPairs, Pool, plan_sample
from buffer.pointers import Pointers
from buffer.records import (
    AddResult,
    Batch,
    BufferedPair,
    BufferStats,
    InvalidRecord,
    SeedResult,
    describe_error,
    validate_records,
)
from offline.pairs import FreshPair, PreferencePair

SEED_CHUNK = 5_000  # pairs per script call while seeding: bounds how long one call blocks Redis
_PAIR_LIST = TypeAdapter(list[BufferedPair])
_PAIR_SERIALIZER = PreferencePair.__pydantic_serializer__


class AnchorMismatch(ReplayBufferError, ValueError):
    """The buffer's anchor was seeded from another dataset (pass replace=True to swap it)."""


def catkey(category: str | None) -> str:
    """How a category appears in key names and group fields ('none' cannot collide with 'c:none')."""
    return "none" if category is None else f"c:{category}"


def _category(key: str) -> str | None:
    return None if key == "none" else key[2:]


class ReplayBuffer:
    """Anchor and fresh preference pairs in Redis; build with `connect()` or `open_buffer()`.

    The namespace's pointers and locks share its connection: `buf.pointers`, `buf.locks`.
    """

    def __init__(self, connection: BufferConnection) -> None:
        self.connection = connection
        self.cfg = connection.cfg
        self.pointers = Pointers(connection)
        self.locks = Locks(connection)
        self._ns = connection.namespace
        key = connection.key
        self._pairs, self._groups, self._times = key("pairs"), key("groups"), key("group_times")
        self._order, self._anchor, self._version = key("fresh:order"), key("anchor"), key("version")
        self._idx = key("idx:")  # + "<pool>:<cat>"
        self._groups_cache: tuple[list[Group], str] | None = None  # last (groups, version) seen
        self._index_keys: set[str] = set()  # index keys known to exist: scripts must be handed them
        self._client = client = connection.client
        self._add = client.register_script(scripts.ADD_LUA)
        self._seed_begin = client.register_script(scripts.SEED_BEGIN_LUA)
        self._seed_abort = client.register_script(scripts.SEED_ABORT_LUA)
        self._fetch = client.register_script(scripts.FETCH_LUA)
        self._read_groups = client.register_script(scripts.GROUPS_LUA)

    @classmethod
    def connect(cls, cfg: BufferConfig, *, url: str | None = None) -> ReplayBuffer:
        """The buffer at `cfg.url`, or at `url` (see `BufferConnection.connect`)."""
        return cls(BufferConnection.connect(cfg, url=url))

    def __repr__(self) -> str:
        return f"ReplayBuffer(url={self.connection.url!r}, namespace={self._ns!r})"

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------------------------

    @translating_errors
    def add(self, records: Iterable[BufferedPair | Mapping[str, Any]]) -> AddResult:
        """Atomically add fresh pairs (one cycle's worth): all are written or none; then evict.

        Every record is validated first (`InvalidRecord`, nothing written). Pairs already in the
        buffer count as duplicates.
        """
        recs = validate_records(records)
        anchors = [i for i, r in enumerate(recs) if r.pool == "anchor"]
        if anchors:
            raise InvalidRecord(f"record {anchors[0]}: anchor pairs enter through seed_anchor(), not add()")
        return self._write(recs, guard="")

    def add_fresh(self, pairs: Sequence[FreshPair]) -> AddResult:
        """One cycle's labelled pairs, as `online/replay.py`'s protocol hands them over, through `add`."""
        records = []
        for i, p in enumerate(pairs):
            try:
                records.append(BufferedPair.fresh(
                    p.pair, cycle=p.cycle, policy_version=p.policy_version, judge=p.judge, confidence=p.confidence,
                ))  # fmt: skip
            except ValidationError as e:
                raise InvalidRecord(f"pair {i}: {describe_error(e)}") from None
        return self.add(records)

    @translating_errors
    def seed_anchor(
        self, pairs: Iterable[PreferencePair], fingerprint: str, *, replace: bool = False
    ) -> SeedResult:
        """Load the offline dataset's pairs as the anchor; idempotent for the same fingerprint.

        A buffer seeded from another dataset raises `AnchorMismatch` unless `replace=True`, which
        drops the old anchor (fresh pairs stay). Seeding goes in chunks, each atomic; an
        interrupted seed is completed by seeding again.
        """
        if not fingerprint:
            raise ValueError("the anchor needs the dataset's fingerprint (non-empty)")
        now = datetime.now(timezone.utc)
        items: list[PreferencePair | BufferedPair] = []
        for i, p in enumerate(pairs):
            if not isinstance(p, PreferencePair):
                raise InvalidRecord(f"pair {i}: expected a PreferencePair, got {type(p).__name__}")
            if type(p) is PreferencePair and p.chosen != p.rejected:
                items.append(p)  # what BufferedPair.anchor would validate: see _AnchorEncoder
                continue
            try:
                items.append(BufferedPair.anchor(p, fingerprint, created_at=now))
            except ValidationError as e:
                raise InvalidRecord(f"pair {i}: {describe_error(e)}") from None
        return self._seed(items, fingerprint, replace=replace, encoder=_AnchorEncoder(fingerprint, now))

    @translating_errors
    def restore(self, records: Iterable[BufferedPair | Mapping[str, Any]]) -> tuple[SeedResult | None, AddResult]:
        """Write records exported by `buffer.export`, provenance intact; idempotent.

        The anchor records must come from one dataset (and match the buffer's, if seeded).
        """
        recs = validate_records(records)
        anchor = [r for r in recs if r.pool == "anchor"]
        fresh = [r for r in recs if r.pool == "fresh"]
        seeded = None
        if anchor:
            fingerprints = sorted({r.source for r in anchor})
            if len(fingerprints) > 1:
                raise InvalidRecord(f"anchor records come from {len(fingerprints)} datasets: {fingerprints[:3]}")
            seeded = self._seed(anchor, fingerprints[0], replace=False)
        # Oldest cycles first, so capacity eviction keeps the newest as live writes would.
        fresh.sort(key=lambda r: (cast(int, r.cycle), r.created_at))
        try:
            added = self._write_chunked(fresh, guard="")
        except BufferFull as e:
            raise BufferFull(
                f"{e}. Restoring stopped part way: {'the anchor and ' if anchor else ''}{e.stored} of "
                f"{len(fresh)} fresh pairs were stored; import again once Redis has room (it is idempotent)"
            ) from None
        return seeded, added

    def _seed(
        self,
        records: Sequence[PreferencePair | BufferedPair],
        fingerprint: str,
        *,
        replace: bool,
        encoder: _Encoder | None = None,
    ) -> SeedResult:
        anchor_keys = [self._anchor, self._pairs, self._groups, self._times, self._version]
        status, removed, complete = self._declared(
            self._seed_begin, anchor_keys, [self._idx, fingerprint, "1" if replace else "0", _token()]
        )
        if status == "mismatch":
            raise AnchorMismatch(
                f"the buffer's anchor holds dataset {removed!r} ({complete} pairs), not {fingerprint!r}; "
                f"pass replace=True (tether buffer seed --replace) to drop it and seed the new one"
            )
        if complete == "1":  # this exact dataset was fully seeded before: nothing to send
            return SeedResult(fingerprint=fingerprint, added=0, existing=len(records), removed=int(removed))
        seeded_at = datetime.now(timezone.utc).isoformat()
        try:
            result = self._write_chunked(records, guard=fingerprint, encoder=encoder, seeded_at=seeded_at)
        except BufferFull as e:
            if complete is not None:  # resuming an interrupted seed: what it held stays
                raise BufferFull(
                    f"{e}. The anchor {fingerprint!r} was an interrupted seed this call resumed; it stays "
                    f"incomplete ({e.stored} more pairs stored): seed again once Redis has room"
                ) from None
            undone = self._declared(self._seed_abort, anchor_keys, [self._idx, fingerprint, _token()])
            raise BufferFull(
                f"{e}. Nothing of this seed of {fingerprint!r} remains (the {undone} pairs its earlier "
                f"chunks had stored were removed)"
            ) from None
        except ReplayBufferError as e:  # ADD_LUA's own refusal arrives as Redis' error reply
            text = str(e)
            if "TETHER_ANCHOR_CHANGED (gone)" in text:
                raise AnchorMismatch(
                    f"the anchor record of {fingerprint!r} disappeared while seeding: the buffer was cleared, "
                    f"or Redis evicted it (run Redis with `maxmemory-policy noeviction`)"
                ) from e
            if "TETHER_ANCHOR_CHANGED" in text:
                raise AnchorMismatch(f"the anchor was re-seeded by someone else while seeding {fingerprint!r}") from e
            raise
        return SeedResult(fingerprint=fingerprint, added=result.added, existing=result.duplicates, removed=int(removed))

    def _write_chunked(
        self,
        records: Sequence[PreferencePair | BufferedPair],
        *,
        guard: str,
        encoder: _Encoder | None = None,
        seeded_at: str | None = None,
    ) -> AddResult:
        """Write in chunks of SEED_CHUNK, each atomic; encode chunk k+1 while Redis runs chunk k.

        With `seeded_at` this is a seed of anchor `guard`: the first chunk may create the anchor
        record and the last (even of no records) marks it complete. A `BufferFull` carries in
        `stored` how many pairs the chunks before the refused one added.
        """
        encoder = encoder or _Encoder()
        added = duplicates = evicted = 0
        starts = list(range(0, len(records), SEED_CHUNK)) or ([0] if seeded_at is not None else [])
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer-writer") as writer:
            pending = None
            try:
                with self.connection.errors():
                    for i, start in enumerate(starts):
                        seed = ("", "") if seeded_at is None else (seeded_at if i == 0 else "", "1" if i == len(starts) - 1 else "")
                        encoded = encoder.encode(records[start : start + SEED_CHUNK])
                        args = self._header(guard, *seed) + encoded
                        if pending is not None:
                            a, d, e = pending.result()
                            added, duplicates, evicted = added + a, duplicates + d, evicted + e
                        pending = writer.submit(self._declared, self._add, self._add_keys(), args, self._group_indexes(encoded))
                    if pending is not None:
                        a, d, e = pending.result()
                        added, duplicates, evicted = added + a, duplicates + d, evicted + e
            except BufferFull as e:
                e.stored = added
                raise
        return AddResult(added=added, duplicates=duplicates, evicted=evicted)

    def _write(self, records: Sequence[BufferedPair], *, guard: str) -> AddResult:
        if not records:
            return AddResult(added=0, duplicates=0, evicted=0)
        encoded = _Encoder().encode(records)
        added, duplicates, evicted = self._declared(
            self._add, self._add_keys(), self._header(guard) + encoded, self._group_indexes(encoded)
        )
        return AddResult(added=added, duplicates=duplicates, evicted=evicted)

    def _add_call(self, records: Sequence[BufferedPair], guard: str) -> tuple[list[str], list[str | int]]:
        """KEYS and ARGV of one ADD script call for `records` (tests send it by hand)."""
        encoded = _Encoder().encode(records)
        self._index_keys.update(self._group_indexes(encoded))
        return self._add_keys() + sorted(self._index_keys), self._header(guard) + encoded

    def _header(self, guard: str, seed_start: str = "", seed_finish: str = "") -> list[str | int]:
        """ADD script arguments before the encoded records (see scripts.ADD_LUA)."""
        return [self._idx, self.cfg.fresh_capacity, guard, seed_start, seed_finish, _token()]

    def _add_keys(self) -> list[str]:
        return [self._pairs, self._groups, self._times, self._order, self._anchor, self._version]

    def _group_indexes(self, encoded: Sequence[str | int]) -> list[str]:
        """The index keys of the group fields in `_Encoder.encode`'s output."""
        fields = cast("Sequence[str]", encoded[1 : 1 + int(encoded[0])])
        return [self._index_key(*_split_field(f)) for f in fields]

    def _index_key(self, pool: str, cat: str) -> str:
        return f"{self._idx}{pool}:{cat}"

    def _declared(self, script: Any, fixed: list[str], args: list[str | int], needed: Iterable[str] = ()) -> Any:
        """Run a script that first checks it was handed every index key it may touch (see
        buffer/scripts.py): `fixed` keys, then the index keys known; retry with any it reports."""
        self._index_keys.update(needed)
        for _ in range(4):
            out = script(keys=fixed + sorted(self._index_keys), args=args)
            if not (isinstance(out, list) and out and out[0] == -1):
                return out
            self._index_keys.update(out[1:])
        raise ReplayBufferError("the buffer's categories kept changing during 4 attempts of one write; retry it")

    # -- reads -----------------------------------------------------------------------------------

    @translating_errors
    def groups(self) -> tuple[list[Group], str]:
        """The buffer's contents as mixing groups, and the version they were read at."""
        flat, version = self._read_groups(keys=[self._groups, self._version])
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        self._remember_groups(raw)
        self._groups_cache = (_parse_groups(raw), version or "0")
        return self._groups_cache

    def _remember_groups(self, raw: Mapping[str, str]) -> None:
        """Note the index keys that the groups read show to exist (scripts must be handed them)."""
        self._index_keys.update(self._index_key(pool, cat) for pool, cat in map(_split_field, raw))

    @translating_errors
    def sample(
        self,
        n: int,
        anchor_fraction: float,
        seed: int,
        *,
        half_life_cycles: float | None | Literal["config"] = "config",
        stratify_by_category: bool | None = None,
    ) -> Batch:
        """A batch of `n` pairs, `round(n * anchor_fraction)` from the anchor, the rest fresh.

        Reproducible for the same seed and contents. Recency weighting and stratification
        default to the config. One round trip while the buffer is unchanged: the plan uses the
        last groups seen, and the fetch script refuses (returning the new groups) if a write
        landed since.
        """
        half_life: float | None = (
            self.cfg.recency_half_life_cycles if half_life_cycles == "config" else half_life_cycles
        )
        stratify = self.cfg.stratify_by_category if stratify_by_category is None else stratify_by_category
        groups, version = self._groups_cache or self.groups()
        for _ in range(8):
            try:
                picks, stats = plan_sample(
                    n, anchor_fraction, groups, seed,
                    half_life_cycles=half_life, stratify_by_category=stratify,
                )  # fmt: skip
            except NotEnoughPairs:  # maybe only the cached groups are stale: re-read once
                seen = version
                groups, version = self.groups()
                if version == seen:
                    raise
                continue
            if not picks:
                return Batch(pairs=[], stats=stats)
            suffixes: dict[str, int] = {}
            spec = ";".join(
                f"{suffixes.setdefault(f'{p.pool}:{catkey(p.category)}', len(suffixes) + 1)},{p.rank}" for p in picks
            )
            fetched = self._fetch(
                keys=[self._version, self._groups, self._pairs, *(self._idx + s for s in suffixes)], args=[version, spec]
            )
            if fetched[0] == 0:  # a write landed since the plan: re-plan on the groups returned
                raw = dict(zip(fetched[2][::2], fetched[2][1::2], strict=True))
                self._remember_groups(raw)
                groups, version = _parse_groups(raw), fetched[1]
                self._groups_cache = (groups, version)
                continue
            pairs = _PAIR_LIST.validate_json("[" + ",".join(fetched[1]) + "]")  # one parse, not n
            return Batch(pairs=pairs, stats=stats)
        raise ReplayBufferError("the buffer changed during every one of 8 sampling attempts; retry later")

    @translating_errors
    def get(self, pair_ids: Sequence[str]) -> list[BufferedPair | None]:
        """The records with these ids (None where absent)."""
        if not pair_ids:
            return []
        blobs = self._client.hmget(self._pairs, list(pair_ids))
        return [None if b is None else BufferedPair.model_validate_json(b) for b in blobs]

    @translating_errors
    def count(self, pool: Pool | None = None) -> int:
        """Pairs in `pool` (both pools when None)."""
        groups, _ = self.groups()
        return sum(g.size for g in groups if pool is None or g.pool == pool)

    def iter_records(self, batch_size: int = 1_000) -> Iterator[BufferedPair]:
        """Every record (for export), read `batch_size` at a time; not a snapshot."""
        with self.connection.errors():
            for _, blob in self._client.hscan_iter(self._pairs, count=batch_size):
                yield BufferedPair.model_validate_json(blob)

    @translating_errors
    def stats(self) -> BufferStats:
        """Counts per pool, cycle and category, ages and Redis memory."""
        ns = self._ns
        groups, _ = self.groups()
        pipe = self._client.pipeline(transaction=False)
        pipe.hget(self._anchor, "fingerprint")
        pipe.hvals(self._times)
        fingerprint, spans = pipe.execute()
        memory = int(self.connection.info("memory").get("used_memory", 0))
        times = [float(t) for span in spans for t in span.split()]
        now = time.time()
        per_cycle: dict[int, int] = {}
        per_category: dict[str, dict[str, int]] = {pool: {} for pool in POOLS}
        for g in groups:
            if g.cycle is not None:
                per_cycle[g.cycle] = per_cycle.get(g.cycle, 0) + g.size
            cat = g.category if g.category is not None else "(none)"
            per_category[g.pool][cat] = per_category[g.pool].get(cat, 0) + g.size
        return BufferStats(
            url=self.connection.url,
            namespace=ns,
            anchor_fingerprint=fingerprint,
            anchor=sum(g.size for g in groups if g.pool == "anchor"),
            fresh=sum(g.size for g in groups if g.pool == "fresh"),
            fresh_capacity=self.cfg.fresh_capacity,
            per_cycle=per_cycle,
            per_category=per_category,
            oldest_age_s=now - min(times) if times else None,
            newest_age_s=now - max(times) if times else None,
            memory_bytes=memory,
        )

    @translating_errors
    def clear(self) -> int:
        """Delete every key of this namespace (pairs, pointers, locks); returns how many."""
        self._groups_cache = None
        self._index_keys.clear()
        deleted = 0
        keys: list[str] = []
        node = self.connection.home_node()  # on a cluster, the one node holding the namespace's slot
        where: dict[str, Any] = {} if node is None else {"target_nodes": node}
        for key in self._client.scan_iter(match=self.connection.key("*"), count=1_000, **where):
            keys.append(key)
            if len(keys) >= 1_000:
                deleted += self._client.unlink(*keys)
                keys = []
        if keys:
            deleted += self._client.unlink(*keys)
        return deleted


class _Encoder:
    """Records as scripts.ADD_LUA's arguments after the header: group count, group fields, the lines
    "<id> <group> <created_at epoch>" in one argument, then each record's JSON (~6 us a pair:
    pydantic-core's serializer straight, not model_dump_json's Python wrapper around it, and the
    content hash)."""

    def encode(self, records: Sequence[PreferencePair | BufferedPair]) -> list[str | int]:
        groups: dict[str, int] = {}
        lines: list[str] = []
        blobs: list[str | int] = []
        for r in records:
            line, blob = self.record(r, groups)
            lines.append(line)
            blobs.append(blob)
        return [len(groups), *groups, "".join(lines), *blobs]

    def record(self, r: PreferencePair | BufferedPair, groups: dict[str, int]) -> tuple[str, str]:
        """The record's line (newline-terminated) and JSON; `groups` gains its group field if new."""
        r = cast(BufferedPair, r)  # (_AnchorEncoder handles bare pairs)
        field = f"{r.pool}|{'' if r.cycle is None else r.cycle}|{catkey(r.pair.category)}"
        g = groups.setdefault(field, len(groups) + 1)
        blob = r.__pydantic_serializer__.to_json(r).decode()
        return f"{r.pair.content_id} {g} {r.created_at.timestamp():.6f}\n", blob


class _AnchorEncoder(_Encoder):
    """Anchor pairs of one seed without a BufferedPair each (building one costs ~10 us a pair).

    Every anchor record of a seed is `{"pair": <the pair's JSON>` plus the same tail (pool,
    source, created_at, ...), so the tail is cut once from a real BufferedPair's JSON; if the
    model's layout ever puts something else first, every pair goes through BufferedPair again.
    seed_anchor passes bare pairs only when they are exactly PreferencePair (whose fields
    pydantic validated when it was built) with chosen != rejected: all that BufferedPair.anchor
    checks of a pair; the fingerprint and time are checked here, once.
    """

    def __init__(self, fingerprint: str, created_at: datetime) -> None:
        self._fingerprint, self._created_at = fingerprint, created_at
        probe = BufferedPair.anchor(PreferencePair(prompt="p", chosen="c", rejected="r"), fingerprint,
                                    created_at=created_at)  # fmt: skip
        head = '{"pair":' + probe.pair.model_dump_json()
        full = probe.model_dump_json()
        self._tail = full[len(head) :] if full.startswith(head) else None
        self._time = f"{created_at.timestamp():.6f}"

    def record(self, r: PreferencePair | BufferedPair, groups: dict[str, int]) -> tuple[str, str]:
        if isinstance(r, BufferedPair):
            return super().record(r, groups)
        if self._tail is None:
            return super().record(BufferedPair.anchor(r, self._fingerprint, created_at=self._created_at), groups)
        g = groups.setdefault(f"anchor||{catkey(r.category)}", len(groups) + 1)
        blob = '{"pair":' + _PAIR_SERIALIZER.to_json(r).decode() + self._tail
        return f"{r.content_id} {g} {self._time}\n", blob


def _token() -> str:
    """A new version token: random, so versions never repeat, even across a FLUSHALL."""
    return uuid.uuid4().hex


def _split_field(field: str) -> tuple[str, str]:
    """(pool, catkey) of a group field "<pool>|<cycle>|<catkey>"."""
    pool, _, cat = field.split("|", 2)
    return pool, cat


def _parse_groups(raw: Mapping[str, str]) -> list[Group]:
    out = []
    for field, count in raw.items():
        pool, cycle, key = field.split("|", 2)
        out.append(Group(cast(Pool, pool), _category(key), int(cycle) if cycle else None, int(count)))
    return out


@contextmanager
def open_buffer(cfg: BufferConfig, state_dir: Path) -> Iterator[ReplayBuffer]:
    """The replay buffer at `cfg.url` if set, else in a local redis-server under `<state_dir>/redis/`
    that is stopped on exit, its data kept for the next run (see `buffer.connection.open_connection`)."""
    with open_connection(cfg, state_dir) as connection:
        yield ReplayBuffer(connection)
