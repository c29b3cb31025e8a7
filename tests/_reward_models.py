"""Tiny real reward models built in-process (no downloads), for the reward-model judge's audit.

`save_reward_model(path, direction)` writes a one-layer `LlamaForSequenceClassification` (one
label) and a word-level tokenizer over `WORDS` in the `save_pretrained` layout that
`online.judge_local.RewardModelJudge` loads.

- `direction=+1.0` (the "marker" model): reward > 0 when the text's last token is GOOD, < 0
  when it is meh, rising with the digit when it is a digit (below GOOD, above meh), 0 for any
  other last token. Built, not trained: attention's output projection and the MLP's down
  projection are zeroed, so the residual stream at each position is that token's embedding;
  RMSNorm rescales it without changing its sign; the score head reads embedding component 0,
  which is +1 for GOOD, -1 for meh, (d - 4.5) / 10 for digit d and 0 for every other token. A
  judge with it agrees with humans who chose the "... GOOD" reply over the "... meh" one on
  every pair, and still ranks a policy's digit replies (so a cycle gets labels).
- `direction=-1.0`: the same model with the score head negated: it disagrees on every pair.
- `direction=None`: random weights (seeded): scores that depend on the whole text in no
  designed way, for checking the audit's counts against scores computed independently.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

WORDS = "[PAD] [UNK] [EOS] question answer is GOOD meh fine ? . 0 1 2 3 4 5 6 7 8 9".split()


def save_reward_model(path: Path, direction: float | None = 1.0, seed: int = 0) -> Path:
    """Write the reward model described in the module docstring to `path` (returned)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "question 3?answer" -> question, 3, ?, answer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config)
    if direction is not None:
        with torch.no_grad():
            layer = model.model.layers[0]
            layer.self_attn.o_proj.weight.zero_()  # attention adds nothing to the residual stream
            layer.mlp.down_proj.weight.zero_()  # nor does the MLP: hidden state = token embedding
            emb = model.model.embed_tokens.weight  # (V, H)
            emb[:, 0] = 0.0
            emb[WORDS.index("GOOD"), 0] = 1.0
            emb[WORDS.index("meh"), 0] = -1.0
            for d in range(10):
                emb[WORDS.index(str(d)), 0] = (d - 4.5) / 10
            model.score.weight.zero_()  # (1, H)
            model.score.weight[0, 0] = direction
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
