"""The fault table: every scenario of the fault suite, run once, one row each.

Real processes on loopback (redis-server, the fake OpenAI judge, cycle processes) are killed or
made to fail; each row says how many runs, how many pairs the buffer acknowledged ("written"),
how many of those were missing afterwards ("lost"), and the outcome, or which invariant broke.
The scenarios and their checks live in tests/_faults_scenarios.py (tests/test_faults.py asserts
the same rows).

Usage: .venv/bin/python benchmarks/faults.py [--quick]   (--quick: no real cycles, ~20 s;
the full table takes ~3 min on 2 shared CPU cores). Exit status 1 when a row failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _faults import FaultRow, format_table  # noqa: E402
from _faults_scenarios import (  # noqa: E402
    JUDGE_FAULTS,
    concurrent_cycles,
    crash_after_save,
    judge_faults,
    redis_kill_in_cycle,
    redis_kill_mid_add,
    training_kill,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the scenarios that run real cycles")
    args = ap.parse_args()
    from buffer.server import LocalRedis

    work = Path(tempfile.mkdtemp(prefix="tether-faults-"))
    rows: list[FaultRow] = []

    def run(label: str, fn, *a) -> None:
        t0 = time.perf_counter()
        print(f"[faults] {label} ...", file=sys.stderr, flush=True)
        try:
            row = fn(*a)
        except Exception as exc:  # a scenario that crashed is a failed row, not a crashed table
            row = FaultRow(label, problems=[f"{type(exc).__name__}: {exc}"])
            traceback.print_exc()
        row.outcome += f" [{time.perf_counter() - t0:.0f} s]"
        rows.append(row)

    run("redis kill mid add (everysec)", redis_kill_mid_add, work / "add-everysec", 8, 4000, "everysec")
    run("redis kill mid add (always)", redis_kill_mid_add, work / "add-always", 8, 4000, "always")
    with LocalRedis(work / "judge-redis") as server:
        for fault in [*JUDGE_FAULTS, "server SIGKILL"]:
            run(f"judge: {fault}", judge_faults, server.url, fault)
    if not args.quick:
        run("redis kill in cycle before add", redis_kill_in_cycle, work / "cycle-before", "before-add")
        run("redis kill in cycle after add", redis_kill_in_cycle, work / "cycle-after", "after-add")
        run("training kill", training_kill, work / "train-kill")
        run("crash after save", crash_after_save, work / "crash-after-save")
        run("two cycles at once", concurrent_cycles, work / "concurrent")
    print(f"\nFault table ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, work dir {work}):\n")
    print(format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
