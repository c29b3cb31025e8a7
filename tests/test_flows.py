"""The flows end to end in Prefect's test harness (a real temporary Prefect server).

One module-scoped state dir: the demo policy is built once (SFT, cached) and the offline
baseline runs once; the cycle tests build on its promoted checkpoint, against the session's
real redis-server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.runtime import configure_prefect

configure_prefect()

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from offline.checkpoint import is_complete, read_lineage  # noqa: E402
from offline.registry import PolicyRegistry  # noqa: E402
from orchestrator import flows  # noqa: E402
from _faults import small_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


def overrides(state_dir: Path, redis_url: str | None = None, **extra) -> dict:
    """The demo config, shrunk so a flow takes seconds; training epochs as configured."""
    return small_overrides(state_dir, redis_url, epochs=None, **extra)


def _artifact_keys(flow_run_id) -> set[str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key for a in arts if a.key}


@pytest.fixture(scope="module")
def offline_run(harness, state_dir):
    state = flows.offline_baseline(CONFIG, overrides(state_dir), run_label="test", progress=False, return_state=True)
    assert state.is_completed(), state
    return state, state.result()


def test_offline_flow_writes_a_complete_checkpoint_with_lineage(offline_run, state_dir):
    _, out = offline_run
    ckpt = Path(out["checkpoint"]["path"])
    assert is_complete(ckpt)
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    lineage = read_lineage(ckpt)
    assert lineage["dataset_fingerprint"] == out["fingerprint"]
    assert lineage["config"]["train"]["loss"]["beta"] == 0.1
    assert lineage["kind"] == "offline"
    assert len(lineage["step_pair_ids"]) == lineage["steps"] == out["metrics"]["train/steps"] > 0
    # the pointer names exactly this checkpoint
    assert PolicyRegistry(state_dir, "demo").current_or_none().checkpoint.path == str(ckpt)


def test_offline_checkpoint_loads_with_transformers(offline_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = offline_run[1]["checkpoint"]["path"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("copy : 1 2 3 =", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_offline_training_beats_the_initial_policy(offline_run):
    m = offline_run[1]["metrics"]
    # the initial policy *is* the reference: every implicit reward margin is a tie (chance)
    assert m["eval_initial/accuracy"] <= 0.55
    assert m["eval/accuracy"] > 0.9
    assert m["eval/mean_margin"] > m["eval_initial/mean_margin"] + 0.1


def test_offline_flow_publishes_artifacts(offline_run):
    state, _ = offline_run
    keys = _artifact_keys(state.state_details.flow_run_id)
    assert {"coverage-report", "offline-metrics", "offline-metrics-table"} <= keys


def test_refresh_cycle_runs_and_moves_the_pointer_only_when_promoted(offline_run, state_dir, redis_url):
    before = PolicyRegistry(state_dir, "demo").current_or_none()
    state = flows.refresh_cycle(CONFIG, overrides(state_dir, redis_url), run_label="t1", progress=False, return_state=True)
    assert state.is_completed(), state
    rep = state.result()
    assert rep["index"] == 1 and not rep["skipped"]
    assert rep["judge"]["judge/judgments"] > 0
    judge, mix = rep["judge"], rep["mix"]
    assert judge["judge/asked"] == judge["judge/judgments"] + judge["judge/dropped"] > 0
    assert judge["judge/samples"] == 48 * 4 and judge["judge/position_conflicts"] == 0.0  # a rule has no positions
    # Every drawn pair was trained on (epochs, not max_steps): fresh + anchor = the draw.
    assert mix["train/fresh_pairs"] == mix["buffer/fresh_pairs_drawn"] > 0
    assert mix["train/fresh_pairs"] + mix["train/anchor_pairs"] == 96
    assert rep["audit"] is None and rep["flags"] == []  # the demo's rule judge: audits off by default
    lineage = read_lineage(Path(rep["checkpoint"]["path"]))["final_metrics"]
    assert lineage["judge"] == judge and lineage["mix"] == mix and lineage["flags"] == []
    assert "kl/policy_ref" in rep["kl"]
    assert is_complete(Path(rep["checkpoint"]["path"]))
    after = PolicyRegistry(state_dir, "demo").current_or_none()
    if rep["promoted"]:
        assert after.checkpoint.path == rep["checkpoint"]["path"]
    else:
        assert after == before
    assert {"refresh-cycle-metrics", "kl-history", "refresh-cycle-table"} <= _artifact_keys(state.state_details.flow_run_id)


def test_a_cycle_over_the_kl_budget_is_rolled_back(offline_run, state_dir, redis_url):
    before = PolicyRegistry(state_dir, "demo").current_or_none()
    o = overrides(state_dir, redis_url, **{"online.controller.kl_budget": 1e-6})
    rep = flows.refresh_cycle(CONFIG, o, run_label="kl", progress=False)
    assert rep["promoted"] is False
    assert any(r.startswith("kl:") for r in rep["reasons"])
    assert PolicyRegistry(state_dir, "demo").current_or_none() == before
    # kept for inspection, complete, but not current
    assert is_complete(Path(rep["checkpoint"]["path"]))


def test_a_regressing_cycle_is_rolled_back(offline_run, state_dir, redis_url):
    before = PolicyRegistry(state_dir, "demo").current_or_none()
    # a huge learning rate wrecks the policy: reward must drop, the gate must refuse it
    o = overrides(state_dir, redis_url, **{"online.train.learning_rate": 0.5, "online.controller.kl_budget": 1e6})
    rep = flows.refresh_cycle(CONFIG, o, run_label="bad", progress=False)
    assert rep["promoted"] is False
    assert rep["after"]["mean"] < rep["before"]["mean"]
    assert any("regressed" in r for r in rep["reasons"])
    assert PolicyRegistry(state_dir, "demo").current_or_none() == before


def test_a_second_cycle_skips_while_one_holds_the_lock(offline_run, state_dir, redis_url):
    from buffer.config import BufferConfig
    from buffer.store import ReplayBuffer

    buf = ReplayBuffer.connect(BufferConfig(url=redis_url))
    with buf.locks.hold("cycle:demo", ttl_s=60, blocking=False):
        rep = flows.refresh_cycle(CONFIG, overrides(state_dir, redis_url), run_label="busy", progress=False)
    buf.close()
    assert rep["skipped"] is True
    assert "taken" in rep["reason"]


def test_a_flow_run_makes_no_storage_lookup_or_csrf_round_trip(offline_run, state_dir, redis_url, monkeypatch):
    """A flow run's synchronous API calls are its own bookkeeping: with `FLOW_RESULTS` and the
    serverless client settings, no default-result-storage lookups and no CSRF token fetch."""
    import httpx

    from buffer.config import BufferConfig
    from buffer.store import ReplayBuffer

    paths: list[str] = []
    real_send = httpx.Client.send

    def recording_send(self, request, **kwargs):
        paths.append(request.url.path)
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", recording_send)
    buf = ReplayBuffer.connect(BufferConfig(url=redis_url))
    with buf.locks.hold("cycle:demo", ttl_s=60, blocking=False):  # the cycle skips: only the flow run's own calls
        rep = flows.refresh_cycle(CONFIG, overrides(state_dir, redis_url), run_label="calls", progress=False)
    buf.close()
    assert rep["skipped"] is True
    assert any(p.endswith("/flow_runs/") for p in paths), paths  # the recorder saw the run being created
    assert not [p for p in paths if p.endswith(("/admin/storage", "/csrf-token"))], paths


def test_schedule_is_created_updated_and_read_back(harness, state_dir):
    from orchestrator import schedule

    schedule.require_server()  # the harness' server answers
    dep = schedule.build_deployment(Path(CONFIG), "demo", every="6h", cron=None)
    first = schedule.apply(dep)
    again = schedule.apply(schedule.build_deployment(Path(CONFIG), "demo", every=None, cron="0 */6 * * *"))
    assert first == again  # updated in place
    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("refresh-cycle/demo-refresh")
        assert d.parameters["config_path"] == str(Path(CONFIG).resolve())
        assert [s.schedule.cron for s in d.schedules] == ["0 */6 * * *"]
    assert "paused" in schedule.set_paused("demo", paused=True)
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("refresh-cycle/demo-refresh").paused is True
    schedule.set_paused("demo", paused=False)
    assert any("demo-refresh" in line and "active" in line for line in schedule.list_deployments())


def test_schedule_refuses_without_a_server():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from orchestrator import schedule

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(schedule.ScheduleError, match="tether ui"):
            schedule.require_server()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(schedule.ScheduleError, match="no Prefect server answers"):
            schedule.require_server()
    with pytest.raises(schedule.ScheduleError, match="unit"):
        schedule.parse_interval("six hours")
