"""The promotion gate: KL budget, evidence counts, confidence bounds (Wilson, paired t, Welch),
the length guard, and the three verdicts. Expected values are worked out in the docstrings."""

import math

import pytest
from pydantic import ValidationError

from online.config import GateConfig, OnlineConfig
from online.gate import EvalSummary, PromptRewards, WinCounts, decide_promotion, length_ratio
from online.stats import mean_bound, t_quantile, welch_bound, wilson_interval

REWARD = GateConfig(tolerance=0.02, metric="reward", min_decisive=4)
WIN = GateConfig(tolerance=0.05, metric="win_rate", min_decisive=30)
CATS = ("math", "coding")


def rewards(per_prompt: dict[str, list[tuple[float, ...]]], length: float | None = 10.0, tag: str = "") -> EvalSummary:
    """A reward summary: category -> each prompt's sample rewards (prompt keys `<tag><cat>-<i>`)."""
    rows = [PromptRewards(key=f"{tag}{c}-{i}", category=c, rewards=r) for c, rs in per_prompt.items() for i, r in enumerate(rs)]
    return EvalSummary.from_rewards(rows, length)


def shifted(base: dict[str, list[tuple[float, ...]]], **shift: float) -> dict[str, list[tuple[float, ...]]]:
    return {c: [tuple(x + shift.get(c, 0.0) for x in r) for r in rs] for c, rs in base.items()}


# 8 prompts x 2 samples per category, some spread (prompt difficulty) and within-prompt noise.
BASE = {c: [(0.5 + 0.05 * i, 0.45 + 0.05 * i) for i in range(8)] for c in CATS}
CURRENT = rewards(BASE)


def even(length: float | None = 10.0) -> EvalSummary:
    """The current policy under the win_rate metric: 0.5 against itself in each category."""
    return EvalSummary(per_category={c: 0.5 for c in CATS}, mean=0.5, win_rate=0.5,
                       per_category_win_rate={c: 0.5 for c in CATS}, mean_response_length=length)


def judged(length: float | None = 10.0, **per: tuple[int, int, int]) -> EvalSummary:
    return EvalSummary.from_counts({c: WinCounts(wins=w, losses=l, ties=t) for c, (w, l, t) in per.items()}, length)


# -- the interval math ---------------------------------------------------------------------------


def test_wilson_interval_known_values():
    """Wilson 95% (z = 1.959964): 8/10 -> (0.4902, 0.9433); 50/100 -> (0.4038, 0.5962), the
    textbook examples; 0/10 -> (0, 0.2775) (upper z^2/(n+z^2) = 3.8415/13.8415); n = 0 -> (0, 1)."""
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(3.8415 / 13.8415, abs=1e-4))
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo90, _ = wilson_interval(50, 100, confidence=0.90)
    assert lo90 > wilson_interval(50, 100)[0]  # a lower confidence, a narrower interval
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_t_quantiles_match_tables():
    """t_{0.975} for df 1, 2, 10, 30 from any t table: 12.706, 4.303, 2.228, 2.042."""
    assert [round(t_quantile(0.975, df), 3) for df in (1, 2, 10, 30)] == [12.706, 4.303, 2.228, 2.042]
    assert t_quantile(0.025, 10) == pytest.approx(-2.228, abs=1e-3)


def test_mean_and_welch_bounds_by_hand():
    """mean_bound([0.1, 0.2, 0.3, 0.4]): mean 0.25, s = 0.1291, se = 0.06455, t_{.975,3} =
    3.1824 -> 0.25 ± 0.2054. welch(1, sd 1, n 10; 0, sd 2, n 20): se = sqrt(0.1 + 0.2) =
    0.5477, df = 0.09 / (0.01/9 + 0.04/19) = 27.98."""
    b = mean_bound([0.1, 0.2, 0.3, 0.4])
    assert (b.estimate, b.stderr, b.df) == (pytest.approx(0.25), pytest.approx(0.06455, abs=1e-5), 3.0)
    assert b.lower == pytest.approx(0.25 - 3.1824 * 0.06455, abs=1e-4)
    w = welch_bound(1.0, 1.0, 10, 0.0, 2.0, 20)
    assert (w.estimate, w.stderr, w.df) == (1.0, pytest.approx(0.5477, abs=1e-4), pytest.approx(27.98, abs=0.01))
    assert math.isinf(mean_bound([0.3]).lower)  # one unit: no spread, no bound


