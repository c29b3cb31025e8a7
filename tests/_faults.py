"""Shared parts of the fault, bad-input, secrets, flow and report suites: a small demo state, plain cycles.

Contract:
- `small_overrides(state_dir, ...)` is the demo config shrunk so a cycle takes seconds.
- `prepare_state(state_dir, overrides, config=CONFIG, models=None)` copies the demo policy
  (built once per process into a temp dir, ~30 s), or links the given `models/` dir (e.g.
  the converted SmolLM2), into `state_dir`, saves it as the checkpoint `initial` and promotes
  it, so a refresh cycle can start without the offline flow; it returns the loaded `TetherConfig`.
- `plain_inputs(cfg)` is `orchestrator.flows.cycle_inputs` without importing prefect.
- `locked_cycle(cfg, buf, step)` is `orchestrator.flows.run_refresh` without Prefect: the plain
  `run_cycle` under the cycle lock; it returns None when another cycle holds the lock.
- `FaultRow` is one row of the fault table (benchmarks/faults.py prints them).

Nothing here imports prefect, so the subprocess driver (`tests/_faults_cycle.py`) starts fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.config import set_dotted

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"

_TEMPLATE: Path | None = None  # <tmp>/models of a state dir in which the demo policy was built


def small_overrides(
    state_dir: Path, redis_url: str | None = None, *, epochs: int | None = 1, **extra: Any,
) -> dict[str, Any]:
    """The demo config, shrunk: 600 data pairs, 48 prompts and 96 training pairs per cycle, and
    `epochs` offline and per cycle (None: the config's, for tests that check what training buys)."""
    o: dict[str, Any] = {
        "state_dir": str(state_dir),
        "data": {"limit": 600},
        "online": {
            "prompts": {"sample_per_cycle": 48},
            "train_pairs": 96,
            "eval_max_prompts": 24,
            "kl_prompts": 8,
        },
    }
    if epochs is not None:
        o["train"] = {"epochs": epochs}
        o["online"]["train"] = {"epochs": epochs}
    if redis_url:
        o["buffer"] = {"url": redis_url}
    for key, value in extra.items():
        set_dotted(o, key, value)
    return o


def demo_models_template() -> Path:
    """A `models/` dir holding the built demo policy (built on first call in this process)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        from offline.demo_task import build_demo_policy

        root = Path(tempfile.mkdtemp(prefix="tether-demo-template-"))
        build_demo_policy(root)
        _TEMPLATE = root / "models"
    return _TEMPLATE


def prepare_state(state_dir: Path, overrides: dict[str, Any], config: Path = CONFIG, models: Path | None = None):
    """Copy the demo policy (or the `models` dir given, hard-linked) into `state_dir`, checkpoint
    it as `initial` and promote it; `config` is the config file the overrides apply to."""
    from offline import pipeline
    from offline.registry import PolicyRegistry
    from offline.train import TrainResult
    from orchestrator.config import load_config, redacted_dump

    state_dir.mkdir(parents=True, exist_ok=True)
    if not (state_dir / "models").exists():
        if models is None:
            shutil.copytree(demo_models_template(), state_dir / "models")
        else:  # a real model's weights are hundreds of MB and only read: link them
            shutil.copytree(models, state_dir / "models", copy_function=_link_or_copy)
    cfg = load_config(config, overrides)
    policy = pipeline.load_initial_policy(cfg.model, state_dir)
    nothing = TrainResult(history=[], step_pair_ids=[], final_metrics={}, steps=0,
                          resumed_from_step=None, tokens=0, seconds=0.0)
    ref = pipeline.save_policy(
        policy, cfg.checkpoints_dir, "initial", kind="offline", fingerprint="initial-policy",
        config=redacted_dump(cfg), parent=None, seed=cfg.seed, result=nothing, metrics={},
    )
    PolicyRegistry(state_dir, cfg.name).promote(ref, kind="offline")
    return cfg


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def plain_inputs(cfg):
    """`orchestrator.flows.cycle_inputs` without prefect."""
    from online.anchor import resolve_static_data
    from online.cycle import CycleInputs
    from orchestrator.config import redacted_dump

    assert cfg.online is not None
    return CycleInputs(
        model=cfg.model, data=resolve_static_data(cfg), train=cfg.train, online=cfg.online,
        state_dir=cfg.state_dir, name=cfg.name, seed=cfg.seed, config_dump=redacted_dump(cfg),
    )


def locked_cycle(cfg, buf, step: Callable | None = None, on_acquired: Callable[[], None] | None = None):
    """One plain cycle under the cycle lock, as `run_refresh` takes it; None when skipped."""
    from buffer.lock import LockHeld
    from online.cycle import identity_step, run_cycle_locked

    try:
        return run_cycle_locked(plain_inputs(cfg), buf, step=step or identity_step, progress=False,
                                on_acquired=on_acquired)
    except LockHeld:
        return None


def hook(name: str, wrap: Callable[[Callable], Callable]) -> Callable[[str, Callable], Callable]:
    """A `step` hook for `run_cycle` that wraps only step `name` (fault injection)."""

    def step(step_name: str, fn: Callable) -> Callable:
        return wrap(fn) if step_name == name else fn

    return step


class _AddSpy:
    """The buffer as a cycle sees it, with `add_fresh` (the cycle's one atomic write) wrapped."""

    def __init__(self, buffer: Any, around: Callable[[Callable, list], Any]) -> None:
        self._buffer, self._around = buffer, around

    def add_fresh(self, records: list) -> Any:
        return self._around(self._buffer.add_fresh, records)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._buffer, name)


def around_fresh_add(around: Callable[[Callable, list], Any]) -> Callable[[str, Callable], Callable]:
    """A `step` hook for `run_cycle`: `around(add, records)` runs in place of the buffer write
    of this cycle's fresh pairs (inside the `update-buffer` step), e.g. to kill Redis before
    or after it; `add(records)` returning means Redis acknowledged the write."""

    def step(step_name: str, fn: Callable) -> Callable:
        if step_name != "update-buffer":
            return fn

        def wrapped(buffer: Any, *a: Any, **k: Any) -> Any:
            return fn(_AddSpy(buffer, around), *a, **k)

        return wrapped

    return step


def checkpoint_dirs(state_dir: Path, name: str = "demo") -> list[Path]:
    """Every directory under the run family's checkpoints, hidden temp dirs included."""
    root = state_dir / "checkpoints" / name
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


@dataclass
class FaultRow:
    """One row of the fault table; `problems` lists every broken invariant (empty = pass)."""

    fault: str
    runs: int = 0
    written: int = 0  # pairs the buffer acknowledged
    lost: int = 0  # acknowledged pairs missing afterwards
    outcome: str = ""
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self, condition: bool, problem: str) -> bool:
        if not condition:
            self.problems.append(problem)
        return condition


def format_table(rows: list[FaultRow]) -> str:
    """The fault table as aligned plain text."""
    head = ("fault", "runs", "pairs written", "pairs lost", "outcome")
    body = [
        (r.fault, str(r.runs), str(r.written), str(r.lost),
         ("ok: " if r.ok else "FAIL: ") + (r.outcome if r.ok else "; ".join(r.problems)))
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(4)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head[:4], widths)) + " | " + head[4]]
    lines.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 40)
    lines += [" | ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + " | " + row[4] for row in body]
    return "\n".join(lines)
