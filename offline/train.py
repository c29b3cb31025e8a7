"""The one preference-training loop, shared by the offline phase and every online cycle.

Contract: `train(policy, tokenized_train, reference_logps, cfg, pad_token_id=...)` updates
`policy` in place and returns a `TrainResult` (per-step metrics, the pair ids each step consumed,
totals). Reference log-probs come in precomputed (offline/reference.py caches them once per pair
and reference); they must cover every pair. The loop reads top to bottom:

    plan steps (length-grouped micro-batches, seeded order) -> optimizer + warm-up/cosine schedule
    -> [resume from a snapshot] -> for each step: for each micro-batch: one forward for chosen
    and rejected together (prompt computed once when `share_prompt`; response-only logits;
    offline/logps.py) -> loss (offline/loss.py LOSSES table) -> backward; clip, step, record
    metrics, snapshot every `save_every` steps.

Metrics per optimizer step: loss, rewards/{chosen,rejected,margins,accuracies},
logps/{chosen,rejected}, grad_norm (before clipping), lr, epoch, tokens_per_s. Tokens are
counted as TRL counts them (prompt + response per sequence, i.e. the prompt twice per pair,
no padding), whatever the layout, so the figure compares across layouts and with TRL.

Numerics: bf16 autocast on CUDA, float32 on CPU. On CPU the same seed gives a bit-identical loss
curve; a micro-batch's loss is its summed per-pair losses over the pairs of the whole optimizer
step, so `grad_accum_steps` x `batch_size` equals one batch of the product (up to rounding).
Dropout (`nn.Dropout`) is switched off in the policy, as TRL does: the implicit reward compares
policy and reference log-probs, which dropout noise would bias.

Multi-GPU: the loop runs under `accelerate.Accelerator`, so the same code runs one process on CPU
or GPU, or data-parallel when its entry point is started by a launcher, e.g.

    accelerate launch --multi_gpu --num_processes 4 train_script.py   # calls train(...)

(DDP; each process takes every N-th micro-batch of a step; a final step with fewer micro-batches
than processes is dropped; metrics are summed over processes; only rank 0 shows the progress
bar and writes snapshots; I/O around `train`, e.g. checkpoints, is the caller's to guard).
Resume snapshots hold full trainable weights, so they need replicated parameters (single
process or DDP), not FSDP sharding. The flow never runs this under a launcher itself:
`train.num_processes > 1` makes offline/launch.py start N ranks of offline/worker.py, each
calling this function. Tested: single process on CPU (CI) and on one CUDA GPU
(tests/test_cuda.py, run by scripts/gpu_check.sh on a GPU machine); 2 processes over gloo on
CPU (tests/test_launch.py); multi-GPU DDP/FSDP is not (no GPU machine with several cards).

Resume after a kill: with `resume_dir` and `cfg.save_every`, every `save_every` steps the loop
writes a snapshot (trainable weights and optimizer tensors as safetensors, scalars/step/RNG/
history as JSON; never pickle) into `resume_dir/run-<key>/step-N/` and then atomically points
`resume_dir/run-<key>/latest` at it. `<key>` hashes the config, the pairs (ids and tokens), their
reference log-probs, `pad_token_id` and a fingerprint of the initial trainable weights, so only
the same run resumes. A resumed run continues with the exact state, so its loss curve equals the
uninterrupted one. A finished run deletes its snapshots (the caller checkpoints the model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from offline.atomic import atomic_write, atomic_write_json
from offline.checkpoint import atomic_dir
from offline.logps import (
    AutocastDtype,
    PreferenceBatch,
    SequenceLogps,
    collate_pairs,
    resolve_autocast,
    supports_shared_prompt,
)
from offline.config import LossConfig, TrainConfig
from offline.loss import PreferenceLogps, preference_loss
from offline.reference import (
    check_reference_logps,
    reference_batch_logps,
    reference_context_for,
    token_digest,
)
from offline.token_store import pair_lengths
from offline.tokenize import TokenizedPair

# Length grouping sorts within windows of this many micro-batches (as HF's LengthGroupedSampler):
# big enough that batches hold similar lengths, small enough that the order stays random.
_MEGA_BATCH = 50
_SNAPSHOT_FORMAT = 1


@dataclass
class TrainResult:
    """What one run did: per-step metrics, the pairs each step consumed, totals."""

    history: list[dict[str, float]]
    step_pair_ids: list[list[str]]
    final_metrics: dict[str, float]
    steps: int
    resumed_from_step: int | None
    tokens: int
    seconds: float


# --------------------------------------------------------------------------------------------
# Planning: which pairs go into which micro-batch of which step (pure, seeded).


def micro_batches(
    lengths: Sequence[int], batch_size: int, length_grouping: bool, generator: torch.Generator
) -> list[list[int]]:
    """Index lists of micro-batches over one epoch.

    Without grouping: a seeded permutation cut into batches. With grouping: the permutation is cut
    into mega-batches of `_MEGA_BATCH` batches, each sorted by length (longest first) and cut into
    batches, then the batch order is shuffled, so similar lengths share a batch but the order of
    batches stays random.
    """
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    if not length_grouping:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    batches: list[list[int]] = []
    window = batch_size * _MEGA_BATCH
    for s in range(0, len(perm), window):
        mega = sorted(perm[s : s + window], key=lambda i: -lengths[i])
        batches += [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def plan_steps(
    pairs: Sequence[TokenizedPair],
    cfg: TrainConfig,
    num_processes: int = 1,
    share_prompt: bool | None = None,
) -> list[list[list[int]]]:
    """steps -> micro-batches (all processes) -> pair indices, over all epochs, cut at max_steps.

    Length grouping sorts by the length of the rows the layout builds (`share_prompt`, default
    `cfg.share_prompt`): prompt + chosen + rejected when the prompt is shared, else prompt + the
    longer response.
    """
    shared = cfg.share_prompt if share_prompt is None else share_prompt
    n = pair_lengths(pairs)  # (N, 3) prompt, chosen, rejected: array reads, no pair is built
    lengths = (n[:, 0] + (n[:, 1] + n[:, 2] if shared else np.maximum(n[:, 1], n[:, 2]))).tolist()
    per_step = cfg.grad_accum_steps * num_processes
    steps: list[list[list[int]]] = []
    for epoch in range(cfg.epochs):
        # A per-epoch generator keyed by (seed, epoch): the plan never depends on how far a previous
        # run got, which is what makes resume exact.
        gen = torch.Generator().manual_seed(hash_int(cfg.seed, epoch))
        batches = micro_batches(lengths, cfg.batch_size, cfg.length_grouping, gen)
        for s in range(0, len(batches), per_step):
            step = batches[s : s + per_step]
            if len(step) >= num_processes:  # every process needs a micro-batch (DDP)
                steps.append(step)
    return steps[: cfg.max_steps] if cfg.max_steps is not None else steps


def hash_int(*parts: object) -> int:
    """A 63-bit seed from parts (distinct (seed, epoch) never collide the way seed+epoch would)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear 0 -> 1 over `warmup_steps`, then cosine 1 -> 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(
    named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decay on matrices only) and its warm-up + cosine schedule."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    # The fused kernel (CPU and CUDA) is several times faster than the default foreach one.
    fused = all(p.device.type in ("cpu", "cuda") for _, p in named)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        fused=fused or None,
    )
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))


