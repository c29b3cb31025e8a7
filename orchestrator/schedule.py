"""Periodic refresh cycles: a Prefect deployment of `refresh-cycle`, created/updated and served.

Schedules live in a Prefect *server* (an ephemeral API forgets them when the process ends), so
every command here first checks that `PREFECT_API_URL` answers, and says how to start one
(`tether ui`) when it does not. Re-running `tether schedule` with the same config updates the
deployment in place (deployments are keyed by flow + name). Overlapping runs are safe: the cycle
flow takes a Redis lock with a TTL, so of two runs due at once exactly one trains and the other
skips (or waits: `online.on_busy`) and says so in its log and artifacts.
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


def build_deployment(config: Path, name: str, *, every: str | None, cron: str | None):
    """The runner deployment of `refresh-cycle` with this config and exactly one schedule."""
    from orchestrator.flows import refresh_cycle

    if (every is None) == (cron is None):
        raise ScheduleError("give exactly one of --every (e.g. 6h) or --cron (e.g. \"0 */6 * * *\")")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError as exc:
            raise ScheduleError(f"--cron {cron!r} is not a valid cron expression ({exc})") from None
    params: dict[str, Any] = {"config_path": str(Path(config).resolve()), "run_label": "scheduled", "progress": False}
    return refresh_cycle.to_deployment(
        name=deployment_name(name),
        interval=parse_interval(every) if every else None,
        cron=cron,
        parameters=params,
        description=f"tether refresh cycles for {name!r} ({config})",
        tags=["tether", name],
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
            lines.append(f"{d.name}: {scheds}; {'paused' if d.paused else 'active'}")
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
