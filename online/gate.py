"""The promotion gate: may a cycle's candidate policy replace the current one, on the evidence?

Contract: `decide_promotion(candidate, current, kl, kl_budget, cfg) -> GateDecision(verdict,
promote, reasons, checks, length_ratio, per_category_delta)`, a pure function of two held-out
evaluation summaries (`EvalSummary`, which carry their counts and the per-prompt data).

Each compared unit (every category the current policy was evaluated on, and "overall") is
judged by a confidence bound, not a raw difference (`cfg.confidence`, default a two-sided 95%
interval, whose lower end the gate reads):
- `reward`: the mean paired difference candidate - current. The two evaluations sample the same
  held-out prompts with the same seed, so each prompt's mean reward difference is one unit (a
  prompt's samples share its difficulty: the prompts, not the samples, are the independent
  draws) and the t interval of their mean is used. When the two summaries do not share their
  prompts the evaluation is not paired and Welch's interval of the difference of means (over
  samples) is used instead. Passes when lower >= -tolerance.
- `win_rate`: the Wilson interval of the candidate's win rate against the current policy over
  the *decisive* judgments (wins / (wins + losses)). Passes when lower >= 0.5 - tolerance.
  Ties are left out: a tie is no evidence either way, and counting it as half a win would both
  pull the estimate to 0.5 and add to n, narrowing the interval around parity, so a judge that
  says "tie" to everything would certify parity with confidence. That is how a weak judge's
  exact 0.500 got a cycle promoted; here it leaves too few decisive judgments: inconclusive.

Verdicts:
- `reject`: a hard failure. KL over the budget (NaN: not measured); the candidate's mean
  response length over `max_length_ratio` x its parent's; a category of the current policy's
  missing from the candidate's evaluation; a unit with at least `min_decisive` units of evidence
  whose lower bound is under the threshold ("regressed" when the estimate itself is under it,
  "regression not ruled out" when only the bound is); or a unit whose *upper* bound is under
  the threshold, however little evidence (a regression shown is shown).
- `inconclusive`: no hard failure, but a unit has fewer than `min_decisive` decisive judgments
  (win_rate) or reward samples (reward), or the length guard is on and a length is missing.
  Not promoted; the reasons give the numbers.
- `promote`: neither. `promote` is `verdict == "promote"`.
Testing 7 units at 95% each makes the gate conservative (a fine candidate is rejected more
often than 5% of the time), never lenient. `reasons` names every failure and every shortfall;
when promoted it holds one line with the worst bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from online.config import GateConfig
from online.stats import MeanBound, clustered_stderr, mean_bound, sample_sd, welch_bound, wilson_interval

# Bounds are differences of floats: 0.50 - 0.52 is -0.020000000000000018, which must still
# count as "exactly at the tolerance".
_EPS = 1e-9

Verdict = Literal["promote", "reject", "inconclusive"]


class WinCounts(BaseModel):
    """The judge's outcomes for the candidate's samples against the current policy's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wins: int = Field(default=0, ge=0)
    losses: int = Field(default=0, ge=0)
    ties: int = Field(default=0, ge=0)
    """Both orders disagreed, the judge said tie, identical responses, or no usable verdict."""

    @property
    def decisive(self) -> int:
        return self.wins + self.losses

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    def __add__(self, other: WinCounts) -> WinCounts:
        return WinCounts(wins=self.wins + other.wins, losses=self.losses + other.losses, ties=self.ties + other.ties)


