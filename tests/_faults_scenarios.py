"""The fault scenarios: each injects one real fault, checks the invariants, returns a `FaultRow`.

Real processes on loopback only, every wait bounded:
- `redis_kill_mid_add`: redis-server SIGKILLed at a random moment while `ReplayBuffer.add`
  writes a big batch, restarted on its AOF, repeatedly: every acknowledged pair is back and
  every batch is all there or not at all.
- `redis_kill_in_cycle`: redis-server SIGKILLed inside a real cycle, just before or just after
  its fresh pairs are written; restarted; the cycle re-run completes, nothing acknowledged is
  lost and nothing is added twice.
- `judge_faults`: the LLM judge against a loopback server failing in one way (429 storms,
  500s, timeouts, garbage verdicts, malformed bodies, dropped connections, or the server
  process SIGKILLed mid-pass): retries and drops are counted, no pair is mislabelled, and what
  the buffer acknowledged is exactly the labels.
- `training_kill`: a cycle process SIGKILLed mid-training (after its first resume snapshot),
  then a re-run SIGKILLed inside `save_checkpoint` (files written, not yet renamed), then a
  final re-run: it resumes, completes, and the promoted pointer never names an incomplete
  checkpoint (a watcher polls it throughout).
- `crash_after_save`: a cycle dies right after its checkpoint is saved, before promotion; the
  re-run must complete.
- `concurrent_cycles`: two cycle processes released at the same instant: exactly one trains.

"pairs written" = pairs the buffer acknowledged (an `add` that returned); "pairs lost" = those
of them missing afterwards. A pair that reached Redis but whose `add` never returned is not
counted as written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from _faults import ROOT, FaultRow, around_fresh_add, checkpoint_dirs, hook, locked_cycle, prepare_state, small_overrides

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "_faults_cycle.py"


# -- helpers -----------------------------------------------------------------------------------


def fresh_records(n: int, cycle: int, tag: str):
    from buffer.records import BufferedPair
    from offline.pairs import PreferencePair

    return [
        BufferedPair.fresh(
            PreferencePair(prompt=f"{tag} c{cycle} q{i}", chosen=f"good {i}", rejected=f"bad {i}"), cycle=cycle
        )
        for i in range(n)
    ]


def buffer_inconsistency(buf) -> str | None:
    """None when every index and group count agrees with the pair hash (no half-applied write
    anywhere); otherwise the three counts, so a failure says which part disagreed."""
    key, client = buf.connection.key, buf.connection.client
    pairs = client.hlen(key("pairs"))
    groups, _ = buf.groups()
    grouped = sum(g.size for g in groups)
    indexed = {k: client.zcard(k) for k in client.scan_iter(match=key("idx:*"))}
    if grouped == pairs == sum(indexed.values()):
        return None
    return f"pair hash {pairs}, group counts {grouped}, indexes {indexed}"


def present(buf, ids: list[str]) -> set[str]:
    return {i for i, r in zip(ids, buf.get(ids)) if r is not None} if ids else set()


class PointerWatch:
    """Polls the pointer file and Redis pointer; records any target that is not a complete checkpoint."""

    def __init__(self, state_dir: Path, name: str, redis_url: str) -> None:
        self.state_dir, self.name, self.url = state_dir, name, redis_url
        self.bad: list[str] = []
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PointerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import redis

        from offline.checkpoint import is_complete
        from offline.registry import PolicyRegistry

        client = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=1)
        while not self._stop.wait(0.005):
            records = []
            try:
                current = PolicyRegistry(self.state_dir, self.name).current_or_none()
                records.append(current.model_dump(mode="json") if current else None)
            except (OSError, ValueError) as e:
                self.bad.append(f"pointer file unreadable: {e}")
            try:
                raw = client.get(f"{{tether}}:pointer:current:{self.name}")
                records.append(json.loads(raw) if raw else None)
            except redis.RedisError:
                pass  # the server may be down on purpose
            for rec in records:
                self.reads += 1
                if rec is not None and not is_complete(rec["checkpoint"]["path"]):
                    self.bad.append(rec["checkpoint"]["path"])
        client.close()


class CycleProcess:
    """`tests/_faults_cycle.py` in a subprocess: its events, and SIGKILL."""

    def __init__(self, work: Path, label: str, overrides: dict[str, Any], *, go: Path | None = None,
                 hang_in_save: bool = False) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.events_path = work / f"{label}.events.jsonl"
        self.log_path = work / f"{label}.log"
        (work / f"{label}.overrides.json").write_text(json.dumps(overrides))
        argv = [sys.executable, str(DRIVER), str(work / f"{label}.overrides.json"), str(self.events_path)]
        if go is not None:
            argv += ["--go", str(go)]
        if hang_in_save:
            argv.append("--hang-in-save")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()
        return [json.loads(x) for x in lines if x.strip().endswith("}")]

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e["event"] == name), None)

    def wait_until(self, cond: Callable[[], Any], timeout_s: float) -> Any:
        """Poll `cond` until truthy; raise (with the log tail) if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.proc.poll() is not None:
                raise RuntimeError(f"cycle process exited ({self.proc.returncode}) early:\n{self.tail()}")
            time.sleep(0.005)
        raise TimeoutError(f"cycle process: condition not met in {timeout_s:.0f} s:\n{self.tail()}")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"cycle process did not finish in {timeout_s:.0f} s:\n{self.tail()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def tail(self, n: int = 25) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


