"""One online refresh cycle, as a recipe of typed steps.

judge audit -> current policy -> evaluate it -> sample prompts -> generate -> judge -> buffer
(anchor, fresh pairs, mixed draw) -> reference log-probs -> train (the offline loop) -> evaluate
the candidate + KL -> gate -> checkpoint, promote or keep for inspection -> controller sets the
next mix.

The judge audit (`online.audit`, cached per judge and dataset) comes first: a judge below its
thresholds stops the cycle with `JudgeAuditFailed` before anything is loaded or generated.
Every cycle's report, lineage and history carry the judge's counters (pairs asked, labels,
ties, position conflicts, unparseable, dropped, retries, cost, samples neutralised), the fresh
and anchor pairs drawn and actually trained on, the audit's figures, and `flags` (e.g. too
many samples needed the judge's reward-hacking guards).
A judge that labels fewer than `online.min_fresh_pairs` pairs ends the cycle after judging:
recorded inconclusive (not trained, nothing written but its history row, the mix unchanged).

Each step takes and returns a small named type (`LoadedPolicy`, `Generation`s, `Labels`,
`BufferUpdate`, `TrainingSet`, `TrainResult`, `CurrentEval` / `CandidateEval`, `CheckpointRef`);
`run_cycle` reads top to bottom. Every step goes through a `step(name, fn)` hook that is the
identity for plain calls (tests, benchmarks) and wraps the function in a Prefect task inside
`orchestrator.flows.refresh_cycle`. Seeds are derived by name (`derive_seed(seed, "generate",
cycle)`), except evaluation's: one seed for the run (`derive_seed(seed, "eval")`, the stages'
too), so every policy is sampled on the held-out prompts with the same random draws, and a
policy evaluated once (as a cycle's candidate, or a stage) is not sampled again as the next
cycle's current policy (`online.evaluate.EvalSampleCache`). Nothing here imports prefect or redis: the buffer arrives as an `online.replay.CycleBuffer`
and the current policy comes from `offline.registry.PolicyRegistry` (its file is the truth, the
buffer's pointers its mirror).

Re-running a failed or killed cycle is safe: the cycle index only advances when a cycle ends;
its prompts and samples are seeded by (seed, index), so a re-run regenerates the same pairs and
their buffer writes are no-ops; training resumes from its snapshot; checkpoints and the pointer
are written atomically, and the pointer moves only after the gate passed.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from offline.checkpoint import CheckpointRef
from offline.config import DataConfig
from offline.data import load_preference_dataset
from offline.models import LoadedPolicy, load_policy, resolve_model_dir
from offline.pairs import FreshPair, PreferencePair
from offline.pipeline import save_policy, train_policy
from offline.reference import ensure_reference_logps
from offline.registry import CycleState, PolicyRegistry
from offline.seeds import derive_seed
from offline.tokenize import TokenizedPair, tokenize_pairs
from online.audit import JudgeAudit, cycle_audit, neutralised_flag
from online.config import CycleInputs, GenerationConfig, JudgeConfig
from online.controller import next_mix
from online.evaluate import (
    EvalSampleCache, eval_sample_key, evaluate_candidate, evaluate_current, finite, make_scorer,
)
from online.gate import EvalSummary, Verdict, decide_promotion
from online.generate import build_generator
from online.judge import build_judge
from online.prompts import Prompt, load_prompt_pool, sample_prompts
from online.replay import CycleBuffer
from online.types import Generation, Judgment, JudgeStats

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class CycleReport(BaseModel):
    """What a cycle did and decided: the row of the KL/reward history.

    Metric dicts are namespaced (`kl/policy_ref`, `judge/cost_usd`, `buffer/anchor_fraction`,
    `gate/lower_bound`); `before`/`after` map each category (and "mean") to the gate's metric.
    `verdict` is the gate's (`promote`, `reject`, `inconclusive`); `promoted` says whether the
    pointer moved (False for a promote verdict in a cycle run with `promote=False`). A cycle whose
    judge produced fewer than `online.min_fresh_pairs` labels did not train: `checkpoint` is None,
    `after`, `kl` and `train` are empty and `verdict` is inconclusive.
    """

    model_config = ConfigDict(frozen=True)

    index: int
    promoted: bool
    reasons: list[str]
    checkpoint: CheckpointRef | None
    parent: CheckpointRef
    verdict: Verdict
    gate: dict[str, float] = Field(default_factory=dict)
    """The gate's numbers: decisive counts, bounds, threshold, length ratio (`gate/...`)."""
    gate_checks: list[dict[str, Any]] = Field(default_factory=list)
    """One row per compared unit (each category, "overall"): n, estimate, bounds, status."""
    kl: dict[str, float]
    kl_budget: float
    before: dict[str, float]
    after: dict[str, float]
    judge: dict[str, float]
    mix: dict[str, float]
    next_anchor_fraction: float
    next_beta: float
    controller_reason: str
    train: dict[str, float]
    seconds: dict[str, float]
    finished_at: float = Field(default_factory=time.time)
    audit: JudgeAudit | None = None
    """The judge's audit this cycle was allowed to label under (None: audits off for this judge)."""
    flags: list[str] = Field(default_factory=list)
    """Warnings that did not stop the cycle (e.g. reward hacking suspected); empty when none."""


