"""Prefect flows: each reads like the pipeline sentence, each step a task over a plain function.

`offline_baseline`: load + validate + tokenise (token ids cached) -> coverage report ->
reference log-probs -> train -> evaluate -> checkpoint (-> promote as the current policy). Every
step is a function in `offline.pipeline`; the tasks here only add names, logs and artifacts so
the run is legible in the Prefect UI. Tasks take live models, so result caching is off
(`NO_CACHE`): hashing a model would cost more than the step.

Call `orchestrator.runtime.configure_prefect()` before importing this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import get_current_settings
from prefect.utilities.annotations import opaque

from offline import pipeline
from offline.reference import ensure_reference_logps
from offline.tokenized import cache_dir_of
from offline.registry import PolicyRegistry
from online.anchor import resolve_static_data
from orchestrator.artifacts import audit_markdown, config_markdown, markdown_table, metrics_rows, sparkline
from orchestrator.config import TetherConfig, load_config, redacted_dump
from orchestrator.tracking import RunTracker, cycle_metrics, open_run

if TYPE_CHECKING:
    from online.audit import JudgeAudit
    from online.config import CycleInputs
    from online.gate import EvalSummary
    from online.cycle import CycleReport

F = TypeVar("F", bound=Callable[..., Any])

# Flow results are not persisted: a run's outputs are its checkpoint (safetensors, with its
# lineage), the buffer and the artifacts; the returned dict is a summary for the caller. Naming
# the (unused) local result storage also spares every flow run two lookups of the server's
# default storage (~20 ms of a 2 s demo cycle).
FLOW_RESULTS: dict[str, Any] = {
    "persist_result": False,
    "result_storage": Path(get_current_settings().results.local_storage_path),
}


def resolve_config(
    config_path: str | None, overrides: dict[str, Any] | None, config: TetherConfig | None
) -> TetherConfig:
    """The run's config: `config` when the caller parsed it already (the CLI, a parent flow),
    else parsed from `config_path` + `overrides`. Parsing once per command means every stage
    of `tether demo` runs on the same resolved config, even if the file changes meanwhile."""
    return config if config is not None else load_config(config_path, overrides)


def tracker_run(cfg: TetherConfig, kind: str) -> AbstractContextManager[RunTracker]:
    """This flow run's experiment-tracker run (`orchestrator.tracking`): named after the flow
    run, tagged with its id; a no-op when `tracking.backends` is empty."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    return open_run(cfg, kind=kind, run_name=run.name if run else None, flow_run_id=str(run.id) if run else None)


