"""How a training batch is drawn from the replay buffer: pure functions of counts and a seed.

Contract. The buffer describes its contents as `Group`s (pool, category, cycle, size); the
store keeps one index per (pool, category), ordered by cycle then pair id, so a group is a
contiguous run of ranks in that index. `plan_sample(n, anchor_fraction, groups, seed, ...)`
decides which ranks to fetch and returns them with `MixStats`; `buffer/store.py` turns ranks into
pairs. No Redis here: the mix is tested, and reproducible, on its own.

- Counts: exactly `round(n * anchor_fraction)` anchor pairs (Python's round: halves to even) and
  the rest fresh. When a pool has too few pairs the other one fills the gap and `MixStats`
  records the shortfall; fewer than `n` pairs in total is `NotEnoughPairs`.
- Within a pool pairs are drawn without replacement. Fresh pairs may be weighted by recency:
  a pair `a` cycles older than the newest cycle weighs `0.5 ** (a / half_life)`.
- With stratification each pool's draw is split across categories in proportion to their
  (weighted) size by largest remainder, so a small category is not lost to sampling noise.
- Same seed and same counts -> same ranks, hence the same pairs for the same buffer contents.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict

Pool = Literal["anchor", "fresh"]
POOLS: tuple[Pool, Pool] = ("anchor", "fresh")
# Floor of a recency weight, so a very old pair is unlikely but never unreachable (no 0/0).
MIN_WEIGHT = 1e-12

K = TypeVar("K", bound=Hashable)


class NotEnoughPairs(ValueError):
    """The buffer holds fewer pairs than a batch asks for."""


class Group(NamedTuple):
    """The pairs of one pool, category and cycle: a contiguous run in the (pool, category) index."""

    pool: Pool
    category: str | None
    cycle: int | None  # None for the anchor
    size: int


class Pick(NamedTuple):
    """One pair to fetch: position `rank` in the (pool, category) index (ordered by cycle, id)."""

    pool: Pool
    category: str | None
    rank: int


class MixStats(BaseModel):
    """How a batch was actually mixed, including any fallback from one pool to the other."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requested: int
    anchor_fraction: float
    anchor_target: int
    anchor: int
    fresh: int
    fresh_shortfall: int
    """Fresh slots filled with anchor pairs because the fresh pool was too small."""
    anchor_shortfall: int
    """Anchor slots filled with fresh pairs because the anchor was too small."""
    anchor_available: int
    fresh_available: int

    @property
    def fell_back(self) -> bool:
        return self.fresh_shortfall > 0 or self.anchor_shortfall > 0

    def metrics(self) -> dict[str, float]:
        """Namespaced metrics for the run log."""
        return {
            "buffer/anchor_fraction": self.anchor / self.requested if self.requested else 0.0,
            "buffer/fresh_shortfall": float(self.fresh_shortfall),
            "buffer/anchor_shortfall": float(self.anchor_shortfall),
            "buffer/fresh_available": float(self.fresh_available),
        }


def mix_counts(n: int, anchor_fraction: float, anchor_available: int, fresh_available: int) -> MixStats:
    """How many anchor and fresh pairs a batch of `n` takes: `round(n * anchor_fraction)` anchor."""
    if n < 0:
        raise ValueError(f"batch size must be >= 0, got {n}")
    if not 0.0 <= anchor_fraction <= 1.0:
        raise ValueError(f"anchor_fraction must be in [0, 1], got {anchor_fraction}")
    if n > anchor_available + fresh_available:
        raise NotEnoughPairs(
            f"asked for {n} pairs but the buffer holds {anchor_available} anchor + "
            f"{fresh_available} fresh; seed the anchor (tether buffer seed) or lower the batch size"
        )
    target = round(n * anchor_fraction)
    anchor = min(target, anchor_available)
    fresh = n - anchor
    fresh_shortfall = max(0, fresh - fresh_available)
    fresh -= fresh_shortfall
    anchor += fresh_shortfall
    return MixStats(
        requested=n, anchor_fraction=anchor_fraction, anchor_target=target, anchor=anchor, fresh=fresh,
        fresh_shortfall=fresh_shortfall, anchor_shortfall=target - min(target, anchor_available),
        anchor_available=anchor_available, fresh_available=fresh_available,
    )  # fmt: skip


def recency_weight(age_cycles: int, half_life_cycles: float | None) -> float:
    """Sampling weight of a pair `age_cycles` older than the newest cycle (1 when unweighted)."""
    if half_life_cycles is None:
        return 1.0
    return max(0.5 ** (age_cycles / half_life_cycles), MIN_WEIGHT)


def allocate(k: int, masses: Mapping[K, float], caps: Mapping[K, int]) -> dict[K, int]:
    """Split `k` over keys in proportion to `masses`, at most `caps[key]` each (largest remainder).

    Keys whose cap binds hand their excess to the others, re-split in proportion. Ties go to the
    key first in `masses`' order, so the result is deterministic. Requires k <= sum(caps).
    """
    if k > sum(caps.values()):
        raise NotEnoughPairs(f"cannot place {k} picks in groups holding {sum(caps.values())}")
    out = {key: 0 for key in masses}
    left = k
    while left > 0:
        open_keys = [key for key in masses if out[key] < caps[key] and masses[key] > 0]
        total = sum(masses[key] for key in open_keys)
        quotas = {key: left * masses[key] / total for key in open_keys}
        share = {key: math.floor(q) for key, q in quotas.items()}
        by_remainder = sorted(open_keys, key=lambda key: quotas[key] - share[key], reverse=True)
        for key in by_remainder[: left - sum(share.values())]:
            share[key] += 1
        for key in open_keys:
            take = min(share[key], caps[key] - out[key])
            out[key] += take
            left -= take
    return out


