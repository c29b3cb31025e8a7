"""The promotion gate: KL budget, per-category regression with a tolerance, both metrics."""

import pytest
from pydantic import ValidationError

from online.gate import EvalSummary, decide_promotion
from online.config import GateConfig

CFG = GateConfig(tolerance=0.02, metric="reward")
CURRENT = EvalSummary(per_category={"math": 0.50, "coding": 0.40, "writing": 0.70}, mean=0.53)


def summary(**per_category) -> EvalSummary:
    cats = {**CURRENT.per_category, **per_category}
    return EvalSummary(per_category=cats, mean=sum(cats.values()) / len(cats))


def test_no_regression_within_budget_promotes():
    decision = decide_promotion(summary(math=0.55), CURRENT, kl=1.0, kl_budget=2.0, cfg=CFG)
    assert decision.promote
    assert decision.per_category_delta == pytest.approx({"coding": 0.0, "math": 0.05, "writing": 0.0})
    assert len(decision.reasons) == 1 and "within budget" in decision.reasons[0]


def test_kl_over_budget_rejects_naming_kl():
    decision = decide_promotion(summary(math=0.9), CURRENT, kl=2.5, kl_budget=2.0, cfg=CFG)
    assert not decision.promote
    assert len(decision.reasons) == 1 and decision.reasons[0].startswith("kl:")
    assert "2.5" in decision.reasons[0] and "budget 2" in decision.reasons[0]
    assert decide_promotion(summary(), CURRENT, kl=2.0, kl_budget=2.0, cfg=CFG).promote  # at budget
    nan = decide_promotion(summary(), CURRENT, kl=float("nan"), kl_budget=2.0, cfg=CFG)
    assert not nan.promote and "not measured" in nan.reasons[0]


def test_one_category_regressing_rejects_naming_it():
    decision = decide_promotion(summary(coding=0.30, math=0.60), CURRENT, kl=0.1, kl_budget=2.0, cfg=CFG)
    assert not decision.promote
    assert [r for r in decision.reasons if "category" in r] == [
        "category 'coding': reward regressed by 0.1 (tolerance 0.02)"
    ]
    assert decision.per_category_delta["coding"] == pytest.approx(-0.1)


def test_every_failure_is_named():
    decision = decide_promotion(summary(coding=0.0, writing=0.0), CURRENT, kl=9.0, kl_budget=2.0, cfg=CFG)
    assert not decision.promote
    text = "\n".join(decision.reasons)
    assert "kl:" in text and "'coding'" in text and "'writing'" in text and "overall" in text
    assert "'math'" not in text


def test_tolerance_edges():
    # Exactly at the tolerance passes (0.50 - 0.52 is -0.020000000000000018 in floats).
    at_edge = summary(math=0.48)
    assert decide_promotion(at_edge, CURRENT, 0.0, 1.0, CFG).promote
    assert not decide_promotion(summary(math=0.4799), CURRENT, 0.0, 1.0, CFG).promote
    # Zero tolerance: equal passes, any drop fails.
    strict = GateConfig(tolerance=0.0)
    assert decide_promotion(summary(), CURRENT, 0.0, 1.0, strict).promote
    assert not decide_promotion(summary(math=0.4999), CURRENT, 0.0, 1.0, strict).promote
    with pytest.raises(ValidationError):
        GateConfig(tolerance=-0.1)


def test_category_missing_from_candidate_rejects():
    candidate = EvalSummary(per_category={"math": 0.9, "coding": 0.9}, mean=0.9)
    decision = decide_promotion(candidate, CURRENT, 0.0, 1.0, CFG)
    assert not decision.promote
    assert decision.reasons == ["category 'writing': missing from the candidate's evaluation"]
    # A new category in the candidate has no baseline and cannot regress.
    extra = summary(roleplay=0.0)
    assert decide_promotion(extra.model_copy(update={"mean": CURRENT.mean}), CURRENT, 0.0, 1.0, CFG).promote


def test_win_rate_metric_compares_with_parity():
    cfg = GateConfig(metric="win_rate", tolerance=0.05)
    good = EvalSummary(
        per_category={}, mean=0.0, win_rate=0.6, per_category_win_rate={"math": 0.7, "coding": 0.46}
    )
    decision = decide_promotion(good, EvalSummary(mean=0.0), 0.0, 1.0, cfg)
    assert decision.promote
    assert decision.per_category_delta == pytest.approx({"coding": -0.04, "math": 0.2})
    bad = good.model_copy(update={"per_category_win_rate": {"math": 0.7, "coding": 0.40}})
    decision = decide_promotion(bad, EvalSummary(mean=0.0), 0.0, 1.0, cfg)
    assert not decision.promote
    assert decision.reasons == ["category 'coding': win_rate regressed by 0.1 (tolerance 0.05)"]
    with pytest.raises(ValueError, match="no win_rate"):
        decide_promotion(EvalSummary(mean=0.0), EvalSummary(mean=0.0), 0.0, 1.0, cfg)