def identity_step(name: str, fn: F) -> F:
    """The `step` hook for plain calls: run the function as it is."""
    return fn


# -- the steps ----------------------------------------------------------------------------------


def load_current(inputs: CycleInputs, checkpoint: str) -> LoadedPolicy:
    """The current policy, trainable, from its checkpoint (LoRA: pi_0 plus its adapter)."""
    return load_policy(inputs.model, inputs.state_dir, checkpoint=checkpoint)


def generate(policy: LoadedPolicy, gen_cfg: GenerationConfig, prompts: list[Prompt], seed: int, version: str) -> list[Generation]:
    """k samples per prompt from the current policy (backend as configured)."""
    generator = build_generator(gen_cfg, policy.model_dir, version, model=policy.model, tokenizer=policy.tokenizer)
    policy.model.eval()
    return generator.generate(prompts, gen_cfg.k, seed)


@dataclass(frozen=True)
class Labels:
    """The judge's pairs for this cycle's samples, and what judging cost and dropped."""

    judgments: list[Judgment]
    stats: JudgeStats


def judge(judge_cfg: JudgeConfig, generations: list[Generation]) -> Labels:
    """Label samples into pairs; ties and unparseable verdicts are dropped and counted."""
    judgments, stats = build_judge(judge_cfg).judge_generations(generations)
    return Labels(judgments, stats)


@dataclass(frozen=True)
class BufferUpdate:
    """What the buffer step did: anchor seeding, this cycle's write, and the mixed draw."""

    fingerprint: str
    pairs_added: int
    pairs: list[PreferencePair]
    mix: dict[str, float]
    fresh_ids: frozenset[str] = frozenset()
    """Content ids of the drawn pairs that came from the fresh pool."""


def fresh_pairs(judgments: list[Judgment], cycle: int, policy_version: str) -> list[FreshPair]:
    """The judge's labels as the buffer stores them: each pair with its cycle, sampler and judge."""
    return [
        FreshPair(pair=j.to_pair(), cycle=cycle, policy_version=policy_version, judge=j.judge,
                  confidence=float(j.confidence))
        for j in judgments
    ]


def update_buffer(
    buffer: CycleBuffer, data_cfg: DataConfig, tokenizer, labels: Labels, cycle: int, policy_version: str,
    n: int, anchor_fraction: float, seed: int,
) -> BufferUpdate:
    """Anchor seeded (idempotent) -> this cycle's pairs in one atomic write -> the mixed draw.

    One step (one task run) for the three buffer operations: each is milliseconds, and a task
    run costs the Prefect API more than that.
    """
    dataset = load_preference_dataset(data_cfg, tokenizer=tokenizer)
    buffer.seed_anchor(dataset.train, dataset.fingerprint)
    added = buffer.add_fresh(fresh_pairs(labels.judgments, cycle, policy_version))
    draw = buffer.sample(n, anchor_fraction, seed)
    fresh = [p.pair.content_id for p in draw.pairs if p.pool == "fresh"]
    mix = {**draw.stats.metrics(), "buffer/fresh_pairs_drawn": float(len(fresh)),
           "buffer/anchor_pairs_drawn": float(len(draw.pairs) - len(fresh))}
    return BufferUpdate(fingerprint=dataset.fingerprint, pairs_added=added.added,
                        pairs=[p.pair for p in draw.pairs], mix=mix, fresh_ids=frozenset(fresh))


