"""Judge audit: does the configured judge agree with the static dataset's human labels?

A judge that cannot tell the better reply (a small model answering "A" whatever it is shown)
labels nothing, or labels noise, and a cycle trained on it still reports figures. The audit asks
the judge about `judge.audit.pairs` held-out pairs of the static dataset, where the human's
preference is known (`chosen`), and measures before any cycle labels with it.

Contract:
- Figures, each a `Rate` with its 95% Wilson interval (`online.stats.wilson_interval`, the one home):
  * agreement with the human label, of the pairs the judge decided (`agreement`; undefined when
    it decided none) and of all it answered (`agreement_all`, a tie counting as no agreement);
  * position-conflict rate: both orders named the same letter. LLM judges only: a reward-model
    or rule judge scores each reply alone, so order cannot sway it; its `position_conflict` is
    None and every table shows "n/a" (never a silent 0), and no threshold applies to it;
  * tie rate (explicit ties, or for a scalar judge a reward margin <= 0 or < `min_margin`;
    position conflicts not included);
  * unparseable rate; and failed requests as a count (they say nothing about the judge);
  * calls and USD per 1,000 pairs asked, USD per 1,000 labels.
  "Answered" pairs = decided + ties + position conflicts + unparseable (the rates' denominator).
- `audit_failures(audit, cfg)` (pure) names each figure below its threshold: agreement <
  `min_agreement` (or undefined: no usable label), position conflicts > `max_position_conflict`,
  unparseable > `max_unparseable`, or no pair answered. `require_usable` raises
  `JudgeAuditFailed` with the figure, its value, the threshold and the override; with
  `enforce: false` it logs the same text as a warning instead.
- The judge is asked through the same `Judge` it labels cycles with (`build_judge`), so the
  LLM judge's both-orders rule, retries, budget and reward-hacking guards all apply. A scalar
  judge (reward model, rule) is asked once per pair, with no order: it agrees when
  reward(prompt + chosen) - reward(prompt + rejected) > 0 and >= its `min_margin`, disagrees
  when the same holds the other way round, and ties otherwise (equal scores, small margin).
- Pairs: a seeded sample (`derive_seed(seed, "judge-audit")`) of the held-out split's pairs with
  two distinct non-empty replies (`load_preference_dataset`: the split the offline phase never
  trains on).
- Cache: one JSON per audit under `<state_dir>/judge-audits/<key>.json`, written with
  `offline.atomic.atomic_write_json`. The key hashes the judge's identity (kind; model or rule
  or reward-model path; the endpoint with any password masked; the template version; the
  sampling temperature; for a reward model, a stamp of its files' names, sizes and mtimes, so
  weights saved again under the same path are audited again), the dataset fingerprint, the
  number of pairs and the seed. Thresholds
  are not in the key: a cached audit is re-checked against the thresholds of the run.
  `refresh=True` measures again (after fixing a judge behind the same endpoint and name).
- `run_audit(cfg)` is the runner (`cfg`: anything with `model`, `data`, `online`, `state_dir`,
  `seed`, e.g. a `TetherConfig` or `CycleInputs`); `cycle_audit` is the cycle's first step.
Nothing here imports prefect or redis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from offline.atomic import atomic_write_json
from offline.config import DataConfig, ModelConfig
from offline.pairs import PreferencePair
from offline.secrets import redact
from offline.seeds import derive_seed
from online.config import JudgeAuditConfig, JudgeConfig, OnlineConfig
from online.judge_prompt import TEMPLATE_VERSION
from online.stats import wilson_interval
from online.types import Generation, Judgment, JudgeStats

log = logging.getLogger(__name__)

AUDIT_DIR = "judge-audits"


# -- statistics (pure) ---------------------------------------------------------------------------


class Rate(BaseModel):
    """k of n, as a proportion with its 95% Wilson interval (value None when n = 0)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int
    n: int
    value: float | None
    low: float
    high: float

    def text(self) -> str:
        """`0.750 (48/64; 95% CI 0.630-0.840)`, or `undefined (0/0)`."""
        if self.value is None:
            return f"undefined ({self.k}/{self.n})"
        return f"{self.value:.3f} ({self.k}/{self.n}; 95% CI {self.low:.3f}-{self.high:.3f})"


def rate(k: int, n: int) -> Rate:
    """The `Rate` of k successes in n trials."""
    low, high = wilson_interval(k, n)
    return Rate(k=k, n=n, value=k / n if n else None, low=low, high=high)


