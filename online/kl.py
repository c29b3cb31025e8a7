"""KL(policy || reference) on held-out prompts, estimated from the policy's own samples.

Contract:
- `kl_from_logps(policy_logps, reference_logps, lengths, groups=None) -> KLEstimate`: the pure
  estimator, from each sample's summed response log-probs under both models.
- `estimate_kl(policy, reference, tokenizer, prompts, n_samples, max_new_tokens, seed) ->
  KLEstimate`: samples y ~ policy(.|x) for each prompt and scores them under both models.
  `reference` is either a separate model or a zero-argument context-manager factory under
  which `policy` *is* the reference (e.g. peft's `policy.disable_adapter`).
- `response_logps(model, prompt_ids, response_ids, pad_id) -> (N,)`: summed log-probs of
  response tokens given the prompt.

Estimator. For y ~ pi(.|x), log pi(y|x) − log pi0(y|x) is an unbiased single-sample estimate
of KL(pi(.|x) || pi0(.|x)) (its expectation under pi is the KL's definition), so
- `sequence` = mean over samples of the summed log-ratio: nats per response;
- `per_token` = sum of log-ratios / sum of response lengths: nats per token, token-weighted
  (a ratio estimator, so long responses count in proportion to their tokens).
This holds only for samples from pi itself, so `estimate_kl` samples at temperature 1 with
top-p and top-k off, and keeps the sampled EOS (stopping is part of y). Each estimate comes
with a standard error of its sampling noise; with `groups` (the prompt of each sample) it is
stratified by prompt, since the held-out prompt set is fixed and only the responses are
random (differences between prompts are part of the quantity, not noise). A response that
hits `max_new_tokens` is scored as sampled, so the estimate is the KL between the two models'
distributions over the first `max_new_tokens` tokens (never above the full-response KL).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from pydantic import BaseModel, ConfigDict

from online.generate import encode_prompts, sample_ids


class KLEstimate(BaseModel):
    """KL(policy || reference) estimated from n policy samples (NaN standard errors when n = 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sequence: float
    """Mean summed log-ratio per sampled response (nats per sequence)."""
    per_token: float
    """Summed log-ratios over summed response lengths (nats per token, token-weighted)."""
    stderr: float
    """Standard error of `sequence`."""
    per_token_stderr: float
    """Standard error of `per_token` (delta method for the ratio)."""
    n: int
    """Samples the estimate is based on."""
    mean_length: float
    """Mean response length in tokens (EOS included when sampled)."""

    def metrics(self) -> dict[str, float]:
        """Namespaced metric keys for logs and the controller."""
        return {
            "kl/policy_ref": self.sequence,
            "kl/policy_ref_per_token": self.per_token,
            "kl/stderr": self.stderr,
            "kl/samples": float(self.n),
            "kl/mean_length": self.mean_length,
        }


def kl_from_logps(
    policy_logps: Sequence[float] | torch.Tensor,
    reference_logps: Sequence[float] | torch.Tensor,
    lengths: Sequence[int] | torch.Tensor,
    groups: Sequence[int] | None = None,
) -> KLEstimate:
    """Sequence-level and per-token KL estimates from samples drawn from the policy.

    All inputs are (N,): summed response log-probs under the policy and the reference, and
    response lengths in tokens. `groups` (N,) labels samples that share a prompt (strata for
    the standard errors; without it all samples form one stratum).
    """
    pol = torch.as_tensor(policy_logps, dtype=torch.float64).flatten()
    ref = torch.as_tensor(reference_logps, dtype=torch.float64).flatten()
    lens = torch.as_tensor(lengths, dtype=torch.float64).flatten()
    n = pol.numel()
    if n == 0 or ref.numel() != n or lens.numel() != n:
        raise ValueError(f"need N >= 1 samples with matching sizes, got {n}, {ref.numel()}, {lens.numel()}")
    if bool((lens <= 0).any()):
        raise ValueError("every response length must be >= 1 token")
    ratio = pol - ref  # (N,) log pi(y|x) - log pi0(y|x)
    seq = ratio.mean().item()
    per_tok = (ratio.sum() / lens.sum()).item()
    g = torch.zeros(n, dtype=torch.long) if groups is None else torch.as_tensor(groups)
    if g.numel() != n:
        raise ValueError(f"groups has {g.numel()} labels for {n} samples")
    return KLEstimate(
        sequence=seq,
        per_token=per_tok,
        stderr=_ratio_stderr(ratio, torch.ones_like(ratio), seq, g),
        per_token_stderr=_ratio_stderr(ratio, lens, per_tok, g),
        n=n,
        mean_length=lens.mean().item(),
    )


def _ratio_stderr(d: torch.Tensor, w: torch.Tensor, r: float, groups: torch.Tensor) -> float:
    """Std error of r = sum(d) / sum(w) (delta method), stratified by `groups`.

    Var(r) ≈ Σ_g n_g/(n_g − 1) · Σ_{i∈g} (e_i − ē_g)² / (Σ w)², e_i = d_i − r·w_i: only the
    spread *within* a prompt is sampling noise when the prompt set is fixed. One group of
    all samples with w = 1 gives the familiar s²/N; groups of one sample carry no information.
    With one sample per prompt (no group of two), the prompts are taken as a sample of prompts
    and all samples form one stratum: that counts the spread between prompts as noise too, so
    it overstates the error, but it is finite and says how far an estimate can be trusted.
    """
    if n_groups_with_pairs(groups) == 0 and groups.numel() > 1:
        groups = torch.zeros_like(groups)
    _, idx = torch.unique(groups, return_inverse=True)
    n_groups = int(idx.max().item()) + 1
    resid = d - r * w  # (N,)
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, torch.ones_like(d))  # (G,)
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, resid)  # (G,)
    centred = resid - (sums / counts)[idx]  # (N,)
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, centred**2)  # (G,)
    usable = counts > 1
    if not bool(usable.any()):
        return math.nan
    var = (counts[usable] / (counts[usable] - 1) * sq[usable]).sum() / w.sum() ** 2
    return math.sqrt(var.item())


