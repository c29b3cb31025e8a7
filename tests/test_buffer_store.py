"""The replay buffer against a real redis-server: idempotence, seeding, mixing, eviction, pointers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from rich.console import Console

from buffer.config import BufferConfig
from buffer.records import BufferedPair, InvalidRecord, format_stats_table
from buffer.store import AnchorMismatch, ReplayBuffer
from offline.pairs import FreshPair, PreferencePair


def make_pair(i: int, tag: str = "p", category: str | None = None) -> PreferencePair:
    return PreferencePair(prompt=f"{tag} prompt {i}", chosen=f"good {i}", rejected=f"bad {i}", category=category)


def fresh(n: int, cycle: int, tag: str = "f", category: str | None = None) -> list[BufferedPair]:
    return [
        BufferedPair.fresh(make_pair(i, f"{tag}{cycle}", category), cycle=cycle, policy_version=f"ckpt-{cycle}",
                           judge="rule", confidence=0.9)
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def buf(redis_url: str) -> Iterator[ReplayBuffer]:
    with ReplayBuffer.connect(BufferConfig(url=redis_url, fresh_capacity=1000)) as b:
        yield b


def test_adding_the_same_pair_twice_is_a_no_op(buf: ReplayBuffer) -> None:
    recs = fresh(20, cycle=0)
    assert buf.add(recs).added == 20
    again = buf.add(fresh(20, cycle=0) + fresh(5, cycle=1))
    assert (again.added, again.duplicates) == (5, 20)
    assert buf.count("fresh") == 25
    # Identity is the content hash: the same texts from another cycle are still a duplicate.
    assert buf.add([BufferedPair.fresh(recs[0].pair, cycle=7)]).duplicates == 1
    got = buf.get([recs[0].id, "0" * 32])
    assert got[0] == recs[0] and got[1] is None


def test_a_cycles_fresh_pairs_are_stored_with_their_provenance_once(buf: ReplayBuffer) -> None:
    labels = [FreshPair(pair=make_pair(i, "l"), cycle=3, policy_version="ckpt-3", judge="rule:m:f", confidence=0.75)
              for i in range(4)]  # fmt: skip
    assert buf.add_fresh(labels).added == 4
    assert (buf.add_fresh(labels).added, buf.add_fresh(labels).duplicates) == (0, 4)  # a re-run adds nothing
    got = buf.get([labels[0].pair.content_id])[0]
    assert got is not None and got.pair == labels[0].pair
    assert (got.pool, got.cycle, got.source, got.policy_version, got.judge, got.confidence) == (
        "fresh", 3, "cycle-3", "ckpt-3", "rule:m:f", 0.75
    )
    same = FreshPair(pair=PreferencePair(prompt="p", chosen="x", rejected="x"), cycle=3, policy_version="v",
                     judge="j", confidence=1.0)  # fmt: skip
    new = labels[0].model_copy(update={"pair": make_pair(99, "l")})
    with pytest.raises(InvalidRecord, match="pair 1: .*identical"):
        buf.add_fresh([new, same])
    assert buf.count("fresh") == 4  # not even the valid pair of the rejected call was written


def test_seeding_the_anchor_is_idempotent_and_guarded_by_fingerprint(buf: ReplayBuffer) -> None:
    pairs = [make_pair(i, "a") for i in range(50)]
    first = buf.seed_anchor(pairs, "fp-1")
    assert (first.added, first.existing) == (50, 0)
    again = buf.seed_anchor(pairs, "fp-1")
    assert (again.added, again.existing, again.removed) == (0, 50, 0)
    buf.add(fresh(10, cycle=0))
    with pytest.raises(AnchorMismatch, match=r"'fp-1' \(50 pairs\).*replace=True"):
        buf.seed_anchor(pairs[:5], "fp-2")
    assert buf.count("anchor") == 50
    swapped = buf.seed_anchor([make_pair(i, "b") for i in range(7)], "fp-2", replace=True)
    assert (swapped.added, swapped.removed) == (7, 50)
    assert (buf.count("anchor"), buf.count("fresh")) == (7, 10)  # fresh pairs survive a re-seed
    assert buf.stats().anchor_fingerprint == "fp-2"


def test_sample_mixes_exact_counts_and_is_reproducible(buf: ReplayBuffer, redis_url: str) -> None:
    buf.seed_anchor([make_pair(i, "a") for i in range(300)], "fp")
    for cycle in range(3):
        buf.add(fresh(100, cycle))
    batch = buf.sample(64, 0.25, seed=11)
    assert Counter(p.pool for p in batch.pairs) == {"anchor": 16, "fresh": 48}
    assert (batch.stats.anchor, batch.stats.fresh, batch.stats.fell_back) == (16, 48, False)
    assert len({p.id for p in batch.pairs}) == 64
    assert buf.sample(64, 0.25, seed=11) == batch
    with ReplayBuffer.connect(BufferConfig(url=redis_url)) as other:  # another process, same contents
        assert other.sample(64, 0.25, seed=11).pairs == batch.pairs
    assert buf.sample(64, 0.25, seed=12).pairs != batch.pairs


def test_sample_falls_back_to_the_anchor_and_reports_it(buf: ReplayBuffer) -> None:
    buf.seed_anchor([make_pair(i, "a") for i in range(100)], "fp")
    buf.add(fresh(3, cycle=0))
    batch = buf.sample(32, 0.5, seed=0)
    assert Counter(p.pool for p in batch.pairs) == {"anchor": 29, "fresh": 3}
    assert batch.stats.fresh_shortfall == 13
    assert batch.stats.metrics()["buffer/anchor_fraction"] == pytest.approx(29 / 32)


def test_sample_sees_writes_made_by_another_client(buf: ReplayBuffer, redis_url: str) -> None:
    buf.add(fresh(10, cycle=0))
    assert len(buf.sample(10, 0.0, seed=0).pairs) == 10  # caches the buffer's groups
    with ReplayBuffer.connect(BufferConfig(url=redis_url)) as other:
        other.add(fresh(10, cycle=1))
    batch = buf.sample(20, 0.0, seed=0)  # stale cache: must re-plan, not fail or miss pairs
    assert {p.cycle for p in batch.pairs} == {0, 1}


def test_recency_and_stratification_through_redis(redis_url: str) -> None:
    cfg = BufferConfig(url=redis_url, recency_half_life_cycles=0.5, stratify_by_category=True)
    with ReplayBuffer.connect(cfg) as b:
        b.seed_anchor([make_pair(i, "a", "math" if i < 90 else "code") for i in range(100)], "fp")
        for cycle in range(3):
            b.add(fresh(50, cycle))
        batch = b.sample(40, 0.5, seed=5)
        anchor_cats = Counter(p.category for p in batch.pairs if p.pool == "anchor")
        assert anchor_cats == {"math": 18, "code": 2}
        # Half-life 0.5 cycle: weights 1/16 : 1/4 : 1, so the newest cycle dominates.
        cycles = Counter(p.cycle for p in batch.pairs if p.pool == "fresh")
        assert cycles[2] > cycles[1] + cycles[0]


def test_fresh_pool_evicts_oldest_cycle_first_and_never_the_anchor(redis_url: str) -> None:
    with ReplayBuffer.connect(BufferConfig(url=redis_url, fresh_capacity=10)) as b:
        b.seed_anchor([make_pair(i, "a") for i in range(30)], "fp")
        c0 = fresh(6, cycle=0)
        b.add(c0)
        assert b.add(fresh(6, cycle=1)).evicted == 2
        assert b.add(fresh(6, cycle=2)).evicted == 6
        stats = b.stats()
        assert (stats.anchor, stats.fresh, stats.per_cycle) == (30, 10, {1: 4, 2: 6})
        assert b.get([r.id for r in c0]) == [None] * 6
        assert len(b.sample(40, 0.5, seed=0).pairs) == 40  # indexes stay consistent after eviction


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"pool": "fresh", "source": "cycle-1", "cycle": 1}, "pair"),  # missing pair
        ({"pair": {"prompt": "p", "chosen": "c", "rejected": "r"}, "pool": "fresh", "source": "c",
          "cycle": "3"}, "cycle"),
        ({"pair": {"prompt": "p", "chosen": "c", "rejected": "r"}, "pool": "fresh", "source": "c", "cycle": 1,
          "confidence": "high"}, "confidence"),
        ({"pair": {"prompt": "p", "chosen": "c", "rejected": "r"}, "pool": "stale", "source": "c"}, "pool"),
        ({"pair": {"prompt": "p", "chosen": 3, "rejected": "r"}, "pool": "fresh", "source": "c", "cycle": 1}, "chosen"),
        ({"pair": {"prompt": "p", "chosen": "c", "rejected": "r"}, "pool": "fresh", "source": "c"}, "cycle index"),
    ],
)  # fmt: skip
def test_bad_records_are_rejected_before_anything_is_written(buf: ReplayBuffer, bad: dict, field: str) -> None:
    good = fresh(3, cycle=1)
    with pytest.raises(InvalidRecord, match=rf"record 3: .*{field}"):
        buf.add([*good, bad])
    assert buf.count() == 0
    with pytest.raises(InvalidRecord, match="seed_anchor"):
        buf.add([BufferedPair.anchor(make_pair(0), "fp")])


def test_pointer_round_trip(buf: ReplayBuffer) -> None:
    assert buf.pointers.get("current_policy") is None
    buf.pointers.set("current_policy", {"checkpoint": "ckpt-3", "cycle": 3})
    assert buf.pointers.get("current_policy") == {"checkpoint": "ckpt-3", "cycle": 3}
    with pytest.raises(TypeError):
        buf.pointers.set("current_policy", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_stats_and_table(buf: ReplayBuffer) -> None:
    buf.seed_anchor([make_pair(i, "a", "math") for i in range(5)], "fp-9")
    buf.add(fresh(3, cycle=2, category="code"))
    stats = buf.stats()
    assert (stats.anchor, stats.fresh, stats.per_cycle) == (5, 3, {2: 3})
    assert stats.per_category == {"anchor": {"math": 5}, "fresh": {"code": 3}}
    assert stats.memory_bytes > 0
    assert stats.oldest_age_s is not None and stats.newest_age_s is not None
    assert stats.oldest_age_s >= stats.newest_age_s >= 0
    console = Console(record=True, width=100)
    console.print(format_stats_table(stats))
    text = console.export_text()
    assert "fp-9" in text and "3 / 1,000" in text and "cycle 2" in text
