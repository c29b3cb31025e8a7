"""One online refresh cycle, as a sequence of plain steps.

current policy -> sample prompts -> generate -> judge -> fresh pairs into the buffer -> draw the
mixed training set -> missing reference log-probs -> train (the offline loop) -> evaluate + KL
-> gate -> promote or keep for inspection -> controller sets the next mix.

The sequence is written once, in `run_cycle`; each step goes through a `step(name, fn)` hook
that is the identity for plain calls (tests, benchmarks) and wraps the function in a Prefect
task inside `orchestrator.flows.refresh_cycle`. Nothing here imports prefect or redis: the
buffer arrives as an object.

Re-running a failed or killed cycle is safe: the cycle index only advances when a cycle ends;
its prompts and samples are seeded by (seed, index), so a re-run regenerates the same pairs and
their buffer writes are no-ops; training resumes from its snapshot; checkpoints and the pointer
are written atomically, and the pointer moves only after the gate passed.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from offline.checkpoint import CheckpointRef, is_complete
from offline.data import load_preference_dataset
from offline.config import DataConfig, ModelConfig, TrainConfig
from offline.models import LoadedPolicy, load_policy, load_reference, resolve_model_dir
from offline.pairs import PreferencePair
from offline.pipeline import reference_id_of, save_policy, train_policy
from offline.pointer import promote, read_current
from offline.reference import ReferenceLogpCache, compute_reference_logps
from online.config import GenerationConfig, JudgeConfig, OnlineConfig
from offline.tokenize import tokenize_pairs
from online.controller import next_mix
from online.gate import EvalSummary, decide_promotion
from online.generate import build_generator
from online.judge import build_judge
from online.judge_local import load_callable
from online.kl import KLEstimate, estimate_kl
from online.prompts import Prompt, load_prompt_pool, sample_prompts
from online.types import Generation, JudgeStats

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class StageTimes(BaseModel):
    """Wall seconds per stage of a cycle (benchmarks/cycle.py reads these)."""

    model_config = ConfigDict(extra="allow")


class CycleReport(BaseModel):
    """What a cycle did and decided: the row of the KL/reward history."""

    model_config = ConfigDict(frozen=True)

    index: int
    promoted: bool
    reasons: list[str]
    checkpoint: dict[str, Any] | None
    parent: dict[str, Any]
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


@dataclass
class CycleInputs:
    """The config sections a cycle reads, plus where it keeps state."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    online: OnlineConfig
    state_dir: Path
    name: str
    seed: int = 0
    config_dump: dict[str, Any] = field(default_factory=dict)

    @property
    def cycle_train(self) -> TrainConfig:
        return self.online.train or self.train


def identity_step(name: str, fn: F) -> F:
    """The `step` hook for plain calls: run the function as it is."""
    return fn


# -- pointers and cycle state (Redis is the live copy, the file its mirror) ----------------------


class NoCurrentPolicy(RuntimeError):
    """A cycle needs a promoted policy to start from; there is none (or it is incomplete)."""


def current_policy(buffer, state_dir: Path, name: str) -> dict[str, Any]:
    """The promoted policy record: the newer (by `seq`) of Redis' pointer and the file's."""
    candidates = [r for r in (buffer.get_pointer(f"current:{name}"), read_current(state_dir, name)) if r]
    if not candidates:
        raise NoCurrentPolicy(
            f"no promoted policy for {name!r} yet: run the offline baseline first (tether offline --config ...)"
        )
    record = max(candidates, key=lambda r: r.get("seq", 0))
    if not is_complete(Path(record["checkpoint"]["path"])):
        raise NoCurrentPolicy(f"the current policy {record['checkpoint']['path']} is not a complete checkpoint")
    return record


def promote_policy(buffer, state_dir: Path, name: str, ref: CheckpointRef, **extra: Any) -> dict[str, Any]:
    """Move the current-policy pointer: the file (atomic replace), then Redis (one SET)."""
    record = promote(state_dir, name, ref, **extra)
    buffer.set_pointer(f"current:{name}", record)
    return record


