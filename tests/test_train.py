"""offline/logps.py and offline/train.py on a tiny Llama built in-process (no downloads).

Response-only log-probs against a naive full-logits computation; padding invariance; the loop's
determinism, gradient-accumulation equivalence, exact resume after a kill, and learning a
trivially learnable preference.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import offline.logps as logps_mod
from offline.logps import collate_pairs, sequence_logps
from offline.config import LossConfig, TrainConfig
from offline.models import default_device
from offline.reference import ReferenceLogpCache, compute_reference_logps
from offline.tokenize import TokenizedPair
from offline.train import plan_steps, train

torch.set_num_threads(1)  # tiny matmuls: extra threads only add sync cost on a shared CPU

TIMING_KEYS = {"tokens_per_s"}

# On a bf16-capable GPU the loop autocasts to bf16 (scripts/gpu_check.sh runs this file there):
# equalities that hold to float32 rounding on a CPU hold to bf16 rounding there.
ON_BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def tol(cpu: float) -> float:
    """The tolerance `cpu` on a CPU; bf16's (~1e-2 relative, accumulated) on a bf16 GPU."""
    return max(cpu, 2e-2) if ON_BF16 else cpu


def tiny_model(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def random_pairs(n: int, seed: int = 1) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, 64, (k,), generator=g).tolist())

    return [
        TokenizedPair(f"p{i}", None, ids(2 + i % 5), ids(1 + i % 3) + (2,), ids(1 + (i * 7) % 4) + (2,), False)
        for i in range(n)
    ]


def learnable_pairs(n: int) -> list[TokenizedPair]:
    """Chosen responses repeat token 5, rejected ones token 7: learnable from the tokens alone."""
    g = torch.Generator().manual_seed(2)
    return [
        TokenizedPair(
            f"q{i}", None, tuple(torch.randint(10, 64, (2 + i % 5,), generator=g).tolist()),
            (5,) * (2 + i % 3), (7,) * (2 + i % 4), False,
        )
        for i in range(n)
    ]


def naive_logps(model, pairs: list[TokenizedPair]) -> torch.Tensor:
    """One unpadded sequence at a time, full-vocabulary float32 log_softmax, sum over the response."""
    out = []
    for response in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = torch.tensor([p.prompt_ids + getattr(p, response)])
            logits = model(input_ids=ids).logits.float()[0, :-1]  # (T-1, V)
            tok = logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(tok[len(p.prompt_ids) - 1 :].sum())
    return torch.stack(out)  # (2B,) chosen first


def reference_of(model, pairs) -> dict[str, tuple[float, float]]:
    """As the pipeline does: on the device the loop will train on, in its precision."""
    model.to(default_device())
    return compute_reference_logps(model, pairs, "ref", ReferenceLogpCache(None), 16, False)


# --- log-probs ----------------------------------------------------------------------------


@pytest.mark.parametrize("share_prompt", [False, True], ids=["paired", "shared-prompt"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_response_only_logps_match_full_logits(monkeypatch, tie: bool, share_prompt: bool) -> None:
    """Values and gradients, with the LM head split into many chunks (3 rows each)."""
    monkeypatch.setattr(logps_mod, "_CHUNK_ELEMENTS", 3 * 64)
    model = tiny_model(tie=tie)
    pairs = random_pairs(5)
    ours = sequence_logps(model, collate_pairs(pairs, pad_token_id=0, share_prompt=share_prompt))
    ours.sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    naive = naive_logps(model, pairs)
    naive.sum().backward()
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_eager_attention_takes_the_shared_layout_too() -> None:
    model = tiny_model()
    model.config._attn_implementation = "eager"
    pairs = random_pairs(4)
    with torch.no_grad():
        shared = sequence_logps(model, collate_pairs(pairs, 0, share_prompt=True))
        torch.testing.assert_close(shared, naive_logps(model, pairs), rtol=1e-5, atol=1e-5)


def test_collate_layouts() -> None:
    """Paired: chosen rows first, right padding. Shared: one row per pair, rejected positions
    restart after the prompt, rejected tokens cannot see chosen ones; both score the same tokens."""
    pairs = [TokenizedPair("a", None, (3, 4), (5, 2), (6, 7, 2), False),
             TokenizedPair("b", None, (8,), (9, 2), (2,), False)]
    paired = collate_pairs(pairs, pad_token_id=0)
    assert paired.input_ids.tolist() == [[3, 4, 5, 2, 0], [8, 9, 2, 0, 0], [3, 4, 6, 7, 2], [8, 2, 0, 0, 0]]
    assert paired.attention_mask.sum().item() == 14 == paired.n_tokens == paired.n_processed
    assert paired.response_lengths.tolist() == [2, 2, 3, 1] and paired.pair_ids == ("a", "b")
    # chosen token 5 of pair a (row 0, col 2) is predicted from col 1
    assert (paired.score_rows[0].item(), paired.score_cols[0].item(), paired.targets[0].item()) == (0, 1, 5)

    shared = collate_pairs(pairs, pad_token_id=0, share_prompt=True)
    assert shared.input_ids.tolist() == [[3, 4, 5, 2, 6, 7, 2], [8, 9, 2, 2, 0, 0, 0]]
    assert shared.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3, 4]
    assert shared.n_tokens == 14 and shared.n_processed == 11
    allowed = shared.attention_mask[0, 0]  # (T, T), pair a: prompt 0-1, chosen 2-3, rejected 4-6
    assert allowed[4].tolist() == [True, True, False, False, True, False, False]
    assert allowed[6].tolist() == [True, True, False, False, True, True, True]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]
    # the first rejected token (6, at col 4) is predicted from the prompt's last position (col 1)
    first_rejected = (shared.score_seq == 2).nonzero()[0].item()
    assert (shared.score_cols[first_rejected].item(), shared.targets[first_rejected].item()) == (1, 6)
    assert sorted(zip(shared.score_seq.tolist(), shared.targets.tolist())) == sorted(
        zip(paired.score_seq.tolist(), paired.targets.tolist()))


