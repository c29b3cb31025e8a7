"""The cycle and the gate together, plain functions on the shrunk demo with a real Redis.

A judge that labels too few pairs must not train (the cycle is recorded inconclusive, the
mix and the pointer stay), the next run goes on from the next index, and a cycle that does
train records the gate's evidence (counts, bounds, the length ratio) in its report, its
history row and its checkpoint's lineage.
"""

from __future__ import annotations

from pathlib import Path

from _faults import CONFIG, checkpoint_dirs, locked_cycle, prepare_state, small_overrides

from buffer.store import ReplayBuffer
from offline.checkpoint import read_lineage
from offline.registry import PolicyRegistry
from orchestrator.config import load_config


def flows():
    """orchestrator.flows, imported the way the app does (Prefect configured first)."""
    from orchestrator.runtime import configure_prefect

    configure_prefect()
    from orchestrator import flows as module

    return module


def indifferent_judge(prompt: str, response: str) -> float:
    """A rule judge that scores every response alike: every pair a tie, no labels at all."""
    return 0.5


def test_a_judge_with_too_few_labels_does_not_train_and_the_next_cycle_goes_on(tmp_path: Path, redis_url: str):
    weak = {"online.judge.rule.function": "test_cycle_gate:indifferent_judge", "online.min_fresh_pairs": 8}
    cfg = prepare_state(tmp_path, small_overrides(tmp_path, redis_url, **weak))
    registry = PolicyRegistry(cfg.state_dir, cfg.name)
    initial = registry.current()
    with ReplayBuffer.connect(cfg.buffer) as buf:
        report = locked_cycle(cfg, buf)
        assert report is not None and report.index == 1
        assert report.verdict == "inconclusive" and report.promoted is False and report.checkpoint is None
        # One tie per prompt whose k samples hold two distinct answers: at most the 48 prompts of the
        # cycle, fewer where the tiny model sampled one answer k times (platform float order decides).
        ties = int(report.judge["judge/ties"])
        assert 0 < ties <= 48 and report.judge["judge/judgments"] == 0
        assert report.reasons == [
            "inconclusive, not trained: the judge produced 0 of the 8 labels required (online.min_fresh_pairs; "
            f"{ties} ties, 0 unparseable, 0 errors)"
        ]
        assert report.after == {} and report.kl == {} and report.train == {} and report.gate_checks == []
        # Nothing written but the history row: no fresh pairs, no checkpoint, the pointer and the mix stay.
        assert buf.count("fresh") == 0
        assert [p.name for p in checkpoint_dirs(cfg.state_dir)] == ["initial"]
        assert registry.current() == initial
        state = registry.cycle_state(cfg.online.initial_anchor_fraction, cfg.online.train.loss.beta)
        assert state.completed == 1
        assert (state.anchor_fraction, state.beta) == (cfg.online.initial_anchor_fraction, cfg.online.train.loss.beta)
        assert state.history[-1]["verdict"] == "inconclusive" and state.history[-1]["reasons"] == report.reasons
        # What the Prefect artifacts show for it (the flow's renderings, no flow run needed).
        md, history = flows().cycle_markdown(report), flows().history_markdown(registry.history(), report.kl_budget)
        assert "# Refresh cycle 1: INCONCLUSIVE, not promoted" in md and "No checkpoint (not trained)" in md
        assert "| 1 | no (inconclusive) |" in history

        # The judge fixed (the task's rule), the next run is cycle 2: it trains and records the gate's evidence.
        report = locked_cycle(load_config(CONFIG, small_overrides(tmp_path, redis_url)), buf)
        assert report is not None and report.index == 2 and report.checkpoint is not None
        assert buf.count("fresh") == report.mix["pairs_added"] > 0
    assert report.verdict in ("promote", "reject", "inconclusive") and report.promoted == (report.verdict == "promote")
    assert (registry.current().checkpoint == report.checkpoint) == report.promoted
    units = {c["unit"]: c for c in report.gate_checks}
    assert "overall" in units and len(units) > 1
    # 24 held-out prompts x eval_samples: the overall unit's samples, paired on the same prompts.
    n = 24 * cfg.online.eval_samples
    assert units["overall"]["n"] == n and units["overall"]["method"] == "paired-t"
    assert sum(c["n"] for u, c in units.items() if u != "overall") == n
    assert report.gate["gate/n"] == n and report.gate["gate/threshold"] == -cfg.online.gate.tolerance
    assert 0.5 < report.gate["gate/length_ratio"] < 2.0  # the parent's and the candidate's answers, in tokens
    if report.verdict == "inconclusive":  # 24 prompts over 6 categories: likely fewer than 30 samples in one
        assert any("reward samples < gate.min_decisive 30" in r for r in report.reasons)
    lineage = read_lineage(Path(report.checkpoint.path))
    assert lineage["final_metrics"]["gate"]["verdict"] == report.verdict
    assert lineage["final_metrics"]["gate"]["length_ratio"] == report.gate["gate/length_ratio"]
    assert registry.history()[-1]["gate"] == report.gate