# -- Redis killed ------------------------------------------------------------------------------


def redis_kill_mid_add(work: Path, runs: int = 6, batch: int = 4000, appendfsync: str = "everysec",
                       seed: int = 0) -> FaultRow:
    """SIGKILL redis-server at a random moment during big `add`s; restart on the AOF; check."""
    from buffer.config import BufferConfig
    from buffer.server import LocalRedis
    from buffer.connection import BufferUnavailable
    from buffer.store import ReplayBuffer

    row = FaultRow(f"redis SIGKILL mid buffer.add ({batch} pairs/add, appendfsync {appendfsync})", runs=runs)
    # (two adds before the kills are acknowledged and must survive every later restart too)
    rng = random.Random(seed)
    cfg = BufferConfig(appendfsync=appendfsync, connect_retries=0)
    data = work / f"redis-{appendfsync}"
    server = LocalRedis(data, appendfsync=appendfsync).start()
    buf = ReplayBuffer.connect(cfg, url=server.url)
    # The kill is timed from the moment the write script is sent (after the client serialised
    # the batch), uniformly over twice the script's measured round trip, so kills land before,
    # inside and after its run on the server.
    script_s: list[float] = []

    def timed_script(buffer, on_send: Callable[[], None]):
        script = buffer._add

        def send(*a, **k):
            on_send()
            t = time.perf_counter()
            out = script(*a, **k)
            script_s.append(time.perf_counter() - t)
            return out
        buffer._add = send

    warm = [fresh_records(batch, 0, "warm"), fresh_records(batch, 0, "warm-again")]
    for recs in warm:
        timed_script(buf, lambda: None)
        buf.add(recs)
    span = 2.0 * max(script_s)
    acked: set[str] = {r.id for recs in warm for r in recs}
    batches: list[list[str]] = [[r.id for r in recs] for recs in warm]
    unacked_landed = 0
    for run in range(1, runs + 1):
        recs = fresh_records(batch, run, "kill")
        ids = [r.id for r in recs]
        batches.append(ids)
        killer = threading.Timer(rng.uniform(0.0, span), server.kill)
        timed_script(buf, killer.start)
        try:
            buf.add(recs)
            acked.update(ids)
        except BufferUnavailable:
            pass
        killer.join()
        buf.close()
        server = LocalRedis(data, appendfsync=appendfsync).start()
        buf = ReplayBuffer.connect(cfg, url=server.url)
        there = present(buf, ids)
        row.check(len(there) in (0, len(ids)), f"run {run}: {len(there)} of {len(ids)} pairs of one add survived")
        unacked_landed += bool(there) and ids[0] not in acked
        problem = buffer_inconsistency(buf)
        row.check(problem is None, f"run {run}: indexes disagree with the pair hash ({problem})")
    row.written = len(acked)
    row.lost = len(acked - present(buf, sorted(acked)))
    row.check(row.lost == 0, f"{row.lost} acknowledged pairs lost")
    n_acked = sum(1 for b in batches[2:] if b[0] in acked)
    row.outcome = (f"kill 0-{1000 * span:.0f} ms after the write was sent: {n_acked}/{runs} adds acknowledged "
                   f"first, {unacked_landed} landed unacknowledged, {runs - n_acked - unacked_landed} absent whole "
                   f"(never acknowledged); every add all-or-nothing")
    buf.close()
    server.stop()
    return row


