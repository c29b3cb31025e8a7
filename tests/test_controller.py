"""The mix controller: bounds, monotonicity in KL, the over-budget case, beta adaptation."""

import pytest
from pydantic import ValidationError

from online.controller import next_mix, smoothstep
from online.config import ControllerConfig

CFG = ControllerConfig(kl_budget=2.0, target_fraction=0.8, min_anchor_fraction=0.1, max_anchor_fraction=0.7)
BETA_CFG = CFG.model_copy(update={"adapt_beta": True, "beta_min": 0.05, "beta_max": 0.5, "beta_step": 0.2})
KLS = [-0.1, 0.0, 0.05, 0.2, 0.5, 0.8, 1.0, 1.2, 1.6, 1.8, 2.0, 2.01, 3.0, 100.0]


def test_anchor_is_monotone_and_bounded_in_kl():
    for current in (0.1, 0.4, 0.7):
        anchors = [next_mix(kl, 2.0, current, 0.1, CFG).anchor_fraction for kl in KLS]
        assert anchors == sorted(anchors)
        assert all(0.1 <= a <= 0.7 for a in anchors)


def test_fresh_start_follows_smoothstep_up_to_the_target():
    """From the minimum (nothing to relax) the anchor is min + (max-min)*smoothstep(kl/target)."""
    target = 0.8 * 2.0
    for kl in (0.0, 0.4, 0.8, 1.2, 1.6):
        got = next_mix(kl, 2.0, 0.1, 0.1, CFG).anchor_fraction
        assert got == pytest.approx(0.1 + 0.6 * smoothstep(kl / target))
    # Midway to the target is the midpoint of the range (smoothstep(0.5) = 0.5).
    assert next_mix(0.8, 2.0, 0.1, 0.1, CFG).anchor_fraction == pytest.approx(0.4)
    # Noise-negative KL counts as zero.
    assert next_mix(-0.3, 2.0, 0.1, 0.1, CFG).anchor_fraction == pytest.approx(0.1)


def test_over_budget_jumps_to_max_anchor_and_says_so():
    decision = next_mix(2.5, 2.0, 0.1, 0.1, CFG)
    assert decision.anchor_fraction == pytest.approx(0.7)
    assert "over budget" in decision.reason
    assert next_mix(1.7, 2.0, 0.1, 0.1, CFG).anchor_fraction == pytest.approx(0.7)  # above target
    assert "above target" in next_mix(1.7, 2.0, 0.1, 0.1, CFG).reason


def test_relaxing_is_rate_limited_but_tightening_is_not():
    # KL fell to zero after a high-KL cycle: fall by relax_step (0.2), not straight to min.
    assert next_mix(0.0, 2.0, 0.7, 0.1, CFG).anchor_fraction == pytest.approx(0.5)
    assert next_mix(0.0, 2.0, 0.25, 0.1, CFG).anchor_fraction == pytest.approx(0.1)  # floor
    # A current value outside the bounds (config changed) is brought back inside.
    assert next_mix(0.0, 2.0, 0.95, 0.1, CFG).anchor_fraction == pytest.approx(0.7)


def test_smoothstep_shape():
    assert smoothstep(-1) == 0.0 and smoothstep(0) == 0.0 and smoothstep(1) == 1.0 and smoothstep(5) == 1.0
    xs = [i / 20 for i in range(21)]
    assert [smoothstep(x) for x in xs] == sorted(smoothstep(x) for x in xs)


def test_beta_unchanged_unless_adapting():
    assert next_mix(100.0, 2.0, 0.1, 0.123, CFG).beta == 0.123


def test_beta_adapts_multiplicatively_monotone_and_bounded():
    betas = [next_mix(kl, 2.0, 0.1, 0.1, BETA_CFG).beta for kl in KLS]
    assert betas == sorted(betas)
    assert all(0.05 <= b <= 0.5 for b in betas)
    assert next_mix(1.6, 2.0, 0.1, 0.1, BETA_CFG).beta == pytest.approx(0.1)  # at target: hold
    assert next_mix(2.5, 2.0, 0.1, 0.1, BETA_CFG).beta == pytest.approx(0.12)  # over: +beta_step
    assert next_mix(0.0, 2.0, 0.1, 0.1, BETA_CFG).beta == pytest.approx(0.08)  # far below: -beta_step
    assert next_mix(1.76, 2.0, 0.1, 0.1, BETA_CFG).beta == pytest.approx(0.11)  # 10% above target
    assert next_mix(50.0, 2.0, 0.1, 0.48, BETA_CFG).beta == pytest.approx(0.5)  # capped
    assert next_mix(0.0, 2.0, 0.1, 0.055, BETA_CFG).beta == pytest.approx(0.05)  # floored
    assert "beta 0.1 -> 0.12" in next_mix(2.5, 2.0, 0.1, 0.1, BETA_CFG).reason


def test_bad_inputs_and_config_fail_clearly():
    with pytest.raises(ValueError, match="NaN"):
        next_mix(float("nan"), 2.0, 0.1, 0.1, CFG)
    with pytest.raises(ValueError, match="kl_budget"):
        next_mix(0.1, 0.0, 0.1, 0.1, CFG)
    with pytest.raises(ValidationError, match="min_anchor_fraction"):
        ControllerConfig(min_anchor_fraction=0.9, max_anchor_fraction=0.5)
    with pytest.raises(ValidationError, match="beta_min"):
        ControllerConfig(beta_min=0.5, beta_max=0.1)
    with pytest.raises(ValidationError):
        ControllerConfig(kl_budget=0)
    with pytest.raises(ValidationError):
        ControllerConfig(typo=1)
