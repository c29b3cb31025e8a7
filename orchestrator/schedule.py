"""Periodic refresh cycles: a Prefect deployment of `refresh-cycle`, served here or run by a worker.

Two ways to run the schedule (`tether schedule`):
- served (`--every 6h`, the default): the deployment is created/updated and this process runs its
  flow runs until stopped (`prefect.serve`); one process, nothing else to start.
- work pool (`--pool NAME --every 6h`): the deployment goes to a Prefect *process* work pool and
  this process exits; `prefect worker start --pool NAME` on the GPU machine runs it. The
  deployment names its flow by module path (`orchestrator.flows.refresh_cycle`), so a worker
  needs tether importable (installed, or run from the project dir, the default working dir of
  its flow runs), and it carries a deployment concurrency limit of 1 with a collision strategy:
  a run due while one is running is queued (`enqueue`) or cancelled (`cancel-new`).

Schedules live in a Prefect *server* (an ephemeral API forgets them when the process ends), so
every command here first checks that `PREFECT_API_URL` answers, and says how to start one
(`tether ui`) when it does not. Re-running `tether schedule` with the same config updates the
deployment in place (deployments are keyed by flow + name). Overlapping runs are safe either way:
the cycle flow takes a Redis lock with a TTL, so of two runs due at once exactly one trains and the
other skips (or waits: `online.on_busy`) and says so in its log and artifacts.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx


class ScheduleError(RuntimeError):
    """The schedule cannot be set: no server, bad interval, unknown deployment."""


def deployment_name(name: str) -> str:
    """Deployment name of a run family's cycle schedule."""
    return f"{name}-refresh"


def require_server() -> str:
    """The API URL of a reachable Prefect server; a clear error when there is none."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url  # PREFECT_API_URL, from the env, a profile or a settings context
    hint = "start one with `tether ui` (it prints the URL) and `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
    if not url:
        raise ScheduleError(f"schedules need a Prefect server, and PREFECT_API_URL is not set: {hint}")
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as exc:
        raise ScheduleError(f"no Prefect server answers at {url} ({type(exc).__name__}): {hint}") from None
    return url


_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_interval(text: str) -> timedelta:
    """'90s', '30m', '6h', '1d' -> timedelta (minimum 1 minute: a cycle takes longer than that)."""
    m = _INTERVAL.match(text)
    if not m:
        raise ScheduleError(f"--every {text!r}: expected a number and a unit s/m/h/d, e.g. 6h")
    value = float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    if value < 60:
        raise ScheduleError(f"--every {text!r}: the shortest interval is 1 minute")
    return timedelta(seconds=value)


# `--collision` values -> Prefect's ConcurrencyLimitStrategy names.
COLLISION_STRATEGIES = {"enqueue": "ENQUEUE", "cancel-new": "CANCEL_NEW"}


def pool_settings(pool: str, collision: str, working_dir: Path) -> dict[str, Any]:
    """The `to_deployment` arguments that send a deployment to process work pool `pool`: the
    flow by module path (no code upload: the worker imports tether), flow runs in `working_dir`
    (where relative config paths resolve), at most one run at a time, `collision` deciding what
    happens to a run that comes due while one is running."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    if collision not in COLLISION_STRATEGIES:
        raise ScheduleError(f"--collision {collision!r}: expected one of {', '.join(COLLISION_STRATEGIES)}")
    return {
        "work_pool_name": pool,
        "entrypoint_type": EntrypointType.MODULE_PATH,
        "job_variables": {"working_dir": str(Path(working_dir).resolve())},
        "concurrency_limit": ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy(COLLISION_STRATEGIES[collision])),
    }


def ensure_process_pool(pool: str) -> bool:
    """Create process work pool `pool` unless it exists; True if created. A pool of another type
    is refused: its workers would expect an image or infrastructure block this deployment lacks."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                description="tether refresh cycles (`prefect worker start --pool " + pool + "`)",
            ))
            return True
    if existing.type != "process":
        raise ScheduleError(f"work pool {pool!r} is a {existing.type!r} pool; tether deploys to a process pool: pick another name")
    return False


def build_deployment(
    config: Path, name: str, *, every: str | None, cron: str | None,
    pool: str | None = None, collision: str = "enqueue", working_dir: Path | None = None,
):
    """The runner deployment of `refresh-cycle` with this config and exactly one schedule; with
    `pool`, bound for that process work pool (`pool_settings`), else to be served here."""
    from orchestrator.flows import refresh_cycle

    if (every is None) == (cron is None):
        raise ScheduleError("give exactly one of --every (e.g. 6h) or --cron (e.g. \"0 */6 * * *\")")
    if pool is None and (collision != "enqueue" or working_dir is not None):
        raise ScheduleError("--collision and --workdir go with --pool (a served schedule runs its flow runs here)")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError as exc:
            raise ScheduleError(f"--cron {cron!r} is not a valid cron expression ({exc})") from None
    params: dict[str, Any] = {"config_path": str(Path(config).resolve()), "run_label": "scheduled", "progress": False}
    on_pool = pool_settings(pool, collision, working_dir or Path.cwd()) if pool is not None else {}
    return refresh_cycle.to_deployment(
        name=deployment_name(name),
        interval=parse_interval(every) if every else None,
        cron=cron,
        parameters=params,
        description=f"tether refresh cycles for {name!r} ({config})",
        tags=["tether", name],
        **on_pool,
    )


def apply(deployment) -> str:
    """Create or update the deployment on the server; returns its id."""
    return str(deployment.apply())


def serve(deployment) -> None:
    """Run scheduled flow runs in this process until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment)


def list_deployments() -> list[str]:
    """One line per tether deployment: name, schedules, paused or active."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with get_client(sync_client=True) as client:
        deps = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["tether"])))
        lines = []
        for d in deps:
            scheds = ", ".join(_describe(s.schedule) for s in (d.schedules or [])) or "no schedule"
            where = f"; work pool {d.work_pool_name}" if d.work_pool_name else ""
            lines.append(f"{d.name}: {scheds}; {'paused' if d.paused else 'active'}{where}")
        return lines or ["no tether deployments yet: create one with `tether schedule --every 6h`"]


def _describe(schedule: Any) -> str:
    if getattr(schedule, "interval", None) is not None:
        return f"every {schedule.interval}"
    if getattr(schedule, "cron", None) is not None:
        return f"cron {schedule.cron!r}"
    return str(schedule)


def set_paused(name: str, *, paused: bool) -> str:
    """Pause or resume the schedule of run family `name`'s deployment."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(f"refresh-cycle/{deployment_name(name)}")
        except ObjectNotFound:
            raise ScheduleError(f"no deployment {deployment_name(name)!r}: create it with `tether schedule --every 6h`") from None
        (client.pause_deployment if paused else client.resume_deployment)(dep.id)
    return f"{deployment_name(name)}: {'paused' if paused else 'resumed'}"