def n_groups_with_pairs(groups: torch.Tensor) -> int:
    """How many groups hold at least two samples."""
    _, counts = torch.unique(groups, return_counts=True)
    return int((counts > 1).sum().item())


@torch.no_grad()
def response_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N,) summed log pi(response | prompt): logits at response positions only.

    Sequences are right-padded, so positions need no adjustment; token t of the sequence is
    predicted by the logits at t − 1.
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        responses = response_ids[start : start + batch_size]
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        rows = [list(p) + list(r) + [pad_id] * (width - len(p) - len(r)) for p, r in zip(prompts, responses)]
        ids = torch.tensor(rows, dtype=torch.long, device=device)  # (B, T)
        positions = torch.arange(width, device=device)  # (T,)
        starts = torch.tensor([len(p) for p in prompts], device=device)[:, None]  # (B, 1)
        ends = starts + torch.tensor([len(r) for r in responses], device=device)[:, None]  # (B, 1)
        attn = (positions < ends).long()  # (B, T)
        scored = (positions >= starts) & (positions < ends)  # (B, T) True at response tokens
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # (B, T-1, V)
        labels = ids[:, 1:]  # (B, T-1)
        token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (B, T-1)
        out.append((token_logps * scored[:, 1:]).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def estimate_kl(
    policy,
    reference: torch.nn.Module | Callable[[], AbstractContextManager],
    tokenizer,
    prompts: Sequence[str | tuple[str, str | None]],
    n_samples: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 16,
) -> KLEstimate:
    """Sample `n_samples` responses per prompt from `policy`, score them under both models.

    `reference` is a separate model, or a context-manager factory under which `policy`
    computes the reference's log-probs (a LoRA policy with its adapter disabled), so no second
    copy of the weights is needed.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: sampled responses could never stop")
    texts = [p if isinstance(p, str) else p[0] for p in prompts]
    if not texts:
        raise ValueError("estimate_kl needs at least one prompt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, texts)
    samples = sample_ids(
        policy,
        prompt_ids,
        k=n_samples,
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_token_id,
        pad_id=pad_id,
        seed=seed,
        batch_size=batch_size,
    )  # [prompt][sample][token], pure ancestral samples (temperature 1, no top-k/top-p)
    flat_prompts = [prompt_ids[i] for i, rs in enumerate(samples) for _ in rs]
    flat_responses = [r for rs in samples for r in rs]
    groups = [i for i, rs in enumerate(samples) for _ in rs]

    was_training = policy.training
    policy.eval()
    try:
        policy_logps = response_logps(policy, flat_prompts, flat_responses, pad_id, batch_size)
        if isinstance(reference, torch.nn.Module):
            reference.eval()
            reference_logps = response_logps(reference, flat_prompts, flat_responses, pad_id, batch_size)
        else:
            with reference():
                reference_logps = response_logps(policy, flat_prompts, flat_responses, pad_id, batch_size)
    finally:
        policy.train(was_training)
    return kl_from_logps(policy_logps, reference_logps, [len(r) for r in flat_responses], groups)
