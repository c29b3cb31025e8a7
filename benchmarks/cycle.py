"""The demo refresh cycle: wall time per stage, as plain functions vs as a Prefect flow.

    .venv/bin/python benchmarks/cycle.py [--repeats 10] [--torch-threads 1] [--set section.field=value]

Three variants, interleaved in every repeat, do identical work: before every run the buffer is
emptied and the pointer reset to the same offline checkpoint, so each run is "cycle 1" with the
same seeds.

- `plain`: load the config and call `online.cycle.run_cycle_locked` (the cycle under its Redis
  lock), no Prefect.
- `flow`: the `refresh-cycle` flow as `tether cycle` runs it with no server: the same work plus
  a task run per step and three artifacts, with tether's serverless settings
  (`orchestrator.runtime.serverless_flow_settings`: heartbeats off, no CSRF round trip, a cheap
  TLS context) and no result-storage lookups (`orchestrator.flows.FLOW_RESULTS`).
- `flow, Prefect defaults`: the same flow with heartbeats off but Prefect's other defaults
  (CSRF token fetch, the full CA bundle, result-storage lookups): what it cost before those.

The temporary local API is started once, before timing (its start-up is reported, not charged
to every cycle). Each flow run is compared with the plain run of the same repeat (the VM's
speed drifts by tens of percent over minutes, much less between neighbouring runs): the
overhead is the median of those paired ratios, and the fixed cost per cycle the median of the
paired differences; target <= 10%. Also printed: the median wall time per stage and the CPU
seconds the Prefect API process spent per cycle (it shares the cores with torch).

Then, because a 2 s cycle on a shared VM varies by +-20% from run to run, the same comparison
without the compute: an empty flow of the cycle's shape (the same nine task runs, a log line and
three artifacts, no work), tether's settings vs Prefect's defaults, alternately, 20 pairs: the
orchestration's own latency and the API's CPU per cycle, the floor under the overhead above.

`--set online.train_pairs=512` etc. measure a larger cycle: the overhead is a fixed cost per
cycle (per flow run, task run and artifact), so its share falls as the cycle grows.
`--torch-threads 1` leaves a core to the API process, as on a GPU box where the model does not
keep the CPUs busy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)


def api_cpu_seconds() -> float:
    """CPU seconds used so far by this process's children (the ephemeral Prefect API server;
    redis-server too, which both variants use alike)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


@contextmanager
def client_settings(variant: str) -> Iterator[None]:
    """For the "Prefect defaults" variants, Prefect's own client defaults for one run (heartbeats
    stay off: their ~1 s join per run was settled earlier and would swamp the rest); otherwise
    tether's serverless settings, already in force."""
    from prefect.settings import temporary_settings

    if not variant.endswith("Prefect defaults"):
        yield
        return
    with temporary_settings(restore_defaults={"client.csrf_support_enabled", "api.ssl_cert_file"}):
        yield


def empty_cycle_flows() -> tuple[Any, Any]:
    """A flow of the refresh cycle's shape with no work in it, with tether's flow options and with
    Prefect's defaults: same step names, one log line, three artifacts of the same kinds."""
    from prefect import flow, get_run_logger
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from orchestrator.flows import FLOW_RESULTS, as_task

    steps = ["load-current-policy", "evaluate-current", "generate", "judge", "update-buffer",
             "reference-logps", "train", "evaluate-candidate", "save-checkpoint"]

    def body() -> None:
        for name in steps:
            as_task(name, _nothing)(name)
        get_run_logger().info("cycle 0: nothing done")
        create_markdown_artifact("# Refresh cycle (empty)", key="bench-empty-cycle")
        create_table_artifact([{"metric": "x", "value": 0.0}], key="bench-empty-cycle-table")
        create_markdown_artifact("# KL history (empty)", key="bench-empty-history")

    tuned = flow(name="bench-empty-cycle", **FLOW_RESULTS)(body)
    return tuned, tuned.with_options(persist_result=None, result_storage=None)


def _nothing(step: str) -> str:
    return step


