"""Secrets come only from the environment and never reach logs, configs, artifacts or the state dir.

The end-to-end test plants a judge API key and a Redis password in the environment (the only
place tether reads them), runs a refresh cycle as a Prefect flow whose LLM judge is the
loopback fake OpenAI server (requiring that key) and whose buffer is a password-protected
redis-server outside the state dir, then greps for either secret in: every artifact, log,
flow run and task run read back from Prefect's API; every log record of the process (tether,
httpx, httpcore and redis at DEBUG); captured stdout/stderr; every lineage.json; every file
under the state dir and PREFECT_HOME; every key and value in Redis. A third secret, a password
typed inline into a config URL (set through an environment override), must reach every
lineage masked by `offline.secrets.redact`, the one redaction function, and nowhere in clear.

Unit tests pin down that function: what it masks, what it must leave alone (tokenizer settings,
names of environment variables), and that `find_secrets` flags exactly what it would mask.

Static checks: `torch.load` is never called without `weights_only=True`, nothing in the
package imports pickle (or a pickle wrapper), and saved checkpoints hold only safetensors
weights.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import uuid
from pathlib import Path

import pytest

from orchestrator.runtime import configure_prefect

configure_prefect()

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from _faults import CONFIG, ROOT, prepare_state, small_overrides  # noqa: E402

KEY = f"sk-planted-XYZ-{uuid.uuid4().hex}"
REDIS_PW = f"redis-planted-{uuid.uuid4().hex}"
URL_PW = f"url-planted-{uuid.uuid4().hex}"
SECRETS = {"judge API key": KEY, "redis password": REDIS_PW, "URL password": URL_PW}
# Inline in a config URL that the demo's local (hf) generation backend never dials.
GENERATION_URL = f"http://gen:{URL_PW}@127.0.0.1:9/v1"
PACKAGES = ("offline", "online", "buffer", "orchestrator")
PICKLERS = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
UNSAFE_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def leaks(where: str, text: str | bytes) -> list[str]:
    """'<where>: <which secret>' for every planted secret found in `text`, whole or cut short.

    Each secret ends in 32 random hex digits; finding their first or last 12 catches an echo
    truncated at either end.
    """
    found = []
    for name, secret in SECRETS.items():
        for needle in (secret[-32:-20], secret[-12:]):
            if (needle.encode() if isinstance(text, bytes) else needle) in text:
                found.append(f"{where}: {name}")
                break
    return found


def file_leaks(root: Path) -> list[str]:
    return [hit for p in sorted(root.rglob("*")) if p.is_file() for hit in leaks(str(p), p.read_bytes())]


class Records(logging.Handler):
    """Keeps every formatted log record (message and exception text)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def redis_dump(url: str, password: str) -> list[str]:
    """Every key with its value, as text."""
    import redis

    client = redis.Redis.from_url(url, password=password, decode_responses=True)
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        value = {
            "string": client.get, "hash": client.hgetall, "set": client.smembers,
            "zset": lambda k: client.zrange(k, 0, -1, withscores=True), "list": lambda k: client.lrange(k, 0, -1),
        }[kind](key)
        out.append(f"{key} {value}")
    client.close()
    return out


def prefect_records(flow_run_id) -> dict[str, list[str]]:
    """Artifacts, logs, the flow run and its task runs, as JSON text, read back from Prefect's API."""
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId,
    )

    from prefect.logging.handlers import APILogWorker

    # Run logs reach the API through a background worker; read them only after it has flushed.
    APILogWorker.drain_all()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {
        "artifact": [a.model_dump_json() for a in artifacts],
        "log": [f"{log.name} {log.message}" for log in logs],
        "flow run": [flow_run.model_dump_json()],
        "task run": [t.model_dump_json() for t in task_runs],
    }


def test_the_leak_grep_finds_a_planted_secret(tmp_path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "blob.bin").write_bytes(b"\x00 Bearer " + KEY[:-4].encode() + b" \x00")
    (tmp_path / "ok.txt").write_text("nothing here")
    assert file_leaks(tmp_path) == [f"{tmp_path / 'a' / 'b' / 'blob.bin'}: judge API key"]
    assert leaks("log", f"redis://:{REDIS_PW}@host") == ["log: redis password"]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.mark.slow