class AuditCounts(BaseModel):
    """How the audit's pairs came out: each pair asked lands in exactly one outcome."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requested: int
    """Pairs sent to the judge."""
    agree: int
    """Decided as the human did."""
    disagree: int
    """Decided against the human."""
    ties: int
    """The judge said tie (or, for a scalar judge, the margin was too small)."""
    position_conflicts: int
    """Both orders named the same letter."""
    unparseable: int
    """A verdict could not be read."""
    errors: int
    """Requests failed for good (say nothing about the judge; not in the rates)."""
    not_asked: int
    """Pairs the judge's budget refused to start."""

    @property
    def decisive(self) -> int:
        return self.agree + self.disagree

    @property
    def answered(self) -> int:
        return self.decisive + self.ties + self.position_conflicts + self.unparseable


def count_outcomes(pairs: Sequence[PreferencePair], judgments: Sequence[Judgment], stats: JudgeStats) -> AuditCounts:
    """Match the judge's labels against the human ones; the other outcomes come from `stats`."""
    human = {(p.prompt, p.chosen, p.rejected) for p in pairs}
    agree = sum((j.prompt, j.chosen, j.rejected) in human for j in judgments)
    disagree = sum((j.prompt, j.rejected, j.chosen) in human for j in judgments)
    if agree + disagree != len(judgments):
        raise ValueError("the judge returned a label for a pair it was not asked about")
    return AuditCounts(
        requested=len(pairs), agree=agree, disagree=disagree,
        ties=stats.ties - stats.position_conflicts, position_conflicts=stats.position_conflicts,
        unparseable=stats.unparseable, errors=stats.errors, not_asked=len(pairs) - stats.asked,
    )


def per_1k(amount: float, n: int) -> float | None:
    """`amount` per 1,000 of `n` (None when n = 0: undefined, not free)."""
    return 1000.0 * amount / n if n else None


class JudgeAudit(BaseModel):
    """One audit of one judge on one dataset: the figures, what they were measured on, when."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    """Cache key (see the module docstring)."""
    judge: str
    """The judge's name (`llm:<model>`, `rule:<fn>`, `reward_model:<dir>`)."""
    identity: dict[str, Any]
    """What the key hashes about the judge; the endpoint with any password masked."""
    dataset_fingerprint: str
    dataset_source: str
    seed: int
    counts: AuditCounts
    agreement: Rate
    """Agreement with the human label, of the pairs the judge decided."""
    agreement_all: Rate
    """Agreement with the human label, of all pairs answered (a tie is no agreement)."""
    position_conflict: Rate | None
    """Both orders named the same letter; None for a judge that scores each reply alone (reward
    model, rule): order cannot sway it, so the figure does not apply (shown as "n/a")."""
    tie: Rate
    unparseable: Rate
    calls: int
    cost_usd: float
    calls_per_1k_pairs: float | None
    cost_per_1k_pairs: float | None
    cost_per_1k_labels: float | None
    budget_exhausted: bool
    seconds: float
    created_at: float

    def summary(self) -> dict[str, Any]:
        """The figures as a flat dict (lineage, cycle reports): `judge_audit/...` keys."""
        out: dict[str, Any] = {"judge_audit/key": self.key, "judge_audit/pairs": self.counts.answered}
        for name in ("agreement", "agreement_all", "position_conflict", "tie", "unparseable"):
            r = getattr(self, name)
            if r is not None and r.value is not None:
                out[f"judge_audit/{name}"] = r.value
        if self.cost_per_1k_labels is not None:
            out["judge_audit/cost_per_1k_labels"] = self.cost_per_1k_labels
        return out


def summarise(
    counts: AuditCounts, stats: JudgeStats, *, key: str, judge: str, identity: dict[str, Any],
    fingerprint: str, source: str, seed: int, seconds: float, created_at: float, pairwise: bool = True,
) -> JudgeAudit:
    """The audit's figures from its counts and the judge's stats (pure). `pairwise`: the judge
    compares two replies shown in an order (LLM); False for one that scores each reply alone,
    which has no position-conflict rate."""
    n = counts.answered
    return JudgeAudit(
        key=key, judge=judge, identity=identity, dataset_fingerprint=fingerprint, dataset_source=source,
        seed=seed, counts=counts,
        agreement=rate(counts.agree, counts.decisive), agreement_all=rate(counts.agree, n),
        position_conflict=rate(counts.position_conflicts, n) if pairwise else None, tie=rate(counts.ties, n),
        unparseable=rate(counts.unparseable, n),
        calls=stats.calls, cost_usd=stats.cost_usd,
        calls_per_1k_pairs=per_1k(stats.calls, stats.asked), cost_per_1k_pairs=per_1k(stats.cost_usd, stats.asked),
        cost_per_1k_labels=per_1k(stats.cost_usd, counts.decisive),
        budget_exhausted=stats.budget_exhausted, seconds=seconds, created_at=created_at,
    )


