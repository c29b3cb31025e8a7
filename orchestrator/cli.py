"""`tether`: one command per user job; each parses arguments and calls one function.

Prefect's settings are applied (`configure_prefect`) before anything imports `prefect`, so
runs made with no server land in the same PREFECT_HOME that `tether ui` serves.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.runtime import configure_prefect, serverless_flow_settings, state_dir_from_env

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
data_app = typer.Typer(no_args_is_help=True, help="Inspect preference datasets.")
buffer_app = typer.Typer(no_args_is_help=True, help="Inspect and snapshot the replay buffer.")
judge_app = typer.Typer(no_args_is_help=True, help="Check the judge against human labels.")
app.add_typer(data_app, name="data")
app.add_typer(buffer_app, name="buffer")
app.add_typer(judge_app, name="judge")
console = Console()

DEMO_CONFIG = Path("configs/demo.yaml")
ConfigOpt = typer.Option(DEMO_CONFIG, "--config", "-c", help="YAML config file.")
SetOpt = typer.Option(None, "--set", help="Override a setting: section.field=value (repeatable; value null = unset).")


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """`["train.loss.beta=0.2", "train.save_every=null"]` -> `{"train": {"loss": {"beta": "0.2"}, "save_every": None}}`."""
    from orchestrator.config import set_dotted

    out: dict[str, Any] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects section.field=value, got {item!r}")
        # `null` unsets an optional field (e.g. train.save_every=null); pydantic coerces the rest.
        set_dotted(out, key, None if value.strip().lower() in ("null", "none", "~") else value)
    return out


def _load(config: Path, sets: list[str] | None):
    from orchestrator.config import ConfigError, load_config

    try:
        cfg = load_config(config, parse_sets(sets))
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    configure_prefect(cfg.state_dir)
    return cfg


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    """A two-column rich table of metrics."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
def offline(config: Path = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Run the offline baseline flow: data -> DPO -> evaluated, promoted checkpoint."""
    cfg = _load(config, set_)
    from orchestrator.flows import offline_baseline

    with _user_errors(), serverless_flow_settings():
        out = offline_baseline(config_path=str(config), overrides=parse_sets(set_), config=cfg)
    print_metrics("offline baseline", out["metrics"])
    console.print(f"checkpoint: [bold]{out['checkpoint']['path']}[/bold]")


@data_app.command("inspect")
def data_inspect(
    path: Path = typer.Argument(..., help="JSONL (.gz) or Parquet preference file."),
    config: Path = ConfigOpt,
    skip_bad: bool = typer.Option(False, help="Skip bad records and count them instead of stopping."),
) -> None:
    """Validate a dataset and print its coverage report (tokenised with the config's model)."""
    from offline.data import DataError

    cfg = _load(config, None)
    from offline.coverage import coverage_report
    from offline.data import load_preference_dataset
    from offline.config import DataConfig
    from offline.models import load_tokenizer, resolve_model_dir

    data_cfg = DataConfig(**{**cfg.data.model_dump(), "path": str(path), "on_bad_record": "skip" if skip_bad else "error"})
    tokenizer = load_tokenizer(resolve_model_dir(cfg.model, cfg.state_dir))
    try:
        dataset = load_preference_dataset(data_cfg, tokenizer=tokenizer)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    report = coverage_report(dataset, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length)
    from rich.markdown import Markdown

    console.print(Markdown(report.to_markdown()))


@app.command()
def ui(
    port: int = typer.Option(4200, help="Port for the Prefect server on 127.0.0.1."),
    state_dir: Path = typer.Option(None, help="State dir whose PREFECT_HOME to serve (default ./.tether)."),
) -> None:
    """Start the Prefect server (UI + API) on 127.0.0.1 over tether's PREFECT_HOME."""
    home = configure_prefect(state_dir or state_dir_from_env())
    url = f"http://127.0.0.1:{port}"
    console.print(f"Prefect UI: [bold]{url}[/bold]  (PREFECT_HOME={home}); Ctrl-C to stop.")
    console.print(f"Point other shells at it with: export PREFECT_API_URL={url}/api")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    # The UI builds its API address from these settings, not from --port.
    env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_API_URL": f"{url}/api"}
    raise typer.Exit(subprocess.call(cmd, env=env))


def _pm(row: dict[str, Any], group: str) -> str:
    """"±s.e." of a stage's covered/held-out score, when the report measured one."""
    se = row.get(f"stderr/{group}", float("nan"))
    return f"±{se:.3f}" if isinstance(se, float) and math.isfinite(se) else ""


def print_stages(rows: list[dict[str, Any]], metric: str = "reward") -> None:
    """The per-stage table of `tether demo` / `tether report`."""
    score = "reward" if metric == "reward" else "win rate vs the initial policy"
    table = Table(title=f"{score} on held-out prompts, and KL(policy || reference) vs budget")
    gate = any("gate/verdict" in r for r in rows)  # the report's rows carry the gate's evidence
    heads = ["stage", "covered cats", "held-out cats", "KL (± s.e.)", "budget", "promoted"] + (
        ["gate: n, lower bound vs threshold"] if gate else [])
    for h in heads:
        table.add_column(h, justify="left" if h in ("stage", "promoted") else "right")
    def num(x: float, spec: str) -> str:  # "-" for a figure not measured (NaN)
        return format(x, spec) if math.isfinite(x) else "-"

    for r in rows:
        kl, se = r["kl/policy_ref"], r.get("kl/stderr", float("nan"))
        n, lower, threshold = (r.get(k, float("nan")) for k in ("gate/n", "gate/lower_bound", "gate/threshold"))
        table.add_row(r["stage"], num(r["reward/covered"], ".3f") + _pm(r, "covered"),
                      num(r["reward/heldout"], ".3f") + _pm(r, "heldout"),
                      num(kl, ".3f") + (f"±{se:.2f}" if math.isfinite(se) else ""), num(r["kl_budget"], ".3g"),
                      str(r["promoted"]),
                      *([f"n={n:.0f}, {lower:+.3f} vs {threshold:+.3f}" if math.isfinite(n) else "-"] if gate else []))
    console.print(table)


@app.command()
def demo(
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    cycles: Optional[int] = typer.Option(None, help="Refresh cycles after the baseline (default: online.cycles)."),
) -> None:
    """The main job: offline baseline, then online refresh cycles, each stage scored the same way."""
    cfg = _load(config, set_)
    from orchestrator.flows import hybrid_demo

    with _user_errors(), serverless_flow_settings():
        out = hybrid_demo(config_path=str(config), overrides=parse_sets(set_), cycles=cycles, config=cfg)
    print_stages(out["stages"], out["metric"])
    console.print(f"covered categories (in the static dataset): {', '.join(out['covered'])}")
    console.print("See every run, task run, log and artifact with [bold]tether ui[/bold].")


@app.command()
def cycle(config: Path = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Run one online refresh cycle from the current policy (skips if another one is running)."""
    cfg = _load(config, set_)
    from orchestrator.flows import refresh_cycle

    with _user_errors(), serverless_flow_settings():
        out = refresh_cycle(config_path=str(config), overrides=parse_sets(set_), config=cfg)
    if out.get("skipped"):
        console.print(f"[yellow]skipped:[/yellow] {out['reason']}")
        return
    verdict = ("[green]promoted[/green]" if out["promoted"]
               else "[yellow]inconclusive, not promoted[/yellow]" if out.get("verdict") == "inconclusive"
               else "[red]not promoted (rolled back)[/red]")
    console.print(f"cycle {out['index']}: {verdict}: " + "; ".join(out["reasons"]))
    for flag in out.get("flags") or []:
        console.print(f"[yellow]flag:[/yellow] {flag}")
    print_metrics(f"cycle {out['index']}", {
        **out.get("gate", {}),
        **{f"reward_before/{k}": v for k, v in out["before"].items()},
        **{f"reward_after/{k}": v for k, v in out["after"].items()},
        **out["kl"], "kl_budget": out["kl_budget"], **out["judge"], **out["mix"],
    })


@app.command("eval")
def eval_(
    config: Path = ConfigOpt,
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint dir (default: the current policy)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Reward per category (covered vs held-out) and KL to the reference, of one checkpoint."""
    cfg = _load(config, set_)
    from offline.registry import PolicyRegistry
    from orchestrator.flows import cycle_inputs
    from online.evaluate import evaluate_checkpoint

    if checkpoint is None:
        current = PolicyRegistry(cfg.state_dir, cfg.name).current_or_none()
        if current is None:
            console.print("[red]error:[/red] no current policy yet: run `tether offline` first, or pass --checkpoint")
            raise typer.Exit(2)
        checkpoint = Path(current.checkpoint.path)
    with _user_errors():
        inputs = cycle_inputs(cfg)
        out = evaluate_checkpoint(inputs, checkpoint, cfg.seed)
        covered = _covered_categories(cfg)
    rows = [{"category": c, "split": "covered" if c in covered else "held-out", "reward": v}
            for c, v in out["reward"].items() if c != "mean"]
    table = Table(title=f"evaluation of {checkpoint}")
    for c in ("category", "split", "reward"):
        table.add_column(c)
    for r in rows:
        table.add_row(r["category"], r["split"], f"{r['reward']:.3f}")
    console.print(table)
    print_metrics("KL to the reference", {**out["kl"], "kl_budget": inputs.online.controller.kl_budget})
    from online.audit import run_audit

    with _user_errors():
        audit = run_audit(inputs)  # cached after the first cycle (or `tether judge audit`)
    print_audit(audit, inputs.online.judge.audit)


def _covered_categories(cfg) -> set[str]:
    from offline.data import load_preference_dataset
    from offline.models import load_tokenizer, resolve_model_dir
    from online.anchor import resolve_static_data

    ds = load_preference_dataset(resolve_static_data(cfg), tokenizer=load_tokenizer(resolve_model_dir(cfg.model, cfg.state_dir)))
    return {p.category for p in ds.train if p.category}


def print_audit(audit, audit_cfg) -> bool:
    """The judge audit as a table and its verdict; True when the judge passes."""
    import time as _time

    from online.audit import audit_failures, audit_rows

    when = _time.strftime("%Y-%m-%d %H:%M UTC", _time.gmtime(audit.created_at))
    table = Table(title=f"judge audit of {audit.judge}: {audit.counts.requested} held-out pairs of "
                        f"{audit.dataset_source} (measured {when}, audit {audit.key})")
    rows = audit_rows(audit, audit_cfg)
    for c in rows[0]:
        table.add_column(c, justify="left" if c == "figure" else "right")
    for r in rows:
        table.add_row(*(r[c] for c in rows[0]))
    console.print(table)
    failures = audit_failures(audit, audit_cfg)
    if failures:
        console.print("[red]the judge fails its audit:[/red] " + "; ".join(f.text() for f in failures)
                      + ("" if audit_cfg.enforce else " (enforce is off: cycles label anyway)"))
    else:
        console.print("[green]the judge passes its audit[/green]")
    return not failures


@judge_app.command("audit")
def judge_audit(
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    refresh: bool = typer.Option(False, help="Measure again even if this judge has a cached audit."),
) -> None:
    """Ask the judge about held-out pairs of the static dataset and compare with the human labels.

    Exit code 1 when a figure is below its threshold (judge.audit.*), 0 when it passes.
    """
    cfg = _load(config, set_)
    from online.audit import JudgeAudit
    from orchestrator.flows import cycle_inputs, judge_audit as judge_audit_flow

    with _user_errors(), serverless_flow_settings():
        out = judge_audit_flow(config_path=str(config), overrides=parse_sets(set_), refresh=refresh, config=cfg)
    if not print_audit(JudgeAudit.model_validate(out["audit"]), cycle_inputs(cfg).online.judge.audit):
        raise typer.Exit(1)


@app.command()
def schedule(
    config: Path = ConfigOpt,
    every: Optional[str] = typer.Option(None, help="Interval, e.g. 30m, 6h, 1d."),
    cron: Optional[str] = typer.Option(None, help='Cron string, e.g. "0 */6 * * *".'),
    list_: bool = typer.Option(False, "--list", help="List tether's deployments and their schedules."),
    pause: bool = typer.Option(False, help="Pause the schedule of this config's deployment."),
    resume: bool = typer.Option(False, help="Resume the schedule of this config's deployment."),
    no_serve: bool = typer.Option(False, "--no-serve", help="Create/update the deployment, then exit."),
    pool: Optional[str] = typer.Option(None, help="Deploy to this Prefect process work pool (created if missing) "
                                       "instead of serving here; run it with `prefect worker start --pool NAME`."),
    collision: str = typer.Option("enqueue", help="With --pool: a run due while one runs is queued "
                                  "(enqueue) or cancelled (cancel-new)."),
    workdir: Optional[Path] = typer.Option(None, help="With --pool: working dir of the worker's flow runs, "
                                           "as the worker machine sees it (default: this directory)."),
) -> None:
    """Schedule periodic refresh cycles: a Prefect deployment of the cycle flow, served here or by a work pool."""
    cfg = _load(config, None)
    from orchestrator import schedule as sched

    try:
        sched.require_server()
        if list_:
            for row in sched.list_deployments():
                console.print(row)
            return
        if pause or resume:
            console.print(sched.set_paused(cfg.name, paused=pause))
            return
        dep = sched.build_deployment(config, cfg.name, every=every, cron=cron, pool=pool, collision=collision,
                                     working_dir=workdir)
        if pool is not None and sched.ensure_process_pool(pool):
            console.print(f"process work pool [bold]{pool}[/bold] created")
        dep_id = sched.apply(dep)
        console.print(f"deployment [bold]{sched.deployment_name(cfg.name)}[/bold] ({dep_id}) created/updated")
        if pool is not None:
            console.print(f"on work pool {pool} (one run at a time, collision: {collision}); run it on the GPU "
                          f"machine with: [bold]prefect worker start --pool {pool}[/bold]")
        elif not no_serve:
            console.print("serving it: scheduled runs execute here until Ctrl-C")
            sched.serve(dep)
    except sched.ScheduleError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def report(
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    cycles: int = typer.Option(3, help="Online refresh cycles after the offline baseline."),
    out: Path = typer.Option(Path(".tether/report"), help="Where report.md/.json/.png go."),
) -> None:
    """Efficacy report: initial vs offline-only vs N cycles (+ a budget probe), claims checked.

    Exit code 1 when the judge failed its audit (enforced): the report is written, says so, and
    measured nothing.
    """
    cfg = _load(config, set_)
    from orchestrator.report import audit_headline, judge_stopped, run_report, verdict

    with _user_errors(), serverless_flow_settings():
        res = run_report(str(config), parse_sets(set_), cycles, out)
    print_stages(res["stages"], res["meta"]["metric"])
    table = Table(title="claims")
    for c in ("claim", "holds", "evidence"):
        table.add_column(c)
    for c in res["claims"]:
        text = verdict(c["holds"])
        colour = {"yes": "green", "NO": "red", "not shown": "yellow"}[text]
        table.add_row(c["claim"], f"[{colour}]{text}[/{colour}]", c["evidence"])
    console.print(table)
    if res.get("audit") is not None:
        print_audit(res["audit"], cfg.online.judge.audit)
    info = res["meta"].get("judge_audit")
    colour = "green" if info and info["passes"] else "yellow" if not info else "red"
    console.print(f"[{colour}]{audit_headline(info)}[/{colour}]")
    console.print("written: " + ", ".join(str(p) for p in res["paths"].values()))
    if judge_stopped(res["meta"]):
        raise typer.Exit(1)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Errors that name what to fix (bad data, prompts, config, an unreachable service) end the
    command with one `error:` line and exit code 2; the flow run's log keeps the traceback."""
    from buffer.connection import ReplayBufferError
    from buffer.server import RedisServerError, RedisServerMissing
    from offline.data import DataError
    from offline.launch import LaunchError
    from offline.registry import NoCurrentPolicy
    from online.audit import JudgeAuditFailed
    from online.generate import GenerationError
    from online.judge import JudgeAPIError
    from online.prompts import PromptError
    from orchestrator.config import ConfigError
    from orchestrator.tracking import TrackingError

    try:
        yield
    except (ConfigError, DataError, PromptError, ReplayBufferError, RedisServerMissing, RedisServerError,
            JudgeAPIError, JudgeAuditFailed, GenerationError, NoCurrentPolicy, TrackingError, LaunchError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@contextmanager
def _buffer_errors() -> Iterator[None]:
    """Buffer failures (Redis unreachable, no redis-server, bad snapshot) as one-line errors."""
    from buffer.connection import ReplayBufferError
    from buffer.records import InvalidRecord
    from buffer.server import RedisServerError, RedisServerMissing

    try:
        yield
    except (ReplayBufferError, RedisServerMissing, RedisServerError, InvalidRecord, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@buffer_app.command("stats")
def buffer_stats(config: Path = ConfigOpt) -> None:
    """Counts per pool, cycle and category, ages and memory of the replay buffer."""
    cfg = _load(config, None)
    from buffer.records import format_stats_table
    from buffer.store import open_buffer

    with _buffer_errors(), open_buffer(cfg.buffer, cfg.state_dir) as buf:
        console.print(format_stats_table(buf.stats()))


@buffer_app.command("export")
def buffer_export(path: Path, config: Path = ConfigOpt) -> None:
    """Snapshot every pair (with provenance and cached log-probs) to JSONL or Parquet."""
    cfg = _load(config, None)
    from buffer.export import export_buffer
    from buffer.store import open_buffer

    with _buffer_errors(), open_buffer(cfg.buffer, cfg.state_dir) as buf:
        n = export_buffer(buf, path)
    console.print(f"wrote {n} pairs to {path}")


@buffer_app.command("import")
def buffer_import(path: Path, config: Path = ConfigOpt) -> None:
    """Restore a snapshot written by `tether buffer export` (idempotent)."""
    cfg = _load(config, None)
    from buffer.export import import_buffer
    from buffer.store import open_buffer

    with _buffer_errors(), open_buffer(cfg.buffer, cfg.state_dir) as buf:
        seeded, added = import_buffer(buf, path)
    console.print(f"anchor: {seeded}; fresh: {added}")


def refuse_distributed_launch() -> None:
    """Exit at once (code 2) when started as one rank of a distributed launcher: the flow is one
    process; training launches its own ranks (`train.num_processes`, offline/launch.py)."""
    from orchestrator.runtime import launcher_rank_env

    why = launcher_rank_env(os.environ)
    if why is not None:
        console.print(
            f"[red]error:[/red] tether was started by a distributed launcher ({why}): every rank would run "
            "its own flow and write the same checkpoint. Run it as one process (`tether offline ...`) and set "
            "`train.num_processes: N` (or `--set train.num_processes=N`, and `train.accelerate_config` for "
            "FSDP/ZeRO-3): the training task launches the N ranks itself."
        )
        raise SystemExit(2)


def main() -> None:
    """Console-script entry point."""
    refuse_distributed_launch()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
