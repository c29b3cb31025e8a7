"""Experiment tracking (orchestrator/tracking.py) end to end, read back with each tool's own reader.

A real offline flow of the tiny demo config (4 optimizer steps) and one real refresh cycle (3
steps, the session's redis-server) run in Prefect's test harness with `tracking.backends:
[tensorboard, mlflow]`. TensorBoard's event files are read back with tensorboard's
`EventAccumulator`, the MLflow SQLite store with `MlflowClient`: per-step training metrics, the
held-out evaluation, a cycle's metrics, the flattened config (a credential in it redacted) and
the Prefect flow-run id as a tag, one tracker run per flow run. W&B is not tested: wandb is not
installed here and it would need the network to upload (its offline mode is documented in README).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from orchestrator.runtime import configure_prefect

configure_prefect()

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from _faults import small_overrides  # noqa: E402
from orchestrator import flows  # noqa: E402
from orchestrator.config import ConfigError, load_config  # noqa: E402
from orchestrator.tracking import (  # noqa: E402
    FLOW_RUN_TAG,
    TrackingError,
    flatten_config,
    mlflow_uri,
    open_run,
    tracking_dir,
)

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo.yaml")
SECRET = "hunter2-not-for-trackers"
OFFLINE_STEPS, CYCLE_STEPS = 4, 3


def tracked(state_dir: Path, redis_url: str | None = None) -> dict:
    """The shrunk demo config with both trackers on, and a credential where a user might paste one."""
    return small_overrides(state_dir, redis_url, epochs=1, **{
        "train.max_steps": OFFLINE_STEPS,
        "online.train.max_steps": CYCLE_STEPS,
        "tracking.backends": ["tensorboard", "mlflow"],
        "online.generation.base_url": f"http://tether:{SECRET}@127.0.0.1:9/v1",
    })


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tracked-state")


@pytest.fixture(scope="module")
def offline_run(harness, state_dir):
    state = flows.offline_baseline(CONFIG, tracked(state_dir), run_label="tracked", progress=False, return_state=True)
    assert state.is_completed(), state
    return str(state.state_details.flow_run_id), state.result()


@pytest.fixture(scope="module")
def cycle_run(offline_run, state_dir, redis_server):
    redis_server.command("FLUSHALL")
    state = flows.refresh_cycle(CONFIG, tracked(state_dir, redis_server.url), run_label="tracked", progress=False,
                                return_state=True)
    assert state.is_completed(), state
    rep = state.result()
    assert not rep["skipped"]
    return str(state.state_details.flow_run_id), rep


def cfg_of(state_dir: Path, redis_url: str | None = None):
    return load_config(CONFIG, tracked(state_dir, redis_url))


def tb_run_dir(state_dir: Path, flow_run_id: str) -> Path:
    """The TensorBoard run of one flow run: `<dir>/tensorboard/<project>/<flow-run name>-<id[:8]>`."""
    runs = [p for p in (tracking_dir(cfg_of(state_dir)) / "tensorboard" / "demo").iterdir()
            if p.name.endswith(flow_run_id[:8])]
    assert len(runs) == 1, runs
    return runs[0]


def tb_read(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run))
    acc.Reload()
    return acc


def tb_text(acc: EventAccumulator, tag: str) -> str:
    (event,) = acc.Tensors(f"{tag}/text_summary")
    return tensor_util.make_ndarray(event.tensor_proto).item().decode()


def tb_hparams(run: Path) -> dict:
    """The hyperparameters accelerate's TensorBoardTracker stored (in a sub-run, as torch writes them)."""
    for sub in run.iterdir():
        if sub.is_dir() and any(sub.glob("events.out.tfevents.*")):
            content = tb_read(sub).PluginTagToContent("hparams")
            data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
            return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                    for k, v in data.session_start_info.hparams.items()}
    raise AssertionError(f"no hparams event file under {run}")