@pytest.mark.parametrize("share_prompt", [False, True], ids=["paired", "shared-prompt"])
def test_padding_does_not_change_logps(share_prompt: bool) -> None:
    """A pair scored alone and next to a much longer pair (so with lots of padding), and with
    another pad id, gets the same log-probs."""
    model = tiny_model()
    short = random_pairs(3)[0]
    long = TokenizedPair("long", None, tuple(range(10, 40)), tuple(range(40, 60)), (9, 2), False)
    with torch.no_grad():
        alone = sequence_logps(model, collate_pairs([short], 0, share_prompt=share_prompt))  # (2,)
        padded = sequence_logps(model, collate_pairs([short, long], 0, share_prompt=share_prompt))  # (4,)
        other_pad = sequence_logps(model, collate_pairs([short, long], 63, share_prompt=share_prompt))
    torch.testing.assert_close(padded[[0, 2]], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_pad, padded, rtol=1e-5, atol=1e-5)


# --- the loop -----------------------------------------------------------------------------


def run(pairs, cfg: TrainConfig, seed: int = 0, **kw):
    model = tiny_model(seed)
    ref = reference_of(model, pairs)
    return model, train(model, pairs, ref, cfg, pad_token_id=0, progress=False, **kw)


def curve(result) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in result.history]


def test_loss_decreases_on_learnable_preference() -> None:
    cfg = TrainConfig(learning_rate=1e-2, batch_size=4, epochs=2, loss=LossConfig(beta=0.5), warmup_ratio=0.0)
    _, result = run(learnable_pairs(32), cfg)
    losses = [m["loss"] for m in result.history]
    assert abs(losses[0] - 0.6931) < 1e-3  # policy == reference at step 1: -log sigma(0)
    assert sum(losses[-3:]) / 3 < 0.2
    assert result.final_metrics["rewards/accuracies"] == 1.0 and result.final_metrics["rewards/margins"] > 1
    assert result.steps == 16 and result.final_metrics["epoch"] == 2.0
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s", "epoch"}
    assert keys <= set(result.final_metrics)
    # every pair is consumed once per epoch, and the token count is the non-pad tokens processed
    pairs = learnable_pairs(32)
    ids = [i for step in result.step_pair_ids for i in step]
    assert sorted(ids) == sorted([p.pair_id for p in pairs] * 2)
    assert result.tokens == 2 * sum(p.n_tokens for p in pairs)


def test_same_seed_is_bit_identical_other_seed_differs() -> None:
    cfg = TrainConfig(learning_rate=1e-3, batch_size=3, epochs=2)
    pairs = random_pairs(12)
    _, a = run(pairs, cfg)
    _, b = run(pairs, cfg)
    _, c = run(pairs, cfg.model_copy(update={"seed": 1}))
    assert curve(a) == curve(b) and a.step_pair_ids == b.step_pair_ids
    assert [m["loss"] for m in a.history] != [m["loss"] for m in c.history]
    assert a.step_pair_ids != c.step_pair_ids


def test_grad_accumulation_equals_bigger_batch() -> None:
    """accum 2 x bs 2 sees the same 4 pairs per step as bs 4 (no length grouping), and sums the
    per-pair losses over the step, so the updates agree up to float rounding."""
    pairs = random_pairs(16)
    base = dict(learning_rate=1e-2, length_grouping=False, warmup_ratio=0.0)
    m1, big = run(pairs, TrainConfig(batch_size=4, **base))
    m2, acc = run(pairs, TrainConfig(batch_size=2, grad_accum_steps=2, **base))
    assert big.step_pair_ids == acc.step_pair_ids and big.steps == 4
    for x, y in zip(big.history, acc.history):
        for key in ("loss", "rewards/margins", "grad_norm", "lr"):
            assert abs(x[key] - y[key]) <= tol(1e-5) * max(1.0, abs(x[key])), key
    if not ON_BF16:
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6)
        return
    # bf16: a weight whose gradient is ~0 can flip sign between the two layouts, and Adam turns
    # any sign into a full step of lr (seen on an H200: 10 of 2048 weights of one matrix). So:
    # nearly every weight agrees closely, and none differs by more than lr per step taken.
    diffs = torch.cat([(p1 - p2).abs().flatten() for p1, p2 in zip(m1.parameters(), m2.parameters())])
    assert (diffs > 1e-3).float().mean() < 0.01
    assert diffs.max() <= 2 * base["learning_rate"] * big.steps


