"""The demo task: rule judge, pairs, dataset file, tokenizer, and the cached tiny policy."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from offline.demo_task import (
    CATEGORIES,
    COVERED_CATEGORIES,
    HELDOUT_CATEGORIES,
    DemoPolicySettings,
    build_demo_policy,
    build_demo_tokenizer,
    demo_dataset_path,
    write_demo_dataset,
    demo_prompts,
    expected_answer,
    make_demo_pairs,
    mean_rule_reward,
    parse_prompt,
    rule_reward,
    sample_responses,
)
from offline.tokenize import tokenize_pairs

# A few SFT steps: enough to exercise build/save/load/cache, fast enough for the unit suite.
FAST = DemoPolicySettings(sft_steps=20)


def test_categories_split():
    assert set(COVERED_CATEGORIES).isdisjoint(HELDOUT_CATEGORIES)
    assert set(CATEGORIES) == set(COVERED_CATEGORIES) | set(HELDOUT_CATEGORIES) and len(CATEGORIES) == 6


@pytest.mark.parametrize(
    "category, expected",
    [
        ("copy", [4, 1, 3, 9]),
        ("reverse", [9, 3, 1, 4]),
        ("increment", [5, 2, 4, 0]),
        ("sort", [1, 3, 4, 9]),
        ("rotate", [1, 3, 9, 4]),
        ("double", [8, 2, 6, 8]),
    ],
)
def test_expected_answers(category, expected):
    assert expected_answer(category, [4, 1, 3, 9]) == expected


def test_rule_reward():
    p = "reverse : 4 1 3 ="
    assert rule_reward(p, "3 1 4") == 1.0
    assert rule_reward(p, " 3 1 4 ") == 1.0
    assert rule_reward(p, "3 1 5") == pytest.approx(2 / 3)
    assert rule_reward(p, "3 1") == pytest.approx(2 / 3)  # missing digit costs
    assert rule_reward(p, "3 1 4 4") == pytest.approx(3 / 4)  # extra digit costs
    assert rule_reward(p, "3 1 4 <eos> 7 7") == 1.0  # nothing after EOS counts
    assert rule_reward(p, "") == 0.0
    assert rule_reward(p, "x y z") == 0.0
    for bad in ["reverse 4 1 3 =", "juggle : 1 2 3 =", "copy : 12 3 =", "copy : ="]:
        with pytest.raises(ValueError):
            rule_reward(bad, "1 2 3")


def test_rule_reward_is_importable_by_path():
    import importlib

    module, func = "offline.demo_task:rule_reward".split(":")
    assert getattr(importlib.import_module(module), func) is rule_reward


def test_make_demo_pairs_deterministic_and_valid():
    pairs = make_demo_pairs(90, COVERED_CATEGORIES, seed=3)
    assert pairs == make_demo_pairs(90, COVERED_CATEGORIES, seed=3)
    assert pairs != make_demo_pairs(90, COVERED_CATEGORIES, seed=4)
    assert {p.category for p in pairs} == set(COVERED_CATEGORIES)
    assert len({p.id for p in pairs}) == 90
    for p in pairs:
        category, digits = parse_prompt(p.prompt)
        assert category == p.category and 3 <= len(digits) <= 5
        assert rule_reward(p.prompt, p.chosen) == 1.0
        wrong = sum(a != b for a, b in zip(p.chosen.split(), p.rejected.split()))
        assert len(p.rejected.split()) == len(p.chosen.split()) and 1 <= wrong <= 2
    with pytest.raises(ValueError):
        make_demo_pairs(3, ["juggle"])


def test_demo_dataset_file(tmp_path: Path):
    path = demo_dataset_path(tmp_path, n=30, seed=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 30 and set(rows[0]) == {"prompt", "chosen", "rejected", "category", "id"}
    assert {r["category"] for r in rows} <= set(COVERED_CATEGORIES)
    mtime = path.stat().st_mtime_ns
    assert demo_dataset_path(tmp_path, n=30, seed=1) == path and path.stat().st_mtime_ns == mtime
    assert [p.prompt for p in make_demo_pairs(30, COVERED_CATEGORIES, 1)] == [r["prompt"] for r in rows]


def test_demo_dataset_written_by_racing_processes_is_whole(tmp_path: Path):
    """Two cycles that both find the dataset missing write it at once (found by the fault
    suite: a shared temp name made one of them fail)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=write_demo_dataset, args=(tmp_path / "d.jsonl", 2000, 1)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert len(rows) == 2000
    assert list(tmp_path.iterdir()) == [tmp_path / "d.jsonl"]  # no temp file left behind


