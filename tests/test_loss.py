"""offline/loss.py: hand-derived values for every loss, and parity with TRL's DPOTrainer.

Notation in the derivations: h = (pc - rc) - (pr - rr), the difference of log-ratios, and
log sigma(x) = -log(1 + e^-x). Numbers used below: log(1 + e^-1) = 0.3132616875182228,
log(1 + e^1) = 1.3132616875182228 (= 1 + 0.31326...), log 2 = 0.6931471805599453.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch
from pydantic import ValidationError

from offline.config import LossConfig
from offline.logps import collate_pairs, sequence_logps
from offline.loss import (
    LOSSES,
    PreferenceLogps,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    robust_loss,
    sft_loss,
)
from offline.tokenize import TokenizedPair

torch.set_num_threads(1)  # tiny matmuls: extra threads only add sync cost on a shared CPU

SP1 = math.log1p(math.exp(-1))  # -log sigma(1)  = 0.31326...
SPM1 = math.log1p(math.exp(1))  # -log sigma(-1) = 1.31326...


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# pair 0: pc=-1, pr=-3, rc=-2, rr=-2 -> log-ratios +1 and -1, h = 2
# pair 1: pc=-4, pr=-4, rc=-4, rr=-4 -> h = 0
PC, PR, RC, RR = t(-1.0, -4.0), t(-3.0, -4.0), t(-2.0, -4.0), t(-2.0, -4.0)


def test_sigmoid_dpo_by_hand() -> None:
    """beta = 0.5. Pair 0: beta*h = 1 -> -log sigma(1) = log(1+e^-1) = 0.313262.
    Pair 1: h = 0 -> -log sigma(0) = log 2. Rewards: 0.5 * (+1, -1) for pair 0, (0, 0) for pair 1."""
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    torch.testing.assert_close(out.losses, t(SP1, math.log(2)))
    torch.testing.assert_close(out.chosen_rewards, t(0.5, 0.0))
    torch.testing.assert_close(out.rejected_rewards, t(-0.5, 0.0))


def test_conservative_dpo_by_hand() -> None:
    """cDPO, eps = 0.1, beta = 0.5, pair 0 (beta*h = 1):
    -(0.9) log sigma(1) - 0.1 log sigma(-1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262.
    Pair 1 (h = 0): (0.9 + 0.1) log 2 = log 2."""
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, t(0.9 * SP1 + 0.1 * SPM1, math.log(2)))
    assert abs(out.losses[0].item() - 0.4132616875182228) < 1e-12


def test_ipo_by_hand() -> None:
    """beta = 0.5 -> target 1/(2 beta) = 1. Sequence form, pair 0: (2 - 1)^2 = 1; pair 1: (0-1)^2 = 1.
    Length-normalised, pair 0 with |y_w| = 2, |y_l| = 4: h = 1/2 - (-1)/4 = 0.75 -> (0.75-1)^2 = 0.0625;
    pair 1 (lengths 3, 5): h = 0 -> 1."""
    torch.testing.assert_close(ipo_loss(PC, PR, RC, RR, beta=0.5).losses, t(1.0, 1.0))
    out = ipo_loss(PC, PR, RC, RR, beta=0.5, chosen_lengths=t(2, 3), rejected_lengths=t(4, 5))
    torch.testing.assert_close(out.losses, t(0.0625, 1.0))
    torch.testing.assert_close(out.chosen_rewards, t(0.5, 0.0))  # rewards stay sequence-level


def test_hinge_by_hand() -> None:
    """beta = 0.5: pair 0: max(0, 1 - 0.5*2) = 0; pair 1: max(0, 1 - 0) = 1.
    A third pair with h = -1: 1 + 0.5 = 1.5."""
    out = hinge_loss(t(-1, -4, -5), t(-3, -4, -4), t(-2, -4, -5), t(-2, -4, -5), beta=0.5)
    torch.testing.assert_close(out.losses, t(0.0, 1.0, 1.5))


def test_robust_by_hand() -> None:
    """rDPO, eps = 0.1, beta = 0.5, pair 0 (beta*h = 1):
    [0.9 * 0.313262 - 0.1 * 1.313262] / 0.8 = (0.281935 - 0.131326) / 0.8 = 0.188262.
    Pair 1 (h = 0): (0.9 - 0.1) log 2 / 0.8 = log 2. At eps = 0 it is sigmoid DPO."""
    out = robust_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, t((0.9 * SP1 - 0.1 * SPM1) / 0.8, math.log(2)))
    assert abs(out.losses[0].item() - 0.1882616875182228) < 1e-12
    torch.testing.assert_close(robust_loss(PC, PR, RC, RR, 0.5).losses, dpo_loss(PC, PR, RC, RR, 0.5).losses)


def test_sft_term_by_hand() -> None:
    """NLL per token of the chosen response: -(-6)/3 = 2 and -(-4)/1 = 4. With sft_weight 0.5 on
    top of sigmoid DPO (beta 0.5, pair 0 of above with pc=-6 -> h = (-6+2) - (-3+2) = -3):
    -log sigma(-1.5) + 0.5 * 2."""
    torch.testing.assert_close(sft_loss(t(-6.0, -4.0), t(3, 1)), t(2.0, 4.0))
    lp = PreferenceLogps(t(-6.0), t(-3.0), t(-2.0), t(-2.0), t(3), t(4))
    out = preference_loss(lp, LossConfig(type="sigmoid", beta=0.5, sft_weight=0.5))
    torch.testing.assert_close(out.losses, t(math.log1p(math.exp(1.5)) + 1.0))


def test_table_covers_every_configurable_loss_and_grads_flow() -> None:
    names = set(LossConfig.model_fields["type"].annotation.__args__)
    assert set(LOSSES) == names
    for name in names:
        pc = PC.clone().requires_grad_(True)
        lp = PreferenceLogps(pc, PR, RC, RR, t(2, 3), t(4, 5))
        out = preference_loss(lp, LossConfig(type=name, beta=0.5))
        out.losses.sum().backward()
        assert pc.grad is not None and not out.chosen_rewards.requires_grad


def test_config_rejects_meaningless_settings() -> None:
    with pytest.raises(ValidationError, match="label_smoothing"):
        LossConfig(type="ipo", label_smoothing=0.1)
    with pytest.raises(ValidationError):
        LossConfig(beta=0.0)
    with pytest.raises(ValidationError):
        LossConfig(type="robust", label_smoothing=0.5)
    with pytest.raises(ValidationError):
        LossConfig(typo=1)  # type: ignore[call-arg]


# --- parity with TRL ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory: pytest.TempPathFactory):
    """One tiny DPOTrainer (tiny Llama, word-level tokenizer t0..t63), reused by every case."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    vocab = {f"t{i}": i for i in range(64)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
        pad_token="t0", unk_token="t1", eos_token="t2",
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg)
    ours = copy.deepcopy(model)  # TRL patches its model's forward; we score an untouched twin
    with warnings.catch_warnings():  # transformers 5 renames gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        args = DPOConfig(
            output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none",
            bf16=False, use_cpu=True, gradient_checkpointing=False, per_device_train_batch_size=2,
        )
    data = Dataset.from_list([{"prompt": "t5 t6", "chosen": " t7", "rejected": " t8"}])
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=data, processing_class=tok)
    trainer.precompute_ref_logps = True  # read reference log-probs from the batch, as we do
    return trainer, ours