def mlflow_run(state_dir: Path, flow_run_id: str):
    client = MlflowClient(mlflow_uri(cfg_of(state_dir).tracking, tracking_dir(cfg_of(state_dir))))
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


# -- the offline flow ---------------------------------------------------------------------------


def test_offline_flow_logs_every_step_and_the_evaluation_to_tensorboard(offline_run, state_dir):
    flow_run_id, out = offline_run
    acc = tb_read(tb_run_dir(state_dir, flow_run_id))
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, OFFLINE_STEPS + 1))
    assert losses[-1].value == pytest.approx(out["metrics"]["train/loss"], rel=1e-5)  # float32 in the event file
    assert {"train/rewards/margins", "train/grad_norm", "train/lr"} <= set(acc.Tags()["scalars"])
    # held-out accuracy before training (step 0) and after (the last step)
    acc_points = [(e.step, e.value) for e in acc.Scalars("eval/accuracy")]
    assert [s for s, _ in acc_points] == [0, OFFLINE_STEPS]
    assert acc_points[0][1] == pytest.approx(out["metrics"]["eval_initial/accuracy"], rel=1e-5)
    assert acc_points[1][1] == pytest.approx(out["metrics"]["eval/accuracy"], rel=1e-5)
    assert tb_text(acc, f"tags/{FLOW_RUN_TAG}") == flow_run_id
    hp = tb_hparams(tb_run_dir(state_dir, flow_run_id))
    assert hp["train.loss.beta"] == pytest.approx(0.1)
    assert hp["train.max_steps"] == OFFLINE_STEPS
    assert hp[FLOW_RUN_TAG] == flow_run_id


def test_offline_flow_logs_steps_params_and_its_flow_run_id_to_mlflow(offline_run, state_dir):
    flow_run_id, out = offline_run
    client, run = mlflow_run(state_dir, flow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tether.kind"] == "offline"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, OFFLINE_STEPS + 1))
    assert history[-1].value == pytest.approx(out["metrics"]["train/loss"])
    assert run.data.metrics["eval/accuracy"] == pytest.approx(out["metrics"]["eval/accuracy"])
    params = run.data.params
    assert params["train.loss.beta"] == "0.1" and params["data.limit"] == "600"
    assert params["tracking.backends"] == '["tensorboard", "mlflow"]'


def test_no_credential_reaches_a_tracker(offline_run, state_dir):
    flow_run_id, _ = offline_run
    _, run = mlflow_run(state_dir, flow_run_id)
    assert run.data.params["online.generation.base_url"] == "http://tether:***@127.0.0.1:9/v1"
    assert not any(SECRET in v for v in [*run.data.params.values(), *run.data.tags.values()])
    for path in tracking_dir(cfg_of(state_dir)).rglob("*"):
        if path.is_file() and path.suffix != ".db":
            assert SECRET.encode() not in path.read_bytes(), path
    db = tracking_dir(cfg_of(state_dir)) / "mlflow.db"
    assert SECRET.encode() not in db.read_bytes()


# -- a refresh cycle: its own tracker run ---------------------------------------------------------


def test_a_cycle_is_its_own_tracker_run_with_its_metrics(cycle_run, offline_run, state_dir):
    flow_run_id, rep = cycle_run
    assert flow_run_id != offline_run[0]
    client, run = mlflow_run(state_dir, flow_run_id)
    assert run.data.tags["tether.kind"] == "cycle"
    m = run.data.metrics
    assert m["reward_after/mean"] == pytest.approx(rep["after"]["mean"])
    assert m["reward_before/mean"] == pytest.approx(rep["before"]["mean"])
    for cat, value in rep["after"].items():
        assert m[f"reward_after/{cat}"] == pytest.approx(value)
    assert m["kl/policy_ref"] == pytest.approx(rep["kl"]["kl/policy_ref"])
    assert m["kl/budget"] == rep["kl_budget"]
    assert m["kl/budget_used"] == pytest.approx(rep["kl"]["kl/policy_ref"] / rep["kl_budget"])
    assert m["judge/judgments"] == rep["judge"]["judge/judgments"] > 0
    assert m["cycle/promoted"] == float(rep["promoted"])
    assert [h.step for h in client.get_metric_history(run.info.run_id, "cycle/promoted")] == [rep["index"]]
    assert [h.step for h in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, CYCLE_STEPS + 1))
    assert run.data.tags["cycle/gate"].split(":")[0] in ("promoted", "not promoted")

    acc = tb_read(tb_run_dir(state_dir, flow_run_id))
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("reward_after/mean")] == [(rep["index"], round(rep["after"]["mean"], 5))]
    assert len(acc.Scalars("train/loss")) == CYCLE_STEPS
    assert tb_text(acc, f"tags/{FLOW_RUN_TAG}") == flow_run_id


