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
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from offline.atomic import atomic_write_json
from offline.checkpoint import is_complete, model_id
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

log = logging.getLogger(__name__)

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


def sample_eval(
    policy: LoadedPolicy, prompts: list[Prompt], gen_cfg: GenerationConfig, samples: int, seed: int,
    cache: "EvalSampleCache | None" = None, model: str | None = None,
) -> list[Generation]:
    """The policy's samples on the held-out prompts (in-memory transformers, whatever the
    backend); the same seed for two policies makes their comparison paired.

    Exactly `samples` sequences per prompt are generated (none is drawn to be thrown away).
    With a `cache` and the policy's weights id `model`, samples already drawn for the same
    weights, prompts, settings and seed are read back instead of generated again, and new ones
    are stored (see `EvalSampleCache`).
    """
    key = eval_sample_key(prompts, gen_cfg, samples, seed) if cache is not None and model else None
    if key is not None:
        hit = cache.get(model, key)  # type: ignore[union-attr]
        if hit is not None:
            log.info("evaluation samples of %s: %d prompts x %d read back from the cache", model, len(prompts), samples)
            return hit
    # `k` counts responses per prompt for pairs (>= 2 in the config); evaluation asks for
    # `samples`, which may be 1: the generator takes k per call, so pass it there.
    cfg = gen_cfg.model_copy(update={"backend": "hf"})
    gens = build_generator(cfg, policy.model_dir, "eval", model=policy.model, tokenizer=policy.tokenizer)
    policy.model.eval()
    t0 = time.perf_counter()
    out = gens.generate(prompts, samples, seed)
    log.info("evaluation samples of %s: %d prompts x %d in %.1f s", model or "the policy", len(prompts), samples,
             time.perf_counter() - t0)
    if key is not None:
        cache.put(model, key, out)  # type: ignore[union-attr,arg-type]
    return out


def eval_sample_key(prompts: list[Prompt], gen_cfg: GenerationConfig, samples: int, seed: int) -> str:
    """24-hex id of everything besides the weights that decides a policy's evaluation samples:
    the prompts (text and category, in order), how many samples each, the seed and the sampling
    settings (the batch size too: it decides which random draws each sequence gets)."""
    spec = {
        "prompts": [[p, c] for p, c in prompts], "samples": samples, "seed": seed,
        "temperature": gen_cfg.temperature, "top_p": gen_cfg.top_p,
        "max_new_tokens": gen_cfg.max_new_tokens, "batch_size": gen_cfg.batch_size,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


class EvalSampleCache:
    """A policy's held-out evaluation samples, kept under `root` by weights id and sample key.

    Why: the current policy of cycle i+1 is cycle i's promoted candidate (or the policy cycle i
    started from), and with the run's fixed evaluation seed its samples were drawn already, when
    it was evaluated as a candidate or as a stage. Sampling is most of a cycle's evaluation
    cost on a CPU, and reading them back halves it. Scores are not cached: the scorer runs on
    the samples every time (cheap for a rule or reward model; an LLM judge's win rate depends on
    the other policy's samples anyway).

    One approximation, stated: a LoRA checkpoint is sampled unmerged (pi_0 plus its adapter) in
    a cycle and merged by `evaluate_checkpoint`; the two are the same weights up to float
    rounding and share one entry. Entries are written atomically; a corrupt one is a miss.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, model: str, key: str) -> Path:
        return self.root / f"{model}-{key}.json"

    def get(self, model: str, key: str) -> list[Generation] | None:
        path = self._path(model, key)
        try:
            rows = json.loads(path.read_text())
            return [Generation.model_validate(r) for r in rows]
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:  # torn or foreign file: sample again, overwrite
            log.warning("ignoring unreadable evaluation samples %s: %s", path, exc)
            return None

    def put(self, model: str, key: str, gens: list[Generation]) -> None:
        """Store `gens`; a failed write is logged, never raised (the cache only saves time)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self._path(model, key), [g.model_dump(mode="json") for g in gens])
        except OSError as exc:
            log.warning("could not cache evaluation samples under %s: %s", self.root, exc)


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
    samples: list[Generation]
    """Its held-out samples: stored under its weights id once it is saved (`EvalSampleCache`)."""


def evaluate_current(policy: LoadedPolicy, prompts: list[Prompt], online: OnlineConfig,
                     scorer: Scorer | None, seed: int, cache: EvalSampleCache | None = None,
                     model: str | None = None) -> CurrentEval:
    """Sample and score the current policy (no scorer: an LLM judge, the 0.5 baseline); its
    samples come from `cache` when these weights (`model`, their id) were sampled already."""
    samples = sample_eval(policy, prompts, online.generation, online.eval_samples, seed, cache, model)
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
    return CandidateEval(summary, kl, samples)


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
    eval_seed = derive_seed(seed, "eval")  # the cycles' evaluation seed too (`online.cycle`)
    # A tether checkpoint's samples may be cached already (a cycle evaluated it); pi_0's weights
    # are not hashed for a key (half a GB), it is sampled once per run anyway.
    cache, weights = (EvalSampleCache(state_dir / "cache" / "eval-samples"), model_id(path)) \
        if is_complete(path) else (None, None)
    gens = sample_eval(policy, eval_prompts, online.generation, online.eval_samples, eval_seed, cache, weights)
    if online.gate.metric == "reward":
        summary = reward_summary(gens, make_scorer(online.judge))
    elif Path(path).resolve() == reference_dir.resolve():
        summary = even_summary(gens)
    else:
        if baseline is None:
            initial = load_policy(plain, state_dir)
            baseline = sample_eval(initial, eval_prompts, online.generation, online.eval_samples, eval_seed)  # pi_0
            del initial
        summary = win_rate_summary(gens, baseline, online.judge)
    kl = finite(measure_kl(policy, reference_dir, list(pool.heldout[: online.kl_prompts]), online.kl_samples,
                           online.generation.max_new_tokens, derive_seed(seed, "kl")).metrics()) if with_kl else {}
    return {"reward": {"mean": summary.mean, **summary.per_category}, "kl": kl, "samples": gens, "summary": summary}
