"""Fault suite: real processes killed or failing on loopback, every wait bounded.

Each test runs one scenario of `tests/_faults_scenarios.py` (whose docstring says what is
injected and checked) and asserts that its row of the fault table has no broken invariant;
`benchmarks/faults.py` runs the same scenarios and prints the whole table. Tests that run real
cycles are marked slow (the demo policy is built once per process, ~30 s; a cycle takes ~10 s).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _faults import FaultRow, format_table
from _faults_scenarios import (
    JUDGE_FAULTS,
    concurrent_cycles,
    crash_after_save,
    judge_faults,
    redis_kill_in_cycle,
    redis_kill_mid_add,
    training_kill,
)


def passed(row: FaultRow) -> bool:
    print("\n" + format_table([row]))
    return row.ok


@pytest.mark.parametrize("appendfsync", ["everysec", "always"])
def test_redis_killed_mid_add_loses_no_acknowledged_pair(tmp_path: Path, appendfsync: str) -> None:
    row = redis_kill_mid_add(tmp_path, runs=8, batch=2000, appendfsync=appendfsync)
    assert passed(row), row.problems
    assert row.written >= 4000 and row.lost == 0


@pytest.mark.parametrize("fault", [*JUDGE_FAULTS, "server SIGKILL"])
def test_judge_failures_are_retried_counted_and_never_mislabel(redis_url: str, fault: str) -> None:
    row = judge_faults(redis_url, fault)
    assert passed(row), row.problems
    assert row.details["mislabelled"] == 0 and row.details["labels"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before-add", "after-add"])
def test_redis_killed_in_a_cycle_then_the_rerun_completes(tmp_path: Path, when: str) -> None:
    row = redis_kill_in_cycle(tmp_path, when)
    assert passed(row), row.problems
    assert row.written > 0 and row.lost == 0


@pytest.mark.slow
def test_training_killed_mid_cycle_resumes_and_never_promotes_a_partial_checkpoint(tmp_path: Path) -> None:
    row = training_kill(tmp_path)
    assert passed(row), row.problems


@pytest.mark.slow
def test_a_cycle_dying_after_its_checkpoint_is_saved_can_be_rerun(tmp_path: Path) -> None:
    row = crash_after_save(tmp_path)
    assert passed(row), row.problems


@pytest.mark.slow
def test_two_cycles_started_at_once_exactly_one_trains(tmp_path: Path) -> None:
    row = concurrent_cycles(tmp_path)
    assert passed(row), row.problems
