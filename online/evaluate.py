"""Online evaluation: how good a policy's own samples are on the held-out prompts, and how far it
has drifted from pi_0.

Contract: every stage that scores a policy goes through here, the cycle's gate (current policy
vs candidate), `tether eval`, and the demo/report stages, so they all use the same prompts,
samples, judge and KL estimate.
- With a scalar judge (rule, reward model; `gate.metric: reward`) a policy's score is the mean
  reward of its samples, per category and overall (`reward_summary`).
- An LLM judge gives no absolute score (`gate.metric: win_rate`): a policy is scored by its win
  rate against another's samples on the same prompts and seed (`win_rate_summary`; a tie counts
  half), so the current policy against itself is 0.5 by definition (`even_summary`).
- Samples come from the in-memory model (transformers), whatever the generation backend, so a
  candidate is evaluated before anything serves it.
- KL(pi || pi_0) is estimated from the policy's own samples (`online.kl`); pi_0 is the LoRA
  policy with its adapter disabled when its base is pi_0, else a frozen copy loaded for it.
Nothing here imports prefect or redis.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from offline.models import LoadedPolicy, load_policy, load_reference, resolve_model_dir
from offline.seeds import derive_seed
from online.config import CycleInputs, GenerationConfig, JudgeConfig, OnlineConfig
from online.gate import EvalSummary, PromptRewards, WinCounts
from online.generate import build_generator
from online.judge import build_judge
from online.judge_local import load_callable
from online.kl import KLEstimate, estimate_kl
from online.prompts import Prompt, load_prompt_pool
from online.types import Generation

Scorer = Callable[[list[tuple[str, str]]], list[float]]
"""A scalar reward for (prompt, response) pairs."""


def make_scorer(judge_cfg: JudgeConfig) -> Scorer:
    """The rule (its `eval_function` when set) or the reward model as a scalar scorer (an LLM
    judge has none: use win rates)."""
    if judge_cfg.kind == "rule":
        assert judge_cfg.rule is not None
        fn = load_callable(judge_cfg.rule.eval_function or judge_cfg.rule.function)
        return lambda items: [float(fn(p, r)) for p, r in items]
    if judge_cfg.kind == "reward_model":
        rm = build_judge(judge_cfg)
        return lambda items: rm.score([p + r for p, r in items])  # type: ignore[attr-defined]
    raise ValueError("the llm judge has no scalar score; use gate.metric: win_rate")


def sample_eval(policy: LoadedPolicy, prompts: list[Prompt], gen_cfg: GenerationConfig, samples: int, seed: int) -> list[Generation]:
    """The policy's samples on the held-out prompts (in-memory transformers, whatever the
    backend); the same seed for two policies makes their comparison paired."""
    cfg = gen_cfg.model_copy(update={"backend": "hf", "k": max(samples, 2)})
    gens = build_generator(cfg, policy.model_dir, "eval", model=policy.model, tokenizer=policy.tokenizer)
    policy.model.eval()
    out = gens.generate(prompts, cfg.k, seed)
    return [g.model_copy(update={"responses": g.responses[:samples]}) for g in out]


def prompt_key(prompt: str) -> str:
    """16-hex id of a prompt's text: pairs two policies' samples of it in the gate."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def mean_response_tokens(gens: list[Generation], tokenizer: Any | None) -> float | None:
    """Mean response length in the policy's tokens (the length guard's measure); None without a tokenizer."""
    if tokenizer is None:
        return None
    texts = [r for g in gens for r in g.responses]
    if not texts:
        return None
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(len(x) for x in ids) / len(ids)


def reward_summary(gens: list[Generation], scorer: Scorer, tokenizer: Any | None = None) -> EvalSummary:
    """Rewards of the samples: per category and overall, with counts, spread and each prompt's
    rewards (the gate pairs them with the other policy's on the same prompts)."""
    items = [(g.prompt, r) for g in gens for r in g.responses]
    rewards = iter(scorer(items))
    rows = [PromptRewards(key=prompt_key(g.prompt), category=g.category or "(none)",
                          rewards=tuple(next(rewards) for _ in g.responses)) for g in gens]
    return EvalSummary.from_rewards(rows, mean_response_tokens(gens, tokenizer))


def even_summary(gens: list[Generation], tokenizer: Any | None = None) -> EvalSummary:
    """The current policy's win rate against itself: 0.5 in every category, by definition."""
    cats = sorted({g.category or "(none)" for g in gens})
    return EvalSummary(per_category={c: 0.5 for c in cats}, mean=0.5, win_rate=0.5,
                       per_category_win_rate={c: 0.5 for c in cats},
                       mean_response_length=mean_response_tokens(gens, tokenizer))


def win_rate_summary(candidate: list[Generation], current: list[Generation], judge_cfg: JudgeConfig,
                     tokenizer: Any | None = None) -> EvalSummary:
    """Judge each candidate sample against the current policy's sample for the same prompt.

    Each comparison is a win, a loss or a tie (the judge's two orders disagree, identical
    responses, an unparseable verdict), counted per category. The readable win rate counts a
    tie half; the gate's bound uses the decisive ones only (see `online.gate`).
    """
    pairs = [
        Generation(prompt=c.prompt, category=c.category, responses=(rc, rb), policy_version="eval")
        for c, b in zip(candidate, current) for rc, rb in zip(c.responses, b.responses)
    ]
    judgments, _ = build_judge(judge_cfg).judge_generations(pairs)
    # A judgment names its comparison by (prompt, chosen, rejected): matching the whole triple
    # keeps a response that won one comparison and lost another on the same prompt apart.
    decided = {(j.prompt, j.chosen, j.rejected) for j in judgments}
    per: dict[str, WinCounts] = {}
    for g in pairs:
        cand, cur = g.responses
        outcome = (WinCounts(wins=1) if (g.prompt, cand, cur) in decided else WinCounts(losses=1)
                   if (g.prompt, cur, cand) in decided else WinCounts(ties=1))
        cat = g.category or "(none)"
        per[cat] = per.get(cat, WinCounts()) + outcome
    return EvalSummary.from_counts(per, mean_response_tokens(candidate, tokenizer))


