"""A policy's held-out evaluation samples are drawn once (`online.evaluate.EvalSampleCache`).

The cycles and the stages share one evaluation seed, so the current policy of cycle i+1 (cycle
i's candidate, or the policy cycle i started from) was sampled already: its samples are read
back, not generated again. Checked on the shrunk demo with a real Redis: which policies the
evaluation generator ran on, and that a cached entry is what sampling those weights again gives.
"""

from __future__ import annotations

from pathlib import Path

from _faults import locked_cycle, plain_inputs, prepare_state, small_overrides

import online.evaluate as evaluate
from buffer.store import ReplayBuffer
from offline.registry import PolicyRegistry
from offline.seeds import derive_seed
from online.cycle import load_current
from online.evaluate import EvalSampleCache, eval_sample_key, sample_eval
from online.prompts import load_prompt_pool
from online.types import Generation


def test_the_next_cycle_reads_its_current_policys_samples_instead_of_sampling_again(
    tmp_path: Path, redis_url: str, monkeypatch,
):
    cfg = prepare_state(tmp_path, small_overrides(tmp_path, redis_url))
    registry = PolicyRegistry(cfg.state_dir, cfg.name)
    initial = registry.current().checkpoint
    sampled: list[int] = []  # evaluation generator runs, by the number of prompts asked
    real_build = evaluate.build_generator

    def counting_build(*args, **kwargs):
        gen = real_build(*args, **kwargs)
        real_generate = gen.generate

        def generate(prompts, k, seed):
            sampled.append(len(prompts))
            return real_generate(prompts, k, seed)

        gen.generate = generate
        return gen

    monkeypatch.setattr(evaluate, "build_generator", counting_build)
    with ReplayBuffer.connect(cfg.buffer) as buf:
        first = locked_cycle(cfg, buf)
        assert first is not None and first.checkpoint is not None
        assert sampled == [24, 24]  # the initial policy (nothing cached yet), then the candidate
        second = locked_cycle(cfg, buf)
        assert second is not None and second.checkpoint is not None
    # Cycle 2 started from cycle 1's candidate when it was promoted, else from the initial
    # policy: sampled already either way, so only cycle 2's candidate ran the generator.
    assert sampled == [24, 24, 24]
    assert second.parent.id == (first.checkpoint.id if first.promoted else initial.id)
    assert second.before == (first.after if first.promoted else first.before)

    # What the cache holds for cycle 1's candidate is what sampling its checkpoint gives.
    inputs = plain_inputs(cfg)
    policy = load_current(inputs, first.checkpoint.path)
    prompts = list(load_prompt_pool(inputs.online.prompts, tokenizer=policy.tokenizer).heldout[:24])
    seed = derive_seed(cfg.seed, "eval")
    key = eval_sample_key(prompts, inputs.online.generation, inputs.online.eval_samples, seed)
    cached = EvalSampleCache(cfg.state_dir / "cache" / "eval-samples").get(first.checkpoint.id, key)
    assert cached is not None and len(cached) == 24
    assert all(len(g.responses) == inputs.online.eval_samples for g in cached)
    fresh = sample_eval(policy, prompts, inputs.online.generation, inputs.online.eval_samples, seed)
    assert [g.responses for g in fresh] == [g.responses for g in cached]


def test_a_cache_entry_is_keyed_by_everything_that_decides_the_samples(tmp_path: Path):
    from online.config import GenerationConfig

    prompts = [("p1", "a"), ("p2", "b")]
    gen = GenerationConfig(temperature=0.7, max_new_tokens=8)
    key = eval_sample_key(prompts, gen, 1, 5)
    assert eval_sample_key(list(prompts), GenerationConfig(temperature=0.7, max_new_tokens=8), 1, 5) == key
    others = [
        eval_sample_key(prompts[:1], gen, 1, 5), eval_sample_key([("p1", "b"), ("p2", "b")], gen, 1, 5),
        eval_sample_key(prompts, gen, 2, 5), eval_sample_key(prompts, gen, 1, 6),
        eval_sample_key(prompts, gen.model_copy(update={"temperature": 1.0}), 1, 5),
        eval_sample_key(prompts, gen.model_copy(update={"top_p": 0.9}), 1, 5),
        eval_sample_key(prompts, gen.model_copy(update={"max_new_tokens": 9}), 1, 5),
        eval_sample_key(prompts, gen.model_copy(update={"batch_size": 4}), 1, 5),
    ]
    assert key not in others and len(set(others)) == len(others)

    cache = EvalSampleCache(tmp_path / "eval")
    rows = [Generation(prompt="p1", category="a", responses=("x",), policy_version="eval")]
    assert cache.get("w1", key) is None
    cache.put("w1", key, rows)
    assert cache.get("w1", key) == rows and cache.get("w2", key) is None
    (tmp_path / "eval" / f"w1-{key}.json").write_text('[{"prompt": "p1"')  # torn: a miss, not an error
    assert cache.get("w1", key) is None
