"""Preference evaluation: does the policy's implicit reward order chosen over rejected?

Contract: `evaluate_preferences(policy, tokenized, reference_logps, beta, pad_token_id=...)`
scores held-out pairs with DPO's implicit reward r(y) = beta * (log pi(y|x) - log pi_ref(y|x))
(Rafailov et al. 2023, Eq. 5) and returns an `EvalResult`: preference accuracy (fraction of pairs
with r(chosen) > r(rejected), ties count as wrong, as in TRL's `rewards/accuracies`), the mean
margin r(chosen) - r(rejected), overall and per category (pairs without one fall under
"uncategorized"). The policy runs in eval mode, without gradients, batched by length; its mode
is restored afterwards. Reference log-probs come from offline/reference.py like training's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from offline.logps import (
    AutocastDtype,
    autocast,
    collate_pairs,
    resolve_autocast,
    sequence_logps,
    supports_shared_prompt,
)
from offline.reference import check_reference_logps
from offline.token_store import pair_lengths
from offline.tokenize import TokenizedPair

UNCATEGORIZED = "uncategorized"


class CategoryEval(BaseModel):
    """Accuracy and mean margin over one group of pairs."""

    model_config = ConfigDict(frozen=True)

    accuracy: float
    """Fraction of pairs whose implicit reward ranks chosen above rejected."""
    mean_margin: float
    """Mean of r(chosen) - r(rejected)."""
    n: int
    """Pairs in the group."""


class EvalResult(CategoryEval):
    """Overall accuracy/margin plus the same per category."""

    per_category: dict[str, CategoryEval]
    """Category name (or "uncategorized") -> its accuracy, margin and count."""


def evaluate_preferences(
    policy: nn.Module,
    tokenized: Sequence[TokenizedPair],
    reference_logps: Mapping[str, tuple[float, float]],
    beta: float,
    *,
    pad_token_id: int,
    batch_size: int = 16,
    autocast_dtype: AutocastDtype = "auto",
) -> EvalResult:
    """Preference accuracy and reward margin of `policy` on `tokenized` (see module docstring),
    in the precision its reference log-probs were computed in (`autocast_dtype`)."""
    if not tokenized:
        raise ValueError("evaluate_preferences got no pairs")
    check_reference_logps(reference_logps, tokenized)
    device = next(policy.parameters()).device
    share_prompt = supports_shared_prompt(policy)
    n = pair_lengths(tokenized)  # (N, 3), read from the store without building pairs
    order = np.argsort(2 * n[:, 0] + n[:, 1] + n[:, 2], kind="stable").tolist()  # by n_tokens
    margins = torch.empty(len(tokenized), dtype=torch.float64)  # (N,) in input order
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad(), autocast(device, resolve_autocast(device, autocast_dtype)):
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                group = [tokenized[i] for i in idx]
                batch = collate_pairs(group, pad_token_id, share_prompt=share_prompt).to(device)
                chosen, rejected = sequence_logps(policy, batch).float().cpu().chunk(2)  # (B,), (B,)
                ref = torch.tensor([reference_logps[p.pair_id] for p in group], dtype=torch.float64)  # (B, 2)
                margin = beta * ((chosen.double() - ref[:, 0]) - (rejected.double() - ref[:, 1]))  # (B,)
                margins[idx] = margin
    finally:
        policy.train(was_training)

    groups: dict[str, list[int]] = defaultdict(list)
    for i, pair in enumerate(tokenized):
        groups[pair.category if pair.category is not None else UNCATEGORIZED].append(i)
    overall = _summary(margins)
    return EvalResult(
        **overall.model_dump(),
        per_category={name: _summary(margins[idx]) for name, idx in sorted(groups.items())},
    )


def _summary(margins: torch.Tensor) -> CategoryEval:
    return CategoryEval(
        accuracy=float((margins > 0).double().mean()),
        mean_margin=float(margins.mean()),
        n=int(margins.numel()),
    )
