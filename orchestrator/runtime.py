"""Process-wide Prefect settings, applied before `prefect` is first imported.

Prefect reads its settings once, at import, and background threads may start their own
temporary API server if they see different ones; so every entry point (CLI, tests,
benchmarks) calls `configure_prefect()` first. Defaults keep a user's runs in one place:
`PREFECT_HOME` under the project state dir, so runs made with no server (Prefect's ephemeral
local API) show up when `tether ui` later starts `prefect server start` on the same home.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DEFAULT_STATE_DIR = Path(".tether")


def state_dir_from_env() -> Path:
    """The project-local state dir: `$TETHER_STATE_DIR` or `./.tether`."""
    return Path(os.environ.get("TETHER_STATE_DIR", DEFAULT_STATE_DIR))


def configure_prefect(state_dir: Path | None = None) -> Path:
    """Set Prefect's env defaults (never overriding what the user set); returns PREFECT_HOME.

    - `PREFECT_HOME`: `<state_dir>/prefect`, shared by serverless runs and `tether ui`.
    - `PREFECT_SERVER_ANALYTICS_ENABLED=false`: no phoning home (and no network here).
    - `PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore`: our plain functions log through the
      stdlib logger; outside a flow that must not warn.
    """
    home = Path(os.environ.get("PREFECT_HOME") or (state_dir or state_dir_from_env()) / "prefect")
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # The ephemeral API prints a banner on every start; keep the CLI output readable.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    return home


@contextmanager
def serverless_flow_settings() -> Iterator[None]:
    """Flow-run heartbeats off while no Prefect server is configured (`PREFECT_API_URL` unset).

    A heartbeat lets a server mark a crashed run; with no server, the temporary local API
    lives and dies with this process, so nobody could act on one. It is not free: the
    heartbeat thread sleeps in 1 s steps and every flow run joins it on exit (~0.5-1 s per
    run, more than all of a demo cycle's task runs together). Against a real server (`tether
    ui`, a served schedule) heartbeats stay on. Import prefect only after `configure_prefect`.
    """
    from prefect.settings import get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield
