"""Experiment trackers (TensorBoard, MLflow, W&B) for flow runs, through accelerate's tracker API.

Contract: `open_run(cfg, kind=..., run_name=..., flow_run_id=...)` is a context manager that
yields a `RunTracker`, one tracker run per flow run (an offline baseline is one run, each refresh
cycle another). On entry every backend in `cfg.tracking.backends` starts its run, stores the
resolved config as hyperparameters (flattened to `train.loss.beta`-style keys, secrets redacted
by `offline.secrets` through `redacted_dump`), and tags the run with the Prefect flow-run id
(`prefect.flow_run_id`). Inside, `log_train_step` is the training loop's `on_step` hook
(`train/<metric>` at the optimizer step) and `log` takes anything else (evaluation, a cycle's
metrics from `cycle_metrics`). On exit every backend finishes its run, also when the flow failed.

The trackers are accelerate's own `GeneralTracker` classes (`TensorBoardTracker`,
`MLflowTracker`, `WandBTracker`), used directly rather than through `Accelerator(log_with=...)`:
the training loop owns its `Accelerator`, and a second one here would only wrap the same classes.
Only the main process logs: with a launcher's RANK other than 0 no backend is even started, and
the tracker classes check `PartialState().is_main_process` themselves.

Where runs go (`cfg.tracking.dir`, default `<state_dir>/tracking`, project default `cfg.name`):
- tensorboard: `<dir>/tensorboard/<project>/<run name>/` (`tensorboard --logdir <dir>/tensorboard`);
- mlflow: `cfg.tracking.mlflow_uri`, default a SQLite store `<dir>/mlflow.db` with artifacts under
  `<dir>/mlflow-artifacts` (`mlflow ui --backend-store-uri sqlite:///<dir>/mlflow.db`);
- wandb: `wandb_mode` offline (default) writes `<dir>/wandb/` for a later `wandb sync`; online
  uploads with `WANDB_API_KEY`. Not exercised by the tests (no network, no wandb installed).

No backend configured: nothing is imported and every call is a no-op. Nothing here imports
prefect: the flow passes its run's id and name in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import TetherConfig, TrackingConfig, redacted_dump

if TYPE_CHECKING:
    from accelerate.tracking import GeneralTracker

    from online.cycle import CycleReport

log = logging.getLogger(__name__)

Scalar = bool | int | float | str
FLOW_RUN_TAG = "prefect.flow_run_id"
# What each backend needs installed (`pip install 'tether[tracking]'` brings the first two).
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}


class TrackingError(RuntimeError):
    """A configured tracker cannot start (its package is missing); the message says what to install."""


# -- pure helpers -------------------------------------------------------------------------------


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """A nested config as one level of dotted keys (`train.loss.beta`), values trackers accept:
    numbers, strings and bools as they are, None as "null", lists as JSON text."""
    out: dict[str, Scalar] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, name + "."))
        elif value is None:
            out[name] = "null"
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, sort_keys=True, default=str)
    return out


def finite_numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of `metrics` as floats (bools as 0/1): what a scalar series takes."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool | int | float) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def cycle_metrics(report: CycleReport) -> dict[str, float]:
    """One refresh cycle as namespaced scalars: reward per category before and after, KL against
    its budget, the judge's stats, the buffer mix, the gate's decision and the controller's next
    setting. Logged at step = the cycle's index."""
    kl = report.kl.get("kl/policy_ref", float("nan"))
    return finite_numbers({
        **{f"reward_before/{c}": v for c, v in report.before.items()},
        **{f"reward_after/{c}": v for c, v in report.after.items()},
        **{f"reward_delta/{c}": v - report.before[c] for c, v in report.after.items() if c in report.before},
        **report.kl,
        "kl/budget": report.kl_budget,
        "kl/budget_used": kl / report.kl_budget,
        **report.judge,
        **report.mix,
        "cycle/index": report.index,
        "cycle/promoted": report.promoted,
        "controller/next_anchor_fraction": report.next_anchor_fraction,
        "controller/next_beta": report.next_beta,
        **{f"seconds/{stage}": s for stage, s in report.seconds.items()},
    })


def is_main_process() -> bool:
    """Rank 0 of a launched job (accelerate's view, which reads the launcher's RANK), or the only
    process. A non-zero RANK answers without importing accelerate."""
    if os.environ.get("RANK", "0") != "0":
        return False
    from accelerate import PartialState

    return PartialState().is_main_process


def tracking_dir(cfg: TetherConfig) -> Path:
    """Root of the local tracker files: `tracking.dir`, default `<state_dir>/tracking` (absolute)."""
    return Path(cfg.tracking.dir or cfg.state_dir / "tracking").resolve()


def mlflow_uri(tcfg: TrackingConfig, root: Path) -> str:
    """The MLflow tracking URI: the configured one, or a SQLite store under the tracking dir."""
    return tcfg.mlflow_uri or f"sqlite:///{root / 'mlflow.db'}"


# -- the run ------------------------------------------------------------------------------------


@dataclass
class RunTracker:
    """One flow run's tracker run on every configured backend (none: all calls are no-ops)."""

    trackers: list[GeneralTracker] = field(default_factory=list)
    run_name: str = ""
    failed: bool = False

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Finite numeric `metrics` at `step` on every backend."""
        values = finite_numbers(metrics)
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=step)

    def log_train_step(self, metrics: Mapping[str, Any]) -> None:
        """The training loop's `on_step` hook: `train/<metric>` at the optimizer step."""
        step = int(metrics["step"])
        self.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=step)

    def log_text(self, key: str, text: str) -> None:
        """A note (why a cycle was skipped, the gate's reasons): TensorBoard text, an MLflow tag,
        a W&B summary entry."""
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log({key: text})
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.set_tag(key, text[:5000])  # MLflow caps tag values
            elif tracker.name == "wandb":
                tracker.tracker.summary[key] = text

    def finish(self) -> None:
        """Close every backend's run; after a failed flow, MLflow and W&B mark the run failed."""
        for tracker in self.trackers:
            try:
                if self.failed and tracker.name == "mlflow":
                    import mlflow

                    mlflow.end_run(status="FAILED")  # the tracker's own finish would say FINISHED
                elif self.failed and tracker.name == "wandb":
                    tracker.tracker.finish(exit_code=1)
                tracker.finish()
            except Exception:  # one backend failing to close must not hide the others' runs
                log.exception("closing the %s run %s failed", tracker.name, self.run_name)


def _start(cfg: TetherConfig, run_name: str, tags: dict[str, str], trackers: list[GeneralTracker]) -> None:
    """Start one tracker per configured backend, appending each to `trackers` as it starts (so
    a later one failing still closes the earlier ones). Imports a backend only when named."""
    tcfg, root = cfg.tracking, tracking_dir(cfg)
    project = tcfg.project or cfg.name
    for backend in tcfg.backends:
        try:
            tracker = _make(backend, tcfg, root, project, run_name, tags)
            tracker.start()
        except ModuleNotFoundError as exc:
            raise TrackingError(
                f"tracking.backends names {backend}, but {exc.name} is not installed: "
                f"pip install {_PACKAGES[backend]} (or pip install 'tether[tracking]')"
            ) from None
        trackers.append(tracker)


def _make(backend: str, tcfg: TrackingConfig, root: Path, project: str, run_name: str,
          tags: dict[str, str]) -> GeneralTracker:
    """accelerate's tracker for `backend`, configured, not started."""
    if backend == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        # torch's SummaryWriter falls back to tensorboardX; we want tensorboard's own format.
        import tensorboard  # noqa: F401

        return TensorBoardTracker(run_name, root / "tensorboard" / project)
    if backend == "mlflow":
        import mlflow
        from accelerate.tracking import MLflowTracker

        # MLflowTracker logs through mlflow's process-wide client: point it at our store.
        mlflow.set_tracking_uri(mlflow_uri(tcfg, root))
        # A local store keeps its artifacts beside it, not in ./mlruns of whatever directory
        # the flow runs in; a server keeps its own default.
        artifacts = None if tcfg.mlflow_uri else (root / "mlflow-artifacts").as_uri()
        return MLflowTracker(experiment_name=project, logging_dir=artifacts, run_name=run_name)
    import wandb  # noqa: F401  (accelerate would only fail later, inside start)
    from accelerate.tracking import WandBTracker

    (root / "wandb").mkdir(parents=True, exist_ok=True)
    return WandBTracker(
        project, name=run_name, dir=str(root), mode=tcfg.wandb_mode, entity=tcfg.wandb_entity,
        tags=[f"{k}={v}"[:64] for k, v in tags.items()],  # W&B tags are short strings
    )


def _tag(trackers: list[GeneralTracker], tags: dict[str, str]) -> None:
    """Run tags where the backend has them (MLflow run tags; W&B got them at init); TensorBoard
    has none, so they go in as text (and, with the config, as hyperparameters)."""
    for tracker in trackers:
        if tracker.name == "mlflow":
            import mlflow

            mlflow.set_tags(tags)  # the run's, not the experiment's (which outlives this run)
        elif tracker.name == "tensorboard":
            tracker.log({f"tags/{k}": v for k, v in tags.items()})


@contextmanager
def open_run(
    cfg: TetherConfig, *, kind: str, run_name: str | None = None, flow_run_id: str | None = None,
) -> Iterator[RunTracker]:
    """One tracker run on every configured backend for the body of one flow run (see module doc).

    `kind` is "offline" or "cycle"; `run_name` names the run (default `<kind>-<time>`, made
    unique with the flow-run id's first 8 characters); `flow_run_id` becomes the
    `prefect.flow_run_id` tag.
    """
    if not cfg.tracking.backends or not is_main_process():
        yield RunTracker()
        return
    name = run_name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    if flow_run_id:
        name = f"{name}-{flow_run_id[:8]}"
    tags = {"tether.kind": kind, "tether.name": cfg.name}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
    run = RunTracker(run_name=name)
    try:
        _start(cfg, name, tags, run.trackers)
        _tag(run.trackers, tags)
        hparams = {**flatten_config(redacted_dump(cfg)), **tags}
        for tracker in run.trackers:
            tracker.store_init_configuration(hparams)
        yield run
    except BaseException:
        run.failed = True
        raise
    finally:
        run.finish()