def trained_counts(pairs: list[PreferencePair], fresh_ids: frozenset[str], step_pair_ids: list[list[str]]) -> dict[str, float]:
    """Fresh and anchor pairs of the draw that training actually saw (a `max_steps` run may
    stop before it has seen them all); `train/...` keys."""
    seen = {i for step in step_pair_ids for i in step}
    trained = [p.content_id for p in pairs if p.content_id in seen]
    fresh = sum(i in fresh_ids for i in trained)
    return {"train/fresh_pairs": float(fresh), "train/anchor_pairs": float(len(trained) - fresh)}


def judge_metrics(stats: JudgeStats, generations: list[Generation]) -> dict[str, float]:
    """The pass's `judge/...` counters plus the samples it saw and the share it neutralised."""
    samples = sum(len(g.responses) for g in generations)
    return {**finite(stats.metrics()), "judge/samples": float(samples),
            "judge/neutralised_fraction": stats.neutralised / samples if samples else 0.0}


@dataclass(frozen=True)
class TrainingSet:
    """The mixed pairs as token ids, with pi_0's log-probs for each."""

    pairs: Sequence[TokenizedPair]  # an in-memory token store (offline.token_store)
    reference_logps: Mapping[str, tuple[float, float]]


def prepare_training_set(
    policy: LoadedPolicy, pairs: list[PreferencePair], data_cfg: DataConfig, reference_dir: Path,
    cache_dir: Path, batch_size: int, progress: bool, num_processes: int = 1, accelerate_config: str | None = None,
) -> TrainingSet:
    """Tokenize the draw and get pi_0's log-probs from the one reference service (cached; LoRA:
    the adapter-disabled base; sharded over a launched job's ranks with `num_processes > 1`)."""
    toks = tokenize_pairs(pairs, policy.tokenizer, data_cfg.max_length, data_cfg.max_prompt_length)
    logps = ensure_reference_logps(policy, toks, reference_dir, cache_dir, batch_size, progress,
                                   num_processes=num_processes, accelerate_config=accelerate_config)
    return TrainingSet(toks, logps)


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0


