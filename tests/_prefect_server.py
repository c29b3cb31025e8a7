"""A real `prefect server start` for tests, and the `tether` CLI run against it in subprocesses.

`prefect_server(home)` starts the server on a free loopback port over the given PREFECT_HOME,
waits for `/api/health`, yields its base URL and always kills the whole process group on exit.
`run_tether(args, ...)` runs `python -m orchestrator.cli ...` in a fresh process, so the
Prefect settings of the pytest process (read once, at import) never leak into the run: with
`api_url` the run goes to that server, without it Prefect uses its ephemeral local API over
`prefect_home`. `api_post` and `eventually` read back what a server recorded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(prefect_home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child process, with Prefect pointed at `prefect_home`.

    Every PREFECT_* setting of the pytest process or the user's shell (API URL, profile,
    database, ...) is dropped first, so only what is set here reaches the child.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace_s`."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children (uvicorn workers, service subprocesses) may outlive the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=grace_s)


@contextmanager
def prefect_server(home: Path, log_path: Path | None = None, timeout_s: float = 120.0) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1:<free port> over PREFECT_HOME=`home`; yields `http://127.0.0.1:<port>`.

    The port also goes in PREFECT_SERVER_API_HOST/PORT: the UI asks `/ui-settings` for its API
    URL, which Prefect builds from those settings, not from `--port` (left alone, the browser
    would call port 4200).
    """
    home.mkdir(parents=True, exist_ok=True)
    log_path = log_path or home / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = child_env(home, PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port))
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    started = time.monotonic()
    try:
        deadline = started + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server not healthy after {timeout_s:.0f}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"prefect server {base} (PREFECT_HOME={home}) healthy after {time.monotonic() - started:.1f}s")
        yield base
    finally:
        stopping = time.monotonic()
        _kill_group(proc)
        print(f"prefect server {base} stopped in {time.monotonic() - stopping:.1f}s")


def shared_state_dir(tmp_path_factory) -> Path:
    """One tether state dir for this pytest session's server and UI tests.

    The demo policy is built (SFT, tens of seconds on 2 cores) once into it and read from its
    cache after; every test that needs a current policy runs `tether offline` itself first.
    """
    path = tmp_path_factory.getbasetemp() / "tether-state"
    path.mkdir(exist_ok=True)
    return path


def run_tether(args: list[str], state_dir: Path, prefect_home: Path, api_url: str | None = None,
               timeout_s: float = 600.0, log_path: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m orchestrator.cli *args` in a fresh process; fails the test with its output if it fails."""
    env = child_env(prefect_home, api_url, TETHER_STATE_DIR=str(state_dir))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    print(f"tether {args[0]} ({'server ' + api_url if api_url else 'no server'}): {time.monotonic() - started:.1f}s")
    if log_path:
        log_path.write_text(output)
    assert proc.returncode == 0, f"tether {' '.join(args)} exited with {proc.returncode}:\n{output[-4000:]}"
    return proc


def eventually(check: Callable[[], T], timeout_s: float = 30.0) -> T:
    """`check()`'s value once it stops failing an assertion, retried for up to `timeout_s`.

    The server records task runs from the events a run emits, a moment after the run has
    ended, so what a finished run left behind is read this way rather than once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def api_post(base: str, path: str, body: dict[str, Any]) -> Any:
    """POST `<base>/api/<path>` and return its JSON (raises on an HTTP error)."""
    r = httpx.post(f"{base}/api/{path.lstrip('/')}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()
