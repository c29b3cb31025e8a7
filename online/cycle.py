"""One online refresh cycle, as a recipe of typed steps.

current policy -> evaluate it -> sample prompts -> generate -> judge -> buffer (anchor, fresh
pairs, mixed draw) -> reference log-probs -> train (the offline loop) -> evaluate the candidate
+ KL -> gate -> checkpoint, promote or keep for inspection -> controller sets the next mix.

Each step takes and returns a small named type (`LoadedPolicy`, `Generation`s, `Labels`,
`BufferUpdate`, `TrainingSet`, `TrainResult`, `CurrentEval` / `CandidateEval`, `CheckpointRef`);
`run_cycle` reads top to bottom. Every step goes through a `step(name, fn)` hook that is the
identity for plain calls (tests, benchmarks) and wraps the function in a Prefect task inside
`orchestrator.flows.refresh_cycle`. Seeds are derived by name (`derive_seed(seed, "generate",
cycle)`). Nothing here imports prefect or redis: the buffer arrives as an `online.replay.CycleBuffer`
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
from online.config import CycleInputs, GenerationConfig, JudgeConfig
from online.controller import next_mix
from online.evaluate import evaluate_candidate, evaluate_current, finite, make_scorer
from online.gate import decide_promotion
from online.generate import build_generator
from online.judge import build_judge
from online.prompts import Prompt, load_prompt_pool, sample_prompts
from online.replay import CycleBuffer
from online.types import Generation, Judgment, JudgeStats

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class CycleReport(BaseModel):
    """What a cycle did and decided: the row of the KL/reward history.

    Metric dicts are namespaced (`kl/policy_ref`, `judge/cost_usd`, `buffer/anchor_fraction`);
    `before`/`after` map each category (and "mean") to the gate's metric.
    """

    model_config = ConfigDict(frozen=True)

    index: int
    promoted: bool
    reasons: list[str]
    checkpoint: CheckpointRef
    parent: CheckpointRef
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
    return BufferUpdate(fingerprint=dataset.fingerprint, pairs_added=added.added,
                        pairs=[p.pair for p in draw.pairs], mix=draw.stats.metrics())


@dataclass(frozen=True)
class TrainingSet:
    """The mixed pairs as token ids, with pi_0's log-probs for each."""

    pairs: Sequence[TokenizedPair]  # an in-memory token store (offline.token_store)
    reference_logps: Mapping[str, tuple[float, float]]


