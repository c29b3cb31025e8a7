"""`tether schedule --pool`: the cycle flow on a Prefect process work pool, run by a real worker.

Everything is real: `prefect server start` on a free loopback port, the `tether` CLI in a
subprocess creating the pool and the deployment, `prefect worker start --pool` in another
subprocess, the session's redis-server, and the demo policy as the current policy. Two runs are
triggered at once through the API; with `--collision cancel-new` and the deployment's limit of
one, one completes a refresh cycle and the other is cancelled by the server, so the registry
records exactly one cycle. The unit tests above it build the deployment without a server.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from orchestrator.runtime import configure_prefect

configure_prefect()

from _faults import prepare_state, small_overrides  # noqa: E402
from _prefect_server import ROOT, _kill_group, child_env, eventually, prefect_server, run_tether  # noqa: E402
from offline.registry import PolicyRegistry  # noqa: E402
from orchestrator import schedule  # noqa: E402
from orchestrator.config import _deep_merge  # noqa: E402

CONFIG = ROOT / "configs" / "demo.yaml"
POOL = "tether-gpu"
DEPLOYMENT = "refresh-cycle/demo-refresh"


def write_config(tmp_path: Path, state_dir: Path, redis_url: str) -> Path:
    """The demo config, shrunk to a cycle of seconds, as the YAML file the deployment names."""
    overrides = small_overrides(state_dir, redis_url, epochs=1, **{"online.train.max_steps": 3})
    merged = _deep_merge(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()), overrides)
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(merged))
    return path


def api(base: str, method: str, path: str, body: dict | None = None):
    r = httpx.request(method, f"{base}/api/{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def schedule_args(config: Path, *extra: str) -> list[str]:
    return ["schedule", "--config", str(config), "--pool", POOL, "--cron", "0 0 1 1 *", *extra]


def test_a_pool_deployment_imports_the_flow_and_allows_one_run_at_a_time(tmp_path):
    dep = schedule.build_deployment(CONFIG, "demo", every="6h", cron=None, pool="gpu", collision="cancel-new",
                                    working_dir=tmp_path)
    assert dep.work_pool_name == "gpu"
    assert dep.entrypoint == "orchestrator.flows.refresh_cycle"
    assert dep.concurrency_limit == 1 and dep.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert dep.job_variables == {"working_dir": str(tmp_path.resolve())}
    served = schedule.build_deployment(CONFIG, "demo", every="6h", cron=None)
    assert served.work_pool_name is None and served.concurrency_limit is None


def test_pool_options_are_checked():
    with pytest.raises(schedule.ScheduleError, match="enqueue, cancel-new"):
        schedule.build_deployment(CONFIG, "demo", every="6h", cron=None, pool="gpu", collision="drop")
    with pytest.raises(schedule.ScheduleError, match="go with --pool"):
        schedule.build_deployment(CONFIG, "demo", every="6h", cron=None, collision="cancel-new")
    with pytest.raises(schedule.ScheduleError, match="go with --pool"):
        schedule.build_deployment(CONFIG, "demo", every="6h", cron=None, working_dir=Path("/srv"))


@pytest.mark.slow
def test_a_worker_on_the_pool_runs_one_cycle_at_a_time(tmp_path, redis_url):
    state_dir = tmp_path / "state"
    config = write_config(tmp_path, state_dir, redis_url)
    prepare_state(state_dir, small_overrides(state_dir, redis_url, epochs=1))
    home = tmp_path / "prefect"
    with prefect_server(home) as base:
        url = f"{base}/api"
        # First deploy: the pool is created, runs queue behind a running one by default.
        out = run_tether(schedule_args(config), state_dir, home, api_url=url).stdout
        said = " ".join(out.split())
        assert f"process work pool {POOL} created" in said and f"prefect worker start --pool {POOL}" in said, out
        first = api(base, "GET", f"deployments/name/{DEPLOYMENT}")
        assert api(base, "GET", f"work_pools/{POOL}")["type"] == "process"
        assert first["work_pool_name"] == POOL
        assert first["entrypoint"] == "orchestrator.flows.refresh_cycle"  # imported, not uploaded
        assert first["global_concurrency_limit"]["limit"] == 1  # (`concurrency_limit` reads None since Prefect 3.1)
        assert first["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        assert first["job_variables"]["working_dir"] == str(ROOT)
        assert first["parameters"]["config_path"] == str(config)
        assert [s["schedule"]["cron"] for s in first["schedules"]] == ["0 0 1 1 *"]

        # Re-deploying with the other collision strategy updates the same deployment in place.
        out = run_tether(schedule_args(config, "--collision", "cancel-new"), state_dir, home, api_url=url).stdout
        assert "process work pool" not in out, out  # the pool already existed
        again = api(base, "GET", f"deployments/name/{DEPLOYMENT}")
        assert again["id"] == first["id"]
        assert again["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

        # Two runs due at once, before any worker polls: a worker then picks up both.
        runs = [api(base, "POST", f"deployments/{again['id']}/create_flow_run", {}) for _ in range(2)]
        log_path = tmp_path / "worker.log"
        env = child_env(home, url, TETHER_STATE_DIR=str(state_dir), PREFECT_WORKER_QUERY_SECONDS="2")
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", "test-worker"],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            def settled() -> dict[str, dict]:
                states = {r["id"]: api(base, "GET", f"flow_runs/{r['id']}") for r in runs}
                kinds = sorted(s["state_type"] for s in states.values())
                assert worker.poll() is None, f"worker exited:\n{log_path.read_text()[-3000:]}"
                assert kinds == ["CANCELLED", "COMPLETED"], (kinds, log_path.read_text()[-2000:])
                return states

            states = eventually(settled, timeout_s=480)
        finally:
            _kill_group(worker)
    done = next(s for s in states.values() if s["state_type"] == "COMPLETED")
    cancelled = next(s for s in states.values() if s["state_type"] == "CANCELLED")
    assert cancelled["state"]["message"] == "Deployment concurrency limit reached.", cancelled["state"]  # CANCEL_NEW
    assert done["work_pool_name"] == POOL and done["name"] == "cycle-scheduled"
    # Exactly one cycle happened, and it left its row in the registry's history.
    state = PolicyRegistry(state_dir, "demo").cycle_state(0.5, 0.1)
    assert state.completed == 1 and len(state.history) == 1
    worker_log = log_path.read_text()
    assert re.search(r"Worker .*test-worker.* started", worker_log), worker_log[-2000:]