# --------------------------------------------------------------------------------------------
# The loop.


def train(
    policy: nn.Module,
    tokenized_train: Sequence[TokenizedPair],
    reference_logps: Mapping[str, tuple[float, float]] | None,
    cfg: TrainConfig,
    *,
    pad_token_id: int,
    resume_dir: Path | None = None,
    on_step: Callable[[dict], None] | None = None,
    progress: bool = True,
    reference_model: nn.Module | None = None,
    autocast_dtype: AutocastDtype = "auto",
    on_trained: Callable[[Any, nn.Module], None] | None = None,
) -> TrainResult:
    """Train `policy` in place on preference pairs; see the module docstring.

    `reference_logps` maps every pair_id to (reference_chosen_logp, reference_rejected_logp).
    Alternatively pass `reference_logps=None` and a `reference_model` (a frozen copy, or the peft
    policy itself, whose adapter is then disabled) to run the reference forward on every micro-
    batch instead (one extra forward per step; kept for comparison with TRL's
    `precompute_ref_log_probs=False`). `autocast_dtype` is the forward's precision ("auto": bf16
    on a bf16-capable GPU; pass the one the reference log-probs were computed in).
    `on_step(metrics)` is called after every `log_every`-th step; an exception from it stops the
    run (the last snapshot stays, for resume). `on_trained(accelerator, model)` is called on every
    process after the last step with the prepared model, for collective exports (a launched job's
    rank 0 gathers FSDP's sharded weights through it: offline/worker.py).
    """
    from accelerate import Accelerator  # heavy import, only when training

    if not tokenized_train:
        raise ValueError("train() got no pairs")
    if reference_logps is None and reference_model is None:
        raise ValueError("pass reference_logps (see offline.reference) or a reference_model")
    if reference_logps is not None:
        check_reference_logps(reference_logps, tokenized_train)
    ref_context = None
    if reference_model is not None:
        ref_context = reference_context_for(reference_model)
        if reference_model is policy and ref_context is contextlib.nullcontext:
            raise ValueError("reference_model is the policy itself: pass a frozen copy (or a peft model)")
        if reference_model is not policy:
            reference_model.eval()
    if cfg.save_every is not None and resume_dir is None:
        raise ValueError("cfg.save_every is set but no resume_dir was given to write snapshots into")

    # The launcher's (or an earlier Accelerator's) settings stand; bf16 autocast is ours (below).
    accelerator = Accelerator()
    device, n_proc, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    amp = resolve_autocast(device, autocast_dtype)
    torch.manual_seed(cfg.seed)

    share_prompt = cfg.share_prompt and supports_shared_prompt(policy)
    plan = plan_steps(tokenized_train, cfg, n_proc, share_prompt)
    total_steps = len(plan)
    micro_per_epoch = math.ceil(len(tokenized_train) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / (cfg.grad_accum_steps * n_proc))
    key = run_key(policy, tokenized_train, reference_logps, cfg, pad_token_id) if resume_dir else ""

    policy.train()
    for module in policy.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(named, cfg, total_steps)
    # The scheduler stays unprepared: accelerate's wrapper would step it once per process.
    model, optimizer = accelerator.prepare(SequenceLogps(policy, amp), optimizer)
    if reference_model is not None and reference_model is not policy:
        reference_model.to(device)

    history: list[dict[str, float]] = []
    step_pair_ids: list[list[str]] = []
    start_step, tokens, seconds, resumed_from = 0, 0, 0.0, None
    if resume_dir is not None:
        state = load_snapshot(Path(resume_dir), key, named, optimizer, scheduler)
        if state is not None:
            start_step = resumed_from = state["step"]
            history, step_pair_ids = state["history"], state["step_pair_ids"]
            tokens, seconds = state["tokens"], state["seconds"]

    bar = tqdm(
        total=total_steps, initial=start_step, desc="train", disable=not progress or rank != 0
    )
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        step_batches = plan[step]
        n_pairs = sum(len(b) for b in step_batches)  # pairs in the whole step, all processes
        mine = step_batches[rank::n_proc]
        # sums over this process's pairs: loss, rewards/chosen, rewards/rejected, accuracies,
        # logps/chosen, logps/rejected, tokens
        stats = torch.zeros(7, dtype=torch.float64, device=device)
        lr = scheduler.get_last_lr()[0]
        for i, indices in enumerate(mine):
            group = [tokenized_train[j] for j in indices]
            batch = collate_pairs(group, pad_token_id, share_prompt=share_prompt).to(device)
            if reference_logps is not None:
                ref = torch.tensor([reference_logps[p] for p in batch.pair_ids], device=device)  # (B, 2)
                ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
            else:
                ref_chosen, ref_rejected = reference_batch_logps(reference_model, batch, ref_context, amp)
            sync = i == len(mine) - 1  # DDP all-reduces gradients on the last micro-batch only
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                logps = model(batch).float()  # (2B,)
                out = _batch_loss(batch, logps, ref_chosen, ref_rejected, cfg.loss)
                # sum / pairs-in-step * processes: DDP averages over processes, so the gradient is
                # the mean over every pair of the step, however it is split into micro-batches
                accelerator.backward(out.losses.sum() * (n_proc / n_pairs))
            stats += _batch_stats(out, logps, batch)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        stats = accelerator.reduce(stats, reduction="sum").tolist()
        elapsed = time.perf_counter() - t0
        tokens += int(stats[6])
        seconds += elapsed
        # (None under DeepSpeed, which clips inside its own step)
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        metrics = _step_metrics(stats, n_pairs, step + 1, steps_per_epoch, grad_norm, lr, elapsed)
        history.append(metrics)
        step_pair_ids.append([tokenized_train[j].pair_id for b in step_batches for j in b])
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
            if accelerator.is_main_process:
                state = {"step": step + 1, "history": history, "step_pair_ids": step_pair_ids,
                         "tokens": tokens, "seconds": seconds}
                save_snapshot(Path(resume_dir), key, state, named, optimizer, scheduler)
            accelerator.wait_for_everyone()
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            if on_step is not None:
                on_step(metrics)
    bar.close()
    if on_trained is not None:
        on_trained(accelerator, model)

    if resume_dir is not None and accelerator.is_main_process:
        shutil.rmtree(Path(resume_dir) / f"run-{key}", ignore_errors=True)
    return TrainResult(
        history=history,
        step_pair_ids=step_pair_ids,
        final_metrics=dict(history[-1]) if history else {},
        steps=len(history),
        resumed_from_step=resumed_from,
        tokens=tokens,
        seconds=seconds,
    )


