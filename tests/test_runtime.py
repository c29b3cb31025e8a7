"""Prefect client settings for serverless runs (orchestrator.runtime), read back from Prefect's
live settings; the CA file is loaded by the ssl module as Prefect's client loads it."""

from __future__ import annotations

import ssl

from orchestrator.runtime import configure_prefect

configure_prefect()

from prefect.settings import get_current_settings, temporary_settings  # noqa: E402

from orchestrator.runtime import loopback_ca_file, serverless_flow_settings  # noqa: E402


def test_the_loopback_ca_file_holds_exactly_one_certificate() -> None:
    home = get_current_settings().home
    path = loopback_ca_file(home)
    text = path.read_text()
    assert text.count("-----BEGIN CERTIFICATE-----") == 1 and text.rstrip().endswith("-----END CERTIFICATE-----")
    ctx = ssl.create_default_context(cafile=str(path))  # what Prefect's client builds from it
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert loopback_ca_file(home) == path and path.read_text() == text  # written once


def test_serverless_settings_apply_only_without_a_server() -> None:
    with temporary_settings(restore_defaults={"api.url", "client.csrf_support_enabled", "api.ssl_cert_file",
                                              "flows.heartbeat_frequency"}):
        defaults = get_current_settings()
        with serverless_flow_settings():
            s = get_current_settings()
            assert s.client.csrf_support_enabled is False
            assert s.api.ssl_cert_file == str(loopback_ca_file(s.home))
            assert s.flows.heartbeat_frequency is None
        # Against a configured server nothing changes.
        with temporary_settings(updates={"api.url": "http://127.0.0.1:9/api"}):
            with serverless_flow_settings():
                s = get_current_settings()
                assert s.client.csrf_support_enabled is True
                assert s.api.ssl_cert_file == defaults.api.ssl_cert_file != str(loopback_ca_file(s.home))
                assert s.flows.heartbeat_frequency == defaults.flows.heartbeat_frequency is not None
        # A local API told to check CSRF tokens gets them.
        with temporary_settings(updates={"server.api.csrf_protection_enabled": True}):
            with serverless_flow_settings():
                assert get_current_settings().client.csrf_support_enabled is True


def test_tether_loggers_reach_prefect_at_info_unless_the_caller_chose_a_level(tmp_path) -> None:
    """A fresh process: tether's package loggers are Prefect extra loggers (their records go to
    the run's logs) at INFO; a root already at DEBUG or a level set on a package is kept."""
    import json
    import os
    import subprocess
    import sys

    probe = (
        "import json, logging, sys\n"
        "if sys.argv[1] == 'debug': logging.basicConfig(level=logging.DEBUG)\n"
        "logging.getLogger('buffer').setLevel(logging.ERROR)\n"
        "from orchestrator.runtime import configure_prefect\n"
        "configure_prefect()\n"
        "from prefect.settings import PREFECT_LOGGING_EXTRA_LOGGERS\n"
        "print(json.dumps({'extra': PREFECT_LOGGING_EXTRA_LOGGERS.value(), 'levels': {n: logging.getLogger(n)"
        ".getEffectiveLevel() for n in ('offline', 'online', 'buffer', 'orchestrator')}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"TETHER_STATE_DIR": str(tmp_path)}
    out = {mode: json.loads(subprocess.run([sys.executable, "-c", probe, mode], env=env, check=True,
                                           capture_output=True, text=True).stdout.splitlines()[-1])
           for mode in ("default", "debug")}
    assert sorted(out["default"]["extra"]) == ["buffer", "offline", "online", "orchestrator"]
    assert out["default"]["levels"] == {"offline": 20, "online": 20, "buffer": 40, "orchestrator": 20}
    assert out["debug"]["levels"] == {"offline": 10, "online": 10, "buffer": 40, "orchestrator": 10}