def test_demo_prompts():
    prompts = demo_prompts(HELDOUT_CATEGORIES, n=12, seed=0)
    assert prompts == demo_prompts(HELDOUT_CATEGORIES, n=12, seed=0)
    assert [c for _, c in prompts] == list(HELDOUT_CATEGORIES) * 4
    assert all(parse_prompt(p)[0] == c for p, c in prompts)


def test_tokenizer_roundtrip_and_template():
    tok = build_demo_tokenizer()
    ids = tok("sort : 4 1 3 =", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == 6
    assert tok.decode(tok("4 1 3", add_special_tokens=False)["input_ids"]) == "4 1 3"
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "sort : 4 1 3 ="
    assert tok.pad_token and tok.eos_token and tok.bos_token and tok.unk_token
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    prompt = "copy : 1 2 3 ="
    msgs = [{"role": "user", "content": prompt}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt
    turn = msgs + [{"role": "assistant", "content": "1 2 3"}]
    assert tok.apply_chat_template(turn, tokenize=False) == "copy : 1 2 3 = 1 2 3 <eos>"


def test_pairs_tokenize_without_unknowns():
    tok = build_demo_tokenizer()
    tps = tokenize_pairs(make_demo_pairs(30, CATEGORIES, 0), tok, max_length=32, max_prompt_length=16)
    assert not any(tp.truncated for tp in tps)
    assert all(tok.unk_token_id not in tp.prompt_ids + tp.chosen_ids + tp.rejected_ids for tp in tps)


def test_build_is_cached_and_loadable(tmp_path: Path):
    rng_before = torch.get_rng_state()
    path = build_demo_policy(tmp_path, seed=0, progress=False, settings=FAST)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert path.parent == tmp_path / "models" and path.name.startswith("demo-tiny-")
    t0 = time.perf_counter()
    assert build_demo_policy(tmp_path, seed=0, progress=False, settings=FAST) == path
    assert time.perf_counter() - t0 < 0.1
    assert FAST.key(1) != FAST.key(0) and dataclasses.replace(FAST, sft_steps=21).key(0) != FAST.key(0)
    assert not list((tmp_path / "models").glob(".*"))

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) and tok.decode([tok.convert_tokens_to_ids("7")]) == "7"
    assert tok.chat_template
    info = json.loads((path / "demo_task.json").read_text())
    assert info["settings"]["sft_steps"] == 20 and info["covered"] == list(COVERED_CATEGORIES)

    prompts = demo_prompts(CATEGORIES, n=12, seed=0)
    samples = sample_responses(model, tok, [p for p, _ in prompts], n_samples=2, temperature=1.0, seed=0)
    assert len(samples) == 12 and all(len(s) == 2 for s in samples)
    assert samples == sample_responses(model, tok, [p for p, _ in prompts], 2, 1.0, seed=0)
    rewards = mean_rule_reward(model, tok, prompts, n_samples=2, temperature=1.0, seed=0)
    assert set(rewards) == set(CATEGORIES) and all(0.0 <= r <= 1.0 for r in rewards.values())
    assert tok.padding_side == "left" and not model.training


@pytest.mark.slow
def test_default_policy_is_imperfect_but_well_formed(tmp_path_factory):
    """The full default build (~20 s): greedy is mostly right, samples are often wrong."""
    path = build_demo_policy(tmp_path_factory.mktemp("state"), progress=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = demo_prompts(CATEGORIES, n=120, seed=1)
    sampled = mean_rule_reward(model, tok, prompts, n_samples=4, temperature=1.0, seed=0)
    greedy = mean_rule_reward(model, tok, prompts, n_samples=1, temperature=0.0)
    for c in CATEGORIES:
        assert 0.5 <= sampled[c] <= 0.9, (c, sampled)
        assert greedy[c] >= 0.85, (c, greedy)
    outputs = sample_responses(model, tok, [p for p, _ in prompts], 1, 1.0)
    assert all(all(t.isdigit() for t in o[0].split()) for o in outputs)
