"""Preference losses: pure functions of four per-sequence log-prob tensors and `beta`.

Contract: every loss takes `policy_chosen_logps`, `policy_rejected_logps`,
`reference_chosen_logps`, `reference_rejected_logps` (each `(B,)`, summed over response tokens)
and `beta`, and returns a `LossOutput` of per-example losses `(B,)` plus the implicit rewards
`beta * (policy - reference)` of the chosen and rejected responses `(B,)`, detached. Rewards are
always the sequence-level ones (summed log-probs), whatever the loss, so `rewards/*` metrics mean
the same thing for every loss type. Nothing here touches a model or an optimizer.

The loop picks a loss through the `LOSSES` table (name -> function of `(PreferenceLogps,
LossConfig)`), never through `if loss_type == ...` chains; `preference_loss` adds the optional
SFT term. Every variant TRL also has is parity-tested against `trl.DPOTrainer` (tests/test_loss.py).

Notation: h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l), the difference of log-ratios.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from offline.config import LossConfig


class LossOutput(NamedTuple):
    """Per-example losses and implicit rewards, each `(B,)`; rewards carry no gradient."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class PreferenceLogps(NamedTuple):
    """What a loss may look at for one batch: four `(B,)` log-prob sums and response lengths."""

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    reference_chosen_logps: torch.Tensor
    reference_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # (B,) response tokens scored, incl. EOS
    rejected_lengths: torch.Tensor  # (B,)


def implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit reward r = beta * log pi/pi_ref (Rafailov et al. 2023, Eq. 5), detached."""
    chosen = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return chosen, rejected


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Sigmoid DPO: -log sigma(beta * h) (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7).

    With `label_smoothing = eps > 0` this is conservative DPO (cDPO; Mitchell 2023, "A note on DPO
    with noisy preferences"): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), the expected
    DPO loss when each label is flipped with probability eps. (TRL 1.x's "sigmoid" has no smoothing;
    equal at eps = 0.)
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return LossOutput(
        losses,
        *implicit_rewards(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
        ),
    )


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> LossOutput:
    """IPO: (h - 1/(2 beta))^2 (Azar et al. 2023, "A General Theoretical Paradigm...", Eq. 17, tau = beta).

    The paper's h uses sequence log-probs. Given `chosen_lengths`/`rejected_lengths`, each log-ratio
    is first divided by its response length (h = lr_w/|y_w| - lr_l/|y_l|): the per-token form TRL
    uses and that the IPO authors confirmed their reported results correspond to; without lengths the
    loss is the paper's sequence-level form. The training loop always passes lengths, so its IPO
    equals TRL's "ipo"; rewards stay sequence-level either way.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    if chosen_lengths is not None and rejected_lengths is not None:
        chosen_logratios = chosen_logratios / chosen_lengths.clamp(min=1)
        rejected_logratios = rejected_logratios / rejected_lengths.clamp(min=1)
    h = chosen_logratios - rejected_logratios
    losses = (h - 1 / (2 * beta)) ** 2
    return LossOutput(
        losses,
        *implicit_rewards(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
        ),
    )


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossOutput:
    """Hinge: max(0, 1 - beta * h).

    SLiC's calibration loss (Zhao et al. 2023, "SLiC-HF", Eq. 1) on reference-normalised
    likelihoods, i.e. the "hinge-norm" loss of RSO (Liu et al. 2023, "Statistical Rejection Sampling
    Improves Preference Optimization", Sec. 3); beta = 1/delta, delta being SLiC's margin.
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    losses = torch.relu(1 - beta * h)
    return LossOutput(
        losses,
        *implicit_rewards(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
        ),
    )


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO: [(1-eps) l(h) - eps l(-h)] / (1 - 2 eps), with l(h) = -log sigma(beta h).

    The de-biased loss of Chowdhury et al. 2024 ("Provably Robust DPO", Sec. 3): an unbiased
    estimate of the clean-label DPO loss when labels are flipped with probability eps
    (`label_smoothing`, in [0, 0.5)). Same as TRL's "robust"; equals sigmoid DPO at eps = 0.
    """
    eps = label_smoothing
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return LossOutput(
        losses,
        *implicit_rewards(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
        ),
    )


def sft_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Length-normalised NLL of the chosen response, `(B,)`: -log pi(y_w|x) / |y_w|.

    Per example (so it adds to the per-example preference losses). TRL's "sft" averages over all
    chosen tokens of the micro-batch instead; the two agree when chosen lengths are equal.
    """
    return -policy_chosen_logps / chosen_lengths.clamp(min=1)


LossFn = Callable[[PreferenceLogps, LossConfig], LossOutput]

# The one place a loss name becomes a function; the loop only ever calls `preference_loss`.
LOSSES: dict[str, LossFn] = {
    "sigmoid": lambda lp, cfg: dpo_loss(*lp[:4], cfg.beta, label_smoothing=cfg.label_smoothing),
    "ipo": lambda lp, cfg: ipo_loss(*lp[:4], cfg.beta, lp.chosen_lengths, lp.rejected_lengths),
    "hinge": lambda lp, cfg: hinge_loss(*lp[:4], cfg.beta),
    "robust": lambda lp, cfg: robust_loss(*lp[:4], cfg.beta, label_smoothing=cfg.label_smoothing),
}


def preference_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """The configured loss plus `sft_weight` * the SFT term; per-example losses `(B,)`."""
    out = LOSSES[cfg.type](logps, cfg)
    if cfg.sft_weight > 0:
        sft = sft_loss(logps.policy_chosen_logps, logps.chosen_lengths)
        out = out._replace(losses=out.losses + cfg.sft_weight * sft)
    return out
