"""Cost accounting and the per-cycle budget of a judging pass.

Contract:
- Cost of a call = prompt_tokens * price_prompt / 1e6 + completion_tokens * price_completion /
  1e6 (prices in USD per 1M tokens, tokens from the API's `usage`); reported per pass as
  `JudgeStats.cost_usd` and as USD per 1,000 emitted judgments.
- `Budget(max_calls, max_cost_usd)`: a pass may send at most `max_calls` requests (retries
  count: each is a request the provider meters) and starts no request once the cost already
  spent reaches `max_cost_usd`. The budget is checked when a request is about to start, so
  in-flight requests always finish; the cost gate can therefore overshoot by the cost of the
  requests in flight at that moment (at most `concurrency` calls). Once a reservation is
  refused the meter stays exhausted for the rest of the pass: judging stops cleanly instead of
  trickling on. Work that needs no request (cache hits) is never refused.
- `CostMeter` is the mutable counter a pass fills in and `snapshot()`s into a frozen
  `JudgeStats`. It is used from one asyncio event loop, where every mutation runs between two
  awaits, so it needs no lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from online.types import JudgeStats


def call_cost_usd(
    prompt_tokens: int,
    completion_tokens: int,
    price_prompt_per_mtok: float,
    price_completion_per_mtok: float,
) -> float:
    """USD cost of one call from its token counts and per-1M-token prices."""
    return (prompt_tokens * price_prompt_per_mtok + completion_tokens * price_completion_per_mtok) / 1e6


@dataclass(frozen=True)
class Budget:
    """Per-pass spending limits; None means unlimited."""

    max_calls: int | None = None
    max_cost_usd: float | None = None


class CostMeter:
    """Counters of one judging pass plus the budget gate (see module docstring)."""

    def __init__(
        self,
        budget: Budget = Budget(),
        price_prompt_per_mtok: float = 0.0,
        price_completion_per_mtok: float = 0.0,
    ) -> None:
        self.budget = budget
        self.price_prompt_per_mtok = price_prompt_per_mtok
        self.price_completion_per_mtok = price_completion_per_mtok
        self.reserved = 0  # requests promised by `reserve` (>= requests sent)
        self.calls = 0
        self.retries = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd = 0.0
        self.cache_hits = 0
        self.judgments = 0
        self.ties = 0
        self.unparseable = 0
        self.errors = 0
        self.position_conflicts = 0  # part of `ties`
        self.neutralised = 0  # samples, not pairs
        self.budget_exhausted = False

    def reserve(self, n: int) -> bool:
        """Promise `n` more requests if the budget allows; False (and exhausted for good) if not."""
        if n == 0:
            return True
        if self.budget_exhausted:
            return False
        b = self.budget
        over_calls = b.max_calls is not None and self.reserved + n > b.max_calls
        over_cost = b.max_cost_usd is not None and self.cost_usd >= b.max_cost_usd
        if over_calls or over_cost:
            self.budget_exhausted = True
            return False
        self.reserved += n
        return True

    def record_request(self, *, retry: bool) -> None:
        """Count a request as sent (call before sending, so failures are counted too)."""
        self.calls += 1
        self.retries += int(retry)

    def record_usage(self, usage: Mapping[str, Any] | None) -> None:
        """Add a response's `usage` (missing or malformed fields count as 0) and its cost."""
        usage = usage or {}
        p, c = _as_count(usage.get("prompt_tokens")), _as_count(usage.get("completion_tokens"))
        self.prompt_tokens += p
        self.completion_tokens += c
        self.cost_usd += call_cost_usd(p, c, self.price_prompt_per_mtok, self.price_completion_per_mtok)

    def snapshot(self) -> JudgeStats:
        """Frozen copy of the counters."""
        return JudgeStats(
            calls=self.calls,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_usd=self.cost_usd,
            judgments=self.judgments,
            ties=self.ties,
            unparseable=self.unparseable,
            errors=self.errors,
            retries=self.retries,
            cache_hits=self.cache_hits,
            budget_exhausted=self.budget_exhausted,
            position_conflicts=self.position_conflicts,
            neutralised=self.neutralised,
        )


def _as_count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