# -- the decision (pure) -------------------------------------------------------------------------

SETTING = "online.judge.audit"


@dataclass(frozen=True)
class AuditFailure:
    """One figure on the wrong side of its threshold."""

    figure: str
    value: str
    threshold: str

    def text(self) -> str:
        return f"{self.figure} {self.value} {self.threshold}"


def conflict_text(audit: JudgeAudit) -> str:
    """The position-conflict rate as text, or why there is none (a judge that scores replies alone)."""
    if audit.position_conflict is None:
        return "n/a (scores each reply alone)"
    return audit.position_conflict.text()


def audit_failures(audit: JudgeAudit, cfg: JudgeAuditConfig) -> list[AuditFailure]:
    """Every figure that rules the judge out under `cfg` (empty: it may label)."""
    c = audit.counts
    if c.answered == 0:
        return [AuditFailure("answered pairs", f"0 of {c.requested} ({c.errors} failed requests, "
                             f"{c.not_asked} refused by the budget)", "(at least 1 needed)")]
    out = []
    if audit.agreement.value is None:
        out.append(AuditFailure(
            "agreement with human labels", f"undefined: the judge produced no usable label ({c.ties} ties, "
            + (f"{c.position_conflicts} position conflicts, " if audit.position_conflict is not None else "")
            + f"{c.unparseable} unparseable of {c.answered})",
            f"(needs >= {cfg.min_agreement:g}, {SETTING}.min_agreement)",
        ))
    elif audit.agreement.value < cfg.min_agreement:
        out.append(AuditFailure("agreement with human labels", audit.agreement.text(),
                                f"< {SETTING}.min_agreement {cfg.min_agreement:g}"))
    if audit.position_conflict is not None and (audit.position_conflict.value or 0.0) > cfg.max_position_conflict:
        out.append(AuditFailure("position-conflict rate", audit.position_conflict.text(),
                                f"> {SETTING}.max_position_conflict {cfg.max_position_conflict:g}"))
    if (audit.unparseable.value or 0.0) > cfg.max_unparseable:
        out.append(AuditFailure("unparseable rate", audit.unparseable.text(),
                                f"> {SETTING}.max_unparseable {cfg.max_unparseable:g}"))
    return out


class JudgeAuditFailed(RuntimeError):
    """The judge's audit is below a threshold: no cycle labels with it (`audit`, `failures`)."""

    def __init__(self, audit: JudgeAudit, failures: list[AuditFailure]) -> None:
        self.audit, self.failures = audit, failures
        super().__init__(failure_message(audit, failures))

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds an exception from its message alone, which this __init__ refuses.
        return type(self), (self.audit, self.failures)


def failure_message(audit: JudgeAudit, failures: list[AuditFailure]) -> str:
    """What failed, by how much, and the ways out."""
    figures = "; ".join(f.text() for f in failures)
    return (
        f"judge {audit.judge} failed its audit on {audit.counts.requested} held-out pairs of "
        f"{audit.dataset_source} (audit {audit.key}): {figures}. No cycle labels with it until it passes: "
        f"use a stronger judge (or fix its endpoint or prompt), then re-measure with "
        f"`tether judge audit --config CFG --refresh`; or override with "
        f"--set {SETTING}.enforce=false (label anyway) or the threshold named."
    )


def require_usable(audit: JudgeAudit, cfg: JudgeAuditConfig) -> None:
    """Raise `JudgeAuditFailed` when a figure fails (with `enforce: false`, only warn)."""
    failures = audit_failures(audit, cfg)
    if not failures:
        return
    if cfg.enforce:
        raise JudgeAuditFailed(audit, failures)
    log.warning("%s (enforce is off: labelling anyway)", failure_message(audit, failures))


