"""Summed response log-probs of a causal LM, computing logits only where they are needed.

Contract: `collate_pairs(pairs, pad_token_id)` turns B tokenized pairs into one right-padded
batch of 2B rows (chosen rows 0..B-1, rejected rows B..2B-1: one forward for both);
`sequence_logps(model, batch)` returns `(2B,)` sums of log pi(token | prefix) over response
tokens (EOS included), differentiable. The prompt is context only and never scored.

Why not `model(...).logits`: a forward materialises `(2B, T, V)` logits, most of them for prompt
tokens that are never scored, and log_softmax over them in float32 is the largest tensor of a DPO
step on small models. Instead the transformer body runs alone, its hidden states are gathered
at the positions that predict a response token (position t-1 predicts token t), and the LM head
is applied to those rows only, in row chunks, by `_ResponseLogProbs`: its forward keeps only
the logsumexp per row, its backward recomputes each chunk's logits (one more head matmul, a
few % of the step) so no `(N, V)` tensor is ever saved for backward.

Right padding needs no special positions: under causal attention a real token only attends to
earlier, real tokens, so padding changes nothing for the scored rows (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from offline.tokenize import TokenizedPair

# Rows per LM-head chunk are chosen so one chunk of float32 logits is about this many elements
# (64 MiB): big enough for an efficient matmul, small enough to bound peak memory.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class PreferenceBatch:
    """B pairs as 2B right-padded rows: chosen rows first, then rejected rows."""

    input_ids: torch.Tensor  # (2B, T) prompt + response, right-padded with pad_token_id
    attention_mask: torch.Tensor  # (2B, T) 1 on real tokens
    response_mask: torch.Tensor  # (2B, T) bool, True on response tokens (the scored ones)
    pair_ids: tuple[str, ...]  # (B,)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def n_tokens(self) -> int:
        """Non-pad tokens put through the model (prompt counted once per response)."""
        return int(self.attention_mask.sum())

    @property
    def response_lengths(self) -> torch.Tensor:
        """`(2B,)` scored tokens per row."""
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.pair_ids,
        )


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int) -> PreferenceBatch:
    """Stack pairs into one `PreferenceBatch`, padded on the right to the longest row."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    for prompt, response in rows:
        if not prompt or not response:
            raise ValueError("every pair needs a non-empty prompt and non-empty responses")
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        n_p, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, n_p:n] = True
    return PreferenceBatch(input_ids, attention_mask, response_mask, tuple(p.pair_id for p in pairs))


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(transformer body, LM head) of a transformers causal LM, a peft model around one, or a
    `SequenceLogps` wrapper. The body returns `last_hidden_state` after the final norm."""
    if isinstance(model, SequenceLogps):
        model = model.model
    if hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the base model
        model = model.get_base_model()
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}'s output embedding is not an nn.Linear; unsupported")
    text_config = model.config.get_text_config()
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(text_config, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"{type(model).__name__} rescales its logits ({attr}); unsupported")
    return model.base_model, head


class _ResponseLogProbs(torch.autograd.Function):
    """log_softmax(h @ W^T + b)[target] per row, in row chunks, recomputing logits in backward.

    Saves `hidden (N, H)` and the per-row logsumexp `(N,)` only. Under autocast the matmuls run
    in the autocast dtype; the softmax and all accumulations run in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype):  # type: ignore[override]
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        w = weight.to(compute_dtype)
        out = hidden.new_empty(n_rows, dtype=torch.float32)  # (N,)
        lse = hidden.new_empty(n_rows, dtype=torch.float32)  # (N,)
        for s in range(0, n_rows, chunk):
            e = min(s + chunk, n_rows)
            logits = _head(hidden[s:e].to(compute_dtype), w, bias).float()  # (n, V)
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            out[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.compute_dtype = compute_dtype
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        cdt, chunk = ctx.compute_dtype, ctx.chunk
        w = weight.to(cdt)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        g = grad_out.float()  # (N,)
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            h = hidden[s:e].to(cdt)
            # d logp[target] / d logits = onehot(target) - softmax(logits)
            dlogits = _head(h, w, bias).float()  # (n, V)
            dlogits.sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])
            dlogits.scatter_add_(1, targets[s:e, None], g[s:e, None])
            if need_h:
                grad_h[s:e] = (dlogits.to(cdt) @ w).to(hidden.dtype)
            if need_w and cdt == torch.float32:  # (V, n) @ (n, H), accumulated in place
                grad_w.addmm_(dlogits.t(), h)
            elif need_w:
                grad_w.add_((dlogits.to(cdt).t() @ h).float())
            if need_b:
                grad_b.add_(dlogits.sum(0))
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def _head(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = h @ w.t()
    return logits if bias is None else logits + bias.to(logits.dtype)


def response_token_logps(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor
) -> torch.Tensor:
    """`(N,)` log-probs of `targets (N,)` under `head` applied to `hidden (N, H)`, chunked."""
    device_type = hidden.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    )
    with torch.autocast(device_type, enabled=False):  # dtypes are handled explicitly inside
        return _ResponseLogProbs.apply(hidden, head.weight, head.bias, targets, compute_dtype)


def sequence_logps(model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """`(2B,)` summed log-probs of each row's response tokens; chosen rows first.

    Calls the transformer body (not the full model), gathers the hidden states that predict
    response tokens and applies the LM head on those rows only (see the module docstring).
    """
    body, head = causal_lm_parts(model)
    out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state  # (2B, T, H)
    scored = batch.response_mask[:, 1:]  # (2B, T-1): token t+1 is scored from position t
    rows, cols = scored.nonzero(as_tuple=True)  # (N,), (N,) in row-major order
    token_logps = response_token_logps(
        hidden[rows, cols], head, batch.input_ids[:, 1:][rows, cols]
    )  # (N,)
    # Scatter back to (2B, T-1) and sum per row: deterministic, unlike index_add on some devices.
    per_token = token_logps.new_zeros(scored.shape).masked_scatter(scored, token_logps)
    return per_token.sum(dim=1)  # (2B,)


class SequenceLogps(nn.Module):
    """`sequence_logps` as a module, so `accelerate.prepare` (DDP/FSDP) wraps the real forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: PreferenceBatch) -> torch.Tensor:
        return sequence_logps(self.model, batch)
