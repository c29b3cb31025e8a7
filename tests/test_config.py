"""The config tree: YAML -> validated sections, env overrides, clear errors, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline.secrets import redact
from orchestrator.config import ConfigError, load_config, redacted_dump

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "smollm2.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.name_or_path
    assert cfg.data.max_prompt_length < cfg.data.max_length


def test_env_overrides_beat_yaml_and_deep_merge(monkeypatch):
    monkeypatch.setenv("TETHER_TRAIN__LOSS__BETA", "0.25")
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.train.loss.beta == 0.25
    # the rest of the section still comes from the file
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.loss.type == "sigmoid"


def test_overrides_dict_applies(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"train": {"batch_size": 4}})
    assert cfg.train.batch_size == 4


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def _demo_with(tmp_path: Path, edit) -> Path:
    """configs/demo.yaml with `edit(dict)` applied, written to a tmp file."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    edit(data)
    return _write(tmp_path, yaml.safe_dump(data))


def test_unknown_key_is_named(tmp_path):
    p = _demo_with(tmp_path, lambda d: d["train"].update(learnig_rate=2))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.learnig_rate" in str(e.value)
    assert str(p) in str(e.value)


def test_negative_beta_is_rejected(tmp_path):
    p = _demo_with(tmp_path, lambda d: d["train"]["loss"].update(beta=-1))
    with pytest.raises(ConfigError, match=r"train\.loss\.beta"):
        load_config(p)


def test_budget_must_be_positive(tmp_path):
    p = _demo_with(tmp_path, lambda d: d["online"]["controller"].update(kl_budget=0))
    with pytest.raises(ConfigError, match=r"online\.controller\.kl_budget"):
        load_config(p)


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("- a\n- b\n", "mapping"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_unreadable_files(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope/none.yaml")


def test_redaction_strips_url_passwords_and_secret_fields():
    data = {"url": "redis://user:hunter2@host:6379/0", "nested": {"api_key": "sk-xyz", "n": 1}, "l": ["rediss://:pw@h"]}
    out = redact(data)
    assert "hunter2" not in str(out) and "sk-xyz" not in str(out) and ":pw@" not in str(out)
    assert out["nested"]["n"] == 1
    assert out["url"] == "redis://user:***@host:6379/0"


def test_redacted_dump_is_json_ready():
    import json

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert json.loads(json.dumps(redacted_dump(cfg)))["train"]["loss"]["beta"] == 0.1


def test_cli_set_values_coerce_and_null_unsets():
    from orchestrator.cli import parse_sets

    sets = parse_sets(["train.loss.beta=0.2", "train.save_every=null", "online.judge.llm.model=None", "name=x=y"])
    assert sets == {"train": {"loss": {"beta": "0.2"}, "save_every": None},
                    "online": {"judge": {"llm": {"model": None}}}, "name": "x=y"}
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                      parse_sets(["train.loss.beta=0.2", "train.save_every=null"]))
    assert cfg.train.loss.beta == 0.2 and cfg.train.save_every is None


def test_validating_a_config_imports_no_heavy_library():
    """`tether --help` and config errors must come back fast: the config tree is pydantic only."""
    import subprocess
    import sys

    code = (
        "import sys; from orchestrator.config import load_config; import orchestrator.cli; "
        "load_config('configs/demo.yaml'); "
        "print(sorted(m for m in ('torch', 'transformers', 'httpx', 'redis', 'prefect', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_with_setting_replaces_one_field_and_validates_it():
    from orchestrator.config import with_setting

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    probe = with_setting(cfg, "online.controller.kl_budget", 0.25)
    assert probe.online.controller.kl_budget == 0.25 and cfg.online.controller.kl_budget != 0.25
    assert probe.online.judge is cfg.online.judge and probe.train is cfg.train  # the rest is shared
    with pytest.raises(ValueError, match="greater than 0"):
        with_setting(cfg, "online.controller.kl_budget", -1.0)
