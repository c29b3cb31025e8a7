"""What a loaded preference dataset covers, and what the trainer will cut: the coverage report.

Contract: `coverage_report(dataset, tokenizer, max_length, max_prompt_length)` returns a frozen,
JSON-serialisable `CoverageReport`: pair counts per split and per category, what was dropped at
load (duplicates, identical chosen/rejected, skipped records per reason, pairs below
`data.min_score_margin`), token-length
percentiles of prompts and responses, and how many pairs the shared truncation rule
(`offline.tokenize.kept_lengths`) would cut at the given limits. `.to_markdown()` renders it for
humans (a Prefect artifact). Pure apart from running the tokenizer. `coverage_of(tokenized)` is
the same report of an `offline.tokenized.TokenizedDataset`, from the raw lengths its store
keeps (no tokenizer call: the offline flow tokenises once, cached, and reports from that).

Token lengths are raw counts of each text (no special tokens, no EOS, before truncation), with
prompt and responses tokenised separately exactly as `offline.tokenize.tokenize_pairs` does.
Percentiles are numpy's default (linear interpolation). Pairs without a category are counted
under `UNCATEGORISED`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from offline.data import PreferenceDataset
from offline.tokenize import BATCH_PAIRS, kept_lengths, token_lengths

if TYPE_CHECKING:
    from offline.tokenized import TokenizedDataset

UNCATEGORISED = "(none)"


class LengthStats(BaseModel):
    """Token-length distribution of one kind of text over every pair."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    p50: float
    """Median length in tokens."""
    p90: float
    """90th percentile in tokens."""
    p99: float
    """99th percentile in tokens."""
    max: int
    """Longest text in tokens."""
    mean: float
    """Mean length in tokens."""


