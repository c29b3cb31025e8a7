"""The demo refresh cycle: wall time per stage, as plain functions vs as a Prefect flow.

    .venv/bin/python benchmarks/cycle.py [--repeats 2] [--state-dir .tether/bench-cycle]

Both variants do identical work: before every run the buffer is emptied and the pointer reset to
the same offline checkpoint, so each run is "cycle 1" with the same seeds. The plain variant
loads the config and calls `online.cycle.run_cycle_locked` (the cycle under its Redis lock)
directly; the flow variant calls the `refresh-cycle` flow, which does the same plus a task run
per step and three artifacts (ephemeral Prefect API already started by a warm-up flow, so the
one-time server start is reported separately, not charged to every cycle; heartbeats off, as
`tether cycle` runs with no server). The table prints the median wall time per stage and
overall, the CPU seconds the Prefect API process spent per cycle (it competes with torch for
the cores), and the orchestration overhead (flow / plain - 1); target <= 10%.

`--set online.train_pairs=512` etc. measure a larger cycle: the overhead is a fixed cost per
cycle (per task run and artifact), so its share falls as the cycle grows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
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
    from offline.checkpoint import CheckpointRef
    from offline.pointer import read_current
    from online.cycle import run_cycle
    from orchestrator import flows
    from orchestrator.config import load_config, set_dotted
    from online.cycle import run_cycle_locked

    # As `tether cycle` runs it with no server: flow-run heartbeats off (orchestrator.runtime).
    with serverless_flow_settings(), LocalRedis(args.state_dir / "redis-bench", appendfsync="everysec") as redis:
        overrides: dict = {}
        for item in args.sets:
            key, _, value = item.partition("=")
            set_dotted(overrides, key, value)
        overrides = {**overrides, "state_dir": str(args.state_dir), "buffer": {"url": redis.url}}
        cfg = load_config(args.config, overrides)
        t0 = time.perf_counter()
        if read_current(cfg.state_dir, cfg.name) is None:
            flows.offline_baseline(args.config, overrides, run_label="bench", progress=False)
        else:
            flow(name="warm-up")(lambda: None)()
        startup = time.perf_counter() - t0
        start = read_current(cfg.state_dir, cfg.name)
        buf = ReplayBuffer.connect(BufferConfig(url=redis.url))

        def reset() -> None:
            from offline.pointer import promote

            buf.clear()
            promote(cfg.state_dir, cfg.name, CheckpointRef.model_validate(start["checkpoint"]), kind="offline")

        # One untimed cycle first: it fills the reference log-prob cache both variants then share.
        reset()
        run_cycle(flows.cycle_inputs(cfg), buf, progress=False)
        results: dict[str, list[dict[str, float]]] = {"plain": [], "flow": []}
        for i in range(args.repeats):
            for variant in ("plain", "flow"):
                reset()
                time.sleep(1.0)  # let the API process finish the previous run's events
                api0 = api_cpu_seconds()
                t = time.perf_counter()
                if variant == "plain":
                    rep = run_cycle_locked(flows.cycle_inputs(load_config(args.config, overrides)), buf, progress=False).model_dump()
                else:
                    rep = flows.refresh_cycle(args.config, overrides, run_label=f"bench-{i}", progress=False)
                wall = time.perf_counter() - t
                time.sleep(1.0)
                api = api_cpu_seconds() - api0
                assert rep["index"] == 1, rep["index"]
                results[variant].append({**rep["seconds"], "total": wall, "child cpu": api})
                print(f"  run {i + 1} {variant:5s}: {wall:6.2f} s  (child processes CPU {api:.2f} s: Prefect API, redis)", flush=True)
        reset()
        buf.close()

    stages = ["load", "eval", "generate", "judge", "buffer", "reference", "train", "checkpoint", "total", "child cpu"]
    med = {v: {s: statistics.median(r.get(s, 0.0) for r in rs) for s in stages} for v, rs in results.items()}
    label = Path(args.config).name + (" " + " ".join(args.sets) if args.sets else "")
    if args.torch_threads:
        label += f", torch threads {args.torch_threads}"
    print(f"\nrefresh cycle, {label}, median of {args.repeats} (seconds; Prefect API start-up {startup:.1f} s once)")
    print(f"{'stage':12s} {'plain':>8s} {'flow':>8s}")
    for s in stages:
        print(f"{s:12s} {med['plain'][s]:8.2f} {med['flow'][s]:8.2f}")
    overhead = med["flow"]["total"] / med["plain"]["total"] - 1
    print(f"\norchestration overhead (flow / plain - 1): {overhead:+.1%}  (target <= +10%)")


if __name__ == "__main__":
    main()