def run_cycle(
    inputs: CycleInputs,
    buffer: CycleBuffer,
    *,
    step: Callable[[str, F], F] = identity_step,
    progress: bool = True,
    on_train_step: Callable[[dict], None] | None = None,
    promote: bool = True,
) -> CycleReport:
    """One refresh cycle under the caller's lock; returns what it did and decided.

    `on_train_step` is the training loop's `on_step` hook (e.g. an experiment tracker's).
    `promote=False` runs everything, gate included, but never moves the pointer (the report's
    budget probe: an experiment on the gate, not a policy to serve).
    """
    online, state_dir, name = inputs.online, inputs.state_dir, inputs.name
    train_cfg = inputs.cycle_train
    seconds: dict[str, float] = {}
    registry = PolicyRegistry(state_dir, name, mirror=buffer.pointers)
    state = registry.cycle_state(online.initial_anchor_fraction, train_cfg.loss.beta)
    current = registry.current()
    # A cycle killed after promoting but before recording its state has still happened: the
    # pointer says so, and the next run must not apply the same cycle twice.
    index = max(state.completed, current.cycle or 0) + 1
    seed = {stage: derive_seed(inputs.seed, stage, index) for stage in ("generate", "mix", "kl")}
    seed["eval"] = derive_seed(inputs.seed, "eval")  # the run's, not the cycle's: see the module doc
    eval_cache = EvalSampleCache(state_dir / "cache" / "eval-samples")
    parent = current.checkpoint
    judge_cfg = online.judge
    with _timed(seconds, "audit"):
        # First, before any model is loaded or sample generated: may this judge label at all?
        audit = step("judge-audit", cycle_audit)(inputs) if judge_cfg.audit.active(judge_cfg.kind) else None
    reference_dir = resolve_model_dir(inputs.model, state_dir)
    log.info("cycle %d of %r from %s (anchor_fraction %.3f, beta %.4g)", index, name, parent.path, state.anchor_fraction, state.beta)

    with _timed(seconds, "load"):
        policy = step("load-current-policy", load_current)(inputs, parent.path)
        pool = load_prompt_pool(online.prompts, tokenizer=policy.tokenizer)
        eval_prompts = list(pool.heldout[: online.eval_max_prompts])
        if not eval_prompts:
            raise ValueError("the prompt pool has no held-out prompts to evaluate on: raise prompts.heldout_fraction")
    with _timed(seconds, "eval"):
        scorer = make_scorer(online.judge) if online.gate.metric == "reward" else None
        before = step("evaluate-current", evaluate_current)(policy, eval_prompts, online, scorer, seed["eval"],
                                                            eval_cache, parent.id)
    with _timed(seconds, "generate"):
        prompts = sample_prompts(pool.train, online.prompts.sample_per_cycle, seed["generate"],
                                 balanced=online.prompts.category_balanced)
        generations = step("generate", generate)(policy, online.generation, prompts, seed["generate"], parent.id)
    with _timed(seconds, "judge"):
        labels = step("judge", judge)(online.judge, generations)
    if len(labels.judgments) < online.min_fresh_pairs:
        # Too few labels to learn from: training on them (diluted by anchors) would produce a
        # candidate the gate might pass on anchor pairs alone. Nothing is written but the
        # history row; the index advances (a deterministic judge would refuse the same samples
        # again) and the next cycle draws new prompts with the mix unchanged.
        return _record_untrained(registry, state, index, parent, before.summary, labels, budget=online.controller.kl_budget,
                                 required=online.min_fresh_pairs, seconds=seconds)
    with _timed(seconds, "buffer"):
        mixed = step("update-buffer", update_buffer)(
            buffer, inputs.data, policy.tokenizer, labels, index, parent.id,
            online.train_pairs, state.anchor_fraction, seed["mix"],
        )
    with _timed(seconds, "reference"):
        training_set = step("reference-logps", prepare_training_set)(
            policy, mixed.pairs, inputs.data, reference_dir, state_dir / "cache" / "reference-logps",
            train_cfg.reference_batch_size, progress, train_cfg.num_processes, train_cfg.accelerate_config,
        )
    with _timed(seconds, "train"):
        cycle_cfg = train_cfg.model_copy(update={
            "seed": derive_seed(train_cfg.seed, "train", index),
            "loss": train_cfg.loss.model_copy(update={"beta": state.beta}),
        })
        resume_dir = state_dir / "resume" / f"cycle-{name}-{index}-{parent.id[:8]}"
        result = step("train", train_policy)(
            policy, training_set.pairs, training_set.reference_logps, cycle_cfg, resume_dir, on_train_step, progress,
        )
    with _timed(seconds, "eval"):
        after = step("evaluate-candidate", evaluate_candidate)(
            policy, eval_prompts, before, scorer, reference_dir, list(pool.heldout[: online.kl_prompts]),
            online, seed["eval"], seed["kl"],
        )
    budget = online.controller.kl_budget
    decision = decide_promotion(after.summary, before.summary, after.kl.sequence, budget, online.gate)
    reasons = decision.reasons + ([] if promote or not decision.promote
                                  else ["not promoted: this cycle runs with promote=False (an experiment)"])
    mix_next = next_mix(after.kl.sequence, budget, state.anchor_fraction, state.beta, online.controller)
    train_metrics = finite(result.final_metrics)
    kl = finite(after.kl.metrics())
    judged = judge_metrics(labels.stats, generations)
    mix = {**finite(mixed.mix), "pairs_added": float(mixed.pairs_added),
           **trained_counts(mixed.pairs, mixed.fresh_ids, result.step_pair_ids)}
    flags = [f for f in [neutralised_flag(labels.stats.neutralised, int(judged["judge/samples"]),
                                          judge_cfg.max_neutralised_fraction)] if f]
    for flag in flags:
        log.warning("cycle %d: %s", index, flag)
    with _timed(seconds, "checkpoint"):
        ckpt = step("save-checkpoint", save_policy)(
            policy, state_dir / "checkpoints" / name, f"cycle-{index:04d}-{parent.id[:8]}",
            kind="cycle", fingerprint=mixed.fingerprint, config=inputs.config_dump, parent=parent,
            seed=cycle_cfg.seed, result=result,
            # A re-run of a cycle that died after saving (same index and parent) replaces the
            # unpromoted checkpoint atomically instead of failing forever.
            overwrite=True,
            metrics={"kl": kl, "before": before.summary.model_dump(), "after": after.summary.model_dump(),
                     "gate": decision.to_dict(), **train_metrics,
                     "judge": judged, "mix": mix, "judge_audit": audit.summary() if audit else None,
                     "flags": flags},
        )
        # The candidate's samples stand for its checkpoint from now on (the next cycle's current).
        eval_cache.put(ckpt.id, eval_sample_key(eval_prompts, online.generation, online.eval_samples, seed["eval"]),
                       after.samples)
        if decision.promote and promote:
            registry.promote(ckpt, kind="cycle", cycle=index)
    report = CycleReport(
        index=index, promoted=decision.promote and promote, reasons=reasons, checkpoint=ckpt, parent=parent,
        verdict=decision.verdict, gate=decision.metrics(), gate_checks=[c.to_dict() for c in decision.checks],
        kl=kl, kl_budget=budget,
        before={"mean": before.summary.mean, **before.summary.per_category},
        after={"mean": after.summary.mean, **after.summary.per_category},
        judge=judged, mix=mix,
        next_anchor_fraction=mix_next.anchor_fraction, next_beta=mix_next.beta,
        controller_reason=mix_next.reason, train=train_metrics, seconds=seconds, audit=audit, flags=flags,
    )
    registry.record_cycle(CycleState(
        completed=index, anchor_fraction=mix_next.anchor_fraction, beta=mix_next.beta,
        history=[*state.history, {**report.model_dump(mode="json", exclude={"checkpoint", "parent", "audit"}),
                                   "judge_audit": audit.summary() if audit else None}],
    ))
    shutil.rmtree(resume_dir, ignore_errors=True)
    return report


