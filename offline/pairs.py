"""The preference pair: the one record type every loader returns and every stage consumes.

A pair is (prompt, chosen, rejected) plus optional provenance and scores. Its `content_id` is a
hash of the three texts only, so the same pair always has the same id whichever file, cycle or
judge it came from, and a dataset's scores or labels never change it; `id` is the dataset's own
id when it had one, else the content id.
"""

from __future__ import annotations

import hashlib

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field


def content_hash(prompt: str, chosen: str, rejected: str) -> str:
    """Stable 32-hex-digit id of a pair's texts: sha256 of the compact JSON list [prompt, chosen,
    rejected] (raw UTF-8, JSON escapes only for quotes, backslashes and control characters), so
    field boundaries are unambiguous. pydantic-core's encoder produces exactly the bytes of
    `json.dumps(..., ensure_ascii=False, separators=(",", ":"))` at a fifth of the cost, which
    matters because the buffer hashes every pair it writes (tests/test_pairs.py checks the two
    agree on fuzzed text)."""
    blob = pydantic_core.to_json([prompt, chosen, rejected])
    return hashlib.sha256(blob).hexdigest()[:32]


class PreferencePair(BaseModel):
    """One preference judgment: `chosen` is preferred over `rejected` as a reply to `prompt`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(min_length=1)
    """The context both responses answer (already rendered to text, chat template applied)."""
    chosen: str = Field(min_length=1)
    """The preferred response (continuation of `prompt`)."""
    rejected: str = Field(min_length=1)
    """The dispreferred response (continuation of `prompt`)."""
    category: str | None = None
    """Optional task/topic label, used for per-category coverage and evaluation."""
    source_id: str | None = None
    """The dataset's own id for this record, when it had one."""
    score_chosen: float | None = Field(default=None, allow_inf_nan=False)
    """The dataset's score of `chosen` (e.g. UltraFeedback's rating), when it had one."""
    score_rejected: float | None = Field(default=None, allow_inf_nan=False)
    """The dataset's score of `rejected` (offline.data sets both scores or neither)."""
    margin: float | None = Field(default=None, allow_inf_nan=False)
    """The dataset's own preference margin column, when it had one."""

    @property
    def content_id(self) -> str:
        """Hash of (prompt, chosen, rejected): adding the same pair twice is a no-op anywhere."""
        return content_hash(self.prompt, self.chosen, self.rejected)

    @property
    def score_margin(self) -> float | None:
        """How much `chosen` is preferred: the dataset's `margin` when given, else
        score_chosen - score_rejected; None for a pair without scores."""
        if self.margin is not None:
            return self.margin
        if self.score_chosen is None or self.score_rejected is None:
            return None
        return self.score_chosen - self.score_rejected

    @property
    def id(self) -> str:
        """The dataset's id when given, else the content id."""
        return self.source_id or self.content_id


class FreshPair(BaseModel):
    """A pair an online cycle labelled, with where it came from: what the replay buffer stores
    beside the pair (the buffer and the cycle share this type, not each other's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pair: PreferencePair
    cycle: int = Field(ge=0)
    """The cycle that generated and labelled it."""
    policy_version: str = Field(min_length=1)
    """The checkpoint id whose samples these are (staleness, provenance)."""
    judge: str = Field(min_length=1)
    """Which judge decided (e.g. `rule:pkg.mod:fn`, `llm:model`)."""
    confidence: float = Field(ge=0.0, le=1.0)
    """How sure the judge was."""