def cycle_state(buffer, name: str, online: OnlineConfig, beta: float) -> dict[str, Any]:
    """Completed-cycle count and the controller's current mix (first cycle: the config's)."""
    state = buffer.get_pointer(f"cycle-state:{name}") or {}
    return {
        "completed": int(state.get("completed", 0)),
        "anchor_fraction": float(state.get("anchor_fraction", online.initial_anchor_fraction)),
        "beta": float(state.get("beta", beta)),
        "history": list(state.get("history", [])),
    }


# -- the steps ----------------------------------------------------------------------------------


def load_current(inputs: CycleInputs, checkpoint_path: str) -> LoadedPolicy:
    """The current policy, trainable, from its checkpoint (LoRA settings as configured)."""
    cfg = inputs.model.model_copy(update={"name_or_path": checkpoint_path})
    return load_policy(cfg, inputs.state_dir)


def generate(policy: LoadedPolicy, gen_cfg: GenerationConfig, prompts: list[Prompt], seed: int, version: str) -> list[Generation]:
    """k samples per prompt from the current policy (backend as configured)."""
    generator = build_generator(gen_cfg, policy.model_dir, version, model=policy.model, tokenizer=policy.tokenizer)
    policy.model.eval()
    return generator.generate(prompts, gen_cfg.k, seed)


def judge(judge_cfg: JudgeConfig, generations: list[Generation]) -> tuple[list, JudgeStats]:
    """Label samples into pairs; ties and unparseable verdicts are dropped and counted."""
    return build_judge(judge_cfg).judge_generations(generations)


def add_fresh_pairs(buffer, judgments: list, cycle: int, policy_version: str) -> dict[str, Any]:
    """All of this cycle's pairs in one atomic write (a re-run adds nothing twice)."""
    from buffer.records import BufferedPair

    records = [
        BufferedPair.fresh(
            j.to_pair(), cycle=cycle, policy_version=policy_version, judge=j.judge,
            confidence=float(j.confidence),
        )
        for j in judgments
    ]
    return buffer.add(records).model_dump(mode="json")


def seed_anchor(buffer, data_cfg: DataConfig, tokenizer) -> dict[str, Any]:
    """Make sure the offline dataset's train split is the buffer's anchor (idempotent)."""
    dataset = load_preference_dataset(data_cfg, tokenizer=tokenizer)
    result = buffer.seed_anchor(dataset.train, dataset.fingerprint)
    return {"fingerprint": dataset.fingerprint, **result.model_dump(mode="json")}


def draw_training_set(buffer, n: int, anchor_fraction: float, seed: int) -> tuple[list[PreferencePair], dict[str, float]]:
    """The mixed training set: round(n * anchor_fraction) anchor pairs, the rest fresh."""
    batch = buffer.sample(n, anchor_fraction, seed)
    return [p.pair for p in batch.pairs], batch.stats.metrics()


@dataclass
class BufferUpdate:
    """What the buffer step did: anchor seeding, this cycle's write, and the mixed draw."""

    anchor: dict[str, Any]
    added: dict[str, Any]
    pairs: list[PreferencePair]
    mix: dict[str, float]


def update_buffer(
    buffer, data_cfg: DataConfig, tokenizer, judgments: list, cycle: int, policy_version: str,
    n: int, anchor_fraction: float, seed: int,
) -> BufferUpdate:
    """Anchor seeded (idempotent) -> this cycle's pairs in one atomic write -> the mixed draw.

    One step (one task run) for the three buffer operations: each is milliseconds, and a task
    run costs the Prefect API more than that.
    """
    anchor = seed_anchor(buffer, data_cfg, tokenizer)
    added = add_fresh_pairs(buffer, judgments, cycle, policy_version)
    pairs, mix = draw_training_set(buffer, n, anchor_fraction, seed)
    return BufferUpdate(anchor=anchor, added=added, pairs=pairs, mix=mix)


