"""A local `redis-server` for the replay buffer: the default when no `buffer.url` is configured.

Contract: `LocalRedis(data_dir)` starts `redis-server` bound to 127.0.0.1 on a free port with the
append-only file on (`appendfsync` always or everysec), `maxmemory-policy noeviction` and no
maxmemory limit (so it passes `buffer/requirements.py`'s checks) and its data under `data_dir` (tether passes
`<state_dir>/redis/`), waits until it answers PING, and stops it (SIGTERM: Redis fsyncs the AOF
and exits) when the context exits. Restarting on the same directory replays the AOF, so the
buffer survives restarts and crashes. One server per data directory: a second `LocalRedis` on a
directory in use fails instead of corrupting the AOF (a `flock` held by us and inherited by the
server, so a server orphaned by a crashed parent still holds it; the error names its pid).

This module does not import redis-py (only `buffer/store.py` does): `command()` speaks just
enough RESP for PING, FLUSHALL and the like, which tests and the pytest fixture need.

The server is the Debian/Ubuntu package (`apt-get install redis-server`, Redis 7); README and CI
install it. `redis-server` missing raises `RedisServerMissing` saying so.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

HOST = "127.0.0.1"
INSTALL_HINT = (
    "install it: apt-get install redis-server (Debian/Ubuntu; brew install redis on macOS), "
    "or set buffer.url to a Redis you run yourself"
)


class RedisServerMissing(RuntimeError):
    """The `redis-server` executable is not installed (or not on PATH)."""


class RedisServerError(RuntimeError):
    """The local redis-server could not be started, answered with an error, or its directory is in use."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _encode(args: tuple[str | int | float, ...]) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _read_reply(f: IO[bytes]) -> object:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by redis-server")
    kind, body = line[:1], line[1:-2].decode()
    if kind == b"+":
        return body
    if kind == b"-":
        raise RedisServerError(body)
    if kind == b":":
        return int(body)
    if kind == b"$":
        n = int(body)
        return None if n < 0 else f.read(n + 2)[:-2].decode()
    if kind == b"*":
        n = int(body)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RedisServerError(f"unexpected reply {line[:40]!r}")


def resp_command(port: int, *args: str | int, password: str | None = None, timeout_s: float = 5.0) -> object:
    """Send one command to the redis-server on 127.0.0.1:`port` and return its decoded reply."""
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock, sock.makefile("rb") as f:
        if password is not None:
            sock.sendall(_encode(("AUTH", password)))
            _read_reply(f)
        sock.sendall(_encode(args))
        return _read_reply(f)