# -- win_rate: Wilson over decisive judgments ---------------------------------------------------


def test_a_weak_judge_producing_only_ties_is_inconclusive():
    """The 0.500 failure: every comparison a tie -> win rate 0.5 (ties half), 0 decisive."""
    candidate = judged(math=(0, 0, 200), coding=(0, 0, 200))
    assert candidate.win_rate == 0.5
    decision = decide_promotion(candidate, even(), kl=0.1, kl_budget=1.0, cfg=WIN)
    assert decision.verdict == "inconclusive" and not decision.promote
    assert "overall: 0 decisive judgments < gate.min_decisive 30 (400 ties)" in decision.reasons[-1]
    assert all(r.startswith("inconclusive, not promoted") for r in decision.reasons)


def test_an_exact_tie_with_many_judgments_is_not_a_regression():
    """500 wins, 500 losses per category: Wilson lower 0.4691 >= 0.45 (n = 1000), and overall
    (n = 2000) 0.4781: parity, shown with confidence. With 50/50 per category the lower end is
    0.4038 < 0.45: parity is not shown, the candidate is rejected though its rate is 0.500."""
    many = decide_promotion(judged(math=(500, 500, 30), coding=(500, 500, 0)), even(), 0.1, 1.0, WIN)
    assert many.verdict == "promote", many.reasons
    assert {c.unit: round(c.lower, 4) for c in many.checks} == {"coding": 0.4691, "math": 0.4691, "overall": 0.4781}
    assert many.per_category_delta == {"coding": 0.0, "math": 0.0}
    few = decide_promotion(judged(math=(50, 50, 0), coding=(50, 50, 0)), even(), 0.1, 1.0, WIN)
    assert few.verdict == "reject"
    assert "category 'coding': win_rate regression beyond the tolerance not ruled out: win rate 0.500 over " \
           "100 decisive judgments (0 ties), lower 95% bound 0.4038 < 0.45" in few.reasons[0]


def test_too_few_decisive_judgments_is_inconclusive_with_the_numbers():
    """20 wins of 20 in math (Wilson lower 0.839) but only 20 < 30 decisive: inconclusive."""
    decision = decide_promotion(judged(math=(20, 0, 5), coding=(60, 20, 0)), even(), 0.1, 1.0, WIN)
    assert decision.verdict == "inconclusive"
    assert decision.reasons == [
        "inconclusive, not promoted: category 'math': 20 decisive judgments < gate.min_decisive 30 (5 ties)"
    ]
    assert decision.metrics()["gate/min_category_n"] == 20 and decision.metrics()["gate/n"] == 100


def test_a_clear_loss_rejects_even_on_little_evidence():
    """0 wins of 12 in coding: Wilson upper 0.2425 < 0.45, a regression shown on 12 judgments."""
    decision = decide_promotion(judged(math=(40, 40, 0), coding=(0, 12, 0)), even(), 0.1, 1.0,
                                WIN.model_copy(update={"min_decisive": 10}))
    assert decision.verdict == "reject"
    assert any(r.startswith("category 'coding': win_rate regressed: win rate 0.000") for r in decision.reasons)


def test_win_rate_needs_judged_counts_and_every_category():
    with pytest.raises(ValueError, match="no judged counts"):
        decide_promotion(EvalSummary(mean=0.5, mean_response_length=1.0), even(), 0.1, 1.0, WIN)
    decision = decide_promotion(judged(math=(400, 100, 0)), even(), 0.1, 1.0, WIN)
    assert decision.verdict == "reject" and decision.reasons == ["category 'coding': missing from the candidate's evaluation"]


# -- reward: paired t, Welch ---------------------------------------------------------------------