def measure_kl(policy: LoadedPolicy, reference_dir: Path, prompts: list[Prompt], n_samples: int,
               max_new_tokens: int, seed: int) -> KLEstimate:
    """KL(pi || pi_0) from the policy's own samples on held-out prompts."""
    policy.model.eval()
    # LoRA on pi_0: the adapter-disabled policy is pi_0, no second copy.
    ref = (policy.reference if policy.reference_runs(reference_dir)
           else load_reference(reference_dir, device=policy.model.device))
    return estimate_kl(policy.model, ref, policy.tokenizer, prompts, n_samples, max_new_tokens, seed)


@dataclass(frozen=True)
class CurrentEval:
    """The current policy on the held-out prompts: its samples (kept, to pair with the
    candidate's) and their score (with an LLM judge, the 0.5 baseline)."""

    samples: list[Generation]
    summary: EvalSummary


@dataclass(frozen=True)
class CandidateEval:
    """The trained candidate: its score (reward, or win rate against the current policy's
    samples on the same prompts and seed) and its KL to pi_0."""

    summary: EvalSummary
    kl: KLEstimate


def evaluate_current(policy: LoadedPolicy, prompts: list[Prompt], online: OnlineConfig,
                     scorer: Scorer | None, seed: int) -> CurrentEval:
    """Sample and score the current policy (no scorer: an LLM judge, the 0.5 baseline)."""
    samples = sample_eval(policy, prompts, online.generation, online.eval_samples, seed)
    tok = policy.tokenizer
    return CurrentEval(samples, reward_summary(samples, scorer, tok) if scorer else even_summary(samples, tok))


def evaluate_candidate(
    policy: LoadedPolicy, prompts: list[Prompt], current: CurrentEval, scorer: Scorer | None,
    reference_dir: Path, kl_prompts: list[Prompt], online: OnlineConfig, seed: int, kl_seed: int,
) -> CandidateEval:
    """Sample and score the candidate exactly as the current policy was, then its KL."""
    samples = sample_eval(policy, prompts, online.generation, online.eval_samples, seed)
    tok = policy.tokenizer
    summary = (reward_summary(samples, scorer, tok) if scorer
               else win_rate_summary(samples, current.samples, online.judge, tok))
    kl = measure_kl(policy, reference_dir, kl_prompts, online.kl_samples, online.generation.max_new_tokens, kl_seed)
    return CandidateEval(summary, kl)


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric entries that are finite (NaN standard errors etc. are left out of JSON state)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def evaluate_checkpoint(
    inputs: CycleInputs, path: str | Path, seed: int = 0, baseline: list[Generation] | None = None,
    with_kl: bool = True,
) -> dict[str, Any]:
    """Score of one checkpoint per category on the held-out prompts, and its KL to pi_0.

    The stages `tether eval`, the demo and the report compare, with the prompts and scorer the
    cycles' gate uses. With an LLM judge the score is the win rate against pi_0's samples on the
    same prompts and seed; pass those as `baseline` to score several checkpoints without
    sampling pi_0 again (they are returned as `samples` when `path` is pi_0 itself, whose win
    rate against itself is 0.5). The checkpoint is evaluated as the merged model it is (LoRA
    off: nothing trains here). `with_kl=False` skips the KL estimate for a caller that has it.
    `summary` is the full `EvalSummary` (counts, per-prompt rewards: standard errors).
    """
    model, online, state_dir = inputs.model, inputs.online, inputs.state_dir
    plain = model.model_copy(update={"lora": None})
    reference_dir = resolve_model_dir(model, state_dir)
    policy = load_policy(plain, state_dir, checkpoint=path)
    pool = load_prompt_pool(online.prompts, tokenizer=policy.tokenizer)
    eval_prompts = list(pool.heldout[: online.eval_max_prompts])
    eval_seed = derive_seed(seed, "eval")
    gens = sample_eval(policy, eval_prompts, online.generation, online.eval_samples, eval_seed)
    if online.gate.metric == "reward":
        summary = reward_summary(gens, make_scorer(online.judge))
    elif Path(path).resolve() == reference_dir.resolve():
        summary = even_summary(gens)
    else:
        if baseline is None:
            initial = load_policy(plain, state_dir)
            baseline = sample_eval(initial, eval_prompts, online.generation, online.eval_samples, eval_seed)
            del initial
        summary = win_rate_summary(gens, baseline, online.judge)
    kl = finite(measure_kl(policy, reference_dir, list(pool.heldout[: online.kl_prompts]), online.kl_samples,
                           online.generation.max_new_tokens, derive_seed(seed, "kl")).metrics()) if with_kl else {}
    return {"reward": {"mean": summary.mean, **summary.per_category}, "kl": kl, "samples": gens, "summary": summary}