class LocalRedis:
    """A redis-server child process on 127.0.0.1 with AOF persistence under `data_dir`."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        appendfsync: Literal["always", "everysec"] = "everysec",
        password: str | None = None,
        executable: str = "redis-server",
        startup_timeout_s: float = 15.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.appendfsync = appendfsync
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self._requested_port = port
        self._password = password
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[str] | None = None

    def __repr__(self) -> str:  # never shows the password
        state = f"pid={self.pid} url={self.url}" if self.running else "stopped"
        return f"LocalRedis({str(self.data_dir)!r}, appendfsync={self.appendfsync!r}, {state})"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("LocalRedis is not started")
        return self._port

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0` (the password, if any, is not part of it)."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def command(self, *args: str | int) -> object:
        """Run one Redis command on this server (tests, fixtures; the buffer itself uses redis-py)."""
        return resp_command(self.port, *args, password=self._password)

    def start(self) -> LocalRedis:
        """Start the server and wait until it answers PING (after replaying any AOF)."""
        if self.running:
            return self
        exe = shutil.which(self.executable)
        if exe is None:
            raise RedisServerMissing(f"{self.executable!r} not found on PATH; {INSTALL_HINT}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_dir_lock()
        try:
            # A free port can be taken between probing and binding: retry a couple of times.
            for attempt in range(3):
                self._port = self._requested_port or free_port()
                self._spawn(exe)
                if self._wait_ready():
                    break
                if self._requested_port is not None or attempt == 2 or "in use" not in self._log_tail():
                    raise RedisServerError(
                        f"redis-server exited during start-up (data dir {self.data_dir}); "
                        f"last log lines:\n{self._log_tail()}"
                    )
            self._compact_torn_aof()
        except BaseException:
            self.kill()
            raise
        atexit.register(self.stop)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server (it fsyncs the AOF and exits), SIGKILL it if it hangs; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._release_dir_lock()
        atexit.unregister(self.stop)

    def kill(self) -> None:
        """SIGKILL the server with no chance to flush anything: a crash, for durability tests."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._release_dir_lock()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------

    def _spawn(self, exe: str) -> None:
        conf = self.data_dir / "redis.conf"
        # The password goes in a 0600 config file, not argv, so `ps` never shows it.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            if self._password is not None:
                escaped = self._password.replace("\\", "\\\\").replace('"', '\\"')
                f.write(f'requirepass "{escaped}"\n')
        argv = [
            exe, str(conf),
            "--bind", HOST, "--port", str(self._port), "--protected-mode", "yes",
            "--dir", str(self.data_dir), "--logfile", str(self.log_path),
            "--appendonly", "yes", "--appendfsync", self.appendfsync,
            # A crash mid-write leaves a torn last transaction: drop it on load (all-or-nothing).
            "--aof-load-truncated", "yes",
            "--save", "",  # AOF only: no RDB snapshots on top
            # Redis' default, stated: a full Redis refuses writes (BufferFull) instead of evicting
            # buffered pairs or the cycle lock (buffer/requirements.py refuses evicting policies).
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no", "--pidfile", str(self.data_dir / "redis.pid"),
        ]  # fmt: skip
        assert self._lock_file is not None
        quiet = subprocess.DEVNULL  # it logs to --logfile
        # The server inherits the directory lock: if we die without stopping it, the orphan
        # still holds it, so a new LocalRedis refuses the directory instead of a second server
        # writing the same AOF.
        self._proc = subprocess.Popen(
            argv, stdin=quiet, stdout=quiet, stderr=quiet, pass_fds=(self._lock_file.fileno(),)
        )

    def _wait_ready(self) -> bool:
        """True once PING answers PONG; False if the process exited; raises on timeout."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        delay = 0.005
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                if self.command("PING") == "PONG":
                    return True
            except (OSError, RedisServerError):  # not listening yet, or -LOADING the AOF
                pass
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        raise RedisServerError(
            f"redis-server did not answer PING within {self.startup_timeout_s:.0f} s "
            f"(data dir {self.data_dir}); last log lines:\n{self._log_tail()}"
        )

    def _own_log_lines(self) -> list[str]:
        """This server process's lines of the shared log file (each starts with `<pid>:`)."""
        assert self._proc is not None
        prefix = f"{self._proc.pid}:"
        try:
            return [line for line in self.log_path.read_text(errors="replace").splitlines() if line.startswith(prefix)]
        except OSError:
            return []

    def _compact_torn_aof(self, timeout_s: float = 120.0) -> None:
        """Rewrite the AOF from memory when this start cut a torn tail off it, before any write.

        A crash mid-append leaves a torn last transaction; `aof-load-truncated` drops it, but
        Redis 7.0 cuts the file at the last whole command, which can be inside that
        transaction's MULTI. Memory is right (the open MULTI never ran), the file is not: the
        next write's MULTI...EXEC is appended after the open MULTI, and the restart after that
        runs the torn half too (the fault suite caught pairs with no index entries; fixed
        in the Valkey fork by valkey-io/valkey#4342). BGREWRITEAOF writes a new base from memory and
        retires the torn file, so nothing is ever appended after it.
        """
        if not any("Truncating the AOF" in line for line in self._own_log_lines()):
            return
        self.command("BGREWRITEAOF")
        deadline = time.monotonic() + timeout_s
        while True:
            info = str(self.command("INFO", "persistence"))
            fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
            if fields.get("aof_rewrite_in_progress") == "0" and fields.get("aof_rewrite_scheduled") == "0":
                if fields.get("aof_last_bgrewrite_status") != "ok":
                    raise RedisServerError(
                        f"rewriting the AOF after a torn tail failed (data dir {self.data_dir}); "
                        f"last log lines:\n{self._log_tail()}"
                    )
                return
            if time.monotonic() > deadline:
                raise RedisServerError(f"rewriting the AOF after a torn tail took over {timeout_s:.0f} s")
            time.sleep(0.01)

    def _log_tail(self, n: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _take_dir_lock(self) -> None:
        if self._lock_file is not None:
            return
        f = open(self.data_dir / ".tether-redis.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            pidfile = self.data_dir / "redis.pid"
            pid = pidfile.read_text().strip() if pidfile.exists() else "unknown"
            raise RedisServerError(
                f"another process runs a redis-server on {self.data_dir} (pid {pid}, perhaps left by a "
                f"crashed run); stop it (kill {pid}), or point buffer.url at it instead of starting "
                f"a second server on the same AOF"
            ) from None
        self._lock_file = f

    def _release_dir_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None
