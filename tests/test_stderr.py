"""Standard errors of a stage's scores: clustered by prompt (online.stats), per category on an
EvalSummary, and pooled into the report's covered / held-out columns. Expected values by hand."""

from __future__ import annotations

import math

import pytest

from online.gate import EvalSummary, PromptRewards, WinCounts
from online.stats import clustered_stderr
from orchestrator.report import stderr_columns


def test_clustered_stderr_by_hand():
    # One sample per group: the familiar s / sqrt(N). Values 0, 1, 1, 0: mean 0.5, s^2 = 1/3.
    assert clustered_stderr([[0.0], [1.0], [1.0], [0.0]]) == pytest.approx(math.sqrt(1 / 3) / 2)
    # Two prompts, two samples each: [1, 1] and [0, 0]. Mean 0.5; group residual sums +1, -1;
    # var = 2/1 * (1 + 1) / 4^2 = 0.25 -> 0.5: as uncertain as two samples, not four.
    assert clustered_stderr([[1.0, 1.0], [0.0, 0.0]]) == pytest.approx(0.5)
    # The same four values spread within prompts instead: no spread between them -> 0.
    assert clustered_stderr([[1.0, 0.0], [0.0, 1.0]]) == 0.0
    # Fewer than two groups (empty ones ignored): no spread between draws to measure.
    assert math.isnan(clustered_stderr([[1.0, 0.0, 1.0]])) and math.isnan(clustered_stderr([[], [1.0]]))


def test_summary_stderr_from_prompt_rewards_and_from_win_counts():
    rows = [PromptRewards(key="a", category="x", rewards=(1.0, 1.0)), PromptRewards(key="b", category="x", rewards=(0.0, 0.0)),
            PromptRewards(key="c", category="y", rewards=(1.0,)), PromptRewards(key="d", category="y", rewards=(0.0,))]
    se = EvalSummary.from_rewards(rows).stderr()
    # y: one sample per prompt, 1 and 0: s = sqrt(1/2), s / sqrt(2) = 0.5.
    assert se["x"] == pytest.approx(0.5) and se["y"] == pytest.approx(0.5)
    # Overall: six values, mean 0.5; residual sums +1, -1, +0.5, -0.5 -> 4/3 * 2.5 / 36.
    assert se["mean"] == pytest.approx(math.sqrt(4 / 3 * 2.5) / 6)
    wins = EvalSummary.from_counts({"x": WinCounts(wins=3, losses=1), "y": WinCounts(ties=2)}).stderr()
    # x: scores 1, 1, 1, 0: p = 0.75, s^2 = (3 * 0.0625 + 0.5625) / 3 = 0.25 -> 0.5 / 2. y: two
    # ties, 0.5 each: no spread at all.
    assert wins["x"] == pytest.approx(0.25) and wins["y"] == 0.0
    # Overall: 1, 1, 1, 0, 0.5, 0.5 -> p = 2/3; s^2 = (3/9 + 4/9 + 2/36) / 5 = 1/6 -> sqrt(1/36).
    assert wins["mean"] == pytest.approx(1 / 6)
    bare = EvalSummary(per_category={"x": 0.5}, mean=0.5).stderr()  # e.g. read back from old lineage
    assert math.isnan(bare["x"]) and math.isnan(bare["mean"])


def test_covered_and_heldout_errors_pool_their_categories():
    cols = stderr_columns({"a": 0.03, "b": 0.04, "c": 0.05, "mean": 0.02}, covered={"a", "b"})
    assert cols["stderr/covered"] == pytest.approx(0.05 / 2)  # sqrt(0.03^2 + 0.04^2) / 2
    assert cols["stderr/heldout"] == pytest.approx(0.05) and cols["stderr/mean"] == 0.02
    assert cols["stderr/a"] == 0.03 and "stderr/covered" in stderr_columns({"c": 0.1}, covered=set())
    assert math.isnan(stderr_columns({"c": 0.1}, covered=set())["stderr/covered"])
    assert math.isnan(stderr_columns(None, covered={"a"})["stderr/mean"])