def test_a_cycle_with_keys_in_the_environment_writes_them_nowhere(harness, tmp_path, monkeypatch, capfd) -> None:
    from fake_openai_server import FakeOpenAIServer

    from buffer.server import LocalRedis
    from orchestrator import flows

    monkeypatch.setenv("TETHER_JUDGE_API_KEY", KEY)
    monkeypatch.setenv("TETHER_REDIS_PASSWORD", REDIS_PW)
    monkeypatch.setenv("TETHER_ONLINE__GENERATION__BASE_URL", GENERATION_URL)
    records = Records()
    logging.getLogger().addHandler(records)
    levels = {n: logging.getLogger(n).level for n in (*PACKAGES, "httpx", "httpcore", "redis")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    state = tmp_path / "state"
    # The judge: the loopback fake, which answers 401 without the planted key; "7" marks the
    # better of two digit-string replies, so the demo policy's samples get real labels.
    with LocalRedis(tmp_path / "external-redis", password=REDIS_PW) as server, \
            FakeOpenAIServer(api_key=KEY, marker="7") as judge:
        overrides = small_overrides(state, server.url, **{
            "online.judge.kind": "llm",
            "online.judge.llm": {"base_url": judge.base_url, "model": "fake-judge", "cache_dir": str(state / "judge-cache"),
                                 "max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
            "online.gate.metric": "win_rate",
            # The "7" judge knows nothing of the demo's right answers, so its audit fails; the
            # cycle still runs the audit (with the key in the environment) and labels anyway.
            "online.judge.audit.enforce": False,
        })
        prepare_state(state, overrides)
        try:
            run = flows.refresh_cycle(str(CONFIG), overrides, run_label="secrets", progress=False, return_state=True)
        finally:
            logging.getLogger().removeHandler(records)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
        assert run.is_completed(), run
        report = run.result()
        assert report["judge"]["judge/judgments"] > 0, report["judge"]
        assert judge.requests and all(r.auth_ok for r in judge.requests), "the judge did not get the planted key"
        stored = redis_dump(server.url, REDIS_PW)

    from_prefect = prefect_records(run.state_details.flow_run_id)
    assert from_prefect["artifact"] and from_prefect["log"] and len(from_prefect["task run"]) > 5, {
        k: len(v) for k, v in from_prefect.items()}
    lineages = sorted(state.rglob("lineage.json"))
    assert len(lineages) >= 2  # the initial checkpoint and the cycle's
    for p in lineages:  # the URL reached each lineage, through redact
        assert json.loads(p.read_text())["config"]["online"]["generation"]["base_url"] == "http://gen:***@127.0.0.1:9/v1"
    assert records.lines and stored
    out, err = capfd.readouterr()
    found = [
        *(hit for kind, texts in from_prefect.items() for i, t in enumerate(texts)
          for hit in leaks(f"prefect {kind} {i}", t)),
        *(hit for i, line in enumerate(records.lines) for hit in leaks(f"log record {i}", line)),
        *leaks("stdout", out), *leaks("stderr", err),
        *(hit for i, item in enumerate(stored) for hit in leaks(f"redis key {item.split()[0]}", item)),
        *(hit for p in lineages for hit in leaks(str(p), p.read_text())),
        *file_leaks(state),
        *file_leaks(Path(os.environ["PREFECT_HOME"])),
    ]
    assert not found, found

    for ckpt in (p.parent for p in lineages):
        names = [p.name for p in ckpt.iterdir()]
        assert any(n.endswith(".safetensors") for n in names), names
        assert not [n for n in names if n.endswith(UNSAFE_WEIGHTS)], names


def test_a_judge_key_refused_by_the_api_is_not_echoed(monkeypatch, caplog) -> None:
    from fake_openai_server import FakeOpenAIServer

    from online.judge import JudgeAPIError, LLMJudge
    from online.config import LLMJudgeConfig
    from online.types import Generation

    monkeypatch.setenv("TETHER_JUDGE_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="online")  # tether's loggers are INFO (runtime.configure_prefect)
    gens = [Generation(prompt="p", responses=("a GOOD", "b"), policy_version="v")]
    with FakeOpenAIServer(api_key="the-real-key") as server, pytest.raises(JudgeAPIError) as info:
        LLMJudge(LLMJudgeConfig(base_url=server.base_url, model="m", max_retries=0)).judge_generations(gens)
    assert "401" in str(info.value)
    assert not leaks("error", str(info.value)) and not leaks("log", caplog.text)


def test_a_secret_set_as_a_config_field_is_refused_without_echoing_it(monkeypatch) -> None:
    from orchestrator.config import ConfigError, load_config

    monkeypatch.setenv("TETHER_ONLINE__JUDGE__LLM__API_KEY", KEY)
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG)
    assert "api_key" in str(info.value) and not leaks("error", str(info.value))


# -- the one redaction function (offline/secrets.py) ----------------------------------------------


def test_redact_masks_secret_keys_url_passwords_and_credential_shaped_values() -> None:
    from offline.secrets import find_secrets, redact

    hf = "hf_" + "A1b2" * 6
    config = {
        "judge": {"api_key": KEY, "api_key_env": "TETHER_JUDGE_API_KEY", "base_url": GENERATION_URL},
        "buffer": {"password_env": "TETHER_REDIS_PASSWORD", "redis_password": REDIS_PW, "token": "t0k"},
        "tokenizer": {"pad_token": "<pad>", "eos_token": "<eos>", "eos_token_id": 2, "max_tokens": 64},
        "headers": ("Authorization: Bearer " + REDIS_PW, KEY, hf, "task-0123456789abcdefghij"),
        "masked": {"password": "", "secret": None, "auth_token": "**********", "passwd": "<redacted>"},
    }
    out = redact(config)
    assert out == {
        "judge": {"api_key": "***", "api_key_env": "TETHER_JUDGE_API_KEY", "base_url": "http://gen:***@127.0.0.1:9/v1"},
        "buffer": {"password_env": "TETHER_REDIS_PASSWORD", "redis_password": "***", "token": "***"},
        "tokenizer": {"pad_token": "<pad>", "eos_token": "<eos>", "eos_token_id": 2, "max_tokens": 64},
        "headers": ("Authorization: Bearer ***", "***", "***", "task-0123456789abcdefghij"),
        "masked": {"password": "", "secret": None, "auth_token": "**********", "passwd": "<redacted>"},
    }
    assert not leaks("redacted", repr(out))
    # find_secrets flags exactly what redact masks, and nothing once it has.
    assert find_secrets(config) == [
        "judge.api_key", "judge.base_url", "buffer.redis_password", "buffer.token",
        "headers[0]", "headers[1]", "headers[2]",
    ]
    assert find_secrets(out) == []


def test_tokenizer_settings_and_variable_names_are_not_secrets() -> None:
    """orchestrator.config's old copy masked every key ending in `token` (so `pad_token` and
    `eos_token` vanished from lineage); only a bare `token` and the credential names are secret."""
    from offline.secrets import find_secrets, is_secret_key, redact

    plain = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token_id": 2, "max_tokens": 5, "max_new_tokens": 8,
             "api_key_env": "X", "password_env": "Y", "secret_name": "z", "tokenizer": "gpt2"}
    assert redact(plain) == plain and find_secrets(plain) == []
    secret = ["token", "Token", "api_key", "x-api-key", "apikey", "client_secret", "redis_password", "passwd",
              "auth_token", "access-token", "HF_TOKEN", "bearer"]
    assert [k for k in secret if not is_secret_key(k)] == []


def test_both_old_copies_gaps_are_closed() -> None:
    """orchestrator.config's old redact left credential-shaped values in clear; offline.checkpoint's
    old find_secrets did not flag a URL's inline password. The one function does both."""
    from offline.secrets import find_secrets, redact

    assert redact({"model": KEY, "note": f"key {KEY} here"}) == {"model": "***", "note": "key *** here"}
    assert find_secrets({"buffer": {"url": f"redis://:{REDIS_PW}@h:6379/0"}}) == ["buffer.url"]
    assert find_secrets({"buffer": {"url": "redis://:***@h:6379/0"}}) == []


def test_redact_url_masks_only_the_password_and_hides_an_unparseable_url() -> None:
    from offline.secrets import redact_url

    assert redact_url(f"redis://u:{REDIS_PW}@[::1]:6379/0?x=1") == "redis://u:***@[::1]:6379/0?x=1"
    assert redact_url("https://judge.example/v1") == "https://judge.example/v1"
    # A bad port makes the password's place unknowable: show the scheme only.
    assert redact_url(f"redis://u:{REDIS_PW}@h:port/0") == "redis://<unparseable>"


def test_the_resolved_config_goes_through_redact(monkeypatch) -> None:
    from offline.secrets import find_secrets
    from orchestrator.config import load_config, redacted_dump

    monkeypatch.setenv("TETHER_ONLINE__GENERATION__BASE_URL", GENERATION_URL)
    dump = redacted_dump(load_config(CONFIG))
    assert dump["online"]["generation"]["base_url"] == "http://gen:***@127.0.0.1:9/v1"
    assert find_secrets(dump) == [] and not leaks("config dump", json.dumps(dump))


# -- static checks over the package ---------------------------------------------------------------


def package_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20
    return files


def unsafe_torch_loads(source: str, where: str = "<src>") -> list[str]:
    """`file:line` of every torch.load call (also via `from torch import load [as x]`) without weights_only=True."""
    tree = ast.parse(source)
    aliases = {"torch.load"}
    modules = {"torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
        elif isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name == "torch" and a.asname}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name):
            name = f.id
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in modules:
            name = f"torch.{f.attr}"
        else:
            continue
        if name not in aliases:
            continue
        safe = any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        if not safe:
            bad.append(f"{where}:{node.lineno}")
    return bad


def test_the_torch_load_scanner_finds_unsafe_calls() -> None:
    assert unsafe_torch_loads("import torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\n") == ["<src>:2", "<src>:3"]
    assert unsafe_torch_loads("from torch import load as l\nl(f)\n") == ["<src>:2"]
    assert unsafe_torch_loads("import torch as T\nT.load(f, map_location='cpu')\n") == ["<src>:2"]
    assert unsafe_torch_loads("import torch\ntorch.load(f, weights_only=True)\nnp.load(f)\n") == []


def test_torch_load_is_never_called_without_weights_only() -> None:
    bad = [hit for p in package_files() for hit in unsafe_torch_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_nothing_in_the_package_imports_pickle() -> None:
    bad = []
    for p in package_files():
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{p.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PICKLERS]
    assert not bad, bad
