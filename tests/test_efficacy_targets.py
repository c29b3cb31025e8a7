"""benchmarks/efficacy.py's target checks (pure): each target is decided by its own figures,
a missed one reads NO, and the per-family standard errors are a target of their own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def efficacy():
    spec = importlib.util.spec_from_file_location("efficacy_bench", ROOT / "benchmarks" / "efficacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(stage, covered, heldout, kl, promoted, *, budget=6.0, fam_se=0.03, agg_se=0.02):
    return {"stage": stage, "reward/covered": covered, "reward/heldout": heldout, "kl/policy_ref": kl,
            "kl_budget": budget, "promoted": promoted, "stderr/covered": agg_se, "stderr/heldout": agg_se,
            "reward/json": covered, "stderr/json": fam_se, "reward/bullets": heldout, "stderr/bullets": fam_se}


def by_name(targets):
    return {t["target"].split(":")[0].split(" by ")[0]: t for t in targets}


def test_targets_met_and_missed_are_told_apart_with_their_figures():
    report = {"stages": [
        row("initial", 0.10, 0.20, 0.0, "-"), row("offline", 0.30, 0.20, 2.0, "yes"),
        row("cycle 1", 0.31, 0.35, 3.0, "yes"), row("cycle 2", 0.30, 0.50, 7.0, "no (rolled back)"),
        row("budget probe", 0.30, 0.30, 4.0, "no (rolled back)", budget=1.5),
    ]}
    t = by_name(efficacy().check_targets(report, 29 * 60))
    assert t["offline DPO lifts the covered families"]["met"] is True
    # The best *promoted* cycle counts: cycle 2's 0.50 was rolled back.
    held = t["cycles lift the held-out families"]
    assert held["met"] is True and "cycle 1 0.350 (+0.150)" in held["figures"]
    assert t["every promoted cycle is within the KL budget"]["met"] is True
    assert t["the budget probe is rolled back"]["met"] is True
    assert t["covered / held-out pass rates"]["met"] is True and t["every family's pass rate"]["met"] is True
    assert t["whole run within 30 minutes"]["met"] is True


def test_a_noisy_family_a_slow_run_and_a_small_lift_each_fail_their_own_target():
    report = {"stages": [
        row("initial", 0.10, 0.20, 0.0, "-", fam_se=0.08), row("offline", 0.15, 0.20, 2.0, "yes"),
        row("cycle 1", 0.15, 0.25, 3.0, "yes"),
        row("budget probe", 0.15, 0.25, 4.0, "yes", budget=1.5),
    ]}
    t = by_name(efficacy().check_targets(report, 31 * 60))
    assert t["offline DPO lifts the covered families"]["met"] is False
    assert t["cycles lift the held-out families"]["met"] is False
    assert t["the budget probe is rolled back"]["met"] is False
    fam = t["every family's pass rate"]
    assert fam["met"] is False and "0.080 (initial, " in fam["figures"]
    assert t["covered / held-out pass rates"]["met"] is True  # the aggregates stay below 0.05
    assert t["whole run within 30 minutes"]["met"] is False and "31.0 min" in t["whole run within 30 minutes"]["figures"]


def test_no_promoted_cycle_leaves_the_budget_target_not_shown():
    report = {"stages": [row("initial", 0.1, 0.2, 0.0, "-"), row("offline", 0.3, 0.2, 2.0, "yes"),
                         row("cycle 1", 0.3, 0.2, 9.0, "no (rolled back)")]}
    t = by_name(efficacy().check_targets(report, 60))
    assert t["every promoted cycle is within the KL budget"]["met"] is None
    assert t["cycles lift the held-out families"]["met"] is False