class PromptRewards(BaseModel):
    """One held-out prompt's sample rewards: what pairs two policies' evaluations."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    """A stable id of the prompt text (the same prompt has the same key in both evaluations)."""
    category: str
    rewards: tuple[float, ...] = Field(min_length=1)


class EvalSummary(BaseModel):
    """A policy's held-out evaluation: per-category means and the counts a confidence bound needs.

    reward metric: `per_category`/`mean` are mean rewards over `n` samples, with `per_category_n`,
    `per_category_std` and `std`, and each prompt's rewards in `prompt_rewards` (for pairing).
    win_rate metric: `win_rate`/`per_category_win_rate` count ties half (the readable figure);
    the gate uses `counts`/`per_category_counts` (wins, losses, ties). `mean_response_length`
    (tokens) feeds the length guard.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_category: dict[str, float] = Field(default_factory=dict)
    """Mean reward (win_rate metric: win rate) per category over the held-out prompts."""
    mean: float
    """Mean reward (win rate) over all held-out samples."""
    win_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    """Judged win rate against the current policy (ties count 0.5), if judged."""
    per_category_win_rate: dict[str, float] = Field(default_factory=dict)
    """Judged win rate against the current policy, per category."""
    n: int = Field(default=0, ge=0)
    """Samples scored (reward) or comparisons judged (win_rate)."""
    per_category_n: dict[str, int] = Field(default_factory=dict)
    """Samples scored / comparisons judged per category."""
    std: float | None = None
    """Sample standard deviation of the rewards (reward metric)."""
    per_category_std: dict[str, float] = Field(default_factory=dict)
    """Sample standard deviation of the rewards per category (reward metric)."""
    prompt_rewards: list[PromptRewards] = Field(default_factory=list)
    """Each held-out prompt's sample rewards (reward metric), for the paired comparison."""
    counts: WinCounts | None = None
    """Wins, losses and ties against the current policy (win_rate metric)."""
    per_category_counts: dict[str, WinCounts] = Field(default_factory=dict)
    """Wins, losses and ties per category (win_rate metric)."""
    mean_response_length: float | None = Field(default=None, ge=0.0)
    """Mean length of the evaluation samples, in tokens of the policy's tokenizer."""

    @classmethod
    def from_rewards(cls, prompts: Iterable[PromptRewards], mean_response_length: float | None = None) -> EvalSummary:
        """Means, counts and standard deviations from each prompt's rewards."""
        rows = list(prompts)
        per: dict[str, list[float]] = {}
        for row in rows:
            per.setdefault(row.category, []).extend(row.rewards)
        every = [r for v in per.values() for r in v]
        return cls(
            per_category={c: _mean(v) for c, v in sorted(per.items())}, mean=_mean(every) if every else 0.0,
            n=len(every), per_category_n={c: len(v) for c, v in sorted(per.items())},
            std=sample_sd(every), per_category_std={c: sample_sd(v) for c, v in sorted(per.items())},
            prompt_rewards=rows, mean_response_length=mean_response_length,
        )

    @classmethod
    def from_counts(cls, per_category: dict[str, WinCounts], mean_response_length: float | None = None) -> EvalSummary:
        """Win rates (ties half) and counts from the judge's outcomes per category."""
        total = sum(per_category.values(), WinCounts())
        rates = {c: _tie_half(w) for c, w in sorted(per_category.items())}
        overall = _tie_half(total)
        return cls(
            per_category=rates, mean=overall, win_rate=overall, per_category_win_rate=rates, n=total.n,
            per_category_n={c: w.n for c, w in sorted(per_category.items())},
            counts=total, per_category_counts=dict(sorted(per_category.items())),
            mean_response_length=mean_response_length,
        )


    def stderr(self) -> dict[str, float]:
        """Standard error of each category's score and of the overall `mean` (key "mean").

        Rewards: clustered by prompt (`online.stats.clustered_stderr`: a prompt's samples are one
        draw). Win rates: s/sqrt(n) of the comparisons scored 1 / 0.5 / 0 (win / tie / loss),
        as the win rate counts them. NaN where the summary carries neither (e.g. an old one read
        back from lineage) or a unit has fewer than two comparisons.
        """
        if self.prompt_rewards:
            per: dict[str, list[tuple[float, ...]]] = {}
            for row in self.prompt_rewards:
                per.setdefault(row.category, []).append(row.rewards)
            out = {c: clustered_stderr(g) for c, g in sorted(per.items())}
            return {**out, "mean": clustered_stderr([r.rewards for r in self.prompt_rewards])}
        if self.per_category_counts and self.counts is not None:
            def scored(w: WinCounts) -> float:
                p = _tie_half(w)
                spread = w.wins * (1 - p) ** 2 + w.ties * (0.5 - p) ** 2 + w.losses * p**2
                return math.sqrt(spread / (w.n - 1) / w.n) if w.n > 1 else math.nan

            out = {c: scored(w) for c, w in self.per_category_counts.items()}
            return {**out, "mean": scored(self.counts)}
        return {**{c: math.nan for c in self.per_category}, "mean": math.nan}


