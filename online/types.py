"""The records on the generator -> judge -> buffer arrows of the online loop.

- `Generation`: k sampled responses of one policy version to one prompt (generator -> judge).
- `Judgment`: one labelled pair the judge stands behind, with its confidence (judge -> buffer);
  `.to_pair()` turns it into the `PreferencePair` every trainer consumes.
- `JudgeStats`: what one judging pass cost and how its pairs came out (judge -> controller/UI).

All three are frozen pydantic models: they cross process boundaries as JSON (Redis, flow
artifacts) and must not change after they are made.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from offline.pairs import PreferencePair


class Generation(BaseModel):
    """k samples of one policy version for one prompt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(min_length=1)
    """The context the responses answer (already rendered to text, chat template applied)."""
    category: str | None = None
    """Optional task/topic label, carried through to the pair."""
    responses: tuple[str, ...] = Field(min_length=1)
    """The k sampled continuations of `prompt` (duplicates and empty ones are allowed here)."""
    policy_version: str = Field(min_length=1)
    """Which checkpoint produced the samples (its id or tag), for provenance and staleness."""


class Judgment(BaseModel):
    """One preference the judge emits: `chosen` beat `rejected` as a reply to `prompt`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(min_length=1)
    """The context both responses answer."""
    category: str | None = None
    """Task/topic label copied from the generation."""
    chosen: str = Field(min_length=1)
    """The preferred response."""
    rejected: str = Field(min_length=1)
    """The dispreferred response."""
    judge: str = Field(min_length=1)
    """Name of the judge that decided (e.g. `llm:gpt-4o-mini`, `rule:pkg.mod:fn`)."""
    confidence: float = Field(ge=0.0, le=1.0)
    """How sure the judge is, in [0, 1]; each judge kind documents how it derives it."""
    details: dict[str, Any] = Field(default_factory=dict)
    """Judge-specific evidence: per-order verdicts, scores, margin, policy_version (JSON-able)."""

    def to_pair(self) -> PreferencePair:
        """The preference pair this judgment labels (provenance beyond category is dropped)."""
        return PreferencePair(
            prompt=self.prompt, chosen=self.chosen, rejected=self.rejected, category=self.category
        )


class JudgeStats(BaseModel):
    """Counters of one judging pass.

    Pair outcomes (`judgments`, `ties`, `unparseable`, `errors`) each count pairs, so their sum is
    the number of pairs decided or given up on (`asked`; `dropped` of them became no label);
    pairs never started because the budget ran out are in none of them (`budget_exhausted`
    says that happened). `position_conflicts` is the part of `ties` where both orders named the
    same letter (position bias). `neutralised` counts samples, not pairs: responses that carried
    the judge template's delimiters (escaped before judging) or were only a "master key"
    (labelled the loser without asking; see `online.judge`). `calls` counts HTTP requests
    sent, retries included (`retries` of them were re-sends); `cache_hits` counts verdicts
    served from the cache without a request. Local judges (reward model, rule) make no calls.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    calls: int = Field(default=0, ge=0)
    """HTTP requests sent to the judge API (retries included)."""
    prompt_tokens: int = Field(default=0, ge=0)
    """Prompt tokens billed, summed from each response's `usage`."""
    completion_tokens: int = Field(default=0, ge=0)
    """Completion tokens billed, summed from each response's `usage`."""
    cost_usd: float = Field(default=0.0, ge=0.0)
    """Tokens priced at the configured USD per 1M prompt / completion tokens."""
    judgments: int = Field(default=0, ge=0)
    """Pairs labelled (emitted as `Judgment`s)."""
    ties: int = Field(default=0, ge=0)
    """Pairs dropped as a tie: the judge said tie, the two orders disagreed, or margin too small."""
    unparseable: int = Field(default=0, ge=0)
    """Pairs dropped because a verdict could not be parsed."""
    errors: int = Field(default=0, ge=0)
    """Pairs dropped because a request failed for good (retries exhausted or HTTP 400)."""
    retries: int = Field(default=0, ge=0)
    """Requests that were re-sends after a 429/5xx/timeout/connection error."""
    cache_hits: int = Field(default=0, ge=0)
    """Verdicts taken from the cache instead of a request."""
    budget_exhausted: bool = False
    """True when the per-cycle budget (max_calls / max_cost_usd) stopped judging early."""
    position_conflicts: int = Field(default=0, ge=0)
    """Ties where both orders named the same letter ("A" both times): position bias, not a verdict."""
    neutralised: int = Field(default=0, ge=0)
    """Samples whose text carried template delimiters (escaped) or was only a master key (LLM judge)."""

    @property
    def asked(self) -> int:
        """Pairs judged or given up on (the budget's unstarted pairs excluded)."""
        return self.judgments + self.ties + self.unparseable + self.errors

    @property
    def dropped(self) -> int:
        """Pairs asked that became no label (ties, unparseable, failed)."""
        return self.asked - self.judgments

    @property
    def cost_per_1k_judgments(self) -> float | None:
        """USD per 1,000 emitted judgments; None when nothing was emitted (undefined)."""
        if self.judgments == 0:
            return None
        return 1000.0 * self.cost_usd / self.judgments

    def metrics(self) -> dict[str, float]:
        """Namespaced metric dict (`judge/...`) for logs and the controller.

        `judge/agreement` is the fraction of pairs with usable verdicts that became labels
        (judgments / (judgments + ties)); 0.0 when there were none.
        """
        decided = self.judgments + self.ties
        out = {
            "judge/asked": float(self.asked),
            "judge/calls": float(self.calls),
            "judge/judgments": float(self.judgments),
            "judge/ties": float(self.ties),
            "judge/position_conflicts": float(self.position_conflicts),
            "judge/dropped": float(self.dropped),
            "judge/neutralised": float(self.neutralised),
            "judge/unparseable": float(self.unparseable),
            "judge/errors": float(self.errors),
            "judge/retries": float(self.retries),
            "judge/cache_hits": float(self.cache_hits),
            "judge/prompt_tokens": float(self.prompt_tokens),
            "judge/completion_tokens": float(self.completion_tokens),
            "judge/cost_usd": self.cost_usd,
            "judge/agreement": self.judgments / decided if decided else 0.0,
            "judge/budget_exhausted": float(self.budget_exhausted),
        }
        if self.cost_per_1k_judgments is not None:
            out["judge/cost_per_1k_judgments"] = self.cost_per_1k_judgments
        return out
