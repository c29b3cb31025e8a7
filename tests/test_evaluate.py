"""offline/evaluate.py against a hand-constructed case.

The reference log-probs are built from the policy's own log-probs minus chosen offsets, so the
implicit rewards are known by hand: with ref_c = pc - a and ref_r = pr - b,
margin = beta * ((pc - ref_c) - (pr - ref_r)) = beta * (a - b).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from offline.evaluate import evaluate_preferences
from offline.logps import collate_pairs, sequence_logps
from offline.tokenize import TokenizedPair

torch.set_num_threads(1)  # tiny matmuls: extra threads only add sync cost on a shared CPU


def test_accuracy_and_margins_by_hand() -> None:
    """beta = 0.5, offsets (a, b) per pair and the margin 0.5 * (a - b):
      p0 math  (2, 0) -> +1.0   right
      p1 math  (0, 1) -> -0.5   wrong
      p2 code  (3, 1) -> +1.0   right
      p3 code  (1, 1.5) -> -0.25 wrong
      p4 none  (0, 4) -> -2.0   wrong
    accuracy 2/5 = 0.4, mean margin (1 - 0.5 + 1 - 0.25 - 2)/5 = -0.15;
    math: 1/2, mean 0.25; code: 1/2, mean 0.375; uncategorized: 0/1, mean -2."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
    ))
    g = torch.Generator().manual_seed(4)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, 64, (k,), generator=g).tolist())

    cats = ["math", "math", "code", "code", None]
    pairs = [TokenizedPair(f"p{i}", c, ids(2 + i), ids(1 + i % 2) + (2,), ids(3) + (2,), False)
             for i, c in enumerate(cats)]
    offsets = [(2, 0), (0, 1), (3, 1), (1, 1.5), (0, 4)]
    with torch.no_grad():
        # scored one pair at a time: the evaluation's own batching must not matter
        own = [sequence_logps(model, collate_pairs([p], 0)).tolist() for p in pairs]
    reference = {p.pair_id: (pc - a, pr - b) for p, (pc, pr), (a, b) in zip(pairs, own, offsets)}

    result = evaluate_preferences(model, pairs, reference, beta=0.5, pad_token_id=0, batch_size=2)
    assert result.n == 5 and result.accuracy == pytest.approx(0.4)
    assert result.mean_margin == pytest.approx(-0.15, abs=1e-5)
    assert set(result.per_category) == {"math", "code", "uncategorized"}
    math_, code, none = (result.per_category[k] for k in ("math", "code", "uncategorized"))
    assert (math_.n, math_.accuracy, math_.mean_margin) == (2, 0.5, pytest.approx(0.25, abs=1e-5))
    assert (code.n, code.accuracy) == (2, 0.5) and code.mean_margin == pytest.approx(0.375, abs=1e-5)
    assert (none.n, none.accuracy) == (1, 0.0) and none.mean_margin == pytest.approx(-2.0, abs=1e-5)
    assert model.training  # mode restored


def test_missing_reference_is_an_error() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=16))
    pair = TokenizedPair("x", None, (3,), (4, 2), (5, 2), False)
    with pytest.raises(ValueError, match="lacks 1 of 1"):
        evaluate_preferences(model, [pair], {}, beta=0.1, pad_token_id=0)