def reference_logps_for(
    reference_dir: Path, pairs: list, data_cfg: DataConfig, tokenizer, cache_dir: Path, batch_size: int,
    device: torch.device, autocast_dtype: torch.dtype | None, progress: bool,
) -> tuple[list, dict[str, tuple[float, float]]]:
    """Token ids of `pairs` and pi_0's log-probs (in the policy's training precision), computed
    only for pairs not cached before."""
    toks = tokenize_pairs(pairs, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length)
    reference_id = reference_id_of(reference_dir, autocast_dtype)
    cache = ReferenceLogpCache(cache_dir)
    if all(cache.get(reference_id, t) is not None for t in toks):
        model = None
        logps = {t.pair_id: cache.get(reference_id, t) for t in toks}
    else:
        model = load_reference(reference_dir, device=device)
        logps = compute_reference_logps(
            model, toks, reference_id, cache, batch_size, progress=progress, pad_token_id=tokenizer.pad_token_id,
            autocast_dtype=autocast_dtype,
        )
    return toks, logps  # type: ignore[return-value]


def make_scorer(judge_cfg: JudgeConfig) -> Callable[[list[tuple[str, str]]], list[float]]:
    """A scalar reward for (prompt, response) pairs, for evaluation: the rule or the reward model.

    An LLM judge gives no scalar; its evaluation is a pairwise win rate (`win_rate_eval`).
    """
    if judge_cfg.kind == "rule":
        assert judge_cfg.rule is not None
        fn = load_callable(judge_cfg.rule.function)
        return lambda items: [float(fn(p, r)) for p, r in items]
    if judge_cfg.kind == "reward_model":
        rm = build_judge(judge_cfg)
        return lambda items: rm.score([p + r for p, r in items])  # type: ignore[attr-defined]
    raise ValueError("the llm judge has no scalar score; use gate.metric: win_rate")


def sample_eval(policy: LoadedPolicy, prompts: list[Prompt], gen_cfg: GenerationConfig, samples: int, seed: int) -> list[Generation]:
    """The policy's samples on the held-out prompts, for evaluation.

    Samples come from the in-memory model (transformers), whatever the generation backend, so a
    candidate is evaluated before anything serves it; the same seed for the current policy and
    the candidate makes their comparison paired.
    """
    cfg = gen_cfg.model_copy(update={"backend": "hf", "k": max(samples, 2)})
    gens = build_generator(cfg, policy.model_dir, "eval", model=policy.model, tokenizer=policy.tokenizer)
    policy.model.eval()
    out = gens.generate(prompts, cfg.k, seed)
    return [g.model_copy(update={"responses": g.responses[:samples]}) for g in out]


def reward_summary(gens: list[Generation], scorer: Callable[[list[tuple[str, str]]], list[float]]) -> EvalSummary:
    """Mean reward of the samples, per category and overall."""
    items = [(g.prompt, r) for g in gens for r in g.responses]
    cats = [g.category or "(none)" for g in gens for _ in g.responses]
    rewards = scorer(items)
    per: dict[str, list[float]] = {}
    for c, r in zip(cats, rewards):
        per.setdefault(c, []).append(r)
    return EvalSummary(
        per_category={c: sum(v) / len(v) for c, v in sorted(per.items())},
        mean=sum(rewards) / max(len(rewards), 1),
    )


def even_summary(gens: list[Generation]) -> EvalSummary:
    """The current policy's win rate against itself: 0.5 in every category, by definition."""
    cats = sorted({g.category or "(none)" for g in gens})
    return EvalSummary(per_category={c: 0.5 for c in cats}, mean=0.5, win_rate=0.5,
                       per_category_win_rate={c: 0.5 for c in cats})


