"""The buffer's fast write path stores exactly what the plain one would: ids, JSON, groups, times."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import pytest

from buffer.config import BufferConfig
from buffer.records import BufferedPair, InvalidRecord
from buffer.store import ReplayBuffer, _AnchorEncoder, _Encoder
from offline.pairs import PreferencePair


@pytest.fixture
def buf(redis_url: str) -> Iterator[ReplayBuffer]:
    with ReplayBuffer.connect(BufferConfig(url=redis_url, fresh_capacity=1000)) as b:
        yield b


def test_anchor_encoding_matches_a_buffered_pair() -> None:
    now = datetime.now(timezone.utc)
    pairs = [
        PreferencePair(prompt='a "q"\n\\ é', chosen="b\t", rejected="c\u2028", category="x|y z\n"),
        PreferencePair(prompt="p", chosen="c", rejected="r", source_id="row-7"),
    ]
    fast = _AnchorEncoder('fp "1"', now).encode(pairs)
    plain = _Encoder().encode([BufferedPair.anchor(p, 'fp "1"', created_at=now) for p in pairs])
    assert fast == plain


def test_seed_validates_every_pair_before_writing(buf: ReplayBuffer) -> None:
    good = [PreferencePair(prompt=f"p{i}", chosen="c", rejected="r") for i in range(5)]
    same = PreferencePair(prompt="p", chosen="same", rejected="same")
    with pytest.raises(InvalidRecord, match="pair 5: .*identical"):
        buf.seed_anchor([*good, same], "fp")
    assert buf.count() == 0


def test_a_pair_twice_in_one_write_is_added_once(buf: ReplayBuffer) -> None:
    p = PreferencePair(prompt="p", chosen="c", rejected="r", category="math")
    recs = [BufferedPair.fresh(p, cycle=1), BufferedPair.fresh(p, cycle=2)]
    result = buf.add(recs)
    assert (result.added, result.duplicates) == (1, 1)
    [got] = buf.get([recs[0].id])
    assert got == recs[0]
    assert buf.stats().per_cycle == {1: 1}