def redis_kill_in_cycle(work: Path, when: str) -> FaultRow:
    """SIGKILL redis-server in a real cycle just before (`before-add`) or after (`after-add`) its write."""
    from buffer.server import LocalRedis
    from buffer.connection import ReplayBufferError
    from buffer.store import ReplayBuffer
    from offline.registry import PolicyRegistry

    assert when in ("before-add", "after-add")
    row = FaultRow(f"redis SIGKILL in a cycle, {when.replace('-', ' ')}; restart; re-run", runs=1)
    data = work / "redis"
    server = LocalRedis(data).start()
    port = server.port
    overrides = small_overrides(work / "state", server.url, **{
        "online.lock_ttl_s": 3, "online.on_busy": "wait", "buffer.connect_retries": 1,
    })
    cfg = prepare_state(work / "state", overrides)
    pointer_before = PolicyRegistry(cfg.state_dir, cfg.name).current_or_none()
    acked: list[str] = []

    def strike(add, records):
        if when == "before-add":
            server.kill()
            return add(records)
        result = add(records)
        acked.extend(r.pair.content_id for r in records)
        server.kill()
        return result

    buf = ReplayBuffer.connect(cfg.buffer)
    try:
        locked_cycle(cfg, buf, step=around_fresh_add(strike))
        row.problems.append("the cycle finished although Redis was killed under it")
    except ReplayBufferError as exc:
        row.details["error"] = str(exc).split(";")[0]
    buf.close()
    server = LocalRedis(data, port=port).start()  # same port: the config's buffer.url
    buf = ReplayBuffer.connect(cfg.buffer)
    row.check(PolicyRegistry(cfg.state_dir, cfg.name).current_or_none() == pointer_before, "the pointer moved in the failed cycle")
    row.check(not PolicyRegistry(cfg.state_dir, cfg.name).history(),
              "the failed cycle was counted as completed")
    row.lost = len(set(acked) - present(buf, acked))
    t0 = time.perf_counter()
    report = locked_cycle(cfg, buf)  # waits out the dead cycle's lock (lock_ttl_s = 3)
    row.details["rerun_s"] = round(time.perf_counter() - t0, 1)
    if row.check(report is not None, "the re-run was skipped"):
        added = int(report.mix["pairs_added"])
        row.check(report.index == 1, f"the re-run is cycle {report.index}, not 1")
        if when == "after-add":
            row.check(added == 0, f"the re-run added {added} pairs the killed run had written already")
        row.written = len(acked) + added
        fresh = buf.count("fresh")
        row.check(fresh == row.written, f"buffer holds {fresh} fresh pairs, {row.written} acknowledged")
        row.outcome = (f"cycle failed ({row.details.get('error')}); re-run completed as cycle 1 after "
                       f"{row.details['rerun_s']} s, added {added} new pairs")
    row.lost = len(set(acked) - present(buf, acked))
    row.check(row.lost == 0, f"{row.lost} acknowledged pairs lost")
    buf.close()
    server.stop()
    return row


# -- the judge failing -------------------------------------------------------------------------

MARKER = "GOOD"


def judge_generations_with_truth(n: int, seed: int):
    """Generations whose responses carry the fake judge's marker at random (ties included)."""
    from online.types import Generation

    rng = random.Random(seed)
    return [
        Generation(prompt=f"question {seed}-{g}", category="faults", policy_version="v0", responses=tuple(
            f"reply {seed}-{g}-{k}" + (f" {MARKER}" if rng.random() < 0.5 else "") for k in range(4)
        ))
        for g in range(n)
    ]


