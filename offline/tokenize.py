"""Pairs -> token ids, with one truncation rule shared by training, evaluation and coverage.

Rule (the usual DPO one): the prompt keeps its last `max_prompt_length` tokens (the end of a
dialogue matters most); each response is cut so that prompt + response + EOS fits in
`max_length`. EOS is appended to both responses so the model learns where to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from offline.pairs import PreferencePair


@dataclass(frozen=True, slots=True)
class TokenizedPair:
    """Token ids of one pair; responses include the trailing EOS (when it fits)."""

    pair_id: str
    category: str | None
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    truncated: bool

    @property
    def n_tokens(self) -> int:
        """Tokens the pair puts through the model (prompt counted once per response)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def truncate(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    eos_id: int,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[int], list[int], bool]:
    """Apply the truncation rule to one prompt/response; returns (prompt, response+eos, truncated)."""
    prompt = list(prompt_ids)
    truncated = False
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        truncated = True
    response = list(response_ids) + [eos_id]
    room = max_length - len(prompt)
    if len(response) > room:
        response = response[: max(room, 1)]
        truncated = True
    return prompt, response, truncated


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
) -> list[TokenizedPair]:
    """Tokenise pairs without special tokens (the prompt text already carries any template)."""
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token: set one before training")
    texts = [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out: list[TokenizedPair] = []
    for i, pair in enumerate(pairs):
        p_ids, c_ids, r_ids = ids[3 * i], ids[3 * i + 1], ids[3 * i + 2]
        prompt, chosen, t1 = truncate(p_ids, c_ids, eos_id, max_length, max_prompt_length)
        _, rejected, t2 = truncate(p_ids, r_ids, eos_id, max_length, max_prompt_length)
        out.append(
            TokenizedPair(
                pair_id=pair.content_id,
                category=pair.category,
                prompt_ids=tuple(prompt),
                chosen_ids=tuple(chosen),
                rejected_ids=tuple(rejected),
                truncated=t1 or t2,
            )
        )
    return out
