"""Throughput of the LLM judge against the loopback fake OpenAI server at a fixed latency.

Each judgment is two calls (A/B and B/A), so with `concurrency` requests in flight and a
server latency of L seconds the ceiling is concurrency / L calls/s, i.e. concurrency / (2 L)
judgments/s. Target: achieved calls/s >= 90% of that ceiling (the client must keep every
slot busy: no head-of-line blocking between the two orders of a pair, no connection churn).
The server runs in a subprocess so client and server do not share a GIL. A control pass at
concurrency 1 measures the machine's real round trip (latency + both HTTP stacks + wake-ups),
which bounds what any client can reach there.

Usage: .venv/bin/python benchmarks/judge.py [--n 400] [--latency-ms 50] [--concurrency 16] [--repeats 3]
(exit status 1 when the best pass is under 90%).

Measured 2026-11-26, dev VM (2 vCPUs shared with other engineers' test runs, load average
2.5-5; Python 3.11.7, httpx 0.28.1), defaults (50 ms, concurrency 16, 400 generations = 800
calls per pass), final code, five runs of three passes:
    ideal                           320 calls/s = 160 judgments/s
    best pass                       284 calls/s = 142 judgments/s = 88.7% of ideal
    typical pass                    240-270 calls/s = 75-84% (about 60% at load average 5+)
    control: sequential round trip  54.8-60.1 ms instead of 50 ms -> at most 83-91% of ideal
So the judge reaches 89-98% of what the control says this machine allows, but the 90%-of-
ideal target was not met here. The missing 5-10 ms per call is outside the judge: client
CPU is ~1.3 ms per call (nearly all httpx/httpcore/h11; the judge's own code is ~2%), the
server ~0.6 ms, the rest is wake-up latency on the loaded VM. What mattered: TCP_NODELAY and
one write per reply in the fake server (Nagle + delayed ACK had added ~40 ms per call:
48% -> 85-89%), and one single-connection httpx client per slot (httpcore rescans its whole
pool on every request; about half the client CPU per call at concurrency 16).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from online.judge import LLMJudge, LLMJudgeConfig  # noqa: E402
from online.types import Generation  # noqa: E402


def start_server(latency_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_openai_server.py"), "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "READY":
        proc.kill()
        raise RuntimeError(f"fake server did not start (said {line!r})")
    return proc, line[1]


def generations(n: int, tag: str) -> list[Generation]:
    # Distinct prompts per pass so nothing is served from the verdict cache.
    return [
        Generation(prompt=f"[{tag}] question {i}?", responses=(f"answer {i} GOOD", f"answer {i} meh"), policy_version="bench")
        for i in range(n)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="generations (one pair, two calls each) per pass")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    os.environ.setdefault("TETHER_JUDGE_API_KEY", "bench-key")
    proc, base_url = start_server(args.latency_ms)
    try:
        cfg = LLMJudgeConfig(base_url=base_url, model="fake-judge", concurrency=args.concurrency, timeout_s=30)
        judge = LLMJudge(cfg)
        judge.judge_generations(generations(args.concurrency, "warmup"))  # imports, first connections
        ideal_calls = args.concurrency / (args.latency_ms / 1000.0)
        # Control: one call at a time measures this machine's real round trip (server latency +
        # HTTP stack + wake-ups), which no amount of client concurrency can beat.
        probe = LLMJudge(cfg.model_copy(update={"concurrency": 1}))
        t0 = time.perf_counter()
        _, probe_stats = probe.judge_generations(generations(25, "probe"))
        rtt = (time.perf_counter() - t0) / probe_stats.calls
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"latency {args.latency_ms:.0f} ms, concurrency {args.concurrency}, {args.n} generations/pass, "
              f"{os.cpu_count()} CPUs, load average {load}")
        print(f"{'pass':>4} {'seconds':>8} {'judgments/s':>12} {'calls/s':>9} {'ideal calls/s':>14} {'ratio':>6}")
        ratios = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            judgments, stats = judge.judge_generations(generations(args.n, f"pass{r}"))
            dt = time.perf_counter() - t0
            assert stats.judgments == len(judgments) == args.n and stats.errors == 0, stats
            ratio = stats.calls / dt / ideal_calls
            ratios.append(ratio)
            print(f"{r:>4} {dt:>8.3f} {len(judgments) / dt:>12.1f} {stats.calls / dt:>9.1f} {ideal_calls:>14.1f} {ratio:>6.1%}")
        best = max(ratios)
        print(f"control: sequential round trip {rtt * 1e3:.1f} ms (latency {args.latency_ms:.0f} ms), so at most "
              f"{args.concurrency / rtt:.0f} calls/s here = {args.concurrency / rtt / ideal_calls:.1%} of ideal")
        verdict = "PASS" if best >= 0.9 else "FAIL"
        print(f"best ratio {best:.1%} (median {sorted(ratios)[len(ratios) // 2]:.1%}); target >= 90%: {verdict}")
        return 0 if best >= 0.9 else 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    raise SystemExit(main())
