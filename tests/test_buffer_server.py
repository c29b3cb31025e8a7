"""The embedded default: a local redis-server under the state dir, started and stopped for us."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from buffer.config import BufferConfig
from buffer.server import LocalRedis, RedisServerError, RedisServerMissing
from buffer.store import open_buffer
from offline.pairs import PreferencePair

REPO = Path(__file__).resolve().parents[1]


def test_missing_redis_server_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(RedisServerMissing, match="apt-get install redis-server"):
        LocalRedis(tmp_path, executable="redis-server-that-is-not-installed").start()


def test_open_buffer_without_url_runs_a_local_server_that_keeps_its_data(tmp_path: Path) -> None:
    cfg = BufferConfig()
    pair = PreferencePair(prompt="p", chosen="c", rejected="r")
    with open_buffer(cfg, tmp_path) as buf:
        buf.seed_anchor([pair], "fp")
        url = buf.connection.url
        pid = int(buf.connection.client.info("server")["process_id"])
    assert url.startswith("redis://127.0.0.1:")
    assert (tmp_path / "redis" / "appendonlydir").is_dir()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped on exit
    with open_buffer(cfg, tmp_path) as buf:  # a new server on the same dir replays the AOF
        assert buf.get([pair.content_id])[0] is not None


def test_open_buffer_with_url_connects_to_it(redis_url: str, tmp_path: Path) -> None:
    with open_buffer(BufferConfig(url=redis_url), tmp_path) as buf:
        assert buf.count() == 0
    assert not (tmp_path / "redis").exists()


def test_one_server_per_data_dir(tmp_path: Path) -> None:
    with LocalRedis(tmp_path) as first:
        with pytest.raises(RedisServerError, match="another process runs a redis-server"):
            LocalRedis(tmp_path).start()
        assert first.command("PING") == "PONG"


def test_a_server_orphaned_by_a_killed_parent_still_guards_its_dir(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    orphan = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no atexit, the redis-server child lives on
    parent.wait()
    try:
        with pytest.raises(RedisServerError, match=rf"pid {orphan}, perhaps left by a crashed run"):
            LocalRedis(tmp_path).start()
    finally:
        os.kill(orphan, signal.SIGTERM)
        for _ in range(100):  # not our child: poll until it is gone
            try:
                os.kill(orphan, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    with LocalRedis(tmp_path) as again:  # once it is gone the dir is free
        assert again.command("PING") == "PONG"


_PARENT = """
import sys, time
from buffer.server import LocalRedis
server = LocalRedis(sys.argv[1]).start()
print(server.pid, flush=True)
time.sleep(60)
"""
