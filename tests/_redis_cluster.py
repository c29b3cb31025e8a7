"""A real 3-node Redis Cluster on loopback for tests, and plain redis-servers with odd settings.

Contract:
- `redis_cluster(tmp_dir)` starts three `redis-server --cluster-enabled yes` (no persistence,
  each in its own directory under `tmp_dir`), joins them with `redis-cli --cluster create ...
  --cluster-replicas 0 --cluster-yes`, waits until every node reports `cluster_state:ok`, yields
  the seed node's `redis://127.0.0.1:<port>/0` URL, and kills every node on exit (always).
- `cluster_fixture` is that as the module-scoped pytest fixture `cluster` (import it into a
  test module, then take `cluster` as an argument): the servers, seed first.
- `plain_redis(tmp_dir, *args)` starts one `redis-server` with the extra `args` (e.g.
  `--maxmemory-policy allkeys-lru`), yields it, and kills it on exit.

Both talk RESP through `buffer.server.resp_command`, so this helper needs no redis-py.
Cluster nodes need two ports each (the client port and the bus port, +10000), so the ports
come from 20000-45000 with both halves checked free.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from buffer.server import HOST, RedisServerError, free_port, resp_command

NEEDS_REDIS = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="needs redis-server and redis-cli (apt-get install redis-server)",
)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _cluster_port(taken: set[int]) -> int:
    """A port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if port not in taken and port + 10000 not in taken and _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node on 127.0.0.1")


@dataclass
class Server:
    """One redis-server child process on 127.0.0.1."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def command(self, *args: str | int) -> object:
        return resp_command(self.port, *args)

    def info(self, *section: str) -> dict[str, str]:
        """`INFO <section>` (or `CLUSTER INFO` with section ("CLUSTER", "INFO")) as a dict."""
        text = str(self.command(*section) if len(section) > 1 else self.command("INFO", *section))
        return dict(line.strip().split(":", 1) for line in text.splitlines() if ":" in line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _start(directory: Path, port: int, *args: str) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "redis.log"
    argv = ["redis-server", "--bind", HOST, "--port", str(port), "--dir", str(directory),
            "--logfile", str(log), "--daemonize", "no", *args]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(port, proc, log)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server {' '.join(args)} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if server.command("PING") == "PONG":
                return server
        except (OSError, RedisServerError):
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"redis-server on port {port} did not answer PING within 15 s")
        time.sleep(0.02)


@contextmanager
def plain_redis(directory: Path, *args: str) -> Iterator[Server]:
    """One redis-server with extra settings (no tether defaults), killed on exit."""
    server = _start(directory, free_port(), *args)
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def redis_cluster(directory: Path, nodes: int = 3) -> Iterator[list[Server]]:
    """A `nodes`-primary Redis Cluster (no replicas, no persistence); yields its servers, seed first."""
    with ExitStack() as stack:
        servers: list[Server] = []
        taken: set[int] = set()
        for _ in range(nodes):
            port = _cluster_port(taken)
            taken |= {port, port + 10000}
            server = _start(directory / f"node-{port}", port,
                            "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                            "--cluster-node-timeout", "5000", "--appendonly", "no", "--save", "")  # fmt: skip
            stack.callback(server.kill)
            servers.append(server)
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"{HOST}:{s.port}" for s in servers),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout[-2000:]}\n{created.stderr[-2000:]}")
        deadline = time.monotonic() + 30
        while not all(s.info("CLUSTER", "INFO").get("cluster_state") == "ok" for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok within 30 s")
            time.sleep(0.1)
        yield servers


@pytest.fixture(scope="module", name="cluster")
def cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """A 3-node cluster for the test module, killed after its last test."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as servers:
        yield servers
