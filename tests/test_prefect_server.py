"""Prefect with and without a server, over one PREFECT_HOME (a real `prefect server start`).

Runs made with no server (Prefect's ephemeral local API, what `tether offline` does by default)
are stored in PREFECT_HOME's database, so a server started later on the same home (what `tether
ui` does) must list them with their task runs, logs and artifacts. And with PREFECT_API_URL set,
a run goes to the running server. Every flow runs through the `tether` CLI in a subprocess, so
Prefect reads its settings fresh there, whatever this pytest process was configured with.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _prefect_server import ROOT, api_post, eventually, prefect_server, run_tether, shared_state_dir

pytestmark = pytest.mark.slow

CONFIG = str(ROOT / "configs" / "demo.yaml")
OFFLINE_TASKS = {"load-policy", "load-and-validate", "coverage-report", "reference-logps", "train", "evaluate", "save-checkpoint"}


@pytest.fixture
def state_dir(tmp_path_factory) -> Path:
    return shared_state_dir(tmp_path_factory)


def offline_args(state_dir: Path) -> list[str]:
    """`tether offline` on the demo config, shrunk to seconds of training."""
    return ["offline", "--config", CONFIG, "--set", f"state_dir={state_dir}",
            "--set", "data.limit=300", "--set", "train.epochs=1"]


def assert_offline_run_recorded(base: str) -> dict:
    """The server at `base` holds one Completed `offline-baseline` run, its task runs, logs and artifacts."""
    runs = api_post(base, "flow_runs/filter", {"flow_runs": {"name": {"any_": ["offline-baseline"]}}})
    assert len(runs) == 1, [r["name"] for r in runs]
    run = runs[0]
    assert run["state_type"] == "COMPLETED" and run["state_name"] == "Completed", run["state"]
    by_run = {"flow_runs": {"id": {"any_": [run["id"]]}}}

    task_runs = api_post(base, "task_runs/filter", by_run)
    # Task run names are `<task name>-<3 hex digits>`.
    assert {t["name"].rsplit("-", 1)[0] for t in task_runs} >= OFFLINE_TASKS, [t["name"] for t in task_runs]
    assert {t["state_type"] for t in task_runs} == {"COMPLETED"}

    artifacts = api_post(base, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    keys = {a["key"] for a in artifacts}
    assert {"coverage-report", "offline-metrics"} <= keys, keys
    metrics = next(a for a in artifacts if a["key"] == "offline-metrics")
    assert "Held-out evaluation: initial vs trained" in metrics["data"]

    logs = api_post(base, "logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}})
    assert any("promoted as current policy" in log["message"] for log in logs), [log["message"] for log in logs]
    # What a plain function logs with the stdlib logger inside a task (offline.reference) is in
    # that task run's logs too, at INFO.
    ref = [log for log in logs if log["message"].startswith("reference log-probs:")]
    assert ref and all(log["level"] == 20 and log["task_run_id"] for log in ref), [log["message"] for log in logs]
    return run


def test_runs_made_without_a_server_show_up_when_it_starts(tmp_path, state_dir):
    home = tmp_path / "prefect"
    run_tether(offline_args(state_dir), state_dir, home, log_path=tmp_path / "offline.log")  # no PREFECT_API_URL
    assert (home / "prefect.db").is_file(), "the ephemeral run should be stored in PREFECT_HOME's database"

    with prefect_server(home) as base:
        eventually(lambda: assert_offline_run_recorded(base))


def test_a_run_against_a_running_server_is_recorded_by_it(tmp_path, state_dir):
    server_home, client_home = tmp_path / "server-prefect", tmp_path / "client-prefect"
    with prefect_server(server_home) as base:
        # The client's own home differs, so the run can only reach the server over PREFECT_API_URL.
        run_tether(offline_args(state_dir), state_dir, client_home, api_url=f"{base}/api", log_path=tmp_path / "offline.log")
        eventually(lambda: assert_offline_run_recorded(base))
    assert not (client_home / "prefect.db").exists(), "with PREFECT_API_URL set no ephemeral API should start"
