"""Training (and reference log-probs) as a launched multi-process job; the caller stays one process.

Contract: `launch_training(policy, pairs, reference_logps, cfg, resume_dir, on_step, progress)`
runs the one training loop (`offline.train.train`) in `cfg.num_processes` ranks and returns the
same `TrainResult` as an in-process run, with the trained weights copied back into
`policy.model`; `launch_reference(...)` computes pi_0's log-probs sharded over the ranks and
returns them. Either raises `LaunchError` naming the failing rank, its exit code and its error
when any rank dies. The Prefect flow that calls them is one process with one flow run; the ranks
(`python -m offline.worker RUN_DIR`) import neither Prefect nor the orchestrator.

The job is started as `accelerate launch --config_file CFG --num_processes N -m offline.worker
RUN_DIR` (CFG: `train.accelerate_config`, else configs/accelerate/ddp.yaml), a subprocess of the
calling task. On a machine without CUDA the ranks get `ACCELERATE_USE_CPU=true`: without it
accelerate under torchrun reports `DistributedType.NO` in every rank (no gradient sync), with it
`MULTI_CPU` over gloo. (`accelerate launch --cpu --num_processes N` starts ONE process: its CPU
launcher expects mpirun.)

The run directory (this process writes the inputs before the launch; compact, no pickle):

    spec.json               WorkerSpec: mode, what to load, the train config, ...
    pairs/                  the pairs as a token store (offline.token_store: tokens.bin flat
                            int32 + offsets and per-pair .npy arrays), memory-mapped by the ranks
    reference.safetensors   (P, 2) float64 reference log-probs in pairs order (train mode)
    initial.safetensors     LoRA: the policy's adapter weights to start from
    out/                    rank 0 only: result.json + weights.safetensors (train), or
                            reference.safetensors (reference)
    ranks/rank-<r>.json     each rank its own status: running / finished (weights digest) /
                            failed (error, traceback)
    ranks/rank-<r>.log      stdout + stderr of rank r > 0 (rank 0's go to the stream below)
    launcher.log            everything the launch printed (rank 0, the launcher itself)

Rank 0's lines stream through this process: step records become `on_step` calls and the
progress bar, the rest are logged. Two ranks never write the same path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from offline.atomic import atomic_path, atomic_write_json
from offline.config import ModelConfig, TrainConfig
from offline.token_store import TokenizedPairs, TokenStore, pair_ids, write_store
from offline.tokenize import TokenizedPair

if TYPE_CHECKING:
    import torch

    from offline.models import LoadedPolicy
    from offline.train import TrainResult

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ACCELERATE_CONFIG = ROOT / "configs" / "accelerate" / "ddp.yaml"
STEP_PREFIX = "@@tether-step "
"""Rank 0 prints one line per logged step: this prefix, then the metrics as JSON."""
FAULT_ENV = "TETHER_FAULT_RANK_EXIT"
"""Fault injection for the test suite: "RANK:STEP[:CODE]" makes that rank `os._exit(CODE)` (3)
right after that optimizer step (offline/worker.py)."""
_SHARDED_TYPES = ("FSDP", "DEEPSPEED")


class LaunchError(RuntimeError):
    """A launched job failed: the message names the rank, its exit code and its error."""


class WorkerSpec(BaseModel):
    """What every rank reads from `spec.json`: the job, and how to rebuild the policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["train", "reference"]
    model: ModelConfig
    """The policy's section: each rank loads it as `offline.models.load_policy` does."""
    state_dir: str
    checkpoint: str
    """The directory the policy was loaded from (pi_0 or a checkpoint)."""
    autocast_dtype: str | None
    """The forward's precision, as the caller resolved it (torch dtype name, None = none)."""
    pad_token_id: int
    num_processes: int
    parent_pid: int
    """The calling process: ranks exit when it is gone (no orphan writes snapshots)."""
    train: TrainConfig | None = None
    resume_dir: str | None = None
    initial_weights: bool = False
    """LoRA: start from initial.safetensors (the caller's adapter), not a fresh random adapter."""
    weights_digest: str | None = None
    """Full fine-tuning: the digest the loaded weights must have (the caller's policy)."""
    reference_dir: str | None = None
    batch_size: int | None = None
    expected_type: str = "MULTI_GPU"
    """The accelerate config's distributed_type; a rank running anything else fails."""


@dataclass(frozen=True)
class RankStatus:
    """What a rank recorded about itself (`ranks/rank-<r>.json`)."""

    rank: int
    state: Literal["running", "finished", "failed"]
    time: float
    error: str | None = None
    traceback: str | None = None
    weights_digest: str | None = None
    replicated: bool | None = None


# ---------------------------------------------------------------------------------------------
# The command (pure)


def accelerate_config_path(cfg: TrainConfig) -> Path:
    """The accelerate config file of the job: `train.accelerate_config` (relative to the cwd),
    else the shipped DDP one; a missing file is an error naming the field."""
    if cfg.accelerate_config is None:
        return DEFAULT_ACCELERATE_CONFIG
    path = Path(cfg.accelerate_config).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"train.accelerate_config: {path} not found (shipped: configs/accelerate/ddp.yaml, fsdp.yaml, zero3.yaml)"
        )
    return path


def distributed_type(config_file: Path) -> str:
    """`distributed_type` of an accelerate config file (MULTI_GPU, FSDP, DEEPSPEED, ...)."""
    import yaml

    data = yaml.safe_load(config_file.read_text()) or {}
    return str(data.get("distributed_type", "NO")).upper()


def launch_command(config_file: Path, num_processes: int, run_dir: Path) -> list[str]:
    """`accelerate launch` of the worker: N processes on this machine, a free port (0)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file),
        "--num_processes", str(num_processes),
        "--num_machines", "1",
        "--machine_rank", "0",
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", "0",
        "-m", "offline.worker", str(run_dir),
    ]


def launch_env(base: Mapping[str, str], num_processes: int, on_cuda: bool, cpu_count: int) -> dict[str, str]:
    """The ranks' environment: the caller's, plus the repo on PYTHONPATH, unbuffered output, and on
    a CPU machine `ACCELERATE_USE_CPU` (gloo instead of `DistributedType.NO`) and the cores split
    between the ranks (torchrun would give each 1 thread; a user's OMP_NUM_THREADS stands)."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if not on_cuda:
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count // num_processes)))
    return env


# ---------------------------------------------------------------------------------------------
# Inputs and outputs in the run directory (safetensors + JSON)


PAIRS_DIR = "pairs"
"""The run directory's token store (offline.token_store): what every rank maps read-only."""


def write_pairs(run_dir: Path, pairs: Sequence[TokenizedPair]) -> None:
    """The pairs as a token store (flat int32 ids + offsets, `.npy` metadata, no pickle) under
    `run_dir/pairs/`: the ranks memory-map it, so N ranks share one copy in the page cache."""
    write_store(pairs, run_dir / PAIRS_DIR)


def read_pairs(run_dir: Path) -> TokenizedPairs:
    """The pairs `write_pairs` wrote, equal to the originals, memory-mapped (a view, not a list)."""
    return TokenizedPairs(TokenStore.open(run_dir / PAIRS_DIR))


def write_logps(path: Path, pairs: Sequence[TokenizedPair], values: Mapping[str, tuple[float, float]]) -> None:
    """(P, 2) float64 in pairs order: the float32 log-probs, exactly as the cache holds them."""
    import torch
    from safetensors.torch import save_file

    table = torch.tensor([values[pid] for pid in pair_ids(pairs)], dtype=torch.float64).reshape(len(pairs), 2)
    with atomic_path(path) as tmp:
        save_file({"logps": table}, tmp)


def read_logps(path: Path, pairs: Sequence[TokenizedPair]) -> dict[str, tuple[float, float]]:
    from safetensors.torch import load_file

    rows = load_file(path)["logps"].tolist()
    if len(rows) != len(pairs):
        raise ValueError(f"{path}: {len(rows)} rows of log-probs for {len(pairs)} pairs")
    return {pid: (c, r) for pid, (c, r) in zip(pair_ids(pairs), rows)}


def trainable(model) -> list[tuple[str, Any]]:
    """(name, parameter) of every trainable parameter, in registration order (tied ones once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def weights_digest(named: Sequence[tuple[str, Any]], sample: int | None = None) -> str:
    """sha256 over names, shapes and values (the first `sample` values of each; None = all)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in named:
        flat = p.detach().reshape(-1)
        flat = flat if sample is None else flat[:sample]
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(flat.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def read_status(run_dir: Path, num_processes: int) -> dict[int, RankStatus]:
    """Every rank's last recorded status (ranks that wrote none are absent)."""
    out: dict[int, RankStatus] = {}
    for rank in range(num_processes):
        path = run_dir / "ranks" / f"rank-{rank}.json"
        if path.is_file():
            out[rank] = RankStatus(**json.loads(path.read_text()))
    return out


# ---------------------------------------------------------------------------------------------
# Which rank failed (pure)

_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
_SIGTERM = -15


def parse_failures(output: str) -> tuple[dict[int, int], int | None]:
    """Exit codes per failed rank, and the root-cause rank, from torch elastic's failure summary
    (the `ChildFailedError` block accelerate launch prints); empty when there is none."""
    codes = {int(r): int(c) for r, c in _FAILURE.findall(output)}
    root = None
    if "Root Cause" in output:
        found = _FAILURE.search(output[output.index("Root Cause"):])
        root = int(found.group(1)) if found else None
    return codes, root


def root_cause(
    status: Mapping[int, RankStatus], codes: Mapping[int, int], elastic_root: int | None, num_processes: int
) -> int | None:
    """The rank whose failure brought the job down.

    A rank that died without recording an error (os._exit, SIGKILL, a segfault, the OOM killer)
    comes first, unless its exit code is SIGTERM, which the launcher sends to the survivors
    when a rank fails: its peers' errors ("Connection closed by peer") are consequences. Else
    the rank that recorded an error first. Else elastic's own pick (first failure it observed,
    whole seconds, so ties go to the lowest rank: why it is the last resort).
    """
    abrupt = [r for r in range(num_processes)
              if (r not in status or status[r].state == "running") and codes.get(r, 0) not in (0, _SIGTERM)]
    if abrupt:
        return elastic_root if elastic_root in abrupt else abrupt[0]
    failed = sorted((s.time, r) for r, s in status.items() if s.state == "failed")
    if failed:
        return failed[0][1]
    return elastic_root


def failure_message(
    run_dir: Path, num_processes: int, returncode: int, output: str, what: str
) -> str:
    """`LaunchError`'s message: the failing rank, its exit code, its error or last log lines."""
    status = read_status(run_dir, num_processes)
    codes, elastic_root = parse_failures(output)
    rank = root_cause(status, codes, elastic_root, num_processes)
    if rank is None:
        tail = "\n".join(output.splitlines()[-20:])
        return f"{what} ({num_processes} processes) exited with code {returncode}; run dir {run_dir}:\n{tail}"
    code = codes.get(rank)
    code_text = f"exit code {code}" if code is not None else f"an unknown exit code (launcher exit {returncode})"
    st = status.get(rank)
    if st is not None and st.state == "failed":
        detail = f"{st.error}\n{st.traceback or ''}".rstrip()
    else:
        detail = "it died without a Python error (killed, os._exit, or a crash); last lines of its output:\n"
        detail += _tail(run_dir / "ranks" / f"rank-{rank}.log" if rank else run_dir / "launcher.log")
    return f"{what}: rank {rank} of {num_processes} failed with {code_text}: {detail}\n(run dir {run_dir})"


def _tail(path: Path, n: int = 15) -> str:
    if not path.is_file():
        return "(no output)"
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip() and STEP_PREFIX not in x]
    return "\n".join(lines[-n:]) if lines else "(its output is empty)"


# ---------------------------------------------------------------------------------------------
# Running the job


def run_job(
    run_dir: Path, spec: WorkerSpec, config_file: Path, *, what: str,
    on_step: Callable[[dict], None] | None = None, echo: bool = False,
) -> None:
    """Write spec.json, launch the ranks, stream rank 0's lines until they exit; raise
    `LaunchError` naming the failing rank when any rank fails."""
    import torch

    atomic_write_json(run_dir / "spec.json", spec.model_dump(mode="json"), indent=1)
    (run_dir / "ranks").mkdir(exist_ok=True)
    cmd = launch_command(config_file, spec.num_processes, run_dir)
    env = launch_env(os.environ, spec.num_processes, torch.cuda.is_available(), os.cpu_count() or 1)
    log.info("launching %s: %s", what, " ".join(cmd))
    captured: list[str] = []
    with open(run_dir / "launcher.log", "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            env=env, cwd=os.getcwd(), start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                at = line.find(STEP_PREFIX)
                if at >= 0:
                    if on_step is not None:
                        on_step(json.loads(line[at + len(STEP_PREFIX):]))
                    continue
                captured.append(line)
                if echo:
                    sys.stderr.write(line)
                else:
                    log.info("%s", line.rstrip())
            returncode = proc.wait()
        finally:
            _stop(proc)
    if returncode != 0:
        raise LaunchError(failure_message(run_dir, spec.num_processes, returncode, "".join(captured), what))


def _stop(proc: subprocess.Popen) -> None:
    """End the launcher and every rank (its own session) if still running: SIGTERM, then SIGKILL.
    (A caller stopped by an exception, Ctrl-C, or a failing `on_step` leaves no rank behind.)"""
    import signal

    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def check_launchable(cfg: TrainConfig, kind: str, config_file: Path, on_cuda: bool) -> None:
    """Refuse settings the sharded engines cannot honour, naming the field (pure).

    accelerate (1.16) turns FSDP and DeepSpeed on only over GPUs: on a CPU it would run the
    file as plain DDP without a word. Resume snapshots hold one rank's full trainable weights:
    FSDP and ZeRO-3 shard them. DeepSpeed steps its optimizer inside every backward, so a step
    of several micro-batches per rank would be several steps.
    """
    if kind in _SHARDED_TYPES and not on_cuda:
        raise ValueError(
            f"train.accelerate_config: {config_file} asks for {kind}, which accelerate runs only on CUDA "
            "GPUs (on a CPU it would silently be DDP); use configs/accelerate/ddp.yaml or unset it"
        )
    if kind in _SHARDED_TYPES and cfg.save_every is not None:
        raise ValueError(
            f"train.save_every: resume snapshots hold one rank's full trainable weights, which "
            f"{config_file} ({kind}) shards; unset save_every, or use DDP (configs/accelerate/ddp.yaml)"
        )
    if kind == "DEEPSPEED" and cfg.grad_accum_steps != 1:
        raise ValueError(
            f"train.grad_accum_steps={cfg.grad_accum_steps}: DeepSpeed ({config_file}) steps its optimizer "
            "in every backward; set it to 1 (raise batch_size or num_processes instead)"
        )


def fresh_run_dir(path: Path) -> Path:
    """An empty run directory at `path` (a previous launch's inputs and outputs removed)."""
    shutil.rmtree(path, ignore_errors=True)
    (path / "out").mkdir(parents=True)
    return path


def _policy_source(policy: LoadedPolicy) -> tuple[ModelConfig, Path]:
    if policy.config is None or policy.state_dir is None:
        raise ValueError("a launched job rebuilds the policy in every rank: load it with offline.models.load_policy")
    return policy.config, policy.state_dir


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def launch_training(
    policy: LoadedPolicy,
    pairs: Sequence[TokenizedPair],
    reference_logps: Mapping[str, tuple[float, float]],
    cfg: TrainConfig,
    resume_dir: Path | None,
    on_step: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """`offline.train.train` in `cfg.num_processes` ranks; see the module docstring.

    The ranks load the policy as it was loaded here (LoRA: with this policy's adapter weights;
    full fine-tuning: checked against this policy's weights), read the pairs and reference
    log-probs from the run directory (`resume_dir/launch`, else a temp dir under the state dir,
    removed after), and rank 0 writes snapshots into `resume_dir` (resume after a kill works as
    in one process: the re-run's ranks load the latest snapshot) and the trained weights, which
    are copied into `policy.model` here.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from offline.logps import supports_shared_prompt
    from offline.reference import check_reference_logps
    from offline.train import TrainResult, plan_steps

    model_cfg, state_dir = _policy_source(policy)
    config_file = accelerate_config_path(cfg)
    kind = distributed_type(config_file)
    check_launchable(cfg, kind, config_file, torch.cuda.is_available())
    check_reference_logps(reference_logps, pairs)
    n = cfg.num_processes
    share_prompt = cfg.share_prompt and supports_shared_prompt(policy.model)
    total = len(plan_steps(pairs, cfg, n, share_prompt))
    if total == 0:
        raise ValueError(
            f"train.num_processes={n}: every rank needs a micro-batch per step, and {len(pairs)} pairs "
            f"at batch_size {cfg.batch_size} make {math.ceil(len(pairs) / cfg.batch_size)}: lower either"
        )
    temp = resume_dir is None
    run_dir = fresh_run_dir(Path(resume_dir) / "launch" if resume_dir else state_dir / "launch" / f"train-{uuid.uuid4().hex[:8]}")
    named = trainable(policy.model)
    lora = policy.reference is not None
    write_pairs(run_dir, pairs)
    write_logps(run_dir / "reference.safetensors", pairs, reference_logps)
    if lora:  # a fresh adapter is random: the ranks must start from this one
        save_file({k: p.detach().cpu().contiguous() for k, p in named}, run_dir / "initial.safetensors")
    spec = WorkerSpec(
        mode="train", model=model_cfg, state_dir=str(state_dir), checkpoint=str(policy.model_dir),
        autocast_dtype=_dtype_name(policy.autocast_dtype), pad_token_id=policy.tokenizer.pad_token_id,
        num_processes=n, parent_pid=os.getpid(), train=cfg,
        resume_dir=str(resume_dir) if resume_dir is not None else None, initial_weights=lora,
        weights_digest=None if lora else weights_digest(named, sample=4096), expected_type=kind,
    )

    bar = tqdm(total=total, desc=f"train ({n} processes)", disable=not progress)

    def step(metrics: dict) -> None:
        bar.update(int(metrics["step"]) - bar.n)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
        if on_step is not None:
            on_step(metrics)

    # The caller's copy waits on the CPU meanwhile, so rank 0 has its GPU to itself.
    device = next(policy.model.parameters()).device
    if device.type == "cuda":
        policy.model.to("cpu")
    try:
        run_job(run_dir, spec, config_file, what=f"training ({n} processes)", on_step=step, echo=progress)
    finally:
        bar.close()
        if device.type == "cuda":
            policy.model.to(device)

    trained = load_file(run_dir / "out" / "weights.safetensors")
    missing = [k for k, _ in named if k not in trained]
    if missing:
        raise LaunchError(f"{run_dir}/out/weights.safetensors lacks {len(missing)} trainable weights, e.g. {missing[:3]}")
    with torch.no_grad():
        for k, p in named:
            p.copy_(trained[k])
    result = TrainResult(**json.loads((run_dir / "out" / "result.json").read_text()))
    if temp:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def launch_reference(
    policy: LoadedPolicy,
    pairs: Sequence[TokenizedPair],
    reference_dir: Path,
    batch_size: int,
    num_processes: int,
    accelerate_config: str | None,
    progress: bool = True,
) -> dict[str, tuple[float, float]]:
    """pi_0's log-probs of `pairs`, computed by `num_processes` ranks (each every N-th batch of
    the one-process order: `offline.reference.rank_shard`) and gathered on rank 0. Called by
    `offline.reference.ensure_reference_logps`, which caches them; no rank writes the cache."""
    model_cfg, state_dir = _policy_source(policy)
    import torch

    config_file = accelerate_config_path(TrainConfig(accelerate_config=accelerate_config))
    kind = distributed_type(config_file)
    check_launchable(TrainConfig(), kind, config_file, torch.cuda.is_available())  # (the engine's own rules)
    run_dir = fresh_run_dir(state_dir / "launch" / f"reference-{uuid.uuid4().hex[:8]}")
    write_pairs(run_dir, pairs)
    spec = WorkerSpec(
        mode="reference", model=model_cfg, state_dir=str(state_dir), checkpoint=str(policy.model_dir),
        autocast_dtype=_dtype_name(policy.autocast_dtype), pad_token_id=policy.tokenizer.pad_token_id,
        num_processes=num_processes, parent_pid=os.getpid(), reference_dir=str(reference_dir),
        batch_size=batch_size, expected_type=kind,
    )
    t0 = time.perf_counter()
    run_job(run_dir, spec, config_file, what=f"reference log-probs ({num_processes} processes)", echo=progress)
    values = read_logps(run_dir / "out" / "reference.safetensors", pairs)
    log.info("reference log-probs of %d pairs on %d processes in %.1f s", len(pairs), num_processes,
             time.perf_counter() - t0)
    shutil.rmtree(run_dir, ignore_errors=True)
    return values


def result_dict(result: TrainResult) -> dict[str, Any]:
    """A `TrainResult` as JSON-ready data (what rank 0 writes to out/result.json)."""
    return asdict(result)