def time_empty_cycles(pairs: int) -> dict[str, dict[str, float]]:
    """Median wall time and API CPU of the empty cycle-shaped flow, tuned vs Prefect defaults."""
    tuned, stock = empty_cycle_flows()
    variants = (("flow", tuned), ("flow, Prefect defaults", stock))
    for variant, fn in variants:  # warm-up
        with client_settings(variant):
            fn()
    out: dict[str, list[tuple[float, float]]] = {v: [] for v, _ in variants}
    for _ in range(pairs):
        for variant, fn in variants:
            time.sleep(0.5)  # the API finishes recording the previous run
            api0 = api_cpu_seconds()
            with client_settings(variant):
                t = time.perf_counter()
                fn()
                wall = time.perf_counter() - t
            time.sleep(0.5)
            out[variant].append((wall, api_cpu_seconds() - api0))
    return {v: {"wall": statistics.median(w for w, _ in r), "api": statistics.median(a for _, a in r)}
            for v, r in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--empty-pairs", type=int, default=20, help="pairs of empty cycle-shaped flows (0: skip)")
    ap.add_argument("--state-dir", type=Path, default=ROOT / ".tether" / "bench-cycle")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.field=value override")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, all cores); 1 on a 2-core machine leaves "
                         "the Prefect API process a core, as on a GPU box where the model does not use the CPUs")
    args = ap.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    from orchestrator.runtime import configure_prefect, serverless_flow_settings

    configure_prefect(args.state_dir)
    from prefect import flow

    from buffer.config import BufferConfig
    from buffer.server import LocalRedis
    from buffer.store import ReplayBuffer
    from offline.registry import PolicyRegistry
    from online.cycle import run_cycle
    from orchestrator import flows
    from orchestrator.config import load_config, set_dotted
    from online.cycle import run_cycle_locked

    # As `tether cycle` runs it with no server (orchestrator.runtime.serverless_flow_settings).
    with serverless_flow_settings(), LocalRedis(args.state_dir / "redis-bench", appendfsync="everysec") as redis:
        overrides: dict = {}
        for item in args.sets:
            key, _, value = item.partition("=")
            set_dotted(overrides, key, value)
        overrides = {**overrides, "state_dir": str(args.state_dir), "buffer": {"url": redis.url}}
        cfg = load_config(args.config, overrides)
        t0 = time.perf_counter()
        if PolicyRegistry(cfg.state_dir, cfg.name).current_or_none() is None:
            flows.offline_baseline(args.config, overrides, run_label="bench", progress=False)
        else:
            flow(name="warm-up")(lambda: None)()
        startup = time.perf_counter() - t0
        start = PolicyRegistry(cfg.state_dir, cfg.name).current_or_none()
        buf = ReplayBuffer.connect(BufferConfig(url=redis.url))

        def reset() -> None:
            buf.clear()
            registry = PolicyRegistry(cfg.state_dir, cfg.name)
            registry.cycles_path.unlink(missing_ok=True)  # every timed cycle is cycle 1 again
            registry.promote(start.checkpoint, kind="offline")

        # One untimed cycle first: it fills the reference log-prob cache both variants then share.
        reset()
        run_cycle(flows.cycle_inputs(cfg), buf, progress=False)
        variants = ("plain", "flow", "flow, Prefect defaults")
        results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        tuned = flows.refresh_cycle
        stock = flows.refresh_cycle.with_options(persist_result=None, result_storage=None)
        for i in range(args.repeats):
            for variant in variants:
                reset()
                time.sleep(1.0)  # let the API process finish the previous run's events
                api0 = api_cpu_seconds()
                with client_settings(variant):
                    t = time.perf_counter()
                    if variant == "plain":
                        rep = run_cycle_locked(flows.cycle_inputs(load_config(args.config, overrides)), buf, progress=False).model_dump()
                    else:
                        flow_fn = tuned if variant == "flow" else stock
                        rep = flow_fn(args.config, overrides, run_label=f"bench-{i}", progress=False)
                    wall = time.perf_counter() - t
                time.sleep(1.0)
                api = api_cpu_seconds() - api0
                assert rep["index"] == 1, rep["index"]
                results[variant].append({**rep["seconds"], "total": wall, "child cpu": api})
                print(f"  run {i + 1} {variant:22s}: {wall:6.2f} s  (child processes CPU {api:.2f} s: Prefect API, redis)", flush=True)
        reset()
        buf.close()
        empty = time_empty_cycles(args.empty_pairs) if args.empty_pairs else {}

    stages = ["load", "eval", "generate", "judge", "buffer", "reference", "train", "checkpoint", "total", "child cpu"]
    med = {v: {s: statistics.median(r.get(s, 0.0) for r in rs) for s in stages} for v, rs in results.items()}
    label = Path(args.config).name + (" " + " ".join(args.sets) if args.sets else "")
    if args.torch_threads:
        label += f", torch threads {args.torch_threads}"
    print(f"\nrefresh cycle, {label}, median of {args.repeats} (seconds; Prefect API start-up {startup:.1f} s once)")
    print(f"{'stage':12s} " + " ".join(f"{v:>24s}" for v in results))
    for s in stages:
        print(f"{s:12s} " + " ".join(f"{med[v][s]:24.2f}" for v in results))
    print()
    for variant in variants[1:]:
        pairs = list(zip(results["plain"], results[variant]))
        ratio = statistics.median(f["total"] / p["total"] - 1 for p, f in pairs)
        fixed = statistics.median(f["total"] - p["total"] for p, f in pairs)
        print(f"orchestration overhead, {variant}: {ratio:+.1%} ({fixed:+.2f} s per cycle), "
              f"median over {len(pairs)} pairs with the plain run of the same repeat; target <= +10%")
    if args.empty_pairs:
        print(f"\nempty flow of the cycle's shape (9 task runs, 1 log line, 3 artifacts, no work), median of {args.empty_pairs}:")
        print(f"{'variant':24s} {'wall':>8s} {'API CPU':>9s}")
        for variant, m in empty.items():
            print(f"{variant:24s} {m['wall']:8.3f} {m['api']:9.3f}")


if __name__ == "__main__":
    main()