# -- configuration and the edges ------------------------------------------------------------------


def test_flatten_config_gives_dotted_scalar_keys():
    tree = {"train": {"loss": {"beta": 0.1, "type": "sigmoid"}, "save_every": None, "share_prompt": True},
            "tracking": {"backends": ["tensorboard"]}, "seed": 3}
    assert flatten_config(tree) == {
        "train.loss.beta": 0.1, "train.loss.type": "sigmoid", "train.save_every": "null",
        "train.share_prompt": True, "tracking.backends": '["tensorboard"]', "seed": 3,
    }


def test_tracking_config_validates(tmp_path):
    base = {"state_dir": str(tmp_path)}
    assert load_config(CONFIG, {**base, "tracking": {"backends": "tensorboard, mlflow"}}).tracking.backends == ("tensorboard", "mlflow")
    assert load_config(CONFIG, base).tracking.backends == ()
    with pytest.raises(ConfigError, match="tracking.backends"):
        load_config(CONFIG, {**base, "tracking": {"backends": ["tensorboard", "comet"]}})
    with pytest.raises(ConfigError, match="named twice"):
        load_config(CONFIG, {**base, "tracking": {"backends": ["mlflow", "mlflow"]}})
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD") as err:
        load_config(CONFIG, {**base, "tracking": {"mlflow_uri": f"http://me:{SECRET}@mlflow:5000"}})
    assert SECRET not in str(err.value)


def test_no_backend_and_other_ranks_log_nothing(tmp_path, monkeypatch):
    quiet = load_config(CONFIG, {"state_dir": str(tmp_path / "a")})
    with open_run(quiet, kind="offline") as run:
        run.log_train_step({"step": 1, "loss": 0.5})
        assert run.trackers == []
    assert not (tmp_path / "a" / "tracking").exists()

    monkeypatch.setenv("RANK", "1")  # a launched job's second process: rank 0 alone logs
    loud = load_config(CONFIG, {"state_dir": str(tmp_path / "b"), "tracking": {"backends": ["tensorboard"]}})
    with open_run(loud, kind="offline") as run:
        run.log_train_step({"step": 1, "loss": 0.5})
        assert run.trackers == []
    assert not (tmp_path / "b" / "tracking").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_backend_that_is_not_installed_is_named(tmp_path):
    cfg = load_config(CONFIG, {"state_dir": str(tmp_path), "tracking": {"backends": ["tensorboard", "wandb"]}})
    with pytest.raises(TrackingError, match="pip install wandb"):
        with open_run(cfg, kind="offline"):
            pass
    # the TensorBoard run that did start was closed, its event file written
    assert list((tmp_path / "tracking" / "tensorboard" / "demo").glob("*/events.out.tfevents.*"))


def test_tracker_files_are_written_as_yaml_free_of_secrets(offline_run, state_dir):
    """accelerate's TensorBoardTracker also writes the hyperparameters as hparams.yml: it must parse."""
    run = tb_run_dir(state_dir, offline_run[0])
    (path,) = list(run.glob("*/hparams.yml"))
    hp = yaml.safe_load(path.read_text())
    assert hp["train.loss.beta"] == 0.1 and hp[FLOW_RUN_TAG] == offline_run[0]