def _step_metrics(
    stats: list[float], n_pairs: int, step: int, steps_per_epoch: int, grad_norm: float, lr: float,
    seconds: float,
) -> dict[str, float]:
    loss, chosen, rejected, correct, logps_chosen, logps_rejected, tokens = stats
    return {
        "step": step,
        "loss": loss / n_pairs,
        "rewards/chosen": chosen / n_pairs,
        "rewards/rejected": rejected / n_pairs,
        "rewards/margins": (chosen - rejected) / n_pairs,
        "rewards/accuracies": correct / n_pairs,
        "logps/chosen": logps_chosen / n_pairs,
        "logps/rejected": logps_rejected / n_pairs,
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens_per_s": tokens / seconds,
        "epoch": step / steps_per_epoch,
    }


def _batch_loss(batch: PreferenceBatch, logps, ref_chosen, ref_rejected, loss_cfg: LossConfig):
    chosen, rejected = logps.chunk(2)  # (B,), (B,)
    lengths = batch.response_lengths
    return preference_loss(
        PreferenceLogps(chosen, rejected, ref_chosen, ref_rejected, *lengths.chunk(2)), loss_cfg
    )


def _batch_stats(out, logps: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    chosen, rejected = logps.detach().chunk(2)
    tokens = torch.tensor(batch.n_tokens, dtype=logps.dtype, device=logps.device)
    return torch.stack(
        [
            out.losses.detach().sum(),
            out.chosen_rewards.sum(),
            out.rejected_rewards.sum(),
            (out.chosen_rewards > out.rejected_rewards).sum(),
            chosen.sum(),
            rejected.sum(),
            tokens,
        ]
    ).double()


# --------------------------------------------------------------------------------------------
# Resume snapshots: safetensors + JSON, written to a fresh directory and published by an atomic
# rename of the `latest` pointer, so a kill at any moment leaves the previous snapshot intact.


def run_key(
    policy: nn.Module,
    pairs: Sequence[TokenizedPair],
    reference_logps: Mapping[str, tuple[float, float]] | None,
    cfg: TrainConfig,
    pad_token_id: int,
) -> str:
    """16 hex digits identifying a run: config, pairs, reference values, initial trainable weights."""
    h = hashlib.sha256()
    h.update(cfg.model_dump_json().encode())
    h.update(str(pad_token_id).encode())
    for pair in pairs:
        ref = reference_logps[pair.pair_id] if reference_logps is not None else ("live",)
        h.update(f"{pair.pair_id}:{token_digest(pair)}:{tuple(ref)!r};".encode())
    for name, p in policy.named_parameters():
        if p.requires_grad:  # shapes plus a sample of values: cheap, yet tells two inits apart
            sample = p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes()
            h.update(f"{name}{tuple(p.shape)}".encode() + sample)
    return h.hexdigest()[:16]


def save_snapshot(
    resume_dir: Path,
    key: str,
    state: dict[str, Any],
    named_params: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    """Write step `state["step"]`'s snapshot and point `latest` at it; drop older snapshots."""
    run_dir = resume_dir / f"run-{key}"
    name = f"step-{state['step']:08d}"
    final = run_dir / name
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in opt["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    meta = {
        "format": _SNAPSHOT_FORMAT,
        "run_key": key,
        **state,
        "optimizer": {"param_groups": opt["param_groups"], "state_scalars": scalars},
        "scheduler": scheduler.state_dict(),
    }
    # A kill leaves either the previous snapshot (and `latest` naming it) or this one, complete.
    with atomic_dir(final, overwrite=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in named_params}, tmp / "model.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "state.json", meta)
    atomic_write(run_dir / "latest", name)
    for old in run_dir.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_snapshot(
    resume_dir: Path,
    key: str,
    named_params: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any] | None:
    """Restore weights, optimizer, scheduler and RNG from run `key`'s latest snapshot, if any."""
    pointer = resume_dir / f"run-{key}" / "latest"
    if not pointer.exists():
        return None
    snap = pointer.parent / pointer.read_text().strip()
    meta = json.loads((snap / "state.json").read_text())
    if meta.get("format") != _SNAPSHOT_FORMAT or meta.get("run_key") != key:
        raise ValueError(f"{snap} is not a snapshot of run {key}; delete {pointer.parent}")

    weights = load_file(snap / "model.safetensors")
    with torch.no_grad():
        for n, p in named_params:
            p.copy_(weights[n])
    tensors = load_file(snap / "optimizer.safetensors")
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("state."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    for idx, scalars in meta["optimizer"]["state_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    groups = meta["optimizer"]["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta
