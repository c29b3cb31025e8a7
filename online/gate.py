"""The promotion gate: may a cycle's candidate policy replace the current one?

Contract: `decide_promotion(candidate, current, kl, kl_budget, cfg) -> GateDecision(promote,
reasons, per_category_delta)`, a pure function of two held-out evaluation summaries.

A candidate is promoted only if
1. its KL(policy || reference) is within the budget (`kl <= kl_budget`; NaN fails), and
2. no held-out category regresses by more than `tolerance`, nor the overall mean, on the
   configured metric:
   - `reward`: delta = candidate reward − current reward, per category (rule or reward-model
     score averaged over held-out prompts; held-out categories count like any other);
   - `win_rate`: delta = candidate's judged win rate against the current policy − 0.5 (a tie
     is 0.5, so a negative delta means the judge preferred the current policy); overall, and
     per category when the summary carries per-category win rates.
   A category the current policy was evaluated on but the candidate was not is a failure
   (an evaluation that silently lost a category must not pass).
A delta of exactly −tolerance passes ("beyond the tolerance" is strict). When rejected,
`reasons` names every failure (the KL and each regressing category); when promoted it holds one
line summarising why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from online.config import GateConfig

# Deltas are differences of floats: 0.50 - 0.52 is -0.020000000000000018, which must still
# count as "exactly at the tolerance".
_EPS = 1e-9


class EvalSummary(BaseModel):
    """A policy's held-out evaluation: per-category reward means and, optionally, win rates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_category: dict[str, float] = Field(default_factory=dict)
    """Mean reward per category over the held-out prompts."""
    mean: float
    """Mean reward over all held-out prompts."""
    win_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    """Judged win rate against the current policy (ties count 0.5), if judged."""
    per_category_win_rate: dict[str, float] = Field(default_factory=dict)
    """Judged win rate against the current policy, per category."""


@dataclass(frozen=True)
class GateDecision:
    """Promote or not, why, and each category's delta on the gate's metric."""

    promote: bool
    reasons: list[str]
    per_category_delta: dict[str, float] = field(default_factory=dict)


def decide_promotion(
    candidate: EvalSummary,
    current: EvalSummary,
    kl: float,
    kl_budget: float,
    cfg: GateConfig,
) -> GateDecision:
    """Promote only without regression beyond `cfg.tolerance` and with KL within budget."""
    failures: list[str] = []
    if math.isnan(kl):
        failures.append("kl: not measured (NaN)")
    elif kl > kl_budget:
        failures.append(f"kl: {kl:.4g} is over the budget {kl_budget:.4g}")

    deltas, overall, missing = _deltas(candidate, current, cfg.metric)
    failures += [f"category '{c}': missing from the candidate's evaluation" for c in missing]
    for category, delta in deltas.items():
        if delta < -cfg.tolerance - _EPS:
            failures.append(
                f"category '{category}': {cfg.metric} regressed by {-delta:.4g} "
                f"(tolerance {cfg.tolerance:.4g})"
            )
    if overall < -cfg.tolerance - _EPS:
        failures.append(f"overall: {cfg.metric} regressed by {-overall:.4g} (tolerance {cfg.tolerance:.4g})")

    if failures:
        return GateDecision(promote=False, reasons=failures, per_category_delta=deltas)
    worst = min(deltas.values(), default=overall)
    return GateDecision(
        promote=True,
        reasons=[
            f"kl {kl:.4g} within budget {kl_budget:.4g}; {len(deltas)} categories, worst "
            f"{cfg.metric} delta {worst:+.4g} (tolerance {cfg.tolerance:.4g})"
        ],
        per_category_delta=deltas,
    )


def _deltas(
    candidate: EvalSummary, current: EvalSummary, metric: str
) -> tuple[dict[str, float], float, list[str]]:
    """(per-category delta, overall delta, categories the candidate lacks), sorted by name."""
    if metric == "reward":
        missing = sorted(set(current.per_category) - set(candidate.per_category))
        deltas = {
            c: candidate.per_category[c] - current.per_category[c]
            for c in sorted(candidate.per_category)
            if c in current.per_category
        }
        return deltas, candidate.mean - current.mean, missing
    # win_rate: the candidate was judged against the current policy; 0.5 is parity.
    if candidate.win_rate is None:
        raise ValueError(
            "gate metric is win_rate but the candidate's evaluation has no win_rate: judge it first"
        )
    # Per-category win rates are optional; when given, none of the current's categories may be missing.
    missing = []
    if candidate.per_category_win_rate:
        missing = sorted(set(current.per_category) - set(candidate.per_category_win_rate))
    deltas = {c: w - 0.5 for c, w in sorted(candidate.per_category_win_rate.items())}
    return deltas, candidate.win_rate - 0.5, missing
