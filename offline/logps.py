"""Summed response log-probs of a causal LM, computing logits only where they are needed.

Contract: `collate_pairs(pairs, pad_token_id, share_prompt=...)` turns B tokenized pairs into
one right-padded `PreferenceBatch` (one forward for chosen and rejected); `sequence_logps(model,
batch)` returns `(2B,)` sums of log pi(token | prompt, previous tokens) over response tokens (EOS
included), chosen first, differentiable. The prompt is context only and never scored.

Two layouts, same result (tested against each other and against a naive full-logits sum):
  * paired: 2B rows, `prompt+chosen` rows then `prompt+rejected` rows, 2D padding mask.
  * shared prompt (`share_prompt=True`): B rows `prompt+chosen+rejected`; a 4D mask hides the
    chosen tokens from the rejected ones and the rejected positions restart after the prompt,
    so each rejected token sees exactly `prompt + rejected[:k]`. The prompt runs once instead of
    twice; with HH-style pairs (long dialogue, short replies) that is ~40% fewer tokens (prefix
    sharing, as in Wang & Hegde 2024, "Accelerating Direct Preference Optimization with Prefix
    Sharing"). Needs attention that honours a custom 4D mask: `sdpa` or `eager`
    (`supports_shared_prompt`).

Why not `model(...).logits`: a forward materialises `(rows, T, V)` logits, most of them for
prompt tokens that are never scored, and log_softmax over them in float32 is the largest tensor
of a DPO step on small models. Instead the transformer body runs alone, its hidden states are
gathered at the positions that predict a response token, and the LM head is applied to those
rows only, in row chunks, by `_ResponseLogProbs`: its forward keeps only the logsumexp per row,
its backward recomputes each chunk's logits (one more head matmul, a few % of the step) so no
`(N, V)` tensor is ever saved for backward.

Right padding needs no special positions: under causal attention a real token only attends to
earlier, real tokens, so padding changes nothing for the scored rows (tested).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import ContextManager, Literal, Sequence, Union

import torch
from torch import nn

from offline.tokenize import TokenizedPair

# Rows per LM-head chunk are chosen so one chunk of float32 logits is about this many elements
# (64 MiB): big enough for an efficient matmul, small enough to bound peak memory.
_CHUNK_ELEMENTS = 1 << 24
# Attention implementations that apply a custom 4D mask as given (transformers passes 4D masks
# through untouched); flash-attention kernels take only padding, so they get the paired layout.
_MASKABLE_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PreferenceBatch:
    """B pairs as model rows plus where each scored token is read from.

    N = response tokens of all 2B sequences. Sequence s < B is pair s's chosen response,
    s >= B pair s-B's rejected one.
    """

    input_ids: torch.Tensor  # (R, T) right-padded; R = 2B (paired) or B (shared prompt)
    attention_mask: torch.Tensor  # (R, T) 1 on real tokens, or (R, 1, T, T) bool: may attend
    position_ids: torch.Tensor | None  # (R, T) for the shared layout, None = 0..T-1
    score_rows: torch.Tensor  # (N,) row of the hidden state that predicts each scored token
    score_cols: torch.Tensor  # (N,) its column
    targets: torch.Tensor  # (N,) the scored token ids
    score_seq: torch.Tensor  # (N,) which of the 2B sequences each scored token belongs to
    score_pos: torch.Tensor  # (N,) its index within that response
    response_lengths: torch.Tensor  # (2B,) scored tokens per sequence
    pair_ids: tuple[str, ...]  # (B,)
    n_tokens: int  # prompt + response tokens per sequence, prompt counted twice (TRL's count)
    n_processed: int  # non-pad tokens actually put through the model

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def shares_prompt(self) -> bool:
        return self.attention_mask.ndim == 4

    def to(self, device: torch.device | str) -> PreferenceBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            **{f: move(getattr(self, f)) for f in (
                "input_ids", "attention_mask", "position_ids", "score_rows", "score_cols",
                "targets", "score_seq", "score_pos", "response_lengths")},
        )


def collate_pairs(
    pairs: Sequence[TokenizedPair], pad_token_id: int, *, share_prompt: bool = False
) -> PreferenceBatch:
    """Stack pairs into one right-padded `PreferenceBatch` (layouts: see the module docstring)."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    for p in pairs:
        if not p.prompt_ids or not p.chosen_ids or not p.rejected_ids:
            raise ValueError(f"pair {p.pair_id}: prompt and both responses must be non-empty")
    b_n = len(pairs)
    rows: list[list[int]] = []
    positions: list[list[int]] = []
    segments: list[list[int]] = []  # shared layout: 0 prompt, 1 chosen, 2 rejected
    src_r: list[int] = []
    src_c: list[int] = []
    tgt: list[int] = []
    seq: list[int] = []
    pos: list[int] = []

    def score(row: int, cols: Sequence[int], tokens: Sequence[int], s: int) -> None:
        src_r.extend([row] * len(tokens))
        src_c.extend(cols)
        tgt.extend(tokens)
        seq.extend([s] * len(tokens))
        pos.extend(range(len(tokens)))

    if share_prompt:
        for b, p in enumerate(pairs):
            n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            rows.append(list(p.prompt_ids + p.chosen_ids + p.rejected_ids))
            positions.append(list(range(n_p + n_c)) + list(range(n_p, n_p + n_r)))
            segments.append([0] * n_p + [1] * n_c + [2] * n_r)
            # chosen token k sits at n_p+k and is predicted from n_p+k-1; rejected token k sits
            # at n_p+n_c+k and is predicted from the prompt's last position (k = 0) or n_p+n_c+k-1
            score(b, range(n_p - 1, n_p + n_c - 1), p.chosen_ids, b)
            score(b, [n_p - 1] + list(range(n_p + n_c, n_p + n_c + n_r - 1)), p.rejected_ids, b_n + b)
    else:
        for b, p in enumerate(pairs):
            rows.append(list(p.prompt_ids + p.chosen_ids))
            score(b, range(len(p.prompt_ids) - 1, len(rows[-1]) - 1), p.chosen_ids, b)
        for b, p in enumerate(pairs):
            rows.append(list(p.prompt_ids + p.rejected_ids))
            score(b_n + b, range(len(p.prompt_ids) - 1, len(rows[-1]) - 1), p.rejected_ids, b_n + b)

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        real[i, : len(r)] = True
    position_ids = None
    attention_mask: torch.Tensor = real.long()
    if share_prompt:
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        seg = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
        for i, (ps, sg) in enumerate(zip(positions, segments)):
            position_ids[i, : len(ps)] = torch.tensor(ps)
            seg[i, : len(sg)] = torch.tensor(sg)
        idx = torch.arange(width)
        causal = idx[:, None] >= idx[None, :]  # (T, T) query i may see key j <= i
        hidden_chosen = (seg[:, :, None] == 2) & (seg[:, None, :] == 1)  # (R, T, T)
        # padding queries see themselves too, so no softmax row is empty (no NaN anywhere)
        pad_key = ~real[:, None, :] & ~torch.eye(width, dtype=torch.bool)
        attention_mask = (causal & ~hidden_chosen & ~pad_key)[:, None]  # (R, 1, T, T)

    lengths = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]

    def long(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long)

    return PreferenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        score_rows=long(src_r),
        score_cols=long(src_c),
        targets=long(tgt),
        score_seq=long(seq),
        score_pos=long(pos),
        response_lengths=long(lengths),
        pair_ids=tuple(p.pair_id for p in pairs),
        n_tokens=sum(p.n_tokens for p in pairs),
        n_processed=int(real.sum()),
    )


