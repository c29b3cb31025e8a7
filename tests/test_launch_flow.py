"""The flows with `train.num_processes: 2` (slow): one flow run, one checkpoint, training and the
missing reference log-probs as launched 2-process jobs (gloo on CPU), then a refresh cycle whose
reference and train steps go through the same launcher. The numerics of the launched path
(equality with one process, identical ranks, a killed rank) are tests/test_launch.py's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.runtime import configure_prefect

configure_prefect()

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from _faults import CONFIG, checkpoint_dirs, demo_models_template, small_overrides  # noqa: E402
from offline.checkpoint import is_complete, read_lineage  # noqa: E402
from offline.registry import PolicyRegistry  # noqa: E402
from orchestrator import flows  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


def _overrides(state: Path, redis_url: str | None = None) -> dict:
    return small_overrides(state, redis_url, **{"train.num_processes": 2, "train.max_steps": 3,
                                                "online.train.max_steps": 2, "online.train.batch_size": 16})


def _runs(flow_run_id=None):
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs()
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))) if flow_run_id else []
    return flow_runs, tasks


def test_offline_flow_and_a_cycle_train_on_two_processes(harness, tmp_path: Path, redis_url: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copytree(demo_models_template(), state / "models")

    run = flows.offline_baseline(str(CONFIG), _overrides(state), run_label="2p", progress=False, return_state=True)
    assert run.is_completed(), run
    out = run.result()
    flow_runs, tasks = _runs(run.state_details.flow_run_id)
    assert len(flow_runs) == 1  # the ranks started no flow of their own
    assert sorted(t.name.rsplit("-", 1)[0] for t in tasks).count("train") == 1
    ckpts = checkpoint_dirs(state)
    assert [Path(out["checkpoint"]["path"])] == ckpts and is_complete(ckpts[0])  # one, no temp dirs
    lineage = read_lineage(ckpts[0])
    assert lineage["steps"] == out["metrics"]["train/steps"] == 3
    assert lineage["config"]["train"]["num_processes"] == 2
    # each step consumed 2 ranks x 1 micro-batch of batch_size pairs
    assert all(len(ids) == 2 * lineage["config"]["train"]["batch_size"] for ids in lineage["step_pair_ids"])
    assert not (state / "resume").exists() or not any((state / "resume").iterdir())
    assert not any((state / "launch").iterdir())  # the reference job's run dir is gone too

    cycle = flows.refresh_cycle(str(CONFIG), _overrides(state, redis_url), run_label="2p", progress=False,
                                return_state=True)
    assert cycle.is_completed(), cycle
    rep = cycle.result()
    assert rep["index"] == 1 and not rep["skipped"]
    assert rep["train"]["step"] == 2 and is_complete(Path(rep["checkpoint"]["path"]))
    cycle_lineage = read_lineage(Path(rep["checkpoint"]["path"]))
    assert all(len(ids) == 2 * 16 for ids in cycle_lineage["step_pair_ids"])  # online.train.batch_size 16
    flow_runs, _ = _runs()
    assert len(flow_runs) == 2
    if rep["promoted"]:
        assert PolicyRegistry(state, "demo").current_or_none().checkpoint.path == rep["checkpoint"]["path"]