def _record_untrained(
    registry: PolicyRegistry, state: CycleState, index: int, parent: CheckpointRef, before: EvalSummary,
    labels: Labels, *, budget: float, required: int, seconds: dict[str, float],
) -> CycleReport:
    """The cycle whose judge fell short: recorded inconclusive, the controller's state unchanged."""
    got = len(labels.judgments)
    report = CycleReport(
        index=index, promoted=False, verdict="inconclusive", checkpoint=None, parent=parent,
        reasons=[f"inconclusive, not trained: the judge produced {got} of the {required} labels required "
                 f"(online.min_fresh_pairs; {labels.stats.ties} ties, {labels.stats.unparseable} unparseable, "
                 f"{labels.stats.errors} errors{', budget exhausted' if labels.stats.budget_exhausted else ''})"],
        kl={}, kl_budget=budget, before={"mean": before.mean, **before.per_category}, after={},
        judge=finite(labels.stats.metrics()), mix={}, next_anchor_fraction=state.anchor_fraction,
        next_beta=state.beta, controller_reason="unchanged: the cycle did not train", train={}, seconds=seconds,
    )
    registry.record_cycle(CycleState(
        completed=index, anchor_fraction=state.anchor_fraction, beta=state.beta,
        history=[*state.history, report.model_dump(mode="json", exclude={"checkpoint", "parent"})],
    ))
    log.warning("cycle %d: %s", index, report.reasons[0])
    return report


def run_cycle_locked(
    inputs: CycleInputs,
    buffer: CycleBuffer,
    *,
    step: Callable[[str, F], F] = identity_step,
    progress: bool = True,
    on_acquired: Callable[[], None] | None = None,
    on_train_step: Callable[[dict], None] | None = None,
    promote: bool = True,
) -> CycleReport:
    """`run_cycle` under the family's cycle lock (Redis, TTL + heartbeat), so exactly one
    cycle trains at a time. Raises `buffer.lock.LockHeld` when another cycle holds the lock
    (`on_busy: skip`) or it was not freed within `wait_timeout_s` (`on_busy: wait`)."""
    online = inputs.online
    with buffer.locks.hold(
        f"cycle:{inputs.name}", ttl_s=online.lock_ttl_s, blocking=online.on_busy == "wait",
        timeout_s=online.wait_timeout_s, heartbeat_s=max(1.0, online.lock_ttl_s / 3),
    ):
        if on_acquired is not None:
            on_acquired()
        return run_cycle(inputs, buffer, step=step, progress=progress, on_train_step=on_train_step, promote=promote)
