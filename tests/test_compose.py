"""The GPU deployment: docker-compose.yml, the Dockerfile, and the two helpers in docker/.

There is no Docker engine (and no GPU) here, so nothing is started. What is checked:
- docker-compose.yml, structurally (yaml.safe_load, always) and with Debian's `docker-compose`
  v1 `config` (skipped where that binary is missing): services, health-gated start order, AOF,
  volumes, GPU reservations, the worker's wiring, no literal secret, and the paths that must
  agree between the worker, weights-sync and vLLM for new weights to reach the server.
- The Dockerfile and .dockerignore, as text.
- docker/weights_sync.py against the real pointer format (`offline.registry.PolicyRegistry.promote`).
- docker/vllm-serve.sh with a fake `vllm` binary: waits for the first promotion, restarts the
  server when the `current` link flips, stops cleanly on SIGTERM.
- docker/redis-start.sh: the argv it hands the image's entrypoint (a stand-in), and, with a real
  redis-server, the rewrite of an AOF whose torn tail a start cut off.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from buffer.config import BufferConfig
from offline.checkpoint import COMPLETE_MARKER, CheckpointRef
from offline.registry import PolicyRegistry

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"redis", "postgres", "prefect-server", "vllm", "worker", "weights-sync"}
GPU_SERVICES = ("vllm", "worker")
# Dummy values for the variables the file requires (`${VAR:?...}`); never real secrets.
REQUIRED_ENV = {"POSTGRES_PASSWORD": "dummy-not-a-secret", "TETHER_CONFIG": "deploy-test"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service(compose: dict, name: str) -> dict:
    return compose["services"][name]


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(svc: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) for the short `source:target[:mode]` volume syntax."""
    out = {}
    for spec in svc.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


def command_args(svc: dict) -> list[str]:
    cmd = svc.get("command", [])
    return cmd if isinstance(cmd, list) else cmd.split()


def arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --------------------------------------------------------------------------- docker-compose v1


