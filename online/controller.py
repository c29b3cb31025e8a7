"""The mix controller: how much offline anchor data to replay (and how hard to hold the policy
to the reference) in the next cycle, given the KL measured after the last one.

Contract: `next_mix(measured_kl, kl_budget, current_anchor_fraction, current_beta, cfg) ->
MixDecision(anchor_fraction, beta, reason)`, a pure function.

Design. Let `target = cfg.target_fraction * kl_budget` be the KL the controller aims to stay
under (headroom below the hard budget the promotion gate enforces, since the measured KL is a
noisy estimate) and `u = clip(measured_kl / target, 0, 1)`.

- Anchor fraction: `min + (max - min) * smoothstep(u)`, smoothstep(u) = 3u² − 2u³. Smooth,
  monotone non-decreasing in KL, flat near KL = 0 (a policy close to the reference explores
  freely) and equal to `max` from the target on. Increases apply at once (safety first);
  decreases are limited to `relax_step` per cycle, so one low, noisy measurement cannot
  swing the mix (tighten fast, relax slowly). Over budget, the anchor goes straight to `max`.
- Beta (optional): the adaptive-KL rule of Ziegler et al. 2019 ("Fine-Tuning Language Models
  from Human Preferences", §2.2): e = clip(KL/target − 1, −s, s), beta ← beta·(1 + e), then
  clipped to [beta_min, beta_max]. Multiplicative, monotone in KL, at most ±s per cycle; over
  budget it is raised by the full step.

Every output is monotone non-decreasing in `measured_kl` for fixed other inputs, and bounded
to [min_anchor_fraction, max_anchor_fraction] and [beta_min, beta_max].
"""

from __future__ import annotations

import math
from dataclasses import dataclass


from online.config import ControllerConfig


@dataclass(frozen=True)
class MixDecision:
    """What the next cycle uses, and one line saying why."""

    anchor_fraction: float
    beta: float
    reason: str


def smoothstep(u: float) -> float:
    """3u² − 2u³ on [0, 1]: 0 -> 0, 1 -> 1, zero slope at both ends, monotone."""
    u = min(max(u, 0.0), 1.0)
    return u * u * (3.0 - 2.0 * u)


def next_mix(
    measured_kl: float,
    kl_budget: float,
    current_anchor_fraction: float,
    current_beta: float,
    cfg: ControllerConfig,
) -> MixDecision:
    """The next cycle's anchor fraction and beta (see the module docstring for the rule).

    `kl_budget` is passed explicitly (normally `cfg.kl_budget`) so the controller and the gate
    read the same number. A slightly negative KL estimate (sampling noise) counts as zero.
    """
    if math.isnan(measured_kl):
        raise ValueError("measured_kl is NaN: the KL estimate failed, fix it before mixing")
    if kl_budget <= 0:
        raise ValueError(f"kl_budget must be > 0, got {kl_budget}")
    if current_beta <= 0:
        raise ValueError(f"current_beta must be > 0, got {current_beta}")
    lo, hi = cfg.min_anchor_fraction, cfg.max_anchor_fraction
    kl = max(measured_kl, 0.0)
    target = cfg.target_fraction * kl_budget
    over = kl > kl_budget

    wanted = hi if over else lo + (hi - lo) * smoothstep(kl / target)
    # Rises at once; falls by at most relax_step; always inside the configured bounds.
    anchor = max(wanted, current_anchor_fraction - cfg.relax_step)
    anchor = min(max(anchor, lo), hi)

    beta = current_beta
    if cfg.adapt_beta:
        error = min(max(kl / target - 1.0, -cfg.beta_step), cfg.beta_step)
        beta = min(max(current_beta * (1.0 + error), cfg.beta_min), cfg.beta_max)

    state = "over budget" if over else ("above target" if kl > target else "within target")
    reason = (
        f"kl {kl:.4g} is {kl / kl_budget:.0%} of budget {kl_budget:.4g} ({state}, target "
        f"{cfg.target_fraction:.0%}): anchor_fraction {current_anchor_fraction:.3f} -> {anchor:.3f}"
        + (f", beta {current_beta:.4g} -> {beta:.4g}" if cfg.adapt_beta else "")
    )
    return MixDecision(anchor_fraction=anchor, beta=beta, reason=reason)
