"""Checkpoints: atomic HF-format save, lineage, crash safety, peft merge, secret refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from offline import checkpoint
from offline.checkpoint import (
    CheckpointRef,
    checkpoint_ref,
    code_version,
    is_complete,
    read_lineage,
    save_checkpoint,
)
from offline.demo_task import build_demo_tokenizer
from offline.secrets import find_secrets


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def tiny_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


LINEAGE = {
    "kind": "offline",
    "dataset_fingerprint": "abc123",
    "config": {"model": {"name_or_path": "demo:tiny"}, "judge": {"api_key": "**********"}},
    "parent": None,
    "seed": 7,
    "pair_ids_per_step": [["p1", "p2"], ["p3"]],
    "metrics": {"rewards/margins": 0.5},
}

IDS = torch.tensor([[4, 5, 6, 7, 8, 9]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_save_load_roundtrip_lineage_and_ref(tmp_path: Path, tokenizer):
    model = tiny_model(tokenizer)
    ref = save_checkpoint(model, tokenizer, tmp_path, "offline", LINEAGE)
    path = tmp_path / "offline"
    assert isinstance(ref, CheckpointRef) and ref.name == "offline" and Path(ref.path) == path.resolve()
    assert is_complete(path) and checkpoint_ref(path) == ref
    assert len(ref.id) == 16

    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(logits(loaded), logits(model))
    assert AutoTokenizer.from_pretrained(path).decode([4, 5]) == tokenizer.decode([4, 5])

    lineage = read_lineage(path)
    for key, value in LINEAGE.items():
        assert lineage[key] == value
    assert lineage["code_version"] == code_version() != "unknown" and lineage["created_at"]
    assert not list(tmp_path.glob(".*"))  # no temp dirs left behind


def test_refuses_overwrite_then_swaps(tmp_path: Path, tokenizer):
    first = save_checkpoint(tiny_model(tokenizer, 0), tokenizer, tmp_path, "c", LINEAGE)
    with pytest.raises(FileExistsError):
        save_checkpoint(tiny_model(tokenizer, 1), tokenizer, tmp_path, "c", LINEAGE)
    assert checkpoint_ref(tmp_path / "c") == first

    second_model = tiny_model(tokenizer, 1)
    second = save_checkpoint(second_model, tokenizer, tmp_path, "c", {**LINEAGE, "seed": 8}, overwrite=True)
    assert second.id != first.id and checkpoint_ref(tmp_path / "c") == second
    assert read_lineage(tmp_path / "c")["seed"] == 8
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    assert torch.equal(logits(loaded), logits(second_model))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_same_weights_same_id_and_parent_ref(tmp_path: Path, tokenizer):
    a = save_checkpoint(tiny_model(tokenizer, 3), tokenizer, tmp_path, "a", LINEAGE)
    b = save_checkpoint(tiny_model(tokenizer, 3), tokenizer, tmp_path, "b", {**LINEAGE, "parent": a})
    assert a.id == b.id and a.path != b.path
    assert read_lineage(b.path)["parent"] == {"id": a.id, "path": a.path, "name": "a"}


def test_crash_mid_write_leaves_nothing_visible(tmp_path: Path, tokenizer, monkeypatch):
    def crashing_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", crashing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tiny_model(tokenizer), tokenizer, tmp_path, "offline", LINEAGE)
    assert not (tmp_path / "offline").exists()
    assert not is_complete(tmp_path / "offline")
    assert list(tmp_path.iterdir()) == []


def test_crash_during_overwrite_keeps_old(tmp_path: Path, tokenizer, monkeypatch):
    old = save_checkpoint(tiny_model(tokenizer, 0), tokenizer, tmp_path, "c", LINEAGE)
    monkeypatch.setattr(checkpoint, "_weights_id", lambda d: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save_checkpoint(tiny_model(tokenizer, 1), tokenizer, tmp_path, "c", LINEAGE, overwrite=True)
    assert checkpoint_ref(tmp_path / "c") == old
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_killed_writer_leftover_is_cleaned_and_not_complete(tmp_path: Path, tokenizer):
    stale = tmp_path / ".offline.tmp-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert not is_complete(tmp_path / "offline")
    save_checkpoint(tiny_model(tokenizer), tokenizer, tmp_path, "offline", LINEAGE)
    assert not stale.exists() and is_complete(tmp_path / "offline")


def test_peft_model_is_saved_merged(tmp_path: Path, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model(tokenizer),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    expected = logits(model)
    save_checkpoint(model, tokenizer, tmp_path, "lora", {**LINEAGE, "kind": "cycle"})
    files = {p.name for p in (tmp_path / "lora").iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lora").eval()
    assert torch.allclose(logits(loaded), expected, atol=1e-5)
    # The live model keeps its adapter: merging happened on a copy.
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model), expected)


def test_refuses_secrets(tmp_path: Path, tokenizer):
    leaky = {**LINEAGE, "config": {"judge": {"api_key": "sk-live-abcdefghijklmnop"}}}
    with pytest.raises(ValueError, match=r"judge\.api_key"):
        save_checkpoint(tiny_model(tokenizer), tokenizer, tmp_path, "x", leaky)
    assert list(tmp_path.iterdir()) == []


def test_find_secrets_is_narrow():
    cfg = {
        "tokenizer": {"pad_token": "<pad>", "max_tokens": 5},
        "judge": {"api_key": None, "password": "**********", "headers": ["hf_abcdefghijklmnopqrstuvwx"]},
        "db": {"secret": "hunter2"},
    }
    assert find_secrets(cfg) == ["judge.headers[0]", "db.secret"]


def test_bad_name_and_missing(tmp_path: Path, tokenizer):
    with pytest.raises(ValueError):
        save_checkpoint(tiny_model(tokenizer), tokenizer, tmp_path, "../x", LINEAGE)
    with pytest.raises(ValueError):
        save_checkpoint(tiny_model(tokenizer), tokenizer, tmp_path, "ok", {"kind": "weird"})
    with pytest.raises(FileNotFoundError):
        checkpoint_ref(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        read_lineage(tmp_path / "nope")


def test_lineage_json_is_plain_json(tmp_path: Path, tokenizer):
    save_checkpoint(tiny_model(tokenizer), tokenizer, tmp_path, "j", {**LINEAGE, "cycle": 3})
    raw = json.loads((tmp_path / "j" / "lineage.json").read_text())
    assert raw["cycle"] == 3 and raw["kind"] == "offline"