def win_rate_summary(candidate: list[Generation], current: list[Generation], judge_cfg: JudgeConfig) -> EvalSummary:
    """Judge each candidate sample against the current policy's sample for the same prompt.

    Win rate = (wins + ties/2) / comparisons, per category; a tie (the judge's two orders
    disagree, identical responses, an unparseable verdict) counts half, never as a win.
    """
    pairs = [
        Generation(prompt=c.prompt, category=c.category, responses=(rc, rb), policy_version="eval")
        for c, b in zip(candidate, current) for rc, rb in zip(c.responses, b.responses)
    ]
    judgments, _ = build_judge(judge_cfg).judge_generations(pairs)
    wins: dict[tuple[str, str], bool] = {(j.prompt, j.chosen): True for j in judgments}
    losses = {(j.prompt, j.rejected) for j in judgments}
    per: dict[str, list[float]] = {}
    for g in pairs:
        cand = g.responses[0]
        score = 1.0 if (g.prompt, cand) in wins else 0.0 if (g.prompt, cand) in losses else 0.5
        per.setdefault(g.category or "(none)", []).append(score)
    rates = {c: sum(v) / len(v) for c, v in sorted(per.items())}
    overall = [x for v in per.values() for x in v]
    mean = sum(overall) / max(len(overall), 1)
    return EvalSummary(per_category=rates, mean=mean, win_rate=mean, per_category_win_rate=rates)


def measure_kl(policy: LoadedPolicy, reference_dir: Path, prompts: list[Prompt], n_samples: int, max_new_tokens: int, seed: int):
    """KL(pi || pi_0) from the policy's own samples on held-out prompts."""
    ref = load_reference(reference_dir, device=policy.model.device)
    policy.model.eval()
    return estimate_kl(policy.model, ref, policy.tokenizer, prompts, n_samples, max_new_tokens, seed)


def evaluate_current(
    policy: LoadedPolicy, prompts: list[Prompt], online: OnlineConfig,
    scorer: Callable[[list[tuple[str, str]]], list[float]] | None, seed: int,
) -> tuple[list[Generation], EvalSummary]:
    """The current policy on the held-out prompts: its samples (kept, to pair with the
    candidate's) and their reward; with no scorer (LLM judge) it is the 0.5 baseline."""
    samples = sample_eval(policy, prompts, online.generation, online.eval_samples, seed)
    return samples, (reward_summary(samples, scorer) if scorer else even_summary(samples))


def evaluate_candidate(
    policy: LoadedPolicy, prompts: list[Prompt], current_samples: list[Generation],
    scorer: Callable[[list[tuple[str, str]]], list[float]] | None, reference_dir: Path,
    kl_prompts: list[Prompt], online: OnlineConfig, seed: int, kl_seed: int,
) -> tuple[EvalSummary, KLEstimate]:
    """The trained candidate: reward (or win rate against the current policy's samples, same
    prompts and seed) and KL(pi || pi_0) from its own samples."""
    samples = sample_eval(policy, prompts, online.generation, online.eval_samples, seed)
    after = reward_summary(samples, scorer) if scorer else win_rate_summary(samples, current_samples, online.judge)
    kl = measure_kl(policy, reference_dir, kl_prompts, online.kl_samples, online.generation.max_new_tokens, kl_seed)
    return after, kl


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric entries that are finite (NaN standard errors etc. are left out of JSON state)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def evaluate_checkpoint(
    inputs: CycleInputs, path: str | Path, seed: int = 0, baseline: list[Generation] | None = None,
    with_kl: bool = True,
) -> dict[str, Any]:
    """Score of one checkpoint per category on the held-out prompts, and its KL to pi_0.

    With a scalar judge (rule, reward model; `gate.metric: reward`) the score is the mean
    reward of its samples. With an LLM judge (`gate.metric: win_rate`) there is no absolute
    score: it is the win rate of its samples against the initial policy's (pi_0) on the same
    prompts and seed; pass those as `baseline` to score several checkpoints without sampling
    pi_0 again (they are returned as `samples` when `path` is pi_0 itself, whose win rate
    against itself is 0.5 by definition). Used by `tether eval` and for the stages the report
    compares, with the prompts and scorer the cycles' gate uses. `with_kl=False` skips the KL
    estimate (its own sampling and two scoring passes) for a caller that has it already.
    """
    online = inputs.online
    reference_dir = resolve_model_dir(inputs.model, inputs.state_dir)
    policy = load_current(inputs, str(path))
    pool = load_prompt_pool(online.prompts, tokenizer=policy.tokenizer)
    eval_prompts = list(pool.heldout[: online.eval_max_prompts])
    gens = sample_eval(policy, eval_prompts, online.generation, online.eval_samples, seed)
    if online.gate.metric == "reward":
        summary = reward_summary(gens, make_scorer(online.judge))
    elif Path(path).resolve() == reference_dir.resolve():
        summary = even_summary(gens)
    else:
        if baseline is None:
            initial = load_current(inputs, str(reference_dir))
            baseline = sample_eval(initial, eval_prompts, online.generation, online.eval_samples, seed)
            del initial
        summary = win_rate_summary(gens, baseline, online.judge)
    kl = finite(measure_kl(policy, reference_dir, list(pool.heldout[: online.kl_prompts]), online.kl_samples,
                           online.generation.max_new_tokens, seed + 11).metrics()) if with_kl else {}
    return {"reward": {"mean": summary.mean, **summary.per_category}, "kl": kl, "samples": gens}


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0