def draw(k: int, counts: Sequence[int], weights: Sequence[float], rng: random.Random) -> list[tuple[int, int]]:
    """`k` distinct (group, offset) picks; pair j of group g is drawn with weight `weights[g]`.

    Weighted sampling without replacement. Drawing from the full distribution and rejecting
    repeats gives exactly the successive-sampling law (each next pick proportional to weight
    among those left), in O(k log G) when repeats are rare; when they are not (k near the
    pool's size, or weight piled on a small group) it switches to explicit successive draws.
    """
    total = sum(counts)
    if k > total:
        raise NotEnoughPairs(f"cannot draw {k} from {total}")
    cum_counts = list(itertools.accumulate(counts))
    if len(set(weights)) <= 1:  # uniform: a plain sample of global positions
        out = []
        for pos in rng.sample(range(total), k):
            g = bisect.bisect_right(cum_counts, pos)
            out.append((g, pos - (cum_counts[g - 1] if g else 0)))
        return out
    cum_mass = list(itertools.accumulate(c * w for c, w in zip(counts, weights, strict=True)))
    chosen: set[tuple[int, int]] = set()
    out = []
    attempts = 0
    while len(out) < k and attempts < 8 * k + 64:
        attempts += 1
        g = min(bisect.bisect_right(cum_mass, rng.random() * cum_mass[-1]), len(counts) - 1)
        pick = (g, int(rng.random() * counts[g]))  # randrange's exactness is not needed here, speed is
        if pick not in chosen:
            chosen.add(pick)
            out.append(pick)
    if len(out) < k:  # too many repeats: finish with explicit successive draws
        taken = [0] * len(counts)
        for g, _ in out:
            taken[g] += 1
        while len(out) < k:
            masses = [(c - t) * w for c, t, w in zip(counts, taken, weights, strict=True)]
            x = rng.random() * sum(masses)
            g = next((i for i, m in enumerate(itertools.accumulate(masses)) if x < m and counts[i] > taken[i]),
                     max(i for i in range(len(counts)) if counts[i] > taken[i]))  # fmt: skip
            free = [o for o in range(counts[g]) if (g, o) not in chosen]
            pick = (g, rng.choice(free))
            chosen.add(pick)
            out.append(pick)
            taken[g] += 1
    return out


def _category_key(category: str | None) -> tuple[int, str]:
    return (0, "") if category is None else (1, category)


def plan_sample(
    n: int,
    anchor_fraction: float,
    groups: Sequence[Group],
    seed: int,
    *,
    half_life_cycles: float | None = None,
    stratify_by_category: bool = False,
) -> tuple[list[Pick], MixStats]:
    """Which ranks of which (pool, category) index make a batch of `n`, and how it was mixed."""
    groups = sorted(
        (g for g in groups if g.size > 0),
        key=lambda g: (g.pool, _category_key(g.category), -1 if g.cycle is None else g.cycle),
    )
    available = {pool: sum(g.size for g in groups if g.pool == pool) for pool in POOLS}
    stats = mix_counts(n, anchor_fraction, available["anchor"], available["fresh"])
    rng = random.Random(seed)
    # Rank of each group's first pair in its (pool, category) index: cumulative over cycles.
    base: list[int] = []
    for _, run in itertools.groupby(groups, key=lambda g: (g.pool, g.category)):
        base.extend(itertools.accumulate((g.size for g in run), initial=0))
        base.pop()
    picks: list[Pick] = []
    for pool, k in (("anchor", stats.anchor), ("fresh", stats.fresh)):
        members = [i for i, g in enumerate(groups) if g.pool == pool]
        if k == 0:
            continue
        newest = max((groups[i].cycle or 0) for i in members)
        weight = {i: recency_weight(newest - (groups[i].cycle or 0), half_life_cycles if pool == "fresh" else None)
                  for i in members}  # fmt: skip
        if stratify_by_category:
            by_cat: dict[str | None, list[int]] = {}
            for i in members:
                by_cat.setdefault(groups[i].category, []).append(i)
            share = allocate(
                k,
                {c: sum(groups[i].size * weight[i] for i in idx) for c, idx in by_cat.items()},
                {c: sum(groups[i].size for i in idx) for c, idx in by_cat.items()},
            )
            parts = [(by_cat[c], share[c]) for c in by_cat]
        else:
            parts = [(members, k)]
        for idx, m in parts:
            for g, offset in draw(m, [groups[i].size for i in idx], [weight[i] for i in idx], rng):
                group = groups[idx[g]]
                picks.append(Pick(group.pool, group.category, base[idx[g]] + offset))
    rng.shuffle(picks)  # no pool-ordered blocks inside a batch
    return picks, stats
