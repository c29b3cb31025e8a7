"""offline/reference.py: the reference log-prob cache (hit, miss, invalidation, persistence) and
the LoRA reference (the policy with its adapter disabled == the base model)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from offline.logps import collate_pairs, sequence_logps
from offline.reference import ReferenceLogpCache, compute_reference_logps
from offline.tokenize import TokenizedPair
from offline.train import train
from offline.config import TrainConfig

torch.set_num_threads(1)  # tiny matmuls: extra threads only add sync cost on a shared CPU


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
    ))


def pairs(n: int, offset: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(7)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, 64, (k,), generator=g).tolist())

    out = [TokenizedPair(f"p{i}", None, ids(2 + i % 4), ids(1 + i % 3) + (2,), ids(2) + (2,), False)
           for i in range(n + offset)]
    return out[offset:]


class CountingForwards:
    """Counts rows put through the transformer body (a forward hook on it); a tiny Llama uses
    sdpa, so each pair is one row (shared-prompt layout)."""

    def __init__(self, model) -> None:
        self.rows = 0
        model.model.register_forward_hook(lambda mod, args, kwargs, out: self._add(kwargs), with_kwargs=True)

    def _add(self, kwargs) -> None:
        self.rows += kwargs["input_ids"].shape[0]


def test_fills_only_missing_pairs_and_persists(tmp_path: Path) -> None:
    model = tiny_model()
    counter = CountingForwards(model)
    cache = ReferenceLogpCache(tmp_path)
    first = compute_reference_logps(model, pairs(6), "ref-a", cache, batch_size=4, progress=False)
    assert counter.rows == 6 and len(first) == 6  # each pair once

    more = compute_reference_logps(model, pairs(4, offset=4), "ref-a", cache, batch_size=4, progress=False)
    assert counter.rows == 6 + 2  # only p6, p7 were missing
    assert more["p4"] == first["p4"] and set(more) == {"p4", "p5", "p6", "p7"}

    reopened = ReferenceLogpCache(tmp_path)  # a new process reads the file
    again = compute_reference_logps(model, pairs(8), "ref-a", reopened, batch_size=4, progress=False)
    assert counter.rows == 8 and again == {**first, **more}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left

    # values equal a direct forward of the model
    batch = collate_pairs(pairs(8), 0)
    with torch.no_grad():
        direct = sequence_logps(model.eval(), batch).chunk(2)
    for i, p in enumerate(pairs(8)):
        assert again[p.pair_id] == pytest.approx((direct[0][i].item(), direct[1][i].item()), abs=1e-5)


def test_other_reference_id_or_retokenised_pair_is_a_miss(tmp_path: Path) -> None:
    model = tiny_model()
    counter = CountingForwards(model)
    cache = ReferenceLogpCache(tmp_path)
    compute_reference_logps(model, pairs(3), "ref-a", cache, batch_size=8, progress=False)
    other = tiny_model(seed=1)
    counter_b = CountingForwards(other)
    b = compute_reference_logps(other, pairs(3), "ref-b/step-2", cache, batch_size=8, progress=False)
    assert counter_b.rows == 3  # new reference: everything recomputed
    assert cache.get("ref-a", pairs(3)[0]) != b["p0"]
    assert len(list(tmp_path.glob("reference-logps-*.json"))) == 2

    p0 = pairs(1)[0]
    shorter = TokenizedPair(p0.pair_id, None, p0.prompt_ids[1:], p0.chosen_ids, p0.rejected_ids, True)
    assert cache.get("ref-a", shorter) is None  # same pair id, other tokens (e.g. new max_length)
    compute_reference_logps(model, [shorter], "ref-a", cache, batch_size=8, progress=False)
    assert counter.rows == 3 + 1


def test_cache_file_is_plain_json(tmp_path: Path) -> None:
    cache = ReferenceLogpCache(tmp_path)
    p = pairs(1)[0]
    cache.put("r", p, -1.25, -3.5)
    cache.save()
    (path,) = tmp_path.iterdir()
    data = json.loads(path.read_text())
    assert data["reference_id"] == "r" and data["entries"]["p0"][:2] == [-1.25, -3.5]
    assert ReferenceLogpCache(tmp_path).get("r", p) == (-1.25, -3.5)


def test_lora_reference_is_the_base_model() -> None:
    """The peft policy with its adapter disabled scores exactly like the base model, while the
    adapter (given non-zero weights) changes the policy's log-probs."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model()
    base_copy = copy.deepcopy(base)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ps = pairs(5)
    ref = compute_reference_logps(policy, ps, "base", ReferenceLogpCache(None), batch_size=8, progress=False)
    batch = collate_pairs(ps, 0)
    with torch.no_grad():
        expected = sequence_logps(base_copy, batch).chunk(2)
        with_adapter = sequence_logps(policy, batch).chunk(2)
    for i, p in enumerate(ps):
        assert ref[p.pair_id] == pytest.approx((expected[0][i].item(), expected[1][i].item()), abs=1e-5)
    assert (with_adapter[0] - expected[0]).abs().max() > 1e-3

    # and the loop trains only the adapter, with the same policy as its live reference
    before = {n: p.clone() for n, p in policy.named_parameters()}
    result = train(policy, ps, None, TrainConfig(learning_rate=1e-2, batch_size=5), pad_token_id=0,
                   progress=False, reference_model=policy)
    assert result.steps == 1
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
