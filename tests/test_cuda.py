"""The CUDA paths, on a GPU: skipped where there is none (CI never has one).

Run them with `scripts/gpu_check.sh` on a CUDA machine. What only a GPU exercises: bf16
autocast in the training loop and in the reference log-probs (they must agree at step 0, or
every DPO run starts from a spurious margin), fused AdamW on CUDA tensors, the CUDA RNG state
in resumable snapshots, seeded generation on the GPU, the KL estimate on the GPU, and a whole
refresh cycle whose checkpoint, saved from GPU tensors, reloads on a CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from offline.config import LossConfig, TrainConfig
from offline.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")

from test_train import Killed, learnable_pairs, random_pairs, reference_of, tiny_model  # noqa: E402


def test_bf16_training_starts_at_log2_and_learns() -> None:
    """Policy == reference at step 1, so the loss is -log sigma(0) = ln 2 only if the reference
    log-probs were computed in the same precision as the policy's forward."""
    pairs = learnable_pairs(32)
    model = tiny_model(0)
    ref = reference_of(model, pairs)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=4, epochs=2, loss=LossConfig(beta=0.5), warmup_ratio=0.0)
    result = train(model, pairs, ref, cfg, pad_token_id=0, progress=False)
    losses = [m["loss"] for m in result.history]
    assert abs(losses[0] - math.log(2)) < 1e-3, losses[0]
    assert sum(losses[-3:]) / 3 < 0.2
    assert result.final_metrics["rewards/accuracies"] == 1.0
    # the weights stay float32 on the GPU (autocast only lowers the matmuls)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.float32)}


def test_float32_config_turns_autocast_off_everywhere() -> None:
    """`model.dtype: float32` on a GPU: no autocast in the reference, the loop or the evaluation
    (the same pairs then score differently than under bf16, and the reference cache keys differ)."""
    from offline.evaluate import evaluate_preferences
    from offline.reference import ReferenceLogpCache, compute_reference_logps, precision_id

    pairs = learnable_pairs(8)
    model = tiny_model(0).cuda()
    ref32 = compute_reference_logps(model, pairs, "r", ReferenceLogpCache(None), 16, False, autocast_dtype=None)
    ref16 = compute_reference_logps(model, pairs, "r", ReferenceLogpCache(None), 16, False)
    assert ref32 != ref16  # bf16 rounding shows: "auto" is bf16 here
    assert precision_id("r", None) == "r" and precision_id("r", torch.bfloat16) == "r@bfloat16"
    ev = evaluate_preferences(model, pairs, ref32, 0.1, pad_token_id=0, autocast_dtype=None)
    assert abs(ev.mean_margin) < 1e-5  # policy == reference in float32: zero margin, not bf16 noise
    cfg = TrainConfig(learning_rate=1e-2, batch_size=4, epochs=1, warmup_ratio=0.0)
    result = train(model, pairs, ref32, cfg, pad_token_id=0, progress=False, autocast_dtype=None)
    assert abs(result.history[0]["loss"] - math.log(2)) < 1e-6


def test_resume_on_cuda_follows_the_uninterrupted_run(tmp_path: Path) -> None:
    """A snapshot holds the CUDA RNG state too; the resumed run takes the same pairs in the same
    order with the same schedule, and lands on the same weights up to GPU float nondeterminism."""
    pairs = random_pairs(20)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=2, epochs=2, save_every=3, weight_decay=0.1)

    def run(resume_dir: Path, on_step=None):
        model = tiny_model(0)
        ref = reference_of(model, pairs)
        return model, train(model, pairs, ref, cfg, pad_token_id=0, progress=False,
                            resume_dir=resume_dir, on_step=on_step)

    model_a, full = run(tmp_path / "a")

    def kill_after_7(metrics: dict) -> None:
        if metrics["step"] == 7:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "b", kill_after_7)
    (run_dir,) = (tmp_path / "b").iterdir()
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "step-00000006" / "optimizer.safetensors"))
    assert any(k.startswith("rng.cuda.") for k in saved), sorted(saved)[:10]
    model_b, resumed = run(tmp_path / "b")
    assert resumed.resumed_from_step == 6
    assert resumed.step_pair_ids == full.step_pair_ids
    assert [m["lr"] for m in resumed.history] == [m["lr"] for m in full.history]
    for x, y in zip(resumed.history, full.history):
        assert abs(x["loss"] - y["loss"]) <= 1e-3 * max(1.0, abs(y["loss"]))
    for p1, p2 in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-3, atol=1e-4)


def test_generation_and_kl_on_cuda_are_seeded_and_agree_with_cpu() -> None:
    import test_kl
    from online.generate import sample_ids
    from online.kl import estimate_kl

    tok = test_kl.tiny_tokenizer()
    policy = test_kl.tiny_model(0).cuda()
    prompts = [[11, 12], [13], [14, 15, 16]]
    kw = dict(k=3, max_new_tokens=6, eos_id=test_kl.EOS, pad_id=0, seed=3)
    cpu_rng = torch.get_rng_state()
    a = sample_ids(policy, prompts, **kw)
    assert a == sample_ids(policy, prompts, **kw)  # same seed, same samples on the GPU
    assert torch.equal(cpu_rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert [len(s) for s in a] == [3, 3, 3] and all(1 <= len(r) <= 6 for s in a for r in s)

    texts = ["the cat", "dog sat", "a b c"]
    reference = test_kl.perturbed(test_kl.tiny_model(0)).cuda()
    on_gpu = estimate_kl(policy, reference, tok, texts, n_samples=64, max_new_tokens=4, seed=0)
    assert on_gpu.n == 192 and math.isfinite(on_gpu.sequence) and on_gpu.sequence > 0
    # the same estimate on the CPU: GPU sampling draws other samples, so agreement is statistical
    on_cpu = estimate_kl(policy.cpu(), reference.cpu(), tok, texts, n_samples=64, max_new_tokens=4, seed=0)
    assert abs(on_gpu.sequence - on_cpu.sequence) < 4 * math.hypot(on_gpu.stderr, on_cpu.stderr) + 1e-6
    itself = estimate_kl(policy.cuda(), policy, tok, texts, n_samples=4, max_new_tokens=4, seed=0)
    assert itself.sequence == 0.0


@pytest.mark.slow
def test_demo_cycle_on_cuda_saves_a_checkpoint_a_cpu_can_load(tmp_path: Path, redis_url: str) -> None:
    """One refresh cycle of the (shrunk) demo on the GPU, plain functions under the cycle lock."""
    from safetensors.torch import load_file

    from _faults import locked_cycle, prepare_state, small_overrides
    from buffer.store import ReplayBuffer
    from offline.checkpoint import is_complete
    from offline.registry import PolicyRegistry

    cfg = prepare_state(tmp_path, small_overrides(tmp_path, redis_url))
    with ReplayBuffer.connect(cfg.buffer) as buf:
        report = locked_cycle(cfg, buf)
        assert report is not None and math.isfinite(report.kl["kl/policy_ref"])
        assert report.mix["pairs_added"] > 0 and report.train["step"] > 0
        path = Path(report.checkpoint.path)
        assert is_complete(path)
        state = load_file(str(path / "model.safetensors"), device="cpu")
        assert state and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
        current = PolicyRegistry(cfg.state_dir, cfg.name).current().checkpoint.path
        assert (current == str(path)) == report.promoted