def prepare_training_set(
    policy: LoadedPolicy, pairs: list[PreferencePair], data_cfg: DataConfig, reference_dir: Path,
    cache_dir: Path, batch_size: int, progress: bool,
) -> TrainingSet:
    """Tokenize the draw and get pi_0's log-probs from the one reference service (cached; LoRA:
    the adapter-disabled base)."""
    toks = tokenize_pairs(pairs, policy.tokenizer, data_cfg.max_length, data_cfg.max_prompt_length)
    logps = ensure_reference_logps(policy, toks, reference_dir, cache_dir, batch_size, progress)
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
) -> CycleReport:
    """One refresh cycle under the caller's lock; returns what it did and decided."""
    online, state_dir, name = inputs.online, inputs.state_dir, inputs.name
    train_cfg = inputs.cycle_train
    seconds: dict[str, float] = {}
    registry = PolicyRegistry(state_dir, name, mirror=buffer.pointers)
    state = registry.cycle_state(online.initial_anchor_fraction, train_cfg.loss.beta)
    current = registry.current()
    # A cycle killed after promoting but before recording its state has still happened: the
    # pointer says so, and the next run must not apply the same cycle twice.
    index = max(state.completed, current.cycle or 0) + 1
    seed = {stage: derive_seed(inputs.seed, stage, index) for stage in ("eval", "generate", "mix", "kl")}
    parent = current.checkpoint
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
        before = step("evaluate-current", evaluate_current)(policy, eval_prompts, online, scorer, seed["eval"])
    with _timed(seconds, "generate"):
        prompts = sample_prompts(pool.train, online.prompts.sample_per_cycle, seed["generate"],
                                 balanced=online.prompts.category_balanced)
        generations = step("generate", generate)(policy, online.generation, prompts, seed["generate"], parent.id)
    with _timed(seconds, "judge"):
        labels = step("judge", judge)(online.judge, generations)
    with _timed(seconds, "buffer"):
        mixed = step("update-buffer", update_buffer)(
            buffer, inputs.data, policy.tokenizer, labels, index, parent.id,
            online.train_pairs, state.anchor_fraction, seed["mix"],
        )
    with _timed(seconds, "reference"):
        training_set = step("reference-logps", prepare_training_set)(
            policy, mixed.pairs, inputs.data, reference_dir, state_dir / "cache" / "reference-logps",
            train_cfg.reference_batch_size, progress,
        )
    with _timed(seconds, "train"):
        cycle_cfg = train_cfg.model_copy(update={
            "seed": derive_seed(train_cfg.seed, "train", index),
            "loss": train_cfg.loss.model_copy(update={"beta": state.beta}),
        })
        resume_dir = state_dir / "resume" / f"cycle-{name}-{index}-{parent.id[:8]}"
        result = step("train", train_policy)(
            policy, training_set.pairs, training_set.reference_logps, cycle_cfg, resume_dir, None, progress,
        )
    with _timed(seconds, "eval"):
        after = step("evaluate-candidate", evaluate_candidate)(
            policy, eval_prompts, before, scorer, reference_dir, list(pool.heldout[: online.kl_prompts]),
            online, seed["eval"], seed["kl"],
        )
    budget = online.controller.kl_budget
    decision = decide_promotion(after.summary, before.summary, after.kl.sequence, budget, online.gate)
    mix_next = next_mix(after.kl.sequence, budget, state.anchor_fraction, state.beta, online.controller)
    train_metrics = finite(result.final_metrics)
    kl = finite(after.kl.metrics())
    with _timed(seconds, "checkpoint"):
        ckpt = step("save-checkpoint", save_policy)(
            policy, state_dir / "checkpoints" / name, f"cycle-{index:04d}-{parent.id[:8]}",
            kind="cycle", fingerprint=mixed.fingerprint, config=inputs.config_dump, parent=parent,
            seed=cycle_cfg.seed, result=result,
            # A re-run of a cycle that died after saving (same index and parent) replaces the
            # unpromoted checkpoint atomically instead of failing forever.
            overwrite=True,
            metrics={"kl": kl, "before": before.summary.model_dump(), "after": after.summary.model_dump(),
                     "gate": {"promote": decision.promote, "reasons": decision.reasons}, **train_metrics},
        )
        if decision.promote:
            registry.promote(ckpt, kind="cycle", cycle=index)
    report = CycleReport(
        index=index, promoted=decision.promote, reasons=decision.reasons, checkpoint=ckpt, parent=parent,
        kl=kl, kl_budget=budget,
        before={"mean": before.summary.mean, **before.summary.per_category},
        after={"mean": after.summary.mean, **after.summary.per_category},
        judge=finite(labels.stats.metrics()), mix={**finite(mixed.mix), "pairs_added": float(mixed.pairs_added)},
        next_anchor_fraction=mix_next.anchor_fraction, next_beta=mix_next.beta,
        controller_reason=mix_next.reason, train=train_metrics, seconds=seconds,
    )
    registry.record_cycle(CycleState(
        completed=index, anchor_fraction=mix_next.anchor_fraction, beta=mix_next.beta,
        history=[*state.history, report.model_dump(mode="json", exclude={"checkpoint", "parent"})],
    ))
    shutil.rmtree(resume_dir, ignore_errors=True)
    return report


def run_cycle_locked(
    inputs: CycleInputs,
    buffer: CycleBuffer,
    *,
    step: Callable[[str, F], F] = identity_step,
    progress: bool = True,
    on_acquired: Callable[[], None] | None = None,
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
        return run_cycle(inputs, buffer, step=step, progress=progress)