def _task(name: str) -> Callable[[F], F]:
    """Decorator: `fn` as a named Prefect task run whose arguments Prefect does not walk.

    Prefect walks every task argument looking for upstream futures and states (to draw the
    run graph); our steps pass models, token tensors and thousands of pairs, and that walk
    cost ~1 s per demo cycle, a third of the cycle itself. `opaque` keeps the top-level check
    (an argument that is another task's result still links the two runs) and skips the rest.
    """

    def wrap(fn: F) -> F:
        as_prefect_task = task(name=name, cache_policy=NO_CACHE)(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            return as_prefect_task(*(opaque(a) for a in args), **{k: opaque(v) for k, v in kwargs.items()})

        return call  # type: ignore[return-value]

    return wrap


static_data_task = _task("static-dataset")(resolve_static_data)
load_policy_task = _task("load-policy")(pipeline.load_initial_policy)
load_data_task = _task("load-and-validate")(pipeline.load_and_validate)
coverage_task = _task("coverage-report")(pipeline.build_coverage)
reference_task = _task("reference-logps")(ensure_reference_logps)
train_task = _task("train")(pipeline.train_policy)
evaluate_task = _task("evaluate")(pipeline.evaluate_policy)
save_task = _task("save-checkpoint")(pipeline.save_policy)


def config_key(config: dict[str, Any]) -> str:
    """Short hash of a resolved config: names the resume state of an interrupted run."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def eval_metrics(prefix: str, ev: pipeline.Evaluation) -> dict[str, float]:
    """Flatten an Evaluation into namespaced metrics (`<prefix>/accuracy`, per category, ...)."""
    out = {
        f"{prefix}/accuracy": ev.implicit.accuracy,
        f"{prefix}/mean_margin": ev.implicit.mean_margin,
        f"{prefix}/likelihood_accuracy": ev.likelihood.accuracy,
    }
    for cat, c in sorted(ev.implicit.per_category.items()):
        out[f"{prefix}/accuracy/{cat}"] = c.accuracy
    for cat, c in sorted(ev.likelihood.per_category.items()):
        out[f"{prefix}/likelihood_accuracy/{cat}"] = c.accuracy
    return out


def run_offline(cfg: TetherConfig, progress: bool = True, tracker: RunTracker | None = None) -> dict[str, Any]:
    """The offline baseline body, shared by the flow (`offline_baseline`) and `tether demo`;
    `tracker` gets every training step and the held-out evaluation before and after."""
    logger = get_run_logger()
    tracker = tracker or RunTracker()
    resolved = redacted_dump(cfg)
    state = cfg.state_dir

    data_cfg = static_data_task(cfg)
    policy = load_policy_task(cfg.model, state)
    # load + validate + tokenise, streamed; the token ids are cached (memory-mapped) for the next run
    dataset = load_data_task(data_cfg, policy.tokenizer, cache_dir_of(state), progress)
    coverage = coverage_task(dataset)
    create_markdown_artifact(
        coverage.to_markdown(), key="coverage-report",
        description=f"Coverage of {dataset.source} ({dataset.fingerprint[:12]})",
    )

    cache_dir = state / "cache" / "reference-logps"
    ref = reference_task(policy, dataset.pairs, policy.model_dir, cache_dir, cfg.train.reference_batch_size, progress,
                         num_processes=cfg.train.num_processes, accelerate_config=cfg.train.accelerate_config)
    before = evaluate_task(policy, dataset.heldout, ref, cfg.train.loss.beta, cfg.train.reference_batch_size)

    resume_dir = state / "resume" / f"offline-{dataset.fingerprint[:8]}-{config_key(resolved)}"
    tracker.log(eval_metrics("eval", before), step=0)
    result = train_task(policy, dataset.train, ref, cfg.train, resume_dir, tracker.log_train_step, progress)
    after = evaluate_task(policy, dataset.heldout, ref, cfg.train.loss.beta, cfg.train.reference_batch_size)
    tracker.log(eval_metrics("eval", after), step=result.steps)

    metrics: dict[str, Any] = {
        "train/steps": result.steps,
        "train/tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        **{f"train/{k}": v for k, v in result.final_metrics.items() if isinstance(v, int | float)},
        **eval_metrics("eval_initial", before),
        **eval_metrics("eval", after),
    }
    name = f"offline-{time.strftime('%Y%m%d-%H%M%S')}-{dataset.fingerprint[:8]}"
    parent = None
    ckpt = save_task(
        policy, cfg.checkpoints_dir, name, kind="offline", fingerprint=dataset.fingerprint,
        config=resolved, parent=parent, seed=cfg.train.seed, result=result, metrics=metrics,
    )
    PolicyRegistry(state, cfg.name).promote(ckpt, kind="offline")
    shutil.rmtree(resume_dir, ignore_errors=True)
    logger.info("checkpoint %s written and promoted as current policy of %r", ckpt.path, cfg.name)

    losses = [h["loss"] for h in result.history if "loss" in h]
    create_markdown_artifact(
        "\n\n".join([
            f"# Offline baseline `{cfg.name}`",
            f"Checkpoint: `{ckpt.path}` (id `{ckpt.id}`), dataset fingerprint `{dataset.fingerprint}`.",
            f"Loss curve ({len(losses)} steps): `{sparkline(losses)}`",
            "## Held-out evaluation: initial vs trained",
            markdown_table(_before_after_rows(before, after)),
            "## Final metrics",
            markdown_table(metrics_rows(metrics)),
            "## Resolved config",
            config_markdown(resolved),
        ]),
        key="offline-metrics",
        description="Offline baseline: held-out evaluation and final metrics",
    )
    create_table_artifact(metrics_rows(metrics), key="offline-metrics-table", description="Final metrics")
    return {
        "checkpoint": ckpt.model_dump(mode="json"),
        "fingerprint": dataset.fingerprint,
        "metrics": metrics,
        "coverage": coverage.model_dump(mode="json"),
        "before": before,
        "after": after,
    }


def _before_after_rows(before: pipeline.Evaluation, after: pipeline.Evaluation) -> list[dict[str, Any]]:
    rows = [{
        "category": "(all)", "n": after.implicit.n,
        "likelihood acc. initial": before.likelihood.accuracy,
        "likelihood acc. trained": after.likelihood.accuracy,
        "implicit-reward acc. trained": after.implicit.accuracy,
        "mean margin trained": after.implicit.mean_margin,
    }]
    for cat in sorted(after.implicit.per_category):
        rows.append({
            "category": cat, "n": after.implicit.per_category[cat].n,
            "likelihood acc. initial": before.likelihood.per_category[cat].accuracy,
            "likelihood acc. trained": after.likelihood.per_category[cat].accuracy,
            "implicit-reward acc. trained": after.implicit.per_category[cat].accuracy,
            "mean margin trained": after.implicit.per_category[cat].mean_margin,
        })
    return rows


@flow(name="offline-baseline", flow_run_name="offline-{run_label}", **FLOW_RESULTS)
def offline_baseline(
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    run_label: str = "baseline",
    progress: bool = True,
    config: TetherConfig | None = None,
) -> dict[str, Any]:
    """Train the offline-only baseline from a static preference dataset and promote it."""
    cfg = resolve_config(config_path, overrides, config)
    with tracker_run(cfg, "offline") as tracker:
        out = run_offline(cfg, progress=progress, tracker=tracker)
    return {k: v for k, v in out.items() if k not in ("before", "after")}


# -- online refresh cycles ------------------------------------------------------------------------


@functools.cache
def as_task(name: str, fn: F) -> F:
    """The `step` hook of `online.cycle.run_cycle` inside a flow: each step a named task run
    (built once per step: building a task reads the function's source)."""
    return _task(name)(fn)


def cycle_inputs(cfg: TetherConfig) -> "CycleInputs":
    """The sections a cycle reads, from the config tree (fails clearly without `online`)."""
    from online.config import CycleInputs

    if cfg.online is None:
        raise ValueError("this config has no `online` section: add one to run refresh cycles (see configs/demo.yaml)")
    return CycleInputs(
        model=cfg.model, data=resolve_static_data(cfg), train=cfg.train, online=cfg.online,
        state_dir=cfg.state_dir, name=cfg.name, seed=cfg.seed, config_dump=redacted_dump(cfg),
    )


def outcome_label(rep: dict[str, Any]) -> str:
    """How a cycle's outcome reads in tables: yes, no (rolled back) or no (inconclusive)."""
    if rep["promoted"]:
        return "yes"
    return "no (inconclusive)" if rep.get("verdict") == "inconclusive" else "no (rolled back)"


def history_markdown(history: list[dict[str, Any]], budget: float) -> str:
    """KL and reward across cycles: a table and one-line charts (rendered in the Prefect UI)."""
    rows = [{
        "cycle": h["index"],
        "promoted": outcome_label(h),
        "gate/n": h.get("gate", {}).get("gate/n", float("nan")),
        "gate/lower_bound": h.get("gate", {}).get("gate/lower_bound", float("nan")),
        "kl/sequence": h["kl"].get("kl/policy_ref", float("nan")),
        "kl budget": h["kl_budget"],
        "reward before": h["before"]["mean"],
        "reward after": h["after"].get("mean", float("nan")),
        "anchor_fraction next": h["next_anchor_fraction"],
        "judge/asked": h["judge"].get("judge/asked", float("nan")),
        "judge/judgments": h["judge"].get("judge/judgments", float("nan")),
        "judge/position_conflicts": h["judge"].get("judge/position_conflicts", float("nan")),
        "judge/cost_usd": h["judge"].get("judge/cost_usd", 0.0),
        "train/fresh_pairs": h["mix"].get("train/fresh_pairs", float("nan")),
        "train/anchor_pairs": h["mix"].get("train/anchor_pairs", float("nan")),
        "flags": len(h.get("flags") or []),
    } for h in history]
    # Cycles that did not train (too few labels) have no KL or reward: the charts skip them.
    kls = [r["kl/sequence"] for r in rows if math.isfinite(r["kl/sequence"])]
    rewards = [r["reward after"] for r in rows if math.isfinite(r["reward after"])]
    return "\n\n".join([
        "# KL and reward history",
        f"KL budget: {budget:g} nats/sequence.",
        f"KL per cycle:     `{sparkline(kls)}`  (last {kls[-1]:.4f})" if kls else "",
        f"Reward per cycle: `{sparkline(rewards)}`  (last {rewards[-1]:.4f})" if rewards else "",
        markdown_table(rows),
    ])


def cycle_markdown(report: "CycleReport") -> str:
    """One cycle's metrics and decision, as markdown."""
    from online.audit import conflict_text

    nan = float("nan")
    cats = sorted(k for k in {**report.before, **report.after} if k != "mean")
    rows = [{"category": c, "reward before": report.before.get(c, nan), "reward after": report.after.get(c, nan),
             "delta": report.after.get(c, nan) - report.before.get(c, nan)}
            for c in ["mean", *cats]]
    verdict = ("promoted" if report.promoted
               else "INCONCLUSIVE, not promoted (the previous policy stays current)" if report.verdict == "inconclusive"
               else "NOT promoted (kept for inspection; the previous policy stays current)")
    where = (f"Checkpoint: `{report.checkpoint.path}`; parent `{report.parent.path}`." if report.checkpoint
             else f"No checkpoint (not trained); parent `{report.parent.path}`.")
    return "\n\n".join([
        f"# Refresh cycle {report.index}: {verdict}",
        f"Gate ({report.verdict}): " + "; ".join(report.reasons),
        "## Gate evidence per unit (lower bound must be >= threshold)",
        markdown_table(report.gate_checks) if report.gate_checks else "No gate checks (the cycle did not train).",
        f"KL(pi||pi_0): {report.kl.get('kl/policy_ref', float('nan')):.4f} nats/sequence "
        f"({report.kl.get('kl/policy_ref_per_token', float('nan')):.4f} per token), budget {report.kl_budget:g}.",
        f"Controller: {report.controller_reason}",
        *(f"**Flag:** {f}" for f in report.flags),
        ("Judge audit: " + report.audit.judge + ", agreement with human labels " + report.audit.agreement.text()
         + ", position conflicts " + conflict_text(report.audit) + " (artifact `judge-audit`)")
        if report.audit else "Judge audit: off for this judge (online.judge.audit.enabled).",
        "## Reward per category (held-out prompts)",
        markdown_table(rows),
        "## Judge, mix, training",
        markdown_table(metrics_rows({**report.judge, **report.mix, **report.train})),
        "## Seconds per stage",
        markdown_table(metrics_rows(report.seconds)),
        where,
    ])


def run_refresh(
    cfg: TetherConfig, progress: bool = True, tracker: RunTracker | None = None, promote: bool = True
) -> dict[str, Any]:
    """One refresh cycle under the cycle lock (skips, and says so, when another one holds it);
    `tracker` gets its training steps and, at step = the cycle's index, `cycle_metrics`.
    `promote=False`: the gate decides but the pointer never moves (the report's budget probe)."""
    from buffer.lock import LockHeld
    from buffer.store import open_buffer
    from online.audit import JudgeAuditFailed
    from online.cycle import run_cycle_locked

    logger = get_run_logger()
    tracker = tracker or RunTracker()
    inputs = cycle_inputs(cfg)
    audit_cfg = inputs.online.judge.audit
    with open_buffer(cfg.buffer, cfg.state_dir) as buf:
        try:
            report = run_cycle_locked(inputs, buf, step=as_task, progress=progress,
                                      on_train_step=tracker.log_train_step, promote=promote)
        except LockHeld as exc:
            logger.warning("skipping this cycle: another refresh cycle is running (%s)", exc)
            tracker.log_text("cycle/skipped", str(exc))
            create_markdown_artifact(f"# Cycle skipped\n\n{exc}", key="refresh-cycle-skipped")
            return {"skipped": True, "reason": str(exc)}
        except JudgeAuditFailed as exc:
            create_markdown_artifact(audit_markdown(exc.audit, audit_cfg), key="judge-audit",
                                     description=f"Judge audit of {exc.audit.judge}: FAILED, the cycle did not run")
            raise
        history = PolicyRegistry(cfg.state_dir, cfg.name).history()
    if report.audit is not None:
        create_markdown_artifact(audit_markdown(report.audit, audit_cfg), key="judge-audit",
                                 description=f"Judge audit of {report.audit.judge}")
    logger.info(
        "cycle %d: %s (gate: %s); KL %.4f (budget %g); reward %.4f -> %.4f",
        report.index, "promoted" if report.promoted else "not promoted", report.verdict,
        report.kl.get("kl/policy_ref", float("nan")), report.kl_budget, report.before["mean"],
        report.after.get("mean", float("nan")),
    )
    tracker.log(cycle_metrics(report), step=report.index)
    tracker.log_text("cycle/gate", ("promoted: " if report.promoted else "not promoted: ") + "; ".join(report.reasons))
    create_markdown_artifact(cycle_markdown(report), key="refresh-cycle-metrics", description=f"Cycle {report.index}")
    create_table_artifact(
        metrics_rows({"promoted": report.promoted, "verdict": report.verdict, **report.gate, **report.kl,
                      **report.judge, **report.mix}),
        key="refresh-cycle-table", description=f"Cycle {report.index} metrics",
    )
    create_markdown_artifact(history_markdown(history, report.kl_budget), key="kl-history", description="KL and reward across cycles")
    return {"skipped": False, **report.model_dump(mode="json")}


@flow(name="refresh-cycle", flow_run_name="cycle-{run_label}", **FLOW_RESULTS)
def refresh_cycle(
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    run_label: str = "manual",
    progress: bool = True,
    config: TetherConfig | None = None,
    promote: bool = True,
) -> dict[str, Any]:
    """Refresh the current policy online: generate, judge, buffer, train under the KL budget, gate."""
    cfg = resolve_config(config_path, overrides, config)
    with tracker_run(cfg, "cycle") as tracker:
        return run_refresh(cfg, progress=progress, tracker=tracker, promote=promote)


@flow(name="judge-audit", flow_run_name="judge-audit-{run_label}", **FLOW_RESULTS)
def judge_audit(
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    run_label: str = "manual",
    refresh: bool = False,
    config: TetherConfig | None = None,
) -> dict[str, Any]:
    """Audit the configured judge against the static dataset's human labels (cached); the
    thresholds are reported, not enforced: a cycle enforces them."""
    from online.audit import audit_failures, run_audit

    cfg = resolve_config(config_path, overrides, config)
    inputs = cycle_inputs(cfg)
    audit = run_audit(inputs, refresh=refresh)
    audit_cfg = inputs.online.judge.audit
    failures = audit_failures(audit, audit_cfg)
    create_markdown_artifact(audit_markdown(audit, audit_cfg), key="judge-audit",
                             description=f"Judge audit of {audit.judge}: " + ("FAILS" if failures else "passes"))
    get_run_logger().info("judge audit %s of %s: %s", audit.key, audit.judge,
                          "; ".join(f.text() for f in failures) or "passes")
    return {"audit": audit.model_dump(mode="json"), "failures": [f.text() for f in failures]}

# -- the embedded demo / efficacy report: initial -> offline -> N cycles -------------------------


def audit_judge(inputs: "CycleInputs") -> "JudgeAudit | None":
    """The judge's audit (`online.audit.cycle_audit`: cached, enforced; None when off for this
    judge), shown as the `judge-audit` artifact, also when it fails."""
    from online.audit import JudgeAuditFailed, cycle_audit

    audit_cfg = inputs.online.judge.audit
    try:
        audit = cycle_audit(inputs)
    except JudgeAuditFailed as exc:
        create_markdown_artifact(audit_markdown(exc.audit, audit_cfg), key="judge-audit",
                                 description=f"Judge audit of {exc.audit.judge}: FAILED, nothing was judged")
        raise
    if audit is not None:
        create_markdown_artifact(audit_markdown(audit, audit_cfg), key="judge-audit",
                                 description=f"Judge audit of {audit.judge}")
    return audit



def stage_row(stage: str, reward: dict[str, float], kl: dict[str, float], budget: float,
              covered: set[str], promoted: str) -> dict[str, Any]:
    """One row of the stages table: reward on covered vs held-out categories, KL vs budget."""
    cats = [c for c in reward if c != "mean"]
    cov = [reward[c] for c in cats if c in covered]
    held = [reward[c] for c in cats if c not in covered]
    return {
        "stage": stage,
        "reward/covered": sum(cov) / len(cov) if cov else float("nan"),
        "reward/heldout": sum(held) / len(held) if held else float("nan"),
        "reward/mean": reward.get("mean", float("nan")),
        "kl/policy_ref": kl.get("kl/policy_ref", float("nan")),
        "kl/stderr": kl.get("kl/stderr", float("nan")),
        "kl_budget": budget,
        "promoted": promoted,
        **{f"reward/{c}": reward[c] for c in sorted(cats)},
    }


@flow(name="hybrid-demo", flow_run_name="demo-{run_label}", **FLOW_RESULTS)
def hybrid_demo(
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    run_label: str = "demo",
    cycles: int | None = None,
    progress: bool = True,
    config: TetherConfig | None = None,
) -> dict[str, Any]:
    """Initial policy -> offline baseline -> N online refresh cycles, scored the same way at each stage."""
    from offline.models import resolve_model_dir
    from online.evaluate import evaluate_checkpoint

    cfg = resolve_config(config_path, overrides, config)
    inputs = cycle_inputs(cfg)
    budget = inputs.online.controller.kl_budget
    # Every stage is scored by the judge: audit it before anything is built, trained or scored
    # (raises JudgeAuditFailed below its thresholds unless audit.enforce is off).
    audit = _task("judge-audit")(audit_judge)(inputs)
    initial_dir = resolve_model_dir(cfg.model, cfg.state_dir)  # built / converted on first use
    score = _task("score-stage")(evaluate_checkpoint)
    initial = score(inputs, initial_dir, cfg.seed)
    # An LLM judge has no absolute score: every stage is its win rate against pi_0's samples.
    by_win_rate = inputs.online.gate.metric == "win_rate"
    baseline = initial["samples"] if by_win_rate else None
    off = offline_baseline(config_path, overrides, run_label=run_label, progress=progress, config=cfg)
    offline_eval = score(inputs, off["checkpoint"]["path"], cfg.seed, baseline)
    # "(none)" labels pairs without a category: it names no category a prompt could share.
    covered = {c["category"] for c in off["coverage"]["categories"] if c["train"] > 0 and c["category"] != "(none)"}
    rows = [
        stage_row("initial", initial["reward"], initial["kl"], budget, covered, "-"),
        stage_row("offline", offline_eval["reward"], offline_eval["kl"], budget, covered, "yes"),
    ]
    summaries = {"initial": initial["summary"], "offline": offline_eval["summary"]}
    reports = []
    for i in range(cycles if cycles is not None else inputs.online.cycles):
        rep = refresh_cycle(config_path, overrides, run_label=f"{run_label}-{i + 1}", progress=progress, config=cfg)
        reports.append(rep)
        if rep.get("skipped"):
            continue
        # The cycle's own `after` is the reward (or, with an LLM judge, the win rate against
        # its parent); the stages table wants the same yardstick as the other rows.
        rescored = score(inputs, rep["checkpoint"]["path"], cfg.seed, baseline, with_kl=False) \
            if by_win_rate and rep["checkpoint"] else None
        after = rescored["reward"] if rescored else rep["after"]
        summaries[f"cycle {rep['index']}"] = rescored["summary"] if rescored else cycle_summary(rep)
        rows.append(stage_row(f"cycle {rep['index']}", after, rep["kl"], budget, covered, outcome_label(rep)))
    create_markdown_artifact(
        "# Hybrid demo: reward per stage\n\nCovered categories (in the static dataset): "
        + ", ".join(sorted(covered)) + ".\n\n" + markdown_table(rows),
        key="demo-stages", description="Initial vs offline vs online cycles",
    )
    return {"stages": rows, "cycles": reports, "offline": off, "covered": sorted(covered),
            "metric": inputs.online.gate.metric, "baseline": baseline, "summaries": summaries, "audit": audit}


def cycle_summary(rep: dict[str, Any]) -> "EvalSummary | None":
    """A cycle's evaluation of its candidate (`final_metrics.after` in the checkpoint's lineage:
    counts and per-prompt rewards); None for a cycle that saved no checkpoint."""
    from offline.checkpoint import read_lineage
    from online.gate import EvalSummary

    if not rep.get("checkpoint"):
        return None
    after = read_lineage(rep["checkpoint"]["path"]).get("final_metrics", {}).get("after")
    return EvalSummary.model_validate(after) if after else None
