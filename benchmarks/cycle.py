"""The demo refresh cycle: wall time per stage, as plain functions vs as a Prefect flow.

    .venv/bin/python benchmarks/cycle.py [--repeats 2] [--state-dir .tether/bench-cycle]

Both variants do identical work: before every run the buffer is emptied and the pointer reset to
the same offline checkpoint, so each run is "cycle 1" with the same seeds. The plain variant
calls `online.cycle.run_cycle` directly; the flow variant calls the `refresh-cycle` flow (each
step a task run, artifacts written, ephemeral Prefect API already started by a warm-up flow, so
the one-time ~3 s server start is reported separately, not charged to every cycle). The table
prints the median wall time per stage and overall, and the orchestration overhead
(flow / plain - 1); target <= 10%.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--state-dir", type=Path, default=ROOT / ".tether" / "bench-cycle")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = ap.parse_args()

    from orchestrator.runtime import configure_prefect

    configure_prefect(args.state_dir)
    from prefect import flow

    from buffer.config import BufferConfig
    from buffer.server import LocalRedis
    from buffer.store import ReplayBuffer
    from offline.checkpoint import CheckpointRef
    from offline.pointer import read_current
    from online.cycle import run_cycle
    from orchestrator import flows
    from orchestrator.config import load_config

    with LocalRedis(args.state_dir / "redis-bench", appendfsync="everysec") as redis:
        overrides = {"state_dir": str(args.state_dir), "buffer": {"url": redis.url}}
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
                t = time.perf_counter()
                if variant == "plain":
                    rep = run_cycle(flows.cycle_inputs(cfg), buf, progress=False).model_dump()
                else:
                    rep = flows.refresh_cycle(args.config, overrides, run_label=f"bench-{i}", progress=False)
                wall = time.perf_counter() - t
                assert rep["index"] == 1, rep["index"]
                results[variant].append({**rep["seconds"], "total": wall})
                print(f"  run {i + 1} {variant:5s}: {wall:6.1f} s", flush=True)
        reset()
        buf.close()

    stages = ["load", "eval", "generate", "judge", "buffer", "reference", "train", "checkpoint", "total"]
    med = {v: {s: statistics.median(r.get(s, 0.0) for r in rs) for s in stages} for v, rs in results.items()}
    print(f"\nrefresh cycle, demo config, median of {args.repeats} (seconds; Prefect API start-up {startup:.1f} s once)")
    print(f"{'stage':12s} {'plain':>8s} {'flow':>8s}")
    for s in stages:
        print(f"{s:12s} {med['plain'][s]:8.2f} {med['flow'][s]:8.2f}")
    overhead = med["flow"]["total"] / med["plain"]["total"] - 1
    print(f"\norchestration overhead (flow / plain - 1): {overhead:+.1%}  (target <= +10%)")


if __name__ == "__main__":
    main()
