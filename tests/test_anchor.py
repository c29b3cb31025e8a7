"""The static anchor built from pi_0's own samples (online/anchor.py): which prompts it draws,
a real build with the tiny demo policy and its rule (categories the demo's static data does not
cover), reuse by key, and the errors that say what to fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _faults import demo_models_template
from offline.data import load_preference_dataset
from offline.demo_task import rule_reward
from online.anchor import ANCHOR_PATH, anchor_prompts, resolve_static_data
from online.config import AnchorConfig
from online.prompts import PromptPool
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_anchor_prompts_are_training_side_per_category_and_seeded():
    pool = PromptPool(train=tuple((f"a{i}", "a") for i in range(5)) + (("b0", "b"), ("c0", "c")),
                      heldout=(("a-held", "a"), ("b-held", "b")), source="test")
    picked = anchor_prompts(pool, AnchorConfig(categories=("a", "b"), prompts_per_category=3), seed=0)
    assert [c for _, c in picked] == ["a", "b", "a", "a"]  # b has one prompt only; interleaved
    assert {p for p, _ in picked} <= {p for p, _ in pool.train}  # never a held-out prompt
    assert picked == anchor_prompts(pool, AnchorConfig(categories=("a", "b"), prompts_per_category=3), seed=0)
    assert picked != anchor_prompts(pool, AnchorConfig(categories=("a", "b"), prompts_per_category=3), seed=1)
    with pytest.raises(ValueError, match=r"\['z'\] have no training-side prompt.*categories are \['a', 'b', 'c'\]"):
        anchor_prompts(pool, AnchorConfig(categories=("a", "z")), seed=0)


def demo_anchor_config(state: Path, **anchor):
    """The demo config with its static data built from pi_0's samples on two of the categories
    its own static data leaves out."""
    state.mkdir(parents=True, exist_ok=True)
    if not (state / "models").exists():
        shutil.copytree(demo_models_template(), state / "models")
    return load_config(ROOT / "configs" / "demo.yaml", {
        "state_dir": str(state), "data": {"path": ANCHOR_PATH},
        "online": {"anchor": {"categories": ["sort", "rotate"], "prompts_per_category": 12, "k": 4, **anchor}},
    })


def test_a_build_pairs_best_with_worst_of_pi0_samples_and_is_reused(tmp_path):
    cfg = demo_anchor_config(tmp_path / "state")
    data = resolve_static_data(cfg)
    path = Path(data.path)
    assert path.parent == tmp_path / "state" / "data" and path.name.startswith("anchor-") and data.format == "explicit"
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["prompts"] == 24 and info["samples"] == 96 and info["categories"] == ["sort", "rotate"]
    dataset = load_preference_dataset(data)
    pairs = dataset.pairs
    assert len(pairs) == info["pairs"] > 0 and {p.category for p in pairs} <= {"sort", "rotate"}
    # Labelled by the judge (the demo rule): the chosen sample scores higher, by the margin.
    for p in pairs:
        assert rule_reward(p.prompt, p.chosen) - rule_reward(p.prompt, p.rejected) >= cfg.online.judge.rule.min_margin
    # Built once: a second resolve reuses the file as it is (a static dataset from then on).
    stamp = path.stat().st_mtime_ns
    assert resolve_static_data(cfg).path == str(path) and path.stat().st_mtime_ns == stamp
    # Another setting is another build, under another name; the first file is left alone.
    other = resolve_static_data(demo_anchor_config(tmp_path / "state", k=3))
    assert other.path != str(path) and path.stat().st_mtime_ns == stamp


def test_other_paths_pass_through_and_a_missing_section_is_named(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"state_dir": str(tmp_path)})
    assert resolve_static_data(cfg).path.endswith("demo-pairs-n3000-s0.jsonl")  # demo:pairs, as before
    bare = load_config(ROOT / "configs" / "demo.yaml", {"state_dir": str(tmp_path), "data": {"path": ANCHOR_PATH}})
    with pytest.raises(ValueError, match="no online.anchor section"):
        resolve_static_data(bare)
