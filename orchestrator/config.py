"""The one config tree: every section lives beside its code; this module assembles them.

A job's config comes from one YAML file, then environment overrides on top
(`TETHER_<SECTION>__<FIELD>`, e.g. `TETHER_TRAIN__LOSS__BETA=0.2`), validated once at
start-up so a typo or a bad value fails before any model is loaded. The resolved config is
written into every checkpoint's lineage and every flow run's artifacts (`redacted_dump`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from buffer.config import BufferConfig, PasswordInUrl
from offline.config import DataConfig, ModelConfig, TrainConfig
from offline.secrets import redact, redact_url
from offline.section import Section
from online.config import OnlineConfig

TrackerBackend = Literal["tensorboard", "mlflow", "wandb"]


class TrackingConfig(Section):
    """Experiment trackers every flow run logs to (`orchestrator.tracking`, accelerate's tracker API).

    Credentials never live here: MLflow reads `MLFLOW_TRACKING_USERNAME`/`_PASSWORD` (or
    `_TOKEN`), W&B reads `WANDB_API_KEY`, both from the environment.
    """

    backends: tuple[TrackerBackend, ...] = ()
    """Trackers to log to: tensorboard, mlflow, wandb (a list, or "a,b" from --set); empty: none."""
    dir: Path | None = None
    """Root of local tracker files (TensorBoard events, the default MLflow store, W&B offline runs); default <state_dir>/tracking."""
    project: str | None = Field(default=None, min_length=1)
    """TensorBoard folder, MLflow experiment and W&B project name; default: the run family `name`."""
    mlflow_uri: str | None = Field(default=None, min_length=1)
    """MLflow tracking URI (http://host:5000, sqlite:///path.db); default sqlite:///<dir>/mlflow.db."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """W&B mode: offline writes runs under <dir>/wandb for a later `wandb sync`; online uploads (needs WANDB_API_KEY)."""
    wandb_entity: str | None = Field(default=None, min_length=1)
    """W&B team or user the project belongs to; default: the API key's user."""

    @field_validator("backends", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):  # `--set tracking.backends=tensorboard,mlflow`
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("backends")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"a backend is named twice: {list(value)}")
        return value

    @field_validator("mlflow_uri")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        if url is None:
            return url
        try:
            has_password = urlsplit(url).password is not None
        except ValueError:
            has_password = "@" in url
        if has_password:  # not a ValueError: pydantic would echo the URL, password included
            raise PasswordInUrl(
                f"tracking.mlflow_uri {redact_url(url)} embeds a password; remove it and export "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead"
            )
        return url


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message says where."""


class TetherConfig(BaseSettings):
    """Everything a tether job needs, resolved from YAML + `TETHER_*` environment overrides."""

    model_config = SettingsConfigDict(
        env_prefix="TETHER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    name: str = Field(default="tether", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Run family name: prefixes checkpoint names and Prefect flow-run names."""
    state_dir: Path = Path(".tether")
    """Project-local state: checkpoints, caches, the embedded Redis data, PREFECT_HOME."""
    seed: int = Field(default=0, ge=0)
    """Global seed (data order, sampling); sections may carry their own on top."""
    model: ModelConfig
    """The policy to train (and, frozen, the reference)."""
    data: DataConfig
    """The static preference dataset (the offline anchor)."""
    train: TrainConfig
    """The training loop, shared by the offline phase and every online cycle."""
    buffer: BufferConfig = BufferConfig()
    """The Redis replay buffer (online cycles)."""
    online: OnlineConfig | None = None
    """Online refresh cycles; absent means offline-only."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment trackers (TensorBoard, MLflow, W&B); none by default."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # Environment beats the YAML file (passed as init kwargs); nested values deep-merge.
        return (env_settings, init_settings)

    @property
    def checkpoints_dir(self) -> Path:
        """Where checkpoints of this run family live."""
        return self.state_dir / "checkpoints" / self.name


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TetherConfig:
    """Read a YAML config, apply `overrides` (nested dict) and env overrides, validate.

    Relative `state_dir` and `data.path` values are kept as written: they resolve against the
    working directory, like every other path the user types.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is None:
            raise ConfigError(f"{p}: the file is empty")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        raw = loaded
    if overrides:
        raw = _deep_merge(raw, overrides)
    try:
        return TetherConfig(**raw)
    except PasswordInUrl as exc:  # deliberately not a ValidationError: pydantic would echo the URL
        raise ConfigError(f"{path if path is not None else 'config'}: {exc}") from None
    except ValidationError as exc:
        where = str(path) if path is not None else "config"
        lines = [f"{where}: {exc.error_count()} invalid setting(s):"]
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<root>"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def with_setting(cfg: TetherConfig, key: str, value: Any) -> TetherConfig:
    """`cfg` with one setting replaced ("online.controller.kl_budget"), without re-reading the
    file or the environment: the section that holds the field is re-validated, the rest is
    shared. For callers that derive a variant of a config they already parsed (`tether report`'s
    budget probe)."""
    *parents, leaf = key.split(".")
    chain: list[Any] = [cfg]
    for part in parents:
        chain.append(getattr(chain[-1], part))
    section = chain[-1]
    node: Any = type(section).model_validate({**section.model_dump(), leaf: value})
    for parent, part in zip(reversed(chain[:-1]), reversed(parents)):
        node = parent.model_copy(update={part: node})
    return node


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """`tree["a"]["b"]["c"] = value` for key "a.b.c", creating the dicts on the way (overrides)."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def redacted_dump(cfg: TetherConfig) -> dict[str, Any]:
    """The resolved config as JSON-ready data, secrets removed (`offline.secrets.redact`): what
    lineage and artifacts store."""
    return redact(cfg.model_dump(mode="json"))