def supports_shared_prompt(model: nn.Module) -> bool:
    """Whether `model`'s attention applies a custom 4D mask (needed by the shared layout)."""
    body, _ = causal_lm_parts(model)
    return getattr(body.config, "_attn_implementation", None) in _MASKABLE_ATTENTION


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(transformer body, LM head) of a transformers causal LM, a peft model around one, or a
    `SequenceLogps` wrapper. The body returns `last_hidden_state` after the final norm."""
    if isinstance(model, SequenceLogps):
        model = model.model
    if hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the base model
        model = model.get_base_model()
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):  # e.g. a LoRA adapter on lm_head, whose delta we'd ignore
        raise TypeError(
            f"{type(model).__name__}'s LM head is a {type(head).__name__}, not an nn.Linear: "
            "remove 'lm_head' from the LoRA target_modules"
        )
    text_config = model.config.get_text_config()
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(text_config, attr, None) not in (None, 1.0):
            # Response-only log-probs apply lm_head by hand; a model that rescales its logits
            # afterwards would get silently wrong numbers, so refuse it by name.
            raise ValueError(
                f"{type(model).__name__} rescales its logits ({attr}={getattr(text_config, attr)}): "
                "tether's response-only log-probs do not support such models"
            )
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
    """`(2B,)` summed log-probs of each sequence's response tokens; chosen first.

    Calls the transformer body (not the full model), gathers the hidden states that predict
    response tokens and applies the LM head on those rows only (see the module docstring).
    """
    body, head = causal_lm_parts(model)
    mask = batch.attention_mask
    if batch.shares_prompt:
        impl = getattr(body.config, "_attn_implementation", None)
        if impl not in _MASKABLE_ATTENTION:
            raise ValueError(f"attention {impl!r} ignores custom masks: collate with share_prompt=False")
        if impl == "eager":  # eager attention adds the mask to its scores
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
                ~mask, torch.finfo(torch.float32).min)
    out = body(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
               use_cache=False)
    hidden = out.last_hidden_state  # (R, T, H)
    token_logps = response_token_logps(
        hidden[batch.score_rows, batch.score_cols], head, batch.targets
    )  # (N,)
    # Place each token's log-prob at (sequence, index) and sum rows: a deterministic reduction.
    per_token = token_logps.new_zeros(len(batch.response_lengths), int(batch.response_lengths.max()))
    per_token = per_token.index_put((batch.score_seq, batch.score_pos), token_logps)
    return per_token.sum(dim=1)  # (2B,)


AutocastDtype = Union[torch.dtype, None, Literal["auto"]]
"""A forward's precision: a dtype to autocast to, None for none (the weights' own), or "auto"."""


def resolve_autocast(device: torch.device, dtype: AutocastDtype = "auto") -> torch.dtype | None:
    """"auto": bf16 on a CUDA device that supports it, else None (float32 on CPU)."""
    if dtype != "auto":
        return dtype
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """`torch.autocast` to `dtype` on `device`'s type, or nothing when `dtype` is None.

    The training forward, the reference log-probs and the evaluation all enter it with the
    same dtype: a reference scored in another precision than the policy's forward gives DPO a
    spurious margin at step 0.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class SequenceLogps(nn.Module):
    """`sequence_logps` as a module, so `accelerate.prepare` (DDP/FSDP) wraps the real forward."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, batch: PreferenceBatch) -> torch.Tensor:
        # Our own autocast rather than `Accelerator(mixed_precision=...)`: accelerate's state is
        # per process and refuses a second, different setting (TRL or a notebook that made an
        # Accelerator first would break every later train() call).
        with autocast(batch.input_ids.device, self.autocast_dtype):
            return sequence_logps(self.model, batch)
