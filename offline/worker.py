"""One rank of a launched job: `python -m offline.worker RUN_DIR` (started by offline/launch.py).

Contract: reads `RUN_DIR/spec.json` (`offline.launch.WorkerSpec`) and the inputs beside it, and
- mode `train`: loads the policy as the caller loaded it, runs the one training loop
  (`offline.train.train`, which takes this rank's share of every step and all-reduces the
  gradients), and on rank 0 writes `out/weights.safetensors` (every trainable weight, gathered
  from the shards under FSDP / ZeRO-3 through `accelerator.get_state_dict`) and
  `out/result.json` (the `TrainResult`); snapshots go to the spec's resume dir, rank 0 only;
- mode `reference`: computes pi_0's log-probs of this rank's batches
  (`offline.reference.rank_shard`), sums the (P, 2) table over the ranks (each row is filled by
  exactly one rank, so the sum is exact) and rank 0 writes `out/reference.safetensors`.

Every rank records its own status in `ranks/rank-<r>.json` (running, then finished with a
digest of its weights, or failed with the error and traceback) and ranks other than 0 send their
output to `ranks/rank-<r>.log`, so only rank 0's lines reach the caller's stream and no two
ranks write one path. A rank exits when the calling process is gone (a daemon thread watches
its pid), so a killed flow leaves no rank training and writing snapshots behind it.

Fault hook for the test suite: env `TETHER_FAULT_RANK_EXIT=RANK:STEP[:CODE]` makes rank RANK
`os._exit(CODE)` (default 3) right after optimizer step STEP, with no Python error recorded.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> None:
    run_dir = Path((argv if argv is not None else sys.argv[1:])[0])
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # only rank 0 speaks to the caller; the others keep a log of their own
        _redirect_output(run_dir / "ranks" / f"rank-{rank}.log")
    _status(run_dir, rank, "running")
    try:
        from offline.launch import WorkerSpec

        spec = WorkerSpec.model_validate_json((run_dir / "spec.json").read_text())
        _exit_with_parent(spec.parent_pid)
        extra = _train(run_dir, spec) if spec.mode == "train" else _reference(run_dir, spec)
    except BaseException as exc:  # a boundary: record why this rank failed, then fail
        _status(run_dir, rank, "failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    _status(run_dir, rank, "finished", **extra)


def _accelerator(spec):
    """The launcher's accelerator, checked: a rank that sees fewer processes than launched would
    train alone without a word (e.g. torchrun on a CPU without ACCELERATE_USE_CPU)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    if accelerator.num_processes != spec.num_processes:
        raise RuntimeError(
            f"launched {spec.num_processes} processes, but accelerate sees {accelerator.num_processes} "
            f"({accelerator.distributed_type}); on a CPU set ACCELERATE_USE_CPU=true"
        )
    running = accelerator.distributed_type.name
    expected = {"MULTI_GPU": ("MULTI_GPU", "MULTI_CPU")}.get(spec.expected_type, (spec.expected_type,))
    if running not in expected:
        raise RuntimeError(f"the accelerate config asks for {spec.expected_type}, but accelerate runs {running}")
    return accelerator


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _train(run_dir: Path, spec) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file

    from offline.atomic import atomic_path, atomic_write_json
    from offline.launch import STEP_PREFIX, read_logps, read_pairs, result_dict, trainable, weights_digest
    from offline.models import load_policy
    from offline.train import train

    accelerator = _accelerator(spec)
    rank = accelerator.process_index
    policy = load_policy(spec.model, Path(spec.state_dir), device=accelerator.device, checkpoint=spec.checkpoint)
    named = trainable(policy.model)
    if spec.initial_weights:
        initial = load_file(run_dir / "initial.safetensors")
        with torch.no_grad():
            for name, p in named:
                p.copy_(initial[name])
    elif spec.weights_digest is not None and weights_digest(named, sample=4096) != spec.weights_digest:
        raise RuntimeError(f"{spec.checkpoint} does not hold the caller's weights (it changed since the caller loaded it)")
    pairs = read_pairs(run_dir)
    reference_logps = read_logps(run_dir / "reference.safetensors", pairs)
    fault = _fault(rank)

    def on_step(metrics: dict) -> None:
        if rank == 0:
            print(STEP_PREFIX + json.dumps(metrics), flush=True)
        if fault is not None and int(metrics["step"]) == fault[0]:
            os._exit(fault[1])

    names = [name for name, _ in named]

    def on_trained(acc, model) -> None:
        # Collective under FSDP / ZeRO-3 (every rank takes part), the full weights on rank 0.
        state = acc.get_state_dict(model)
        if acc.is_main_process:
            # The state dict is SequenceLogps's: the policy's names under "model.".
            weights = {n: state[f"model.{n}"].detach().cpu().contiguous() for n in names}
            with atomic_path(run_dir / "out" / "weights.safetensors") as tmp:
                save_file(weights, tmp)

    result = train(
        policy.model, pairs, reference_logps, spec.train, pad_token_id=spec.pad_token_id,
        resume_dir=Path(spec.resume_dir) if spec.resume_dir else None, on_step=on_step, progress=False,
        autocast_dtype=_dtype(spec.autocast_dtype), on_trained=on_trained,
    )
    if rank == 0:
        atomic_write_json(run_dir / "out" / "result.json", result_dict(result))
    replicated = accelerator.distributed_type.name not in ("FSDP", "DEEPSPEED")
    digest = weights_digest(named) if replicated else None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"weights_digest": digest, "replicated": replicated}