def test_reward_uses_the_paired_difference_on_the_same_prompts():
    """Candidate = current + 0.01 on every sample: every per-prompt difference is +0.01, zero
    spread, so the bound is the difference itself (+0.01 >= -0.02): promoted on 16 samples per
    category, though the rewards themselves vary by 0.35 across prompts (which an unpaired test
    would count as noise)."""
    decision = decide_promotion(rewards(shifted(BASE, math=0.01, coding=0.01)), CURRENT, 0.1, 1.0, REWARD)
    assert decision.verdict == "promote", decision.reasons
    assert {c.method for c in decision.checks} == {"paired-t"}
    assert [c.n for c in decision.checks] == [16, 16, 32]
    assert all(c.lower == pytest.approx(0.01) for c in decision.checks)


def test_reward_ci_by_hand():
    """Math differences per prompt alternate +0.1 / -0.1 (mean 0, s = 0.1069, se = 0.0378,
    t_{.975,7} = 2.3646): lower -0.0894 < -0.02, a regression not ruled out; with tolerance
    0.1 it passes."""
    diffs = [0.1 if i % 2 == 0 else -0.1 for i in range(8)]
    cand = {**BASE, "math": [tuple(x + d for x in r) for r, d in zip(BASE["math"], diffs)]}
    decision = decide_promotion(rewards(cand), CURRENT, 0.1, 1.0, REWARD)
    math_check = next(c for c in decision.checks if c.unit == "math")
    assert math_check.lower == pytest.approx(-2.3646 * 0.1069 / math.sqrt(8), abs=1e-3)
    assert decision.verdict == "reject"
    assert decision.reasons[0].startswith("category 'math': reward regression beyond the tolerance not ruled out")
    assert decide_promotion(rewards(cand), CURRENT, 0.1, 1.0, REWARD.model_copy(update={"tolerance": 0.1})).promote


def test_unpaired_evaluations_fall_back_to_welch():
    """Other prompts in the candidate's evaluation: Welch on the sample means and deviations."""
    other = {c: [(0.5 + 0.05 * i, 0.45 + 0.05 * i) for i in range(8, 16)] for c in CATS}
    cand = rewards(other, tag="other-")
    decision = decide_promotion(cand, CURRENT, 0.1, 1.0, REWARD)
    assert {c.method for c in decision.checks} == {"welch-t"}
    check = next(c for c in decision.checks if c.unit == "math")
    expect = welch_bound(cand.per_category["math"], cand.per_category_std["math"], 16,
                         CURRENT.per_category["math"], CURRENT.per_category_std["math"], 16)
    assert check.lower == pytest.approx(expect.lower) and check.estimate == pytest.approx(0.4)


def test_reward_with_too_few_samples_is_inconclusive_and_a_clear_drop_rejects():
    small = {c: rs[:1] for c, rs in BASE.items()}  # 1 prompt x 2 samples per category, 4 overall
    cfg = REWARD.model_copy(update={"min_decisive": 5})
    decision = decide_promotion(rewards(shifted(small, math=0.1)), rewards(small), 0.1, 1.0, cfg)
    assert decision.verdict == "inconclusive"
    assert [r.split(": ", 1)[1] for r in decision.reasons] == [
        "category 'coding': 2 reward samples < gate.min_decisive 5",
        "category 'math': 2 reward samples < gate.min_decisive 5",
        "overall: 4 reward samples < gate.min_decisive 5",
    ]
    # With enough samples for a verdict (4 >= 4) two prompts say little: the paired t bound
    # (df 1, t = 12.7) is far under -0.02, so a regression is not ruled out: rejected.
    assert decide_promotion(rewards(shifted(small, math=0.1)), rewards(small), 0.1, 1.0, REWARD).verdict == "reject"
    # A drop of 0.5 on 8 prompts with little spread is shown whatever min_decisive says.
    wrecked = decide_promotion(rewards(shifted(BASE, coding=-0.5)), CURRENT, 0.1, 1.0,
                               REWARD.model_copy(update={"min_decisive": 1000}))
    assert wrecked.verdict == "reject" and wrecked.reasons[0].startswith("category 'coding': reward regressed")


# -- KL, length, verdict precedence --------------------------------------------------------------