def run_cycle(
    inputs: CycleInputs,
    buffer,
    *,
    step: Callable[[str, F], F] = identity_step,
    progress: bool = True,
) -> CycleReport:
    """One refresh cycle under the caller's lock; returns what it did and decided."""
    online, state_dir, name = inputs.online, inputs.state_dir, inputs.name
    train_cfg = inputs.cycle_train
    seconds: dict[str, float] = {}
    state = cycle_state(buffer, name, online, train_cfg.loss.beta)
    pointer = current_policy(buffer, state_dir, name)
    # A cycle killed after promoting but before recording its state has still happened: the
    # pointer says so, and the next run must not apply the same cycle twice.
    index = max(state["completed"], int(pointer.get("cycle") or 0)) + 1
    seed = inputs.seed * 1_000_003 + index
    parent = CheckpointRef.model_validate(pointer["checkpoint"])
    reference_dir = resolve_model_dir(inputs.model, state_dir)
    log.info("cycle %d of %r from %s (anchor_fraction %.3f, beta %.4g)", index, name, parent.path, state["anchor_fraction"], state["beta"])

    with _timed(seconds, "load"):
        policy = step("load-current-policy", load_current)(inputs, parent.path)
        pool = load_prompt_pool(online.prompts, tokenizer=policy.tokenizer)
        eval_prompts = list(pool.heldout[: online.eval_max_prompts])
        if not eval_prompts:
            raise ValueError("the prompt pool has no held-out prompts to evaluate on: raise prompts.heldout_fraction")
    with _timed(seconds, "eval"):
        scorer = make_scorer(online.judge) if online.gate.metric == "reward" else None
        current_samples, before = step("evaluate-current", evaluate_current)(
            policy, eval_prompts, online, scorer, seed + 7,
        )
    with _timed(seconds, "generate"):
        prompts = sample_prompts(pool.train, online.prompts.sample_per_cycle, seed, balanced=online.prompts.category_balanced)
        generations = step("generate", generate)(policy, online.generation, prompts, seed, parent.id)
    with _timed(seconds, "judge"):
        judgments, jstats = step("judge", judge)(online.judge, generations)
    with _timed(seconds, "buffer"):
        mixed = step("update-buffer", update_buffer)(
            buffer, inputs.data, policy.tokenizer, judgments, index, parent.id,
            online.train_pairs, state["anchor_fraction"], seed,
        )
    with _timed(seconds, "reference"):
        toks, ref = step("reference-logps", reference_logps_for)(
            reference_dir, mixed.pairs, inputs.data, policy.tokenizer, state_dir / "cache" / "reference-logps",
            train_cfg.reference_batch_size, policy.model.device, policy.autocast_dtype, progress,
        )
    with _timed(seconds, "train"):
        cycle_cfg = train_cfg.model_copy(update={
            "seed": train_cfg.seed + index,
            "loss": train_cfg.loss.model_copy(update={"beta": state["beta"]}),
        })
        resume_dir = state_dir / "resume" / f"cycle-{name}-{index}-{parent.id[:8]}"
        result = step("train", train_policy)(policy, toks, ref, cycle_cfg, resume_dir, None, progress)
    with _timed(seconds, "eval"):
        after, kl = step("evaluate-candidate", evaluate_candidate)(
            policy, eval_prompts, current_samples, scorer, reference_dir, list(pool.heldout[: online.kl_prompts]),
            online, seed + 7, seed + 11,
        )
    budget = online.controller.kl_budget
    decision = decide_promotion(after, before, kl.sequence, budget, online.gate)
    mix_next = next_mix(kl.sequence, budget, state["anchor_fraction"], state["beta"], online.controller)
    train_metrics = {k: float(v) for k, v in result.final_metrics.items() if isinstance(v, int | float)}
    with _timed(seconds, "checkpoint"):
        ckpt = step("save-checkpoint", save_policy)(
            policy, state_dir / "checkpoints" / name, f"cycle-{index:04d}-{parent.id[:8]}",
            kind="cycle", fingerprint=mixed.anchor["fingerprint"], config=inputs.config_dump, parent=parent,
            seed=cycle_cfg.seed, result=result,
            # A re-run of a cycle that died after saving (same index and parent) replaces the
            # unpromoted checkpoint atomically instead of failing forever.
            overwrite=True,
            metrics={"kl": finite(kl.metrics()), "before": before.model_dump(), "after": after.model_dump(),
                     "gate": {"promote": decision.promote, "reasons": decision.reasons}, **train_metrics},
        )
        if decision.promote:
            promote_policy(buffer, state_dir, name, ckpt, kind="cycle", cycle=index, seq=index, promoted_at=time.time())
    report = CycleReport(
        index=index, promoted=decision.promote, reasons=decision.reasons,
        checkpoint=ckpt.model_dump(mode="json"), parent=parent.model_dump(mode="json"),
        kl=finite(kl.metrics()), kl_budget=budget,
        before={"mean": before.mean, **before.per_category}, after={"mean": after.mean, **after.per_category},
        judge=finite(jstats.metrics()), mix={**finite(mixed.mix), "pairs_added": float(mixed.added.get("added", 0))},
        next_anchor_fraction=mix_next.anchor_fraction, next_beta=mix_next.beta,
        controller_reason=mix_next.reason, train=train_metrics, seconds=seconds,
    )
    history = [*state["history"], report.model_dump(mode="json", exclude={"checkpoint", "parent"})]
    buffer.set_pointer(f"cycle-state:{name}", {
        "completed": index, "anchor_fraction": mix_next.anchor_fraction, "beta": mix_next.beta,
        "history": history[-200:],
    })
    shutil.rmtree(resume_dir, ignore_errors=True)
    return report


def run_cycle_locked(
    inputs: CycleInputs,
    buffer,
    *,
    step: Callable[[str, F], F] = identity_step,
    progress: bool = True,
    on_acquired: Callable[[], None] | None = None,
) -> CycleReport:
    """`run_cycle` under the family's cycle lock (Redis, TTL + heartbeat), so exactly one
    cycle trains at a time. Raises `buffer.lock.LockHeld` when another cycle holds the lock
    (`on_busy: skip`) or it was not freed within `wait_timeout_s` (`on_busy: wait`)."""
    online = inputs.online
    with buffer.lock(
        f"cycle:{inputs.name}", ttl_s=online.lock_ttl_s, blocking=online.on_busy == "wait",
        timeout_s=online.wait_timeout_s, heartbeat_s=max(1.0, online.lock_ttl_s / 3),
    ):
        if on_acquired is not None:
            on_acquired()
        return run_cycle(inputs, buffer, step=step, progress=progress)
