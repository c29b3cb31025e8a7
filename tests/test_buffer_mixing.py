"""The mixing decision on its own: counts, fallback, reproducibility, recency, stratification (no Redis)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from buffer.mixing import Group, NotEnoughPairs, allocate, draw, mix_counts, plan_sample, recency_weight


def test_mix_counts_takes_exactly_round_n_times_fraction_from_the_anchor() -> None:
    s = mix_counts(64, 0.25, anchor_available=1000, fresh_available=1000)
    assert (s.anchor, s.fresh, s.anchor_target) == (16, 48, 16)
    assert not s.fell_back
    # Python's round: 10 * 0.25 = 2.5 -> 2 (half to even), 10 * 0.35 = 3.5 -> 4.
    assert mix_counts(10, 0.25, 100, 100).anchor == 2
    assert mix_counts(10, 0.35, 100, 100).anchor == 4
    assert (mix_counts(7, 0.0, 100, 100).anchor, mix_counts(7, 1.0, 100, 100).fresh) == (0, 0)


def test_mix_counts_falls_back_to_the_anchor_and_says_so() -> None:
    s = mix_counts(64, 0.25, anchor_available=1000, fresh_available=5)
    assert (s.anchor, s.fresh, s.fresh_shortfall, s.anchor_shortfall) == (59, 5, 43, 0)
    assert s.fell_back
    assert s.metrics()["buffer/fresh_shortfall"] == 43.0
    t = mix_counts(64, 0.5, anchor_available=10, fresh_available=1000)
    assert (t.anchor, t.fresh, t.anchor_shortfall) == (10, 54, 22)


def test_mix_counts_rejects_impossible_requests() -> None:
    with pytest.raises(NotEnoughPairs, match="holds 3 anchor"):
        mix_counts(10, 0.5, 3, 4)
    with pytest.raises(ValueError, match="anchor_fraction"):
        mix_counts(10, 1.5, 100, 100)


def _groups() -> list[Group]:
    return [Group("anchor", None, None, 500)] + [Group("fresh", None, c, 100) for c in range(5)]


def test_plan_sample_is_exact_distinct_and_reproducible() -> None:
    picks, stats = plan_sample(64, 0.25, _groups(), seed=7)
    assert Counter(p.pool for p in picks) == {"anchor": 16, "fresh": 48}
    assert len(set(picks)) == 64
    assert all(0 <= p.rank < (500 if p.pool == "anchor" else 500) for p in picks)
    assert plan_sample(64, 0.25, list(reversed(_groups())), seed=7) == (picks, stats)  # order-free input
    assert plan_sample(64, 0.25, _groups(), seed=8)[0] != picks


def test_ranks_follow_cycle_order_within_a_pool_and_category() -> None:
    # Fresh "x" holds cycle 0 (3 pairs) then cycle 1 (2 pairs): cycle 1 is ranks 3..4.
    groups = [Group("fresh", "x", 0, 3), Group("fresh", "x", 1, 2)]
    picks, _ = plan_sample(5, 0.0, groups, seed=0)
    assert sorted(p.rank for p in picks) == [0, 1, 2, 3, 4]
    picks, _ = plan_sample(2, 0.0, groups, seed=0, half_life_cycles=1e-3)  # ~all weight on cycle 1
    assert sorted(p.rank for p in picks) == [3, 4]


def test_recency_weighting_favours_newer_cycles_by_the_half_life() -> None:
    assert recency_weight(0, 2.0) == 1.0 and recency_weight(2, 2.0) == 0.5 and recency_weight(4, None) == 1.0
    groups = [Group("fresh", None, c, 1000) for c in range(3)]  # ranks: cycle c = [1000c, 1000c+1000)
    per_cycle: Counter[int] = Counter()
    for seed in range(200):
        picks, _ = plan_sample(10, 0.0, groups, seed=seed, half_life_cycles=1.0)
        per_cycle.update(p.rank // 1000 for p in picks)
    # Weights 1/4 : 1/2 : 1 -> expected shares 1/7, 2/7, 4/7 of 2000 draws.
    assert per_cycle[2] == pytest.approx(2000 * 4 / 7, rel=0.1)
    assert per_cycle[0] == pytest.approx(2000 * 1 / 7, rel=0.2)


def test_stratification_splits_each_pool_in_proportion_to_category_size() -> None:
    groups = [Group("anchor", "a", None, 900), Group("anchor", "b", None, 100), Group("fresh", None, 0, 50)]
    picks, _ = plan_sample(40, 0.5, groups, seed=3, stratify_by_category=True)
    by_group = Counter((p.pool, p.category) for p in picks)
    assert by_group == {("anchor", "a"): 18, ("anchor", "b"): 2, ("fresh", None): 20}


def test_allocate_hands_capped_excess_to_the_others() -> None:
    assert allocate(10, {"a": 1.0, "b": 1.0, "c": 2.0}, {"a": 1, "b": 100, "c": 100}) == {"a": 1, "b": 3, "c": 6}
    assert sum(allocate(7, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 9, "b": 9, "c": 9}).values()) == 7
    with pytest.raises(NotEnoughPairs):
        allocate(5, {"a": 1.0}, {"a": 4})


def test_draw_without_replacement_even_when_weight_is_piled_on_a_small_group() -> None:
    # 3 heavy pairs and 1000 nearly weightless ones: rejection stalls, the exact path finishes.
    out = draw(10, [3, 1000], [1.0, 1e-9], random.Random(0))
    assert len(set(out)) == 10
    assert sum(1 for g, _ in out if g == 0) == 3
    assert sorted(draw(5, [5], [1.0], random.Random(0))) == [(0, i) for i in range(5)]
