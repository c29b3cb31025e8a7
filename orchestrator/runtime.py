"""Process-wide Prefect settings, applied before `prefect` is first imported.

Prefect reads its settings once, at import, and background threads may start their own
temporary API server if they see different ones; so every entry point (CLI, tests,
benchmarks) calls `configure_prefect()` first. Defaults keep a user's runs in one place:
`PREFECT_HOME` under the project state dir, so runs made with no server (Prefect's ephemeral
local API) show up when `tether ui` later starts `prefect server start` on the same home.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from offline.atomic import atomic_write

DEFAULT_STATE_DIR = Path(".tether")
# tether's packages: their loggers are attached to Prefect's run logs (see configure_prefect).
TETHER_LOGGERS = ("offline", "online", "buffer", "orchestrator")


def state_dir_from_env() -> Path:
    """The project-local state dir: `$TETHER_STATE_DIR` or `./.tether`."""
    return Path(os.environ.get("TETHER_STATE_DIR", DEFAULT_STATE_DIR))


def configure_prefect(state_dir: Path | None = None) -> Path:
    """Set Prefect's env defaults (never overriding what the user set); returns PREFECT_HOME.

    - `PREFECT_HOME`: `<state_dir>/prefect`, shared by serverless runs and `tether ui`.
    - `PREFECT_SERVER_ANALYTICS_ENABLED=false`: no phoning home (and no network here).
    - `PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore`: our plain functions log through the
      stdlib logger; outside a flow that must not warn.
    - `PREFECT_LOGGING_EXTRA_LOGGERS`: tether's own packages (`TETHER_LOGGERS`), so what the
      plain functions log inside a run (a cycle's start, the anchor build, the judge's
      statistics) reaches that run's logs in the Prefect UI. Their level is set to INFO unless
      it was set, or the root's was already INFO or lower: a caller who wants their DEBUG lines
      (a retried request) sets it on the package's logger (`logging.getLogger("online")`).
    """
    home = Path(os.environ.get("PREFECT_HOME") or (state_dir or state_dir_from_env()) / "prefect")
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(TETHER_LOGGERS))
    for name in TETHER_LOGGERS:  # unset, they would inherit the root's WARNING and drop INFO
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET and logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    # The ephemeral API prints a banner on every start; keep the CLI output readable.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    return home


@contextmanager
def serverless_flow_settings() -> Iterator[None]:
    """Client settings for flows run with no Prefect server configured (`PREFECT_API_URL` unset).

    Prefect then starts a temporary local API in a subprocess (plain HTTP on 127.0.0.1) that
    lives and dies with this process. Its per-run bookkeeping is a fixed cost on every cycle
    (a third of a 2-second demo cycle's wall time), so for that API only:

    - flow-run heartbeats off: a heartbeat lets a server mark a crashed run; here nobody could
      act on one, and every flow run joins the heartbeat thread on exit (~0.5-1 s per run);
    - no CSRF token round trip (unless the local API is told to check them);
    - a one-certificate CA file for the TLS context Prefect builds for every client, even for
      plain HTTP: loading the full CA bundle costs ~40 ms per flow run on a 2-vCPU VM, and no
      TLS is ever negotiated with the loopback API.

    Against a real server (`tether ui`, a served schedule) nothing changes. Import prefect
    only after `configure_prefect`.
    """
    from prefect.settings import get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield
        return
    updates: dict[str, object] = {
        "flows.heartbeat_frequency": None,
        "api.ssl_cert_file": str(loopback_ca_file(settings.home)),
    }
    if not settings.server.api.csrf_protection_enabled:  # the local API checks no tokens
        updates["client.csrf_support_enabled"] = False
    with temporary_settings(updates=updates):
        yield


def loopback_ca_file(home: Path) -> Path:
    """A CA file holding one certificate (the first of certifi's bundle), in Prefect's `home`.

    Only for the plain-HTTP loopback API: Prefect's clients build an SSL context from
    `api.ssl_cert_file` even when the URL is `http://`, and parsing certifi's ~150 roots takes
    ~40 ms on a small VM; one certificate takes under 1 ms. It never verifies anything.
    """
    import certifi

    path = Path(home) / "loopback-ca.pem"
    if not path.exists():
        bundle = Path(certifi.where()).read_text()
        end = "-----END CERTIFICATE-----"
        first = bundle[bundle.index("-----BEGIN CERTIFICATE-----"): bundle.index(end) + len(end)] + "\n"
        atomic_write(path, first)  # processes starting at once each write the same bytes
    return path


def launcher_rank_env(env: Mapping[str, str]) -> str | None:
    """Why this process looks like one rank of a distributed launch (torchrun, `accelerate
    launch --multi_gpu`, ...), or None. Pure: the CLI refuses to start then, since every rank
    would run its own flow, Prefect API and checkpoint writes."""
    found = []
    for key, limit in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        value = env.get(key, "").strip()
        if value.lstrip("-").isdigit() and int(value) > limit:
            found.append(f"{key}={value}")
    return ", ".join(found) or None
