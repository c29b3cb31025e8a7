"""Launched training: `train.num_processes > 1` runs the one training loop in N ranks (gloo on CPU).

Unit tests (fast): the run directory's formats, the reference shards, the command and its
environment, reading which rank failed, the settings refused, the CLI under a launcher.

Slow tests launch real 2-process jobs on the CPU (`accelerate launch` -> torch elastic -> gloo),
each with the tiny demo policy and a few steps:
- reference log-probs sharded over 2 ranks equal the one-process values;
- 2 processes x 1 micro-batch train like 1 process x 2 micro-batches (same pairs per optimizer
  step): same loss curve, same weights, and both ranks hold identical weights;
- a rank killed mid-run fails the job naming that rank and its exit code; the re-run resumes
  from the snapshot and ends on the uninterrupted curve;
- (tests/test_launch_flow.py) the offline flow and a refresh cycle with 2 processes.

Tolerances: both comparisons run the same batches (same rows, same padding) in the same order;
what may differ is how a matmul splits its sums over threads (each rank has 1 thread, this
process 2) and, for training, that gloo adds the two ranks' gradients where one process
accumulates them in `.grad` (a + b either way: fp32 addition of two terms is commutative). The
tolerances below are fp32 rounding scaled by the sizes involved: log-probs are sums of <= 32
token log-probs of magnitude <= ~20, so a reordered sum moves them by ~32 * 20 * 6e-8 ~ 4e-5 at
worst (allowed: 1e-4 absolute); a loss of ~0.7-0.9 after 4 Adam steps from such gradients moves
by ~1e-6 relative (allowed: 1e-5 relative; one step of training changes it by ~1e-2, so a rank
that trained on its half alone would fail it by three orders of magnitude). Measured on the
2-core dev VM (2026-12-05): both differences were exactly 0.0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offline.config import TrainConfig
from offline.launch import (
    RankStatus,
    check_launchable,
    distributed_type,
    launch_command,
    launch_env,
    parse_failures,
    read_logps,
    read_pairs,
    root_cause,
    write_logps,
    write_pairs,
)
from offline.reference import rank_shard
from offline.tokenize import TokenizedPair

ROOT = Path(__file__).resolve().parents[1]
LOGP_ATOL = 1e-4
LOSS_RTOL = 1e-5


def pairs_of(n: int) -> list[TokenizedPair]:
    return [
        TokenizedPair(pair_id=f"p{i}", category=None if i % 3 else "copy", prompt_ids=tuple(range(i % 5 + 1)),
                      chosen_ids=(7,) * (i % 4 + 1), rejected_ids=(8, 9)[: i % 2 + 1], truncated=i % 7 == 0)
        for i in range(n)
    ]


# -- unit ------------------------------------------------------------------------------------------


def test_pairs_and_log_probs_round_trip_through_the_run_dir(tmp_path: Path) -> None:
    pairs = pairs_of(23) + [TokenizedPair("empty-prompt", None, (), (1,), (2,), False)]
    write_pairs(tmp_path, pairs)
    mapped = read_pairs(tmp_path)
    assert isinstance(mapped.store.tokens, np.memmap)  # the ranks map one file, none holds a copy
    assert list(mapped) == pairs
    values = {p.pair_id: (-1.0 / (i + 3), -2.5 - i * 1e-7) for i, p in enumerate(pairs)}
    write_logps(tmp_path / "ref.safetensors", pairs, values)
    assert read_logps(tmp_path / "ref.safetensors", pairs) == values  # float64: exact
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".npy", ".bin"}  # no pickle


def test_reference_shards_are_whole_batches_disjoint_and_cover(tmp_path: Path) -> None:
    pairs = pairs_of(37)
    batch = 4
    shards = [rank_shard(pairs, batch, r, 3) for r in range(3)]
    write_pairs(tmp_path, pairs)  # what a rank shards: a view of the mapped store, same rows
    assert [list(rank_shard(read_pairs(tmp_path), batch, r, 3)) for r in range(3)] == shards
    ids = [p.pair_id for s in shards for p in s]
    assert sorted(ids) == sorted(p.pair_id for p in pairs) and len(ids) == len(set(ids))
    one_process = sorted(pairs, key=lambda p: p.n_tokens)
    batches = [one_process[i : i + batch] for i in range(0, len(one_process), batch)]
    # rank r re-forms exactly the batches r, r+3, ... of the one-process order
    for r, shard in enumerate(shards):
        again = sorted(shard, key=lambda p: p.n_tokens)
        assert [again[i : i + batch] for i in range(0, len(again), batch)] == batches[r::3]


def test_launch_command_and_environment() -> None:
    cmd = launch_command(Path("configs/accelerate/ddp.yaml"), 4, Path("/run"))
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--main_process_port") + 1] == "0"
    assert cmd[-3:] == ["-m", "offline.worker", "/run"]
    cpu = launch_env({"PATH": "/bin"}, 2, on_cuda=False, cpu_count=8)
    assert cpu["ACCELERATE_USE_CPU"] == "true" and cpu["OMP_NUM_THREADS"] == "4"
    assert cpu["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert launch_env({"OMP_NUM_THREADS": "1"}, 2, False, 8)["OMP_NUM_THREADS"] == "1"  # the user's stands
    assert "ACCELERATE_USE_CPU" not in launch_env({}, 2, on_cuda=True, cpu_count=8)


def test_shipped_accelerate_configs() -> None:
    kinds = {p.stem: distributed_type(p) for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}


# torch elastic's summary as accelerate launch printed it when rank 1 called os._exit(3) (torch 2.13)
ELASTIC_SUMMARY = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
offline.worker FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-05_08:45:59
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 9076)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 9076
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-05_08:45:59
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 3 (pid: 9077)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"""


