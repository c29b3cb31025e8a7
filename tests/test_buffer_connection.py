"""Connecting: passwords only from the environment and never shown, clear errors when Redis is away."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from buffer.config import BufferConfig, PasswordInUrl
from buffer.server import LocalRedis, free_port
from buffer.connection import BufferUnavailable
from buffer.store import ReplayBuffer
from offline.secrets import redact_url
from offline.section import Section

SECRET = "s3cret-Hunter2-xyzzy"


def test_every_config_field_is_documented_and_constrained() -> None:
    for name, field in BufferConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(ValidationError):
        BufferConfig(fresh_capacity=0)
    with pytest.raises(ValidationError):
        BufferConfig(appendfsync="no")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="redis:// or rediss://"):
        BufferConfig(url="http://localhost:6379")
    assert BufferConfig(url="rediss://user@redis.example:6380/2").url == "rediss://user@redis.example:6380/2"


def test_a_password_in_the_url_is_refused_without_echoing_it() -> None:
    class Root(Section):
        buffer: BufferConfig = BufferConfig()

    for build in (lambda: BufferConfig(url=f"redis://:{SECRET}@h:6379/0"),
                  lambda: Root.model_validate({"buffer": {"url": f"rediss://u:{SECRET}@h/0"}})):  # fmt: skip
        with pytest.raises(PasswordInUrl) as err:
            build()
        assert SECRET not in str(err.value) and "TETHER_REDIS_PASSWORD" in str(err.value)


def test_redact_url() -> None:
    assert redact_url(f"redis://u:{SECRET}@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url(f"rediss://:{SECRET}@h/3") == "rediss://:***@h/3"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_unreachable_redis_says_how_to_start_one() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(BufferUnavailable) as err:
        ReplayBuffer.connect(BufferConfig(url=url, connect_retries=0))
    text = str(err.value)
    assert url in text
    assert "redis-server --port 6379 --appendonly yes" in text
    assert "buffer.url unset" in text and "docker-compose up redis" in text


def test_password_comes_from_the_environment_and_never_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalRedis(tmp_path, password=SECRET) as server:
        assert SECRET not in repr(server)
        cfg = BufferConfig(url=server.url, connect_retries=0)
        monkeypatch.delenv("TETHER_REDIS_PASSWORD", raising=False)
        with pytest.raises(BufferUnavailable, match=r"\$TETHER_REDIS_PASSWORD"):
            ReplayBuffer.connect(cfg)

        monkeypatch.setenv("TETHER_REDIS_PASSWORD", "wrong-" + SECRET)
        with pytest.raises(BufferUnavailable) as err:
            ReplayBuffer.connect(cfg)
        assert SECRET not in str(err.value) and SECRET not in repr(err.value)

        monkeypatch.setenv("TETHER_REDIS_PASSWORD", SECRET)
        with ReplayBuffer.connect(cfg) as buf:
            buf.pointers.set("p", {"ok": True})
            shown = [repr(buf), str(buf), buf.connection.url, repr(cfg), str(cfg), cfg.model_dump_json()]
            shown.append(buf.stats().model_dump_json())
            assert all(SECRET not in s for s in shown)

        # Another variable name, via the config.
        monkeypatch.delenv("TETHER_REDIS_PASSWORD")
        monkeypatch.setenv("MY_REDIS_PW", SECRET)
        with ReplayBuffer.connect(cfg.model_copy(update={"password_env": "MY_REDIS_PW"})) as buf:
            assert buf.pointers.get("p") == {"ok": True}
    assert SECRET not in (tmp_path / "redis.log").read_text()
