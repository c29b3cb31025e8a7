"""Throughput of the LLM judge against the loopback fake OpenAI server at a fixed latency.

Each judgment is two calls (A/B and B/A), so with `concurrency` requests in flight and a
server latency of L seconds the ceiling is concurrency / L calls/s, i.e. concurrency / (2 L)
judgments/s. Target: achieved calls/s >= 90% of that ceiling (the client must keep every
slot busy: no head-of-line blocking between the two orders of a pair, no connection churn).
The server runs in a subprocess (so client and server do not share a GIL), by default on one
asyncio loop as `vllm serve` does (`--server threaded`: the tests' thread-per-connection one).
A control runs the same number of calls with bare httpx (one keep-alive client per slot, no
judge logic) against the same server: what this machine and httpx allow, whatever the judge
does. Two settings by default: 50 ms / 16 in flight (a stress case: the client's CPU per call
is a large share of the latency) and 250 ms / 32 (an LLM judge's order of latency; real ones
are slower still).

Usage: .venv/bin/python benchmarks/judge.py [--n 400] [--setting 50:16 --setting 250:32] [--repeats 3]
(exit status 1 when a setting's best pass is under 90%).

Measured 2026-11-26 11:47 UTC, dev VM (2 vCPUs, load average 1.3; Python 3.11.7, httpx
0.28.1), 800 calls per pass, 3 passes, asyncio server:

    latency  in flight  ideal calls/s  bare httpx  judge best  judge median  judge/bare  client CPU/call
    50 ms    16         320            83.2%       83.3%       83.3%         100%        1.75 ms
    250 ms   32         128            93.0%       93.2%       92.9%         100%        1.73 ms

At an LLM judge's latency the target is met (93%); at 50 ms it is not (83%), and bare httpx
does no better there: the judge's own code costs nothing measurable on top of httpx. Why the
ceiling: with a fixed server latency all slots answer in the same instant, and the single
client thread handles those answers one after another at ~1.7 ms of CPU each (nearly all
httpx/httpcore/h11), so the last of a wave of 16 waits ~25 ms; real servers' latencies vary
and spread the waves out. What mattered earlier: TCP_NODELAY and one write per reply in the
fake server (Nagle + delayed ACK had added ~40 ms per call: 48% -> 85%), and one
single-connection httpx client per slot (httpcore rescans its whole pool on every request;
about half the client CPU per call at concurrency 16).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))

from fake_openai_server import spawn  # noqa: E402
from online.judge import LLMJudge, LLMJudgeConfig  # noqa: E402
from online.types import Generation  # noqa: E402


def start_server(latency_ms: float, kind: str = "asyncio") -> tuple[subprocess.Popen, str]:
    return spawn(latency_ms, *(["--asyncio"] if kind == "asyncio" else []))


def generations(n: int, tag: str) -> list[Generation]:
    # Distinct prompts per pass so nothing is served from the verdict cache.
    return [
        Generation(prompt=f"[{tag}] question {i}?", responses=(f"answer {i} GOOD", f"answer {i} meh"), policy_version="bench")
        for i in range(n)
    ]


async def bare_httpx(base_url: str, n_calls: int, concurrency: int) -> float:
    """Control: calls/s of bare httpx (one keep-alive client per slot, no judge logic) against
    the same server: what this machine and httpx allow, whatever the judge does."""
    import json

    import httpx

    body = json.dumps({"model": "fake-judge", "messages": [
        {"role": "user", "content": "<reply_a>\nx GOOD\n</reply_a>\n<reply_b>\ny\n</reply_b>"}]}).encode()
    url = httpx.URL(base_url + "/chat/completions")
    left = [n_calls]
    clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) for _ in range(concurrency)]

    async def worker(client: httpx.AsyncClient) -> None:
        while left[0] > 0:
            left[0] -= 1
            (await client.post(url, content=body)).json()

    for c in clients:
        await c.post(url, content=body)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    dt = time.perf_counter() - t0
    for c in clients:
        await c.aclose()
    return n_calls / dt


def run_setting(latency_ms: float, concurrency: int, n: int, repeats: int, server: str) -> dict[str, float]:
    """One (latency, concurrency) setting: control, then `repeats` judge passes."""
    proc, base_url = start_server(latency_ms, server)
    try:
        cfg = LLMJudgeConfig(base_url=base_url, model="fake-judge", concurrency=concurrency, timeout_s=30)
        judge = LLMJudge(cfg)
        judge.judge_generations(generations(concurrency, "warmup"))  # imports, first connections
        ideal = concurrency / (latency_ms / 1000.0)
        bare = asyncio.run(bare_httpx(base_url, 2 * n, concurrency))
        ratios, cpus = [], []
        for r in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            judgments, stats = judge.judge_generations(generations(n, f"{latency_ms}-{concurrency}-pass{r}"))
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert stats.judgments == len(judgments) == n and stats.errors == 0, stats
            ratios.append(stats.calls / dt / ideal)
            cpus.append(cpu / stats.calls)
        return {
            "latency_ms": latency_ms, "concurrency": concurrency, "ideal": ideal, "bare": bare / ideal,
            "best": max(ratios), "median": statistics.median(ratios), "cpu_ms": 1e3 * statistics.median(cpus),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="generations (one pair, two calls each) per pass")
    ap.add_argument("--setting", action="append", default=[], metavar="LATENCY_MS:CONCURRENCY",
                    help="repeatable; default 50:16 (stress) and 250:32 (an LLM judge's order of latency)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server", choices=["asyncio", "threaded"], default="asyncio",
                    help="the fake judge server: one event loop (like vllm serve), or the tests' threaded one")
    args = ap.parse_args()
    settings = [tuple(map(float, s.split(":"))) for s in (args.setting or ["50:16", "250:32"])]

    os.environ.setdefault("TETHER_JUDGE_API_KEY", "bench-key")
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.server} fake server on loopback; {args.n} generations = {2 * args.n} calls per pass, "
          f"{args.repeats} passes; {os.cpu_count()} CPUs, load average {load}")
    rows = [run_setting(lat, int(conc), args.n, args.repeats, args.server) for lat, conc in settings]
    print(f"\n{'latency':>8} {'conc.':>5} {'ideal calls/s':>13} {'bare httpx':>10} {'judge best':>10} "
          f"{'judge median':>12} {'judge/bare':>10} {'client CPU/call':>15}")
    for r in rows:
        print(f"{r['latency_ms']:>6.0f}ms {r['concurrency']:>5.0f} {r['ideal']:>13.1f} {r['bare']:>10.1%} "
              f"{r['best']:>10.1%} {r['median']:>12.1%} {r['median'] / r['bare']:>10.1%} {r['cpu_ms']:>13.2f}ms")
    ok = all(r["best"] >= 0.9 for r in rows)
    print("\nratio = calls/s / (concurrency / latency); bare httpx = the same calls without the judge (the "
          "machine's ceiling); target: judge best >= 90% in every setting: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