def audit_rows(audit: JudgeAudit, cfg: JudgeAuditConfig) -> list[dict[str, str]]:
    """The audit as table rows: figure, value, 95% CI, threshold, verdict (CLI and artifacts)."""

    def row(figure: str, r: Rate, threshold: str = "", ok: bool | None = None) -> dict[str, str]:
        value = "undefined" if r.value is None else f"{r.value:.3f}"
        return {"figure": figure, "value": value, "k/n": f"{r.k}/{r.n}", "95% CI": f"{r.low:.3f}-{r.high:.3f}",
                "threshold": threshold, "ok": "" if ok is None else "yes" if ok else "NO"}

    def money(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else fmt.format(x)

    a, pc, un = audit.agreement, audit.position_conflict, audit.unparseable
    c = audit.counts
    return [
        row("agreement with human labels (decided pairs)", a, f">= {cfg.min_agreement:g}",
            a.value is not None and a.value >= cfg.min_agreement),
        row("agreement with human labels (all answered)", audit.agreement_all),
        row("position-conflict rate", pc, f"<= {cfg.max_position_conflict:g}",
            (pc.value or 0.0) <= cfg.max_position_conflict) if pc is not None else
        {"figure": "position-conflict rate", "value": "n/a", "k/n": "", "95% CI": "",
         "threshold": "not applicable: scores each reply alone, in no order", "ok": ""},
        row("tie rate", audit.tie),
        row("unparseable rate", un, f"<= {cfg.max_unparseable:g}", (un.value or 0.0) <= cfg.max_unparseable),
        {"figure": "failed requests / refused by budget", "value": f"{c.errors} / {c.not_asked}", "k/n": "",
         "95% CI": "", "threshold": "", "ok": ""},
        {"figure": "calls / USD per 1,000 pairs; USD per 1,000 labels",
         "value": f"{money(audit.calls_per_1k_pairs, '{:.0f}')} / {money(audit.cost_per_1k_pairs, '${:.4f}')}; "
                  f"{money(audit.cost_per_1k_labels, '${:.4f}')}",
         "k/n": "", "95% CI": "", "threshold": "", "ok": ""},
    ]


# -- identity, cache, pairs ----------------------------------------------------------------------


def audit_identity(judge_cfg: JudgeConfig) -> dict[str, Any]:
    """What makes two judges the same judge, for the cache key (no secret: endpoint redacted)."""
    if judge_cfg.kind == "llm":
        llm = judge_cfg.llm
        assert llm is not None
        return {"kind": "llm", "model": llm.model, "endpoint": redact(llm.base_url.rstrip("/")),
                "template": TEMPLATE_VERSION, "temperature": llm.temperature}
    if judge_cfg.kind == "rule":
        assert judge_cfg.rule is not None
        return {"kind": "rule", "function": judge_cfg.rule.function, "min_margin": judge_cfg.rule.min_margin}
    assert judge_cfg.reward_model is not None
    path = Path(judge_cfg.reward_model.path).expanduser().resolve()
    return {"kind": "reward_model", "path": str(path), "files": files_stamp(path),
            "min_margin": judge_cfg.reward_model.min_margin}


def files_stamp(directory: Path) -> str:
    """A short hash of the names, sizes and mtimes of the files under `directory` (a reward
    model's weights, config and tokenizer): weights saved again under the same path make a new
    audit key, where hashing the contents would read gigabytes for each cycle. A copy with new
    mtimes is audited again too, which only costs time. "missing" when the path is not a dir
    (building the judge then fails with the loader's own error)."""
    if not directory.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(directory).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def audit_key(identity: dict[str, Any], fingerprint: str, pairs: int, seed: int) -> str:
    """Hex key of (judge identity, dataset fingerprint, pairs, seed)."""
    blob = json.dumps([identity, fingerprint, pairs, seed], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def audit_path(state_dir: Path, key: str) -> Path:
    return Path(state_dir) / AUDIT_DIR / f"{key}.json"


def read_cached(path: Path, key: str) -> JudgeAudit | None:
    """The audit stored at `path`, or None (missing, unreadable or another key's: measured again)."""
    if not path.is_file():
        return None
    try:
        audit = JudgeAudit.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ValidationError) as exc:
        log.warning("ignoring unreadable judge audit %s (%s); measuring again", path, exc)
        return None
    return audit if audit.key == key else None


def select_audit_pairs(heldout: Sequence[PreferencePair], n: int, seed: int) -> list[PreferencePair]:
    """A seeded sample of `n` held-out pairs a judge can be asked about (two distinct replies).

    Pairs the judge would skip (an empty or whitespace-identical reply) and repeats of the same
    prompt and replies in either order are left out first, so every pair sent is judged once.
    """
    seen: set[tuple[str, frozenset[str]]] = set()
    usable = []
    for p in heldout:
        a, b = p.chosen.strip(), p.rejected.strip()
        key = (p.prompt, frozenset((p.chosen, p.rejected)))
        if a and b and a != b and key not in seen:
            seen.add(key)
            usable.append(p)
    return random.Random(seed).sample(usable, min(n, len(usable)))


def judge_pairs(judge: Any, pairs: Sequence[PreferencePair]) -> tuple[list[Judgment], JudgeStats]:
    """Ask `judge` about each pair as a two-sample generation (chosen shown first; the LLM judge
    asks the swapped order too)."""
    gens = [Generation(prompt=p.prompt, category=p.category, responses=(p.chosen, p.rejected),
                       policy_version="judge-audit") for p in pairs]
    return judge.judge_generations(gens)


# -- the runner ----------------------------------------------------------------------------------


class AuditInputs(Protocol):
    """What `run_audit` reads from a config: `TetherConfig` and `CycleInputs` both have it."""

    model: ModelConfig
    data: DataConfig
    online: OnlineConfig | None
    state_dir: Path
    seed: int


def run_audit(cfg: AuditInputs, *, tokenizer: Any = None, refresh: bool = False, judge: Any = None) -> JudgeAudit:
    """The configured judge's audit: from the cache, or measured now and cached.

    `tokenizer` renders chat-format data (loaded from the model when needed and not given);
    `judge` replaces the one `cfg` builds (tests). Does not apply the thresholds: see
    `require_usable`.
    """
    from offline.data import load_preference_dataset
    from online.anchor import resolve_static_data
    from online.judge import build_judge

    if cfg.online is None:
        raise ValueError("this config has no `online` section: there is no judge to audit")
    judge_cfg, n = cfg.online.judge, cfg.online.judge.audit.pairs
    data_cfg = resolve_static_data(cfg)
    if tokenizer is None and data_cfg.format not in ("explicit", "hh"):
        from offline.models import load_tokenizer, resolve_model_dir

        tokenizer = load_tokenizer(resolve_model_dir(cfg.model, cfg.state_dir))
    dataset = load_preference_dataset(data_cfg, tokenizer=tokenizer)
    seed = derive_seed(cfg.seed, "judge-audit")
    identity = audit_identity(judge_cfg)
    key = audit_key(identity, dataset.fingerprint, n, seed)
    path = audit_path(cfg.state_dir, key)
    if not refresh and (cached := read_cached(path, key)) is not None:
        log.info("judge audit %s: cached (measured %s)", key, time.strftime("%Y-%m-%d %H:%M", time.gmtime(cached.created_at)))
        return cached
    pairs = select_audit_pairs(dataset.heldout, n, seed)
    if not pairs:
        raise ValueError(
            f"{dataset.source}: no held-out pair with two distinct replies to audit the judge on; "
            "raise data.heldout_fraction"
        )
    if len(pairs) < n:
        # Thresholds apply to point estimates: on a handful of pairs they pass or fail by luck.
        log.warning("judge audit: only %d of the %d pairs asked for (%s.pairs): the held-out split has no more "
                    "judgeable pairs; raise data.heldout_fraction (or data.limit) for a sharper audit",
                    len(pairs), n, SETTING)
    judge = judge if judge is not None else build_judge(judge_cfg)
    t0 = time.perf_counter()
    judgments, stats = judge_pairs(judge, pairs)
    audit = summarise(
        count_outcomes(pairs, judgments, stats), stats, key=key, judge=judge.name, identity=identity,
        fingerprint=dataset.fingerprint, source=redact(dataset.source), seed=seed,
        seconds=time.perf_counter() - t0, created_at=time.time(), pairwise=judge_cfg.kind == "llm",
    )
    atomic_write_json(path, audit.model_dump(mode="json"), indent=2)
    log.info("judge audit %s of %s: agreement %s, position conflicts %s", key, audit.judge,
             audit.agreement.text(), conflict_text(audit))
    return audit


def cycle_audit(inputs: AuditInputs, tokenizer: Any = None) -> JudgeAudit | None:
    """A cycle's first step: the judge's audit (cached after the first), enforced.

    None when audits are off for this judge (`judge.audit.enabled`). Raises `JudgeAuditFailed`
    below a threshold, before anything is generated.
    """
    assert inputs.online is not None
    judge_cfg = inputs.online.judge
    if not judge_cfg.audit.active(judge_cfg.kind):
        return None
    audit = run_audit(inputs, tokenizer=tokenizer)
    require_usable(audit, judge_cfg.audit)
    return audit


def neutralised_flag(neutralised: int, samples: int, max_fraction: float) -> str | None:
    """The cycle's flag when more than `max_fraction` of its samples needed the judge's
    reward-hacking guards (delimiters escaped, master-key-only replies); None otherwise."""
    if samples == 0 or neutralised / samples <= max_fraction:
        return None
    return (
        f"reward hacking suspected: {neutralised} of {samples} samples ({neutralised / samples:.1%}) carried the "
        f"judge template's delimiters or were only a master key (> online.judge.max_neutralised_fraction "
        f"{max_fraction:g}); they were escaped or labelled the loser, but read the samples"
    )