def run_compose(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (Debian package, v1) is not installed; the structural checks still ran")
    # An empty --env-file: a developer's .env must neither supply nor mask the required variables.
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    full_env = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV}
    full_env.update(env)
    return subprocess.run(
        [exe, "--env-file", str(empty_env_file), "-f", str(COMPOSE), *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60,
    )


def test_docker_compose_v1_validates_and_interpolates(tmp_path):
    """v1 validates against the compose spec (GPU `deploy`, health conditions) and interpolates."""
    proc = run_compose("config", env=REQUIRED_ENV, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert set(resolved["services"]) == SERVICES
    pg_url = env_of(resolved["services"]["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert urlsplit(pg_url).password == REQUIRED_ENV["POSTGRES_PASSWORD"]
    assert "/app/configs/deploy-test.yaml" in resolved["services"]["worker"]["command"]
    assert resolved["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_missing_secret_fails_fast(tmp_path):
    """No default password: without POSTGRES_PASSWORD `compose` stops and names it."""
    env = {k: v for k, v in REQUIRED_ENV.items() if k != "POSTGRES_PASSWORD"}
    proc = run_compose("config", "-q", env=env, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr


# --------------------------------------------------------------------------- structure


def test_services_and_no_version_key(compose):
    assert set(compose["services"]) == SERVICES
    # Compose-spec format: Compose v2 calls a `version:` key obsolete, and the 3.x file format
    # (before docker-compose 1.27) had no `depends_on` conditions.
    assert "version" not in compose


def test_every_service_has_a_healthcheck_and_restart_policy(compose):
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert svc.get("restart") == "unless-stopped", f"{name}: no restart policy"


def test_start_order_is_gated_on_health(compose):
    deps = {name: svc.get("depends_on", {}) for name, svc in compose["services"].items()}
    assert deps["prefect-server"]["postgres"]["condition"] == "service_healthy"
    assert deps["worker"]["redis"]["condition"] == "service_healthy"
    assert deps["worker"]["prefect-server"]["condition"] == "service_healthy"
    # vLLM serves nothing until the worker's first promotion: waiting for it would deadlock.
    assert "vllm" not in deps["worker"]
    for name, dep in deps.items():
        assert isinstance(dep, dict), f"{name}: depends_on needs conditions, not a bare list"
        for target, cond in dep.items():
            assert target in compose["services"], f"{name} depends on unknown {target}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in compose["services"][target]


def test_redis_persists_with_aof_and_optional_password(compose):
    redis = service(compose, "redis")
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    assert redis["entrypoint"] == ["sh", "/opt/tether/redis-start.sh"]
    assert mounts(redis)["/opt/tether/redis-start.sh"] == ("./docker/redis-start.sh", "ro")
    assert env_of(redis)["TETHER_REDIS_PASSWORD"] == "${TETHER_REDIS_PASSWORD:-}"
    assert mounts(redis)["/data"][0] == "redis-data"
    assert "PONG" in " ".join(redis["healthcheck"]["test"])


REDIS_START = ROOT / "docker" / "redis-start.sh"


def run_redis_start(tmp_path: Path, env: dict[str, str], entrypoint: str) -> subprocess.Popen:
    """docker/redis-start.sh with `docker-entrypoint.sh` replaced by `entrypoint` (a shell body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "docker-entrypoint.sh"
    stand_in.write_text("#!/bin/sh\n" + entrypoint + "\n")
    stand_in.chmod(0o755)
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.Popen(["sh", str(REDIS_START)], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.parametrize("password", ["", "p@ss w'rd"])
def test_redis_start_passes_aof_flags_and_requirepass_only_when_set(tmp_path, password):
    """The argv redis-start.sh gives the image's entrypoint (a stand-in that prints it)."""
    data = tmp_path / "data"
    proc = run_redis_start(
        tmp_path, {"TETHER_REDIS_PASSWORD": password, "TETHER_REDIS_DATA": str(data), "TETHER_REDIS_PORT": "1"},
        'printf "ARG %s\\n" "$@"',
    )
    proc.wait(timeout=20)  # the stand-in printed and exited
    os.killpg(proc.pid, signal.SIGKILL)  # the log echo and the checker (no server ever came) remain
    out = proc.stdout.read()
    argv = [line[4:] for line in out.splitlines() if line.startswith("ARG ")]
    base = ["redis-server", "--port", "1", "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--dir", str(data), "--logfile", str(data / "redis-server.log")]
    assert argv == (base + ["--requirepass", password] if password else base)


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                    reason="needs redis-server and redis-cli")
def test_redis_start_rewrites_an_aof_whose_torn_tail_it_cut(tmp_path):
    """A torn last transaction (cut inside its MULTI, see tests/test_buffer_durability.py): the
    compose redis drops it, rewrites the AOF, and the torn half stays out after the next write
    and restart."""
    from buffer.server import RedisServerError, free_port, resp_command
    from buffer.store import ReplayBuffer
    from test_buffer_durability import assert_consistent, cycle, tear_inside_multi, two_cycles_then_sigkill

    data = tmp_path / "data"
    cfg = BufferConfig(appendfsync="always")
    tear_inside_multi(*two_cycles_then_sigkill(data, cfg))
    port = free_port()
    env = {"TETHER_REDIS_DATA": str(data), "TETHER_REDIS_PORT": str(port), "TETHER_REDIS_PASSWORD": ""}
    url = f"redis://127.0.0.1:{port}/0"

    def serve() -> subprocess.Popen:
        proc = run_redis_start(tmp_path, env, 'exec "$@"')
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if resp_command(port, "PING") == "PONG":
                    return proc
            except (OSError, RedisServerError):  # not listening yet, or -LOADING the AOF
                time.sleep(0.05)
        raise AssertionError("redis-start.sh did not bring redis-server up")

    def stop(proc: subprocess.Popen) -> str:
        os.killpg(proc.pid, signal.SIGTERM)  # as `docker compose stop`: redis fsyncs and exits
        out, _ = proc.communicate(timeout=20)
        return out

    proc = serve()
    deadline = time.monotonic() + 20  # the rewrite runs in the background once PING answers
    while "Background AOF rewrite finished successfully" not in (data / "redis-server.log").read_text():
        assert time.monotonic() < deadline, (data / "redis-server.log").read_text()[-2000:]
        time.sleep(0.05)
    buf = ReplayBuffer.connect(cfg, url=url)
    assert buf.stats().per_cycle == {0: 100}
    buf.add(cycle(50, 2))
    buf.close()
    out = stop(proc)
    assert "the AOF had a torn tail" in out and "Truncating the AOF" in out  # the log reached stdout
    proc = serve()
    buf = ReplayBuffer.connect(cfg, url=url)
    try:
        assert buf.stats().per_cycle == {0: 100, 2: 50}
        assert buf.connection.client.hlen(buf.connection.key("pairs")) == 150
        assert_consistent(buf)
    finally:
        buf.close()
        stop(proc)


def test_postgres_and_prefect_server(compose):
    pg, prefect = service(compose, "postgres"), service(compose, "prefect-server")
    assert pg["image"] == "postgres:16"
    assert env_of(pg)["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert mounts(pg)["/var/lib/postgresql/data"][0] == "postgres-data"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])

    assert prefect["image"] == "prefecthq/prefect:3-python3.11"
    assert command_args(prefect) == ["prefect", "server", "start", "--host", "0.0.0.0"]
    env = env_of(prefect)
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "${POSTGRES_PASSWORD:?" in url
    url = urlsplit(re.sub(r"\$\{[^}]*\}", "pw", url))  # the message holds a '/'
    assert (url.scheme, url.username, url.hostname, url.port, url.path) == (
        "postgresql+asyncpg", "prefect", "postgres", 5432, "/prefect"
    )
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert any(p.endswith(":4200:4200") for p in prefect["ports"])
    assert "/api/health" in " ".join(prefect["healthcheck"]["test"])


def test_volumes_are_declared_and_mounted(compose):
    declared = set(compose["volumes"])
    used = set()
    for svc in compose["services"].values():
        for target, (source, _) in mounts(svc).items():
            if not source.startswith((".", "/")):  # named volume, not a bind mount
                assert source in declared, f"{source} mounted at {target} but not declared"
                used.add(source)
    assert used == declared == {"redis-data", "postgres-data", "state", "checkpoints", "vllm-cache"}
    assert (ROOT / "docker" / "vllm-serve.sh").is_file()  # bind-mounted into the vllm container
    assert (ROOT / "docker" / "redis-start.sh").is_file()  # and this one into redis


def test_gpu_reservations(compose):
    for name in GPU_SERVICES:
        devices = service(compose, name)["deploy"]["resources"]["reservations"]["devices"]
        (dev,) = devices
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        # One GPU each, picked by id: `count: 1` on both would hand both the same first GPU.
        assert len(dev["device_ids"]) == 1
    vllm_gpu = service(compose, "vllm")["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
    worker_gpu = service(compose, "worker")["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
    assert vllm_gpu != worker_gpu
    for name in set(compose["services"]) - set(GPU_SERVICES):
        assert "deploy" not in service(compose, name), f"{name} should not hold a GPU"


def test_worker_wiring(compose):
    worker = service(compose, "worker")
    assert "build" in worker and worker["image"] == service(compose, "weights-sync")["image"]
    env = env_of(worker)
    api = urlsplit(env["PREFECT_API_URL"])
    assert (api.hostname, api.port, api.path) == ("prefect-server", 4200, "/api")
    # TETHER_BUFFER__URL is the env override of buffer.url: it must validate as one, with no password.
    buffer_url = urlsplit(BufferConfig(url=env["TETHER_BUFFER__URL"]).url)
    assert (buffer_url.hostname, buffer_url.port or 6379) == ("redis", 6379)
    assert env["TETHER_REDIS_PASSWORD"] == "${TETHER_REDIS_PASSWORD:-}"  # BufferConfig.password_env's default
    # Generation goes to the vllm service (online.generation.{backend,base_url} overrides).
    assert env["TETHER_ONLINE__GENERATION__BACKEND"] == "openai"
    gen = urlsplit(env["TETHER_ONLINE__GENERATION__BASE_URL"])
    assert (gen.scheme, gen.hostname, gen.port, gen.path) == ("http", "vllm", 8000, "/v1")
    assert "TETHER_ONLINE__GENERATION__MODEL" not in env  # unset: requests pin the checkpoint path
    # An empty TETHER_NAME would override the config's run-family name with "" (pydantic-settings).
    assert "TETHER_NAME" not in env
    args = command_args(worker)
    assert args[0] == "schedule" and arg_after(args, "--every") == "${TETHER_EVERY:-6h}"
    config = arg_after(args, "--config")
    assert config.startswith("/app/configs/${TETHER_CONFIG:?") and config.endswith(".yaml")
    assert mounts(worker)["/app/configs"] == ("./configs", "ro")
    assert worker.get("init") is True  # reaps the flow-run subprocesses the Prefect runner starts
    assert "127.0.0.1:8080/health" in " ".join(worker["healthcheck"]["test"])


def test_new_weights_reach_vllm(compose):
    """The paths that carry a promotion to vLLM agree across the three services.

    worker: TetherConfig.checkpoints_dir = <TETHER_STATE_DIR>/checkpoints/<name>, which is the
    checkpoints volume; weights-sync: same mounts at the same paths (the pointer's absolute path
    is valid there) and flips <volume>/current; vLLM: the same volume, read-only, `--model` on
    the link, and the worker's path as alias prefix so pinned requests name the right version.
    """
    worker, sync, vllm = (service(compose, n) for n in ("worker", "weights-sync", "vllm"))
    state_dir = env_of(worker)["TETHER_STATE_DIR"]
    assert mounts(worker)[state_dir][0] == "state"
    worker_ckpts = f"{state_dir}/checkpoints"
    assert mounts(worker)[worker_ckpts][0] == "checkpoints"
    assert env_of(sync)["TETHER_STATE_DIR"] == state_dir
    assert mounts(sync)[state_dir] == ("state", "ro")
    assert mounts(sync)[worker_ckpts] == ("checkpoints", "rw")
    assert sync["entrypoint"] == ["python", "/app/docker/weights_sync.py"]
    assert arg_after(command_args(sync), "--config") == arg_after(command_args(worker), "--config")

    assert vllm["image"].startswith("vllm/vllm-openai:")
    args = command_args(vllm)
    model = arg_after(args, "--model")
    source, mode = mounts(vllm)[str(Path(model).parent)]
    assert (source, mode, Path(model).name) == ("checkpoints", "ro", "current")
    assert arg_after(args, "--served-model-name") == "tether-policy"
    assert arg_after(args, "--port") == "8000" and any(p.endswith(":8000") for p in vllm["ports"])
    assert env_of(vllm)["TETHER_VLLM_ALIAS_PREFIX"] == worker_ckpts
    assert vllm["entrypoint"] == ["/bin/bash", "/opt/tether/vllm-serve.sh"]
    assert mounts(vllm)["/opt/tether/vllm-serve.sh"] == ("./docker/vllm-serve.sh", "ro")
    assert "8000/health" in " ".join(vllm["healthcheck"]["test"])


SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|apikey|auth)", re.I)
# `${VAR}`, `${VAR:-}` (empty default) or `${VAR:?message}`: a reference, never a value.
ENV_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-|:\?[^}]*)?\}$")
URL_CREDENTIALS = re.compile(r"://[^/\s:@]*:(?P<pw>[^@\s]+)@")


def walk_strings(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk_strings(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk_strings(v, (*path, str(i)))
    elif isinstance(node, str):
        yield path, node


def test_no_literal_secrets(compose):
    for path, value in walk_strings(compose):
        where = ".".join(path)
        if SECRET_KEY.search(path[-1]):
            assert ENV_REFERENCE.match(value), f"{where}: {value!r} is not a ${{VAR}} reference"
        for m in URL_CREDENTIALS.finditer(value):
            assert ENV_REFERENCE.match(m["pw"]), f"{where}: URL with a literal password"
        if "requirepass" in value:
            assert re.search(r"--requirepass\s+\"?\$\$", value), f"{where}: requirepass takes a literal"
    # And the raw text, in case a secret hides in a comment or an anchor.
    for n, line in enumerate(COMPOSE.read_text().splitlines(), 1):
        m = re.search(r"(?i)\b(password|secret|token)\s*[:=]\s*['\"]?([A-Za-z0-9+/_-]{8,})", line)
        assert m is None or m[2].startswith("$"), f"docker-compose.yml:{n}: literal {m[1]}?"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_and_dockerignore():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "ARG PYTHON_VERSION=3.11" in lines
    assert any(ln.startswith("FROM python:${PYTHON_VERSION}") for ln in lines)
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu12\d", text)
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    # The worker talks to the vllm service over HTTP: no vLLM in this image.
    code = "\n".join(lines)
    assert "vllm" not in code.lower()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    # The console script the entrypoint names ([project.scripts] in pyproject.toml).
    assert 'ENTRYPOINT ["tether"]' in lines
    assert re.search(r'^tether = "orchestrator\.cli:main"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert any(ln.startswith("HEALTHCHECK") for ln in lines)

    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv/", ".tether/", ".git/", "**/__pycache__/", ".pytest_cache/", ".env"):
        assert entry in ignored, f".dockerignore misses {entry}"
    # What the image needs must not be ignored.
    for needed in ("pyproject.toml", "configs/", "docker/", "offline/"):
        assert not any(needed.startswith(i.rstrip("/")) for i in ignored if i and not i.startswith("#"))


# --------------------------------------------------------------------------- docker/weights_sync.py


@pytest.fixture(scope="module")
def weights_sync():
    spec = importlib.util.spec_from_file_location("weights_sync", ROOT / "docker" / "weights_sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_checkpoint(root: Path, family: str, name: str, complete: bool = True) -> CheckpointRef:
    """A directory shaped like offline/checkpoint.py's output (weights' bytes do not matter here)."""
    path = root / family / name
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0")
    ref = CheckpointRef(path=str(path), id=name[-4:].rjust(16, "0"), name=name)
    if complete:
        (path / COMPLETE_MARKER).write_text(ref.model_dump_json(exclude={"path"}))
    return ref


def test_weights_sync_mirrors_the_pointer_atomically(tmp_path, weights_sync):
    state = tmp_path / "state"
    root = state / "checkpoints"
    root.mkdir(parents=True)
    assert weights_sync.sync_once(state, root, "tether") is None  # nothing promoted yet
    assert not (root / "current").exists()

    first = make_checkpoint(root, "tether", "offline-0001")
    PolicyRegistry(state, "tether").promote(first, kind="offline")
    assert weights_sync.sync_once(state, root, "tether") == "tether/offline-0001"
    link = root / "current"
    # Relative, so it resolves under both mounts of the volume (worker and vLLM).
    assert os.readlink(link) == "tether/offline-0001" and link.resolve() == Path(first.path)
    assert weights_sync.flip_link(root, "tether/offline-0001") is False  # idempotent

    second = make_checkpoint(root, "tether", "cycle-0002")
    PolicyRegistry(state, "tether").promote(second, kind="cycle")
    weights_sync.sync_once(state, root, "tether")
    assert link.resolve() == Path(second.path)
    assert sorted(p.name for p in root.iterdir()) == ["current", "tether"]  # no temp link left


def test_weights_sync_refuses_what_vllm_cannot_serve(tmp_path, weights_sync):
    state = tmp_path / "state"
    root = state / "checkpoints"
    good = make_checkpoint(root, "tether", "offline-0001")
    PolicyRegistry(state, "tether").promote(good, kind="offline")
    weights_sync.sync_once(state, root, "tether")

    # promote() itself refuses incomplete checkpoints; a hand-edited pointer must not get through either.
    partial = make_checkpoint(root, "tether", "cycle-0002", complete=False)
    (state / "pointers" / "tether.json").write_text(json.dumps({"checkpoint": {"path": partial.path}}))
    with pytest.raises(weights_sync.SyncError, match="incomplete"):
        weights_sync.sync_once(state, root, "tether")
    outside = make_checkpoint(tmp_path / "elsewhere", "tether", "cycle-0003")
    PolicyRegistry(state, "tether").promote(outside, kind="offline")
    with pytest.raises(weights_sync.SyncError, match="not under"):
        weights_sync.sync_once(state, root, "tether")
    assert (root / "current").resolve() == Path(good.path)  # the old policy keeps being served
    assert weights_sync.main(["--once", "--state-dir", str(state), "--name", "tether"]) == 1


def test_weights_sync_follows_the_configs_run_family(tmp_path, weights_sync, monkeypatch):
    config = tmp_path / "cfg.yaml"
    config.write_text("name: gsm-run\nmodel: {}\n")
    monkeypatch.delenv("TETHER_NAME", raising=False)
    assert weights_sync.run_family(config, None) == "gsm-run"
    assert weights_sync.run_family(config, "explicit") == "explicit"
    assert weights_sync.run_family(None, None) == "tether"
    monkeypatch.setenv("TETHER_NAME", "from-env")  # env beats YAML, as in orchestrator.config
    assert weights_sync.run_family(config, None) == "from-env"

    state = tmp_path / "state"
    PolicyRegistry(state, "from-env").promote(make_checkpoint(state / "checkpoints", "from-env", "offline-0001"), kind="offline")
    heartbeat = tmp_path / "alive"
    rc = weights_sync.main(["--once", "--config", str(config), "--state-dir", str(state), "--heartbeat", str(heartbeat)])
    assert rc == 0 and heartbeat.exists()
    assert os.readlink(state / "checkpoints" / "current") == "from-env/offline-0001"


# --------------------------------------------------------------------------- docker/vllm-serve.sh

FAKE_VLLM = """#!/usr/bin/env bash
# Stands in for `vllm`: logs its pid and arguments, runs until SIGTERM (or exits with $FAKE_RC).
echo "start $$ $*" >> "$FAKE_LOG"
[[ -n ${FAKE_RC:-} ]] && exit "$FAKE_RC"
trap 'echo "stop $$" >> "$FAKE_LOG"; exit 0' TERM
while :; do sleep 0.05; done
"""


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the supervisor")


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture()
def supervisor(tmp_path):
    """Start docker/vllm-serve.sh on a fake vllm; yields (start(extra_env), root, log)."""
    if shutil.which("bash") is None or shutil.which("setsid") is None:
        pytest.skip("needs bash and setsid (util-linux)")
    fake = tmp_path / "vllm"
    fake.write_text(FAKE_VLLM)
    fake.chmod(0o755)
    root, log = tmp_path / "checkpoints", tmp_path / "vllm.log"
    root.mkdir()
    procs: list[subprocess.Popen] = []

    def start(**extra_env: str) -> subprocess.Popen:
        env = {
            **os.environ, "TETHER_VLLM_BIN": str(fake), "TETHER_VLLM_POLL_S": "0.1",
            "TETHER_VLLM_STOP_TIMEOUT_S": "5", "TETHER_VLLM_ALIAS_PREFIX": "/state/checkpoints",
            "FAKE_LOG": str(log), **extra_env,
        }
        cmd = ["bash", str(ROOT / "docker" / "vllm-serve.sh"), "--model", str(root / "current"),
               "--served-model-name", "tether-policy", "--port", "8000"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start, root, log
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # A fake server runs in its own session (setsid): end any that a failed test left behind.
    for line in log_lines(log):
        if line.startswith("start "):
            try:
                os.kill(int(line.split()[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_vllm_supervisor_restarts_on_promotion(supervisor, weights_sync):
    start, root, log = supervisor
    proc = start()
    time.sleep(0.3)
    assert log_lines(log) == []  # nothing promoted: it waits instead of starting vLLM on nothing

    first = make_checkpoint(root, "tether", "offline-0001")
    weights_sync.flip_link(root, "tether/offline-0001")
    wait_for(lambda: len(log_lines(log)) == 1)
    _, pid1, *args = log_lines(log)[0].split()
    assert args == ["serve", first.path, "--served-model-name", "tether-policy",
                    "/state/checkpoints/tether/offline-0001", "--port", "8000"]

    second = make_checkpoint(root, "tether", "cycle-0002")
    weights_sync.flip_link(root, "tether/cycle-0002")
    wait_for(lambda: len(log_lines(log)) == 3)
    stop, restart = log_lines(log)[1:]
    assert stop == f"stop {pid1}"  # the old server is gone before the new one starts (one GPU)
    assert restart.split()[3] == second.path and "/state/checkpoints/tether/cycle-0002" in restart

    proc.send_signal(signal.SIGTERM)  # `docker stop`
    assert proc.wait(timeout=10) == 0
    assert log_lines(log)[-1] == f"stop {restart.split()[1]}"


def test_vllm_supervisor_exits_when_vllm_dies(supervisor, weights_sync):
    """A crash is not papered over: the container exits and Docker's restart policy takes over."""
    start, root, log = supervisor
    make_checkpoint(root, "tether", "offline-0001")
    weights_sync.flip_link(root, "tether/offline-0001")
    proc = start(FAKE_RC="3")
    assert proc.wait(timeout=10) == 3
    assert "exited with status 3" in proc.stderr.read()