class Killed(Exception):
    """Stands in for a kill: raised from on_step, it stops the run between steps."""


def test_resume_after_kill_equals_uninterrupted(tmp_path: Path) -> None:
    pairs = random_pairs(20)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=2, epochs=2, save_every=3, weight_decay=0.1)
    model_a, full = run(pairs, cfg, resume_dir=tmp_path / "a")
    assert full.steps == 20 and not list((tmp_path / "a").iterdir())  # a finished run cleans up

    def kill_after_7(metrics: dict) -> None:
        if metrics["step"] == 7:
            raise Killed

    with pytest.raises(Killed):
        run(pairs, cfg, resume_dir=tmp_path / "b", on_step=kill_after_7)
    (run_dir,) = (tmp_path / "b").iterdir()
    assert (run_dir / "latest").read_text() == "step-00000006"
    assert sorted(p.name for p in (run_dir / "step-00000006").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json"]

    model_b, resumed = run(pairs, cfg, resume_dir=tmp_path / "b")  # a fresh process would do this
    assert resumed.resumed_from_step == 6
    assert curve(resumed) == curve(full) and resumed.step_pair_ids == full.step_pair_ids
    for p1, p2 in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p1, p2)


def test_other_config_does_not_resume_foreign_snapshot(tmp_path: Path) -> None:
    pairs = random_pairs(8)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=2, save_every=1)
    with pytest.raises(Killed):
        run(pairs, cfg, resume_dir=tmp_path, on_step=lambda m: (_ for _ in ()).throw(Killed()))
    _, other = run(pairs, cfg.model_copy(update={"seed": 5}), resume_dir=tmp_path)
    assert other.resumed_from_step is None


def test_live_reference_forward_equals_cached_reference() -> None:
    """`reference_model=` (a reference forward every step) gives the cached run's curve."""
    pairs = random_pairs(8)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=4, epochs=2)
    _, cached = run(pairs, cfg)
    policy = tiny_model()
    live = train(policy, pairs, None, cfg, pad_token_id=0, progress=False, reference_model=copy.deepcopy(policy))
    for x, y in zip(cached.history, live.history):
        assert abs(x["loss"] - y["loss"]) < tol(1e-6)


def test_shared_prompt_training_matches_paired_training() -> None:
    """Same batches (no length grouping: the layouts group by different row lengths)."""
    pairs = random_pairs(12)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=4, epochs=2, length_grouping=False)
    _, shared = run(pairs, cfg)
    _, paired = run(pairs, cfg.model_copy(update={"share_prompt": False}))
    assert shared.step_pair_ids == paired.step_pair_ids and shared.tokens == paired.tokens
    for x, y in zip(shared.history, paired.history):
        assert abs(x["loss"] - y["loss"]) < tol(1e-4)
        assert abs(x["rewards/margins"] - y["rewards/margins"]) < tol(1e-4)


def test_missing_reference_logps_is_an_error() -> None:
    pairs = random_pairs(5)
    model = tiny_model()
    ref = reference_of(model, pairs[:3])
    with pytest.raises(ValueError, match="lacks 2 of 5 pairs"):
        train(model, pairs, ref, TrainConfig(), pad_token_id=0, progress=False)


def test_plan_groups_lengths_and_respects_max_steps() -> None:
    pairs = random_pairs(40)
    plan = plan_steps(pairs, TrainConfig(batch_size=4, epochs=3, max_steps=25))
    assert len(plan) == 25 and all(len(step) == 1 for step in plan)
    grouped = plan_steps(pairs, TrainConfig(batch_size=4))
    ungrouped = plan_steps(pairs, TrainConfig(batch_size=4, length_grouping=False))

    def padding(plan) -> int:
        return sum(len(b) * max(pairs[i].n_tokens for i in b) - sum(pairs[i].n_tokens for i in b)
                   for step in plan for b in step)

    assert padding(grouped) < padding(ungrouped)


def test_train_runs_after_another_accelerator_was_made() -> None:
    """accelerate's state is one per process: TRL (or a notebook) that made an Accelerator with
    other settings first must not break train() (it did on a GPU: "AcceleratorState has already
    been initialized and cannot be changed")."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests' train() made one
    Accelerator(mixed_precision="bf16", cpu=True)
    try:
        _, result = run(random_pairs(4), TrainConfig(batch_size=2))
        assert result.steps == 2 and math.isfinite(result.final_metrics["loss"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