@dataclass(frozen=True)
class GateCheck:
    """One compared unit (a category, or "overall"): its evidence, bound and outcome."""

    unit: str
    n: int
    """Decisive judgments (win_rate) or the candidate's reward samples (reward)."""
    estimate: float
    """Decisive win rate (win_rate) or mean difference candidate - current (reward)."""
    lower: float
    upper: float
    threshold: float
    """The lower bound must be >= this: 0.5 - tolerance (win_rate) or -tolerance (reward)."""
    method: str
    """"wilson", "paired-t" (units: prompts) or "welch-t"."""
    status: Literal["pass", "fail", "insufficient"]
    ties: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (infinite bounds become None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class GateDecision:
    """The verdict, why, and the evidence behind it."""

    verdict: Verdict
    reasons: list[str]
    checks: list[GateCheck] = field(default_factory=list)
    length_ratio: float | None = None
    confidence: float = 0.95
    per_category_delta: dict[str, float] = field(default_factory=dict)
    """Each category's estimate minus parity (reward: the mean difference; win_rate: decisive win rate - 0.5)."""

    @property
    def promote(self) -> bool:
        return self.verdict == "promote"

    def metrics(self) -> dict[str, float]:
        """Namespaced numbers for the cycle report and lineage (`gate/...`)."""
        overall = next((c for c in self.checks if c.unit == "overall"), None)
        cats = [c for c in self.checks if c.unit != "overall"]
        out: dict[str, float] = {"gate/promote": float(self.promote), "gate/confidence": self.confidence}
        if overall is not None:
            out |= {"gate/n": float(overall.n), "gate/estimate": overall.estimate, "gate/lower_bound": overall.lower,
                    "gate/threshold": overall.threshold, "gate/ties": float(overall.ties)}
        if cats:
            worst = min(cats, key=lambda c: c.lower - c.threshold)
            out |= {"gate/min_category_n": float(min(c.n for c in cats)),
                    "gate/worst_category_lower_bound": worst.lower}
        if self.length_ratio is not None:
            out["gate/length_ratio"] = self.length_ratio
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def to_dict(self) -> dict[str, Any]:
        """The decision as lineage and the cycle history store it."""
        return {"verdict": self.verdict, "promote": self.promote, "reasons": self.reasons,
                "confidence": self.confidence, "length_ratio": self.length_ratio,
                "checks": [c.to_dict() for c in self.checks]}


def decide_promotion(
    candidate: EvalSummary,
    current: EvalSummary,
    kl: float,
    kl_budget: float,
    cfg: GateConfig,
) -> GateDecision:
    """Promote only on evidence: KL within budget, length in bounds, no unit's bound under its threshold."""
    failures: list[str] = []
    shortfalls: list[str] = []
    if math.isnan(kl):
        failures.append("kl: not measured (NaN)")
    elif kl > kl_budget:
        failures.append(f"kl: {kl:.4g} is over the budget {kl_budget:.4g}")

    ratio = length_ratio(candidate, current)
    if cfg.max_length_ratio is not None:
        if ratio is None:
            shortfalls.append("response length: not measured for both policies (gate.max_length_ratio is set)")
        elif ratio > cfg.max_length_ratio:
            failures.append(f"response length: {ratio:.3g}x the parent's "
                            f"({candidate.mean_response_length:.4g} vs {current.mean_response_length:.4g} tokens), "
                            f"over gate.max_length_ratio {cfg.max_length_ratio:g}")

    checks, missing = _checks(candidate, current, cfg)
    failures += [f"category '{c}': missing from the candidate's evaluation" for c in missing]
    for c in checks:
        if c.status == "fail":
            failures.append(_fail_reason(c, cfg))
        elif c.status == "insufficient":
            what = "decisive judgments" if c.method == "wilson" else "reward samples"
            shortfalls.append(f"{_name(c.unit)}: {c.n} {what} < gate.min_decisive {cfg.min_decisive}"
                              + (f" ({c.ties} ties)" if c.method == "wilson" else ""))

    deltas = {c.unit: c.estimate - (0.5 if c.method == "wilson" else 0.0) for c in checks if c.unit != "overall"}
    common = {"checks": checks, "length_ratio": ratio, "confidence": cfg.confidence, "per_category_delta": deltas}
    if failures:
        return GateDecision("reject", failures + [f"also inconclusive: {s}" for s in shortfalls], **common)
    if shortfalls:
        return GateDecision("inconclusive", [f"inconclusive, not promoted: {s}" for s in shortfalls], **common)
    worst = min(checks, key=lambda c: c.lower - c.threshold)
    pct = f"{100 * cfg.confidence:g}%"
    return GateDecision("promote", [
        f"kl {kl:.4g} within budget {kl_budget:.4g}; {len(checks)} units, worst lower {pct} bound "
        f"{worst.lower:+.4g} ({_name(worst.unit)}, n={worst.n}, {worst.method}) >= {worst.threshold:+.4g}"
        + (f"; length ratio {ratio:.3g}" if ratio is not None else "")
    ], **common)


def length_ratio(candidate: EvalSummary, current: EvalSummary) -> float | None:
    """Candidate's mean response length over the parent's (None: either not measured)."""
    a, b = candidate.mean_response_length, current.mean_response_length
    if a is None or b is None:
        return None
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def _checks(candidate: EvalSummary, current: EvalSummary, cfg: GateConfig) -> tuple[list[GateCheck], list[str]]:
    """(one check per category both evaluated, then "overall"; categories the candidate lacks)."""
    if cfg.metric == "win_rate":
        if candidate.counts is None:
            raise ValueError("gate metric is win_rate but the candidate's evaluation has no judged counts: judge it first")
        missing = sorted(set(current.per_category) - set(candidate.per_category_counts))
        units = [*sorted(candidate.per_category_counts.items()), ("overall", candidate.counts)]
        return [_wilson_check(u, w, cfg) for u, w in units], missing
    missing = sorted(set(current.per_category) - set(candidate.per_category))
    cats = [c for c in sorted(candidate.per_category) if c in current.per_category]
    checks = [_reward_check(c, candidate, current, cfg) for c in cats]
    return checks + [_reward_check(None, candidate, current, cfg)], missing


def _wilson_check(unit: str, w: WinCounts, cfg: GateConfig) -> GateCheck:
    lower, upper = wilson_interval(w.wins, w.decisive, cfg.confidence)
    estimate = w.wins / w.decisive if w.decisive else math.nan
    return GateCheck(unit, w.decisive, estimate, lower, upper, 0.5 - cfg.tolerance, "wilson",
                     _status(w.decisive, lower, upper, 0.5 - cfg.tolerance, cfg), ties=w.ties)


def _reward_check(category: str | None, candidate: EvalSummary, current: EvalSummary, cfg: GateConfig) -> GateCheck:
    """Paired t on per-prompt mean differences when both evaluated the same prompts, else Welch."""
    def rows(s: EvalSummary) -> dict[str, PromptRewards]:
        return {p.key: p for p in s.prompt_rewards if category is None or p.category == category}

    cand, cur = rows(candidate), rows(current)
    if cand and cand.keys() == cur.keys():
        diffs = [_mean(cand[k].rewards) - _mean(cur[k].rewards) for k in sorted(cand)]
        bound, method = mean_bound(diffs, cfg.confidence), "paired-t"
        n = min(sum(len(p.rewards) for p in cand.values()), sum(len(p.rewards) for p in cur.values()))
    else:
        bound, method = _welch(category, candidate, current, cfg.confidence), "welch-t"
        n = bound.n
    threshold = -cfg.tolerance
    return GateCheck(category or "overall", n, bound.estimate, bound.lower, bound.upper, threshold, method,
                     _status(n, bound.lower, bound.upper, threshold, cfg))


def _welch(category: str | None, candidate: EvalSummary, current: EvalSummary, confidence: float) -> MeanBound:
    def stats(s: EvalSummary) -> tuple[float, float, int]:
        if category is None:
            return s.mean, s.std if s.std is not None else math.nan, s.n
        return s.per_category[category], s.per_category_std.get(category, math.nan), s.per_category_n.get(category, 0)

    (ma, sa, na), (mb, sb, nb) = stats(candidate), stats(current)
    if math.isnan(sa) or math.isnan(sb):  # no spread recorded: no interval, only the counts
        return MeanBound(0, ma - mb, math.inf, 0.0, -math.inf, math.inf)
    return welch_bound(ma, sa, na, mb, sb, nb, confidence)


def _status(n: int, lower: float, upper: float, threshold: float, cfg: GateConfig) -> Literal["pass", "fail", "insufficient"]:
    if upper < threshold - _EPS:
        return "fail"  # worse beyond the tolerance even at the interval's best: shown on any evidence
    if n < cfg.min_decisive:
        return "insufficient"
    return "pass" if lower >= threshold - _EPS else "fail"


def _fail_reason(c: GateCheck, cfg: GateConfig) -> str:
    pct = f"{100 * cfg.confidence:g}%"
    if c.method == "wilson":
        evidence = f"win rate {c.estimate:.3f} over {c.n} decisive judgments ({c.ties} ties)"
    else:
        evidence = f"reward difference {c.estimate:+.4g} ({c.method}, {c.n} samples)"
    what = "regressed" if c.estimate < c.threshold - _EPS else "regression beyond the tolerance not ruled out"
    return (f"{_name(c.unit)}: {cfg.metric} {what}: {evidence}, lower {pct} bound {c.lower:.4g} < "
            f"{c.threshold:.4g} (tolerance {cfg.tolerance:.4g})")


def _name(unit: str) -> str:
    return "overall" if unit == "overall" else f"category '{unit}'"


def _mean(values: Iterable[float]) -> float:
    v = list(values)
    return sum(v) / len(v)


def _tie_half(w: WinCounts) -> float:
    return (w.wins + 0.5 * w.ties) / w.n if w.n else 0.5