def test_failure_summary_is_read_per_rank() -> None:
    assert parse_failures(ELASTIC_SUMMARY) == ({0: -15, 1: 3}, 1)
    assert parse_failures("no summary here") == ({}, None)


def test_the_rank_that_failed_first_is_blamed_not_its_peers() -> None:
    def st(rank, state, t=0.0):
        return RankStatus(rank=rank, state=state, time=t)

    # rank 1 died without a Python error; rank 0 then failed on the closed connection: rank 1
    assert root_cause({0: st(0, "failed", 5.0), 1: st(1, "running")}, {0: 1, 1: 3}, 0, 2) == 1
    # rank 0 was stopped by the launcher's SIGTERM after rank 1 raised: rank 1
    assert root_cause({0: st(0, "running"), 1: st(1, "failed", 2.0)}, {0: -15, 1: 1}, 0, 2) == 1
    # two Python errors: the earlier one
    assert root_cause({0: st(0, "failed", 9.0), 1: st(1, "failed", 3.0)}, {0: 1, 1: 1}, 0, 2) == 1
    # a rank that never wrote a status (died before) counts as abrupt
    assert root_cause({0: st(0, "running")}, {0: -15, 1: -9}, None, 2) == 1
    assert root_cause({}, {}, None, 2) is None


def test_settings_the_sharded_engines_cannot_honour_are_refused() -> None:
    f = Path("configs/accelerate/x.yaml")
    check_launchable(TrainConfig(save_every=2, grad_accum_steps=4), "MULTI_GPU", f, on_cuda=False)
    with pytest.raises(ValueError, match="only on CUDA"):
        check_launchable(TrainConfig(), "FSDP", f, on_cuda=False)
    with pytest.raises(ValueError, match="train.save_every"):
        check_launchable(TrainConfig(save_every=2), "FSDP", f, on_cuda=True)
    with pytest.raises(ValueError, match="train.grad_accum_steps"):
        check_launchable(TrainConfig(grad_accum_steps=2), "DEEPSPEED", f, on_cuda=True)


def test_a_missing_accelerate_config_names_the_field(tmp_path: Path) -> None:
    from offline.launch import accelerate_config_path

    with pytest.raises(FileNotFoundError, match="train.accelerate_config"):
        accelerate_config_path(TrainConfig(accelerate_config=str(tmp_path / "nope.yaml")))
    assert accelerate_config_path(TrainConfig()).name == "ddp.yaml"
    assert not TrainConfig().launched and TrainConfig(num_processes=2).launched
    assert TrainConfig(accelerate_config="configs/accelerate/fsdp.yaml").launched