JUDGE_FAULTS: dict[str, dict[str, float]] = {
    "429 storm (60%, Retry-After)": {"429": 0.6},
    "HTTP 500s (40%)": {"500": 0.4},
    "timeouts (25%)": {"timeout": 0.25},
    "garbage/malformed/empty/biased replies": {"garbage": 0.1, "malformed": 0.1, "no_choices": 0.1, "always_a": 0.1},
    "dropped connections (35%)": {"drop": 0.35},
}


def judge_faults(redis_url: str, fault: str, runs: int = 2, n_generations: int = 30) -> FaultRow:
    """The LLM judge against a loopback server failing one way (or SIGKILLed: fault='server SIGKILL')."""
    from fake_openai_server import FakeOpenAIServer
    from fake_openai_server import spawn as spawn_judge_server

    from buffer.config import BufferConfig
    from buffer.store import ReplayBuffer
    from online.cycle import fresh_pairs
    from online.judge import LLMJudge
    from online.config import LLMJudgeConfig

    row = FaultRow(f"judge: {fault}", runs=runs)
    buf = ReplayBuffer.connect(BufferConfig(url=redis_url, namespace="faults-judge"))
    buf.clear()
    totals = {"labels": 0, "retries": 0, "errors": 0, "unparseable": 0, "ties": 0, "mislabelled": 0}
    for run in range(runs):
        gens = judge_generations_with_truth(n_generations, seed=100 * run + len(fault))
        n_pairs = sum(len(g.responses) // 2 for g in gens)  # 4 distinct responses -> 2 pairs each
        cfg = dict(model="fake-judge", timeout_s=0.25, max_retries=4, backoff_base_s=0.01,
                   backoff_max_s=0.05, concurrency=8)
        if fault == "server SIGKILL":
            proc, url = spawn_judge_server(latency_ms=50)  # a pass takes >= 0.75 s: killed mid-pass
            killer = threading.Timer(0.6, lambda: os.kill(proc.pid, signal.SIGKILL))
            killer.start()
            judgments, stats = LLMJudge(LLMJudgeConfig(base_url=url, **cfg)).judge_generations(gens)
            killer.join()
            proc.wait()
            served = None
        else:
            with FakeOpenAIServer(storm=JUDGE_FAULTS[fault], seed=run, retry_after="0.02",
                                  timeout_sleep_s=0.5, marker=MARKER) as server:
                judgments, stats = LLMJudge(LLMJudgeConfig(base_url=server.base_url, **cfg)).judge_generations(gens)
                deadline = time.monotonic() + 2.0  # a request the client timed out may be logged late
                while server.n_requests < stats.calls and time.monotonic() < deadline:
                    time.sleep(0.01)
                served = server.n_requests
        wrong = [j for j in judgments if MARKER not in j.chosen or MARKER in j.rejected]
        outcomes = stats.judgments + stats.ties + stats.unparseable + stats.errors
        row.check(not wrong, f"run {run}: {len(wrong)} mislabelled pairs")
        row.check(outcomes == n_pairs, f"run {run}: outcomes count {outcomes} pairs of {n_pairs}")
        row.check(stats.judgments == len(judgments),
                  f"run {run}: judgments counted {stats.judgments}, returned {len(judgments)}")
        row.check(stats.retries == stats.calls - 2 * n_pairs,
                  f"run {run}: retries {stats.retries} != calls {stats.calls} - 2 x {n_pairs} pairs")
        if served is not None:
            row.check(stats.calls == served, f"run {run}: judge counted {stats.calls} calls, server saw {served}")
        row.check(stats.retries > 0, f"run {run}: no retries under '{fault}'")
        if fault.startswith("garbage"):  # those replies cannot be retried into labels: some must drop
            row.check(stats.errors + stats.unparseable + stats.ties > 0, f"run {run}: nothing dropped under '{fault}'")
        added = buf.add_fresh(fresh_pairs(judgments, cycle=run, policy_version="v0")).model_dump()
        ids = [j.to_pair().content_id for j in judgments]
        row.written += added["added"]
        row.lost += len(set(ids) - present(buf, ids))
        totals["labels"] += len(judgments)
        totals["mislabelled"] += len(wrong)
        for k in ("retries", "errors", "unparseable", "ties"):
            totals[k] += getattr(stats, k)
    stored = [r for r in buf.iter_records() if r.pool == "fresh"]
    bad_stored = [r for r in stored if MARKER not in r.pair.chosen or MARKER in r.pair.rejected]
    row.check(not bad_stored, f"{len(bad_stored)} mislabelled pairs in the buffer")
    row.check(len(stored) == row.written, f"buffer holds {len(stored)} pairs, acknowledged {row.written}")
    row.check(row.lost == 0, f"{row.lost} acknowledged pairs lost")
    row.details = totals
    row.outcome = (f"{totals['mislabelled']} mislabelled of {totals['labels']} labels; {totals['retries']} retries; "
                   f"dropped {totals['errors']} failed + {totals['unparseable']} unparseable + {totals['ties']} ties")
    buf.clear()
    buf.close()
    return row


# -- the training process killed -----------------------------------------------------------------


def _snapshot_latest(state_dir: Path) -> Path | None:
    return next(iter(state_dir.glob("resume/cycle-*/run-*/latest")), None)


def training_kill(work: Path) -> FaultRow:
    """SIGKILL a cycle mid-training, re-run and SIGKILL it inside save_checkpoint, re-run to the end."""
    from buffer.server import LocalRedis
    from buffer.store import ReplayBuffer
    from offline.checkpoint import is_complete
    from offline.registry import PolicyRegistry

    row = FaultRow("training process SIGKILL mid-train, then mid-save; re-run", runs=3)
    server = LocalRedis(work / "redis").start()
    state = work / "state"
    overrides = small_overrides(state, server.url, **{
        "online.train.save_every": 2, "online.train.epochs": 2, "online.train_pairs": 192,
        "online.lock_ttl_s": 3, "online.on_busy": "wait",
    })
    cfg = prepare_state(state, overrides)
    initial = PolicyRegistry(state, cfg.name).current_or_none()
    with PointerWatch(state, cfg.name, server.url) as watch:
        first = CycleProcess(work, "killed-mid-train", overrides)
        latest = first.wait_until(lambda: _snapshot_latest(state), timeout_s=180)
        first.kill()
        snap = latest.parent / latest.read_text().strip()
        files = sorted(p.name for p in snap.iterdir())
        row.details["snapshot_files"] = files
        row.check(all(f.endswith((".safetensors", ".json")) for f in files), f"snapshot holds {files}")
        added = first.event("added")
        acked = added["ids"] if added else []
        row.check(first.event("done") is None, "the first process finished before the kill")

        second = CycleProcess(work, "killed-mid-save", overrides, hang_in_save=True)
        saving = second.wait_until(lambda: second.event("saving"), timeout_s=180)
        second.kill()
        trained = second.event("trained") or {}
        row.details["resumed_from_step"] = trained.get("resumed_from_step")
        row.check((trained.get("resumed_from_step") or 0) >= 2, f"the re-run did not resume: {trained}")
        again = (second.event("added") or {}).get("result", {})
        row.check(again.get("added") == 0, f"the re-run re-added pairs: {again}")
        tmp = Path(saving["dir"])
        row.check(tmp.name.startswith(".") and tmp.exists(), f"the kill did not land in the temp dir {tmp}")
        row.check(PolicyRegistry(state, cfg.name).current_or_none() == initial, "the pointer moved before the checkpoint was renamed")
        visible = [p for p in checkpoint_dirs(state) if not p.name.startswith(".")]
        row.check(all(is_complete(p) for p in visible), f"an incomplete checkpoint is visible: {visible}")

        buf = ReplayBuffer.connect(cfg.buffer)
        report = locked_cycle(cfg, buf)
    row.check(report is not None and report.index == 1, f"final re-run: {report and report.index}")
    row.check(not watch.bad, f"the pointer named incomplete checkpoints: {watch.bad[:3]}")
    row.check(watch.reads > 100, f"the pointer watcher read only {watch.reads} times")
    leftovers = [p.name for p in checkpoint_dirs(state) if p.name.startswith(".")]
    row.check(not leftovers, f"temp dirs left behind: {leftovers}")
    current = PolicyRegistry(state, cfg.name).current_or_none()
    row.check(is_complete(current.checkpoint.path), "the final pointer names an incomplete checkpoint")
    row.written = len(acked)
    row.lost = len(set(acked) - present(buf, acked))
    row.check(row.lost == 0, f"{row.lost} acknowledged pairs lost")
    row.check(buf.count("fresh") == len(acked), f"fresh pairs {buf.count('fresh')} != acknowledged {len(acked)}")
    if report is not None:
        row.outcome = (f"resumed from step {row.details['resumed_from_step']}; final re-run completed cycle "
                       f"{report.index} ({'promoted' if report.promoted else 'rolled back'}); pointer read "
                       f"{watch.reads}x, never incomplete")
    buf.close()
    server.stop()
    return row


class Crash(Exception):
    """Stands in for a SIGKILL at a point no poller can hit reliably."""


def crash_after_save(work: Path) -> FaultRow:
    """A cycle dies right after save-checkpoint returns (before promotion); the re-run must complete."""
    from buffer.server import LocalRedis
    from buffer.store import ReplayBuffer

    row = FaultRow("cycle dies after its checkpoint is saved, before promotion; re-run", runs=1)
    server = LocalRedis(work / "redis").start()
    cfg = prepare_state(work / "state", small_overrides(work / "state", server.url))
    buf = ReplayBuffer.connect(cfg.buffer)

    def die_after(save):
        def wrapped(*a, **k):
            row.details["saved"] = save(*a, **k).path
            raise Crash("killed after save-checkpoint")
        return wrapped

    try:
        locked_cycle(cfg, buf, step=hook("save-checkpoint", die_after))
    except Crash:
        pass
    try:
        report = locked_cycle(cfg, buf)
        row.check(report is not None and report.index == 1, "the re-run did not complete cycle 1")
        row.outcome = "re-run completed"
    except Exception as exc:  # the finding this row reports
        row.problems.append(f"re-run failed: {type(exc).__name__}: {exc}")
        row.details["error"] = exc
    buf.close()
    server.stop()
    return row


# -- two cycles at once ------------------------------------------------------------------------


def concurrent_cycles(work: Path) -> FaultRow:
    """Two cycle processes released at the same instant: exactly one takes the lock and trains."""
    from buffer.server import LocalRedis
    from buffer.store import ReplayBuffer

    row = FaultRow("two cycles started at once", runs=1)
    server = LocalRedis(work / "redis").start()
    state = work / "state"
    overrides = small_overrides(state, server.url)
    cfg = prepare_state(state, overrides)
    go = work / "go"
    procs = [CycleProcess(work, f"racer-{i}", overrides, go=go) for i in range(2)]
    for p in procs:
        p.wait_until(lambda p=p: p.event("ready"), timeout_s=120)
    go.touch()
    for p in procs:
        p.wait(timeout_s=240)
    done = [p for p in procs if p.event("done")]
    skipped = [p for p in procs if p.event("skipped")]
    row.check(len(done) == 1 and len(skipped) == 1, f"{len(done)} finished, {len(skipped)} skipped")
    row.check(all(p.event("trained") is None and p.event("added") is None for p in skipped),
              "the skipped process wrote pairs or trained")
    buf = ReplayBuffer.connect(cfg.buffer)
    from offline.registry import PolicyRegistry

    completed = len(PolicyRegistry(cfg.state_dir, cfg.name).history())
    row.check(completed == 1, f"cycle-state says {completed} cycles completed")
    cycles = [p.name for p in checkpoint_dirs(state) if p.name.startswith("cycle-")]
    row.check(len(cycles) == 1, f"cycle checkpoints: {cycles}")
    if done:
        added = done[0].event("added") or {}
        row.written = int(added.get("result", {}).get("added", 0))
        ids = added.get("ids", [])
        row.lost = len(set(ids) - present(buf, ids))
    row.outcome = f"{len(done)} trained, {len(skipped)} skipped (lock held); 1 checkpoint, cycle-state 1"
    buf.close()
    server.stop()
    return row