class CategoryCount(BaseModel):
    """Pairs of one category on each side of the split."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    category: str
    """The category label (UNCATEGORISED for pairs without one)."""
    train: int
    """Pairs in the training split."""
    heldout: int
    """Pairs in the held-out split."""


class CoverageReport(BaseModel):
    """Counts, length percentiles and truncation of one dataset at one length budget."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    """Where the data came from (path as given or hub id)."""
    format: str
    """Resolved record shape (offline.formats.Format)."""
    fingerprint: str
    """The dataset's fingerprint (as in lineage records)."""
    n_train: int
    """Pairs in the training split."""
    n_heldout: int
    """Pairs in the held-out split."""
    duplicates: int
    """Records dropped at load because the same pair (content id) was already loaded."""
    identical_responses: int
    """Records skipped because chosen == rejected (or they differ only in whitespace)."""
    min_score_margin: float | None = None
    """The configured data.min_score_margin (None: no score filter)."""
    below_min_score_margin: int = 0
    """Valid pairs dropped because their score margin was below min_score_margin."""
    scored_pairs: int = 0
    """Loaded pairs that carry a score margin (score_chosen/score_rejected or margin)."""
    skipped: dict[str, int]
    """Records skipped at load, per reason (identical_responses included)."""
    categories: list[CategoryCount]
    """Pairs per category and split, most frequent first."""
    tokenizer: str
    """Name of the tokenizer that counted the tokens."""
    prompt_tokens: LengthStats
    """Prompt lengths."""
    chosen_tokens: LengthStats
    """Chosen-response lengths."""
    rejected_tokens: LengthStats
    """Rejected-response lengths."""
    max_length: int
    """Token budget of prompt + response + EOS the truncation figures refer to."""
    max_prompt_length: int
    """Prompt budget the truncation figures refer to."""
    truncated_pairs: int
    """Pairs the truncation rule cuts anywhere (prompt, chosen or rejected)."""
    truncation_rate: float
    """truncated_pairs / pairs."""
    prompt_truncated: int
    """Pairs whose prompt loses its first tokens."""
    response_truncated: int
    """Pairs whose chosen or rejected response (with EOS) loses its last tokens."""

    @property
    def n_pairs(self) -> int:
        """Pairs loaded (train + held-out)."""
        return self.n_train + self.n_heldout

    @property
    def n_skipped(self) -> int:
        """Records skipped at load, all reasons."""
        return sum(self.skipped.values())

    def to_markdown(self) -> str:
        """A readable report with tables (used as a Prefect markdown artifact)."""
        n = self.n_pairs

        def share(count: int) -> str:
            return f"{count:,} ({count / n:.1%})" if n else f"{count:,}"

        lines = [
            f"# Dataset coverage: `{_cell(self.source)}`",
            "",
            "| | |",
            "|---|---|",
            f"| format | {self.format} |",
            f"| fingerprint | `{self.fingerprint}` |",
            f"| pairs | {n:,} (train {self.n_train:,}, held-out {self.n_heldout:,}) |",
            f"| duplicates dropped | {self.duplicates:,} |",
            f"| identical chosen/rejected skipped | {self.identical_responses:,} |",
            f"| pairs with scores | {share(self.scored_pairs)} |",
            "| below min_score_margin dropped | "
            + (
                "off |" if self.min_score_margin is None
                else f"{self.below_min_score_margin:,} (margin < {self.min_score_margin:g}) |"
            ),
            f"| records skipped (all reasons) | {self.n_skipped:,} |",
            f"| truncated pairs | {share(self.truncated_pairs)} |",
            "",
            f"## Token lengths (`{_cell(self.tokenizer)}`, no special tokens, before truncation)",
            "",
            "| text | p50 | p90 | p99 | max | mean |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, s in (
            ("prompt", self.prompt_tokens),
            ("chosen", self.chosen_tokens),
            ("rejected", self.rejected_tokens),
        ):
            lines.append(
                f"| {name} | {s.p50:.1f} | {s.p90:.1f} | {s.p99:.1f} | {s.max:,} | {s.mean:.1f} |"
            )
        lines += [
            "",
            f"## Truncation at max_length {self.max_length}, "
            f"max_prompt_length {self.max_prompt_length}",
            "",
            "| cut | pairs |",
            "|---|---:|",
            f"| prompt (keeps its last {self.max_prompt_length} tokens) | "
            f"{share(self.prompt_truncated)} |",
            f"| response (chosen or rejected, EOS included) | {share(self.response_truncated)} |",
            f"| any | {share(self.truncated_pairs)} |",
            "",
            "## Categories",
            "",
            "| category | train | held-out | total |",
            "|---|---:|---:|---:|",
        ]
        for c in self.categories:
            lines.append(
                f"| {_cell(c.category)} | {c.train:,} | {c.heldout:,} | {c.train + c.heldout:,} |"
            )
        lines += ["", "## Skipped records", ""]
        if self.skipped:
            lines += ["| reason | records |", "|---|---:|"]
            lines += [f"| {reason} | {count:,} |" for reason, count in self.skipped.items()]
        else:
            lines.append("None.")
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell or inline code."""
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _length_stats(lengths: np.ndarray) -> LengthStats:
    a = np.asarray(lengths, dtype=np.float64)  # (N,)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return LengthStats(
        p50=float(p50), p90=float(p90), p99=float(p99), max=int(a.max()), mean=float(a.mean())
    )


def coverage_report(
    dataset: PreferenceDataset, tokenizer: Any, max_length: int, max_prompt_length: int
) -> CoverageReport:
    """Count, measure and truncation-check every pair of `dataset` with `tokenizer`."""
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})"
        )
    pairs = dataset.pairs
    # Only lengths matter, so a tokenizer without EOS still works.
    raw = np.zeros((len(pairs), 3), dtype=np.int64)  # (N, 3) prompt, chosen, rejected
    for start in range(0, len(pairs), BATCH_PAIRS):
        batch = pairs[start : start + BATCH_PAIRS]
        _, lengths = token_lengths(tokenizer, [t for p in batch for t in (p.prompt, p.chosen, p.rejected)])
        raw[start : start + len(batch)] = lengths.reshape(-1, 3)
    sides = [(p.category, 0) for p in dataset.train] + [(p.category, 1) for p in dataset.heldout]
    return _report(
        raw, sides, max_length, max_prompt_length,
        source=dataset.source, format=dataset.format, fingerprint=dataset.fingerprint,
        duplicates=dataset.duplicates, skipped=dict(dataset.skipped),
        tokenizer=getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        min_score_margin=dataset.min_score_margin,
        below_min_score_margin=dataset.below_min_score_margin,
        scored_pairs=sum(p.score_margin is not None for p in pairs),
    )


def coverage_of(dataset: TokenizedDataset) -> CoverageReport:
    """The same report for a tokenised dataset, from the raw lengths its store keeps: no texts
    and no tokenizer call (equal to `coverage_report` on the same data, tested)."""
    pairs = dataset.pairs
    raw = np.asarray(pairs.store.raw_lengths, dtype=np.int64)[pairs.rows]  # (N, 3), train first
    sides = list(zip(pairs.categories(), [0] * len(dataset.train) + [1] * len(dataset.heldout)))
    return _report(
        raw, sides, dataset.max_length, dataset.max_prompt_length,
        source=dataset.source, format=dataset.format, fingerprint=dataset.fingerprint,
        duplicates=dataset.duplicates, skipped=dict(dataset.skipped), tokenizer=dataset.tokenizer,
        min_score_margin=dataset.min_score_margin, below_min_score_margin=dataset.below_min_score_margin,
        scored_pairs=dataset.scored_pairs,
    )


def _report(
    raw: np.ndarray, sides: list[tuple[str | None, int]], max_length: int, max_prompt_length: int,
    *, source: str, format: str, fingerprint: str, duplicates: int, skipped: dict[str, int], tokenizer: str,
    min_score_margin: float | None, below_min_score_margin: int, scored_pairs: int,
) -> CoverageReport:
    """The report from raw token lengths `(N, 3)` (train first) and each pair's (category, side)."""
    p_len, c_len, r_len = raw[:, 0], raw[:, 1], raw[:, 2]
    kept = kept_lengths(p_len, c_len, r_len, max_length, max_prompt_length)
    per_category: dict[str, list[int]] = {}
    for category, side in sides:
        per_category.setdefault(category or UNCATEGORISED, [0, 0])[side] += 1
    categories = [
        CategoryCount(category=name, train=train, heldout=heldout)
        for name, (train, heldout) in sorted(
            per_category.items(), key=lambda kv: (-sum(kv[1]), kv[0])
        )
    ]
    n_train = sum(side == 0 for _, side in sides)
    truncated = int(np.count_nonzero(kept.truncated))
    return CoverageReport(
        source=source,
        format=format,
        fingerprint=fingerprint,
        n_train=n_train,
        n_heldout=len(sides) - n_train,
        duplicates=duplicates,
        identical_responses=skipped.get("identical_responses", 0),
        min_score_margin=min_score_margin,
        below_min_score_margin=below_min_score_margin,
        scored_pairs=scored_pairs,
        skipped=skipped,
        categories=categories,
        tokenizer=tokenizer,
        prompt_tokens=_length_stats(p_len),
        chosen_tokens=_length_stats(c_len),
        rejected_tokens=_length_stats(r_len),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncated_pairs=truncated,
        truncation_rate=truncated / len(sides) if sides else 0.0,
        prompt_truncated=int(np.count_nonzero(kept.prompt_cut)),
        response_truncated=int(np.count_nonzero(kept.response_cut)),
    )