def test_cycles_inherit_how_training_is_launched(tmp_path: Path) -> None:
    from online.config import CycleInputs
    from orchestrator.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", {"train": {"num_processes": 2}})
    inputs = CycleInputs(model=cfg.model, data=cfg.data, train=cfg.train, online=cfg.online, state_dir=tmp_path, name="x")
    assert inputs.cycle_train.num_processes == 2 and inputs.cycle_train.epochs == cfg.online.train.epochs
    own = load_config(ROOT / "configs" / "demo.yaml", {"train": {"num_processes": 2}, "online": {"train": {"num_processes": 1}}})
    inputs = CycleInputs(model=own.model, data=own.data, train=own.train, online=own.online, state_dir=tmp_path, name="x")
    assert inputs.cycle_train.num_processes == 1  # set there: it stands


def test_the_cli_refuses_to_run_as_a_launchers_rank() -> None:
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "offline"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "distributed launcher" in out.stdout and "train.num_processes" in out.stdout
    from orchestrator.runtime import launcher_rank_env

    assert launcher_rank_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None
    assert launcher_rank_env({"WORLD_SIZE": "2", "RANK": "0"}) == "WORLD_SIZE=2"


# -- slow: real 2-process jobs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A state dir with the demo policy, 128 tokenized demo pairs and their reference log-probs
    (computed in this process)."""
    from _faults import CONFIG, demo_models_template
    from offline import pipeline
    from offline.reference import ensure_reference_logps
    from orchestrator.config import load_config

    state = tmp_path_factory.mktemp("launch-state")
    shutil.copytree(demo_models_template(), state / "models")
    cfg = load_config(CONFIG, {"state_dir": str(state), "data": {"limit": 200}})
    policy = pipeline.load_initial_policy(cfg.model, state)
    data_cfg = pipeline.resolve_data(cfg.data, state)
    toks = pipeline.load_and_validate(data_cfg, policy.tokenizer)
    pairs = toks.train[:128]
    ref = ensure_reference_logps(policy, pairs, policy.model_dir, None, 16, progress=False)
    train_cfg = cfg.train.model_copy(update={"batch_size": 16, "epochs": 1, "max_steps": 4, "save_every": 2})
    return {"cfg": cfg, "state": state, "pairs": pairs, "ref": ref, "train": train_cfg}


def fresh_policy(demo):
    from offline import pipeline

    return pipeline.load_initial_policy(demo["cfg"].model, demo["state"])


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


@pytest.mark.slow
def test_sharded_reference_log_probs_equal_one_process(demo) -> None:
    from offline.reference import ensure_reference_logps

    policy = fresh_policy(demo)
    cache = demo["state"] / "cache-sharded"
    sharded = ensure_reference_logps(policy, demo["pairs"], policy.model_dir, cache, 16, progress=False, num_processes=2)
    assert sharded.keys() == demo["ref"].keys()
    worst = max(abs(sharded[k][i] - demo["ref"][k][i]) for k in sharded for i in (0, 1))
    assert worst <= LOGP_ATOL, worst
    # this process cached them (the one writer); no launch directory is left behind
    assert len(list(cache.glob("reference-logps-*.json"))) == 1
    assert not any((demo["state"] / "launch").iterdir())


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_pairs_per_step(demo, tmp_path: Path) -> None:
    from offline.launch import trainable, weights_digest
    from offline.pipeline import train_policy

    two = fresh_policy(demo)
    cfg2 = demo["train"].model_copy(update={"num_processes": 2})
    result2 = train_policy(two, demo["pairs"], demo["ref"], cfg2, tmp_path / "resume", progress=False)
    one = fresh_policy(demo)
    cfg1 = demo["train"].model_copy(update={"num_processes": 1, "grad_accum_steps": 2, "save_every": None})
    result1 = train_policy(one, demo["pairs"], demo["ref"], cfg1, None, progress=False)

    assert result2.steps == result1.steps == 4 and result2.step_pair_ids == result1.step_pair_ids
    assert losses(result2) == pytest.approx(losses(result1), rel=LOSS_RTOL)
    assert losses(result2)[-1] < losses(result2)[0]  # it trained
    # the weights that came back equal the one-process run's, and are what both ranks held
    import torch

    for (name, a), (_, b) in zip(trainable(two.model), trainable(one.model)):
        torch.testing.assert_close(a, b, rtol=LOSS_RTOL, atol=1e-7, msg=name)
    ranks = [json.loads((tmp_path / "resume" / "launch" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["state"] for r in ranks] == ["finished", "finished"] and all(r["replicated"] for r in ranks)
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"] == weights_digest(trainable(two.model))
    # rank 0 alone wrote the outputs; rank 1 its own log; the finished run left no snapshot
    out = tmp_path / "resume" / "launch"
    assert sorted(p.name for p in (out / "out").iterdir()) == ["result.json", "weights.safetensors"]
    assert (out / "ranks" / "rank-1.log").exists() and not (out / "ranks" / "rank-0.log").exists()
    assert not list((tmp_path / "resume").glob("run-*"))


@pytest.mark.slow
def test_a_rank_killed_mid_run_fails_naming_it_and_the_rerun_resumes(demo, tmp_path: Path, monkeypatch) -> None:
    from offline.launch import LaunchError
    from offline.pipeline import train_policy

    cfg = demo["train"].model_copy(update={"num_processes": 2})  # snapshots every 2 steps
    resume = tmp_path / "resume"
    monkeypatch.setenv("TETHER_FAULT_RANK_EXIT", "1:3:3")  # rank 1: os._exit(3) after step 3
    with pytest.raises(LaunchError, match=r"rank 1 of 2 failed with exit code 3") as err:
        train_policy(fresh_policy(demo), demo["pairs"], demo["ref"], cfg, resume, progress=False)
    assert "without a Python error" in str(err.value)
    snapshots = list(resume.glob("run-*/step-*"))
    assert [p.name for p in snapshots] == ["step-00000002"]
    monkeypatch.delenv("TETHER_FAULT_RANK_EXIT")

    policy = fresh_policy(demo)
    resumed = train_policy(policy, demo["pairs"], demo["ref"], cfg, resume, progress=False)
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    uninterrupted = train_policy(fresh_policy(demo), demo["pairs"], demo["ref"],
                                 cfg.model_copy(update={"num_processes": 1, "grad_accum_steps": 2, "save_every": None}),
                                 None, progress=False)
    assert losses(resumed) == pytest.approx(losses(uninterrupted), rel=LOSS_RTOL)


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_job_with_its_error(demo, tmp_path: Path) -> None:
    from offline.launch import LaunchError
    from offline.pipeline import train_policy

    bad = dict(demo["ref"])
    policy = fresh_policy(demo)
    # a config the ranks cannot load: the policy's model section names a model dir that is gone
    policy.config = policy.config.model_copy(update={"name_or_path": str(tmp_path / "gone")})
    with pytest.raises(LaunchError, match=r"rank \d of 2 failed with exit code 1: FileNotFoundError: model") as err:
        train_policy(policy, demo["pairs"], bad, demo["train"].model_copy(update={"num_processes": 2}), None, progress=False)
    assert "Traceback" in str(err.value)


@pytest.mark.slow
def test_the_cli_under_torchrun_refuses_in_every_rank() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "orchestrator.cli", "offline"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    # torchrun SIGTERMs the other rank as soon as one fails, so it may be stopped before it
    # prints: under torchrun one refusal is certain; each rank's own refusal is checked below,
    # in the environment torchrun gives it.
    assert "distributed launcher" in out.stdout, out.stdout + out.stderr
    for rank in ("0", "1"):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29555"}
        one = subprocess.run([sys.executable, "-m", "orchestrator.cli", "offline"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert one.returncode != 0 and "distributed launcher (WORLD_SIZE=2" in one.stdout, one.stdout + one.stderr