def test_kl_over_budget_or_unmeasured_rejects_whatever_the_evidence():
    good = rewards(shifted(BASE, math=0.2, coding=0.2))
    over = decide_promotion(good, CURRENT, kl=2.5, kl_budget=2.0, cfg=REWARD)
    assert over.verdict == "reject" and over.reasons == ["kl: 2.5 is over the budget 2"]
    assert decide_promotion(good, CURRENT, kl=2.0, kl_budget=2.0, cfg=REWARD).promote  # at budget
    nan = decide_promotion(good, CURRENT, kl=float("nan"), kl_budget=2.0, cfg=REWARD)
    assert not nan.promote and nan.reasons == ["kl: not measured (NaN)"]
    # Over budget and too little evidence: a reject (a hard failure), the shortfall named too.
    both = decide_promotion(judged(math=(3, 0, 0), coding=(3, 0, 0)), even(), 5.0, 1.0, WIN)
    assert both.verdict == "reject" and both.reasons[0].startswith("kl:")
    assert any(r.startswith("also inconclusive: category 'math'") for r in both.reasons)


def test_response_length_drift_rejects():
    """The candidate's answers average 16 tokens against its parent's 10: ratio 1.6 > 1.5."""
    long = rewards(shifted(BASE, math=0.2, coding=0.2), length=16.0)
    decision = decide_promotion(long, CURRENT, 0.1, 1.0, REWARD)
    assert decision.verdict == "reject" and decision.length_ratio == pytest.approx(1.6)
    assert decision.reasons == ["response length: 1.6x the parent's (16 vs 10 tokens), over gate.max_length_ratio 1.5"]
    assert decision.metrics()["gate/length_ratio"] == pytest.approx(1.6)
    assert decide_promotion(long, CURRENT, 0.1, 1.0, REWARD.model_copy(update={"max_length_ratio": None})).promote
    assert decide_promotion(rewards(shifted(BASE, math=0.2), length=15.0), CURRENT, 0.1, 1.0, REWARD).promote
    # The guard is on but nothing measured the lengths: not evidence of anything, inconclusive.
    unmeasured = decide_promotion(rewards(BASE, length=None), CURRENT, 0.1, 1.0, REWARD)
    assert unmeasured.verdict == "inconclusive" and "response length: not measured" in unmeasured.reasons[0]
    assert length_ratio(rewards(BASE, length=3.0), rewards(BASE, length=0.0)) == math.inf


def test_missing_category_rejects_and_a_new_one_cannot_regress():
    decision = decide_promotion(rewards({"math": BASE["math"]}), CURRENT, 0.1, 1.0, REWARD)
    assert decision.verdict == "reject"
    assert decision.reasons[0] == "category 'coding': missing from the candidate's evaluation"
    extra = rewards({**BASE, "roleplay": [(0.0, 0.0)]})
    assert [c.unit for c in decide_promotion(extra, CURRENT, 0.1, 1.0, REWARD).checks] == ["coding", "math", "overall"]


def test_a_promotion_says_which_bound_was_worst_and_carries_its_numbers():
    decision = decide_promotion(rewards(shifted(BASE, math=0.05, coding=0.01)), CURRENT, 0.3, 1.0, REWARD)
    assert decision.promote and len(decision.reasons) == 1
    assert "worst lower 95% bound +0.01 (category 'coding', n=16, paired-t) >= -0.02" in decision.reasons[0]
    d = decision.to_dict()
    assert d["verdict"] == "promote" and [c["unit"] for c in d["checks"]] == ["coding", "math", "overall"]


def test_gate_and_cycle_config_bounds():
    assert GateConfig().min_decisive == 30 and GateConfig().confidence == 0.95 and GateConfig().max_length_ratio == 1.5
    for bad in ({"tolerance": -0.1}, {"confidence": 1.0}, {"min_decisive": 1}, {"max_length_ratio": 0.9}):
        with pytest.raises(ValidationError):
            GateConfig(**bad)
    with pytest.raises(ValidationError):
        OnlineConfig(prompts={"function": "m:f"}, judge={"kind": "rule", "rule": {"function": "m:f"}}, min_fresh_pairs=-1)