def _reference(run_dir: Path, spec) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from offline.atomic import atomic_path
    from offline.launch import read_pairs
    from offline.models import load_policy
    from offline.reference import ReferenceLogpCache, compute_reference_logps, rank_shard, reference_model
    from offline.token_store import pair_ids

    accelerator = _accelerator(spec)
    rank, n = accelerator.process_index, accelerator.num_processes
    pairs = read_pairs(run_dir)
    shard = rank_shard(pairs, spec.batch_size, rank, n)
    # As in one process: the policy as loaded there, and pi_0 run the same way (offline.reference).
    policy = load_policy(spec.model, Path(spec.state_dir), device=accelerator.device, checkpoint=spec.checkpoint)
    with reference_model(policy, Path(spec.reference_dir)) as (model, context):
        values = compute_reference_logps(
            model, shard, "launched", ReferenceLogpCache(None), spec.batch_size, progress=False,
            pad_token_id=spec.pad_token_id, reference_context=context, autocast_dtype=_dtype(spec.autocast_dtype),
        )
    index = {pid: i for i, pid in enumerate(pair_ids(pairs))}
    table = torch.zeros(len(pairs), 3, dtype=torch.float64, device=accelerator.device)  # chosen, rejected, count
    for pair_id, (chosen, rejected) in values.items():
        table[index[pair_id]] = torch.tensor([chosen, rejected, 1.0], dtype=torch.float64)
    table = accelerator.reduce(table, reduction="sum")  # each row filled by one rank: the sum is exact
    if rank == 0:
        counts = table[:, 2]
        if not torch.all(counts == 1):
            raise RuntimeError(f"reference shards overlap or miss pairs: counts {counts.unique().tolist()}")
        with atomic_path(run_dir / "out" / "reference.safetensors") as tmp:
            save_file({"logps": table[:, :2].cpu().contiguous()}, tmp)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {}


def _fault(rank: int) -> tuple[int, int] | None:
    """(step, exit code) when `TETHER_FAULT_RANK_EXIT` names this rank."""
    raw = os.environ.get("TETHER_FAULT_RANK_EXIT", "").strip()
    if not raw:
        return None
    parts = [int(x) for x in raw.split(":")]
    if parts[0] != rank:
        return None
    return parts[1], parts[2] if len(parts) > 2 else 3


def _status(run_dir: Path, rank: int, state: str, **fields: Any) -> None:
    """This rank's status file (its own path; written atomically, read by the caller)."""
    from offline.atomic import atomic_write_json

    atomic_write_json(run_dir / "ranks" / f"rank-{rank}.json",
                      {"rank": rank, "state": state, "time": time.time(), **fields})


def _redirect_output(path: Path) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _exit_with_parent(pid: int, every_s: float = 1.0) -> None:
    """Exit (code 70) as soon as process `pid`, the caller that launched the job, is gone."""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(70)
            except PermissionError:
                pass  # alive, owned by someone else

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


if __name__ == "__main__":
    main()