def _pairs(equal_chosen_lengths: bool) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, 64, (n,), generator=g).tolist())

    lengths = [(4, 3, 6), (2, 3, 2), (6, 3, 4)] if equal_chosen_lengths else [(4, 2, 6), (2, 5, 2), (6, 1, 4)]
    return [TokenizedPair(f"p{i}", None, ids(a), ids(b) + (2,), ids(c) + (2,), False)
            for i, (a, b, c) in enumerate(lengths)]


@pytest.mark.parametrize(
    ("ours", "trl_losses", "trl_weights", "equal_lengths"),
    [
        (LossConfig(type="sigmoid", beta=0.1), ["sigmoid"], [1.0], False),
        (LossConfig(type="sigmoid", beta=2.0), ["sigmoid"], [1.0], False),
        (LossConfig(type="ipo", beta=0.1), ["ipo"], [1.0], False),
        (LossConfig(type="hinge", beta=0.2), ["hinge"], [1.0], False),
        (LossConfig(type="robust", beta=0.1, label_smoothing=0.2), ["robust"], [1.0], False),
        (LossConfig(type="sigmoid", beta=0.1, sft_weight=0.7), ["sigmoid", "sft"], [1.0, 0.7], True),
    ],
    ids=["sigmoid", "sigmoid-beta2", "ipo", "hinge", "robust", "sigmoid+sft"],
)
def test_matches_trl_dpo_trainer(trl_trainer, ours, trl_losses, trl_weights, equal_lengths) -> None:
    """TRL's `_compute_loss` on the same batch (its collator, its fused LM head) vs our
    `sequence_logps` (both layouts) + `preference_loss`: loss, mean rewards and mean logps within
    1e-5 relative.
    SFT is compared with equal chosen lengths: TRL averages NLL over the micro-batch's tokens,
    we per example (identical then)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer, model = trl_trainer
    trainer.beta, trainer.label_smoothing = ours.beta, ours.label_smoothing
    trainer.loss_types, trainer.loss_weights = trl_losses, trl_weights
    trainer._metrics["train"].clear()
    pairs = _pairs(equal_lengths)
    # Reference values a few nats away from the policy's own, so that rewards (and h) are O(1)
    # and a 1e-5 relative comparison is not swamped by cancellation.
    with torch.no_grad():
        own_c, own_r = sequence_logps(model, collate_pairs(pairs, 0)).chunk(2)
    ref = [(round(c) - 2.0 - 0.5 * i, round(r) + 1.5 + 0.25 * i)
           for i, (c, r) in enumerate(zip(own_c.tolist(), own_r.tolist()))]
    examples = [
        {"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids),
         "rejected_ids": list(p.rejected_ids), "ref_chosen_logps": c, "ref_rejected_logps": r}
        for p, (c, r) in zip(pairs, ref)
    ]
    inputs = DataCollatorForPreference(pad_token_id=0)(examples)
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, inputs, False).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    def close(a: float, b: float) -> None:
        assert abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-3), (a, b)

    assert torch.equal(collate_pairs(pairs, 0).input_ids, inputs["input_ids"])  # same rows, padding
    for share_prompt in (False, True):
        batch = collate_pairs(pairs, pad_token_id=0, share_prompt=share_prompt)
        with torch.no_grad():
            chosen, rejected = sequence_logps(model, batch).chunk(2)
        ref_t = torch.tensor(ref)
        lengths = batch.response_lengths.chunk(2)
        out = preference_loss(PreferenceLogps(chosen, rejected, ref_t[:, 0], ref_t[:, 1], *lengths), ours)
        close(out.losses.mean().item(), trl_loss)
        close(out.chosen_rewards.mean().item(), metrics["rewards/chosen"])
        close(out.rejected_rewards.mean().item(), metrics["rewards/rejected"])
        close(chosen.mean().item(), metrics["logps/chosen"])
        close(rejected.mean().item(), metrics["logps/rejected"])
