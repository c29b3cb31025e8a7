"""Pairs -> token ids, with one truncation rule shared by training, evaluation and coverage.

Rule (the usual DPO one): the prompt keeps its last `max_prompt_length` tokens (the end of a
dialogue matters most); each response is cut so that prompt + response + EOS fits in
`max_length`. EOS is appended to both responses so the model learns where to stop.
`kept_lengths` states the rule on lengths (ints or arrays); `truncate` applies it to one list.

Tokenising is batched: `encode_batch` makes one call of the fast tokenizer for a batch of
pairs (`tokenizer(texts)`: the Rust tokenizer runs the batch on every core) and applies the
rule to the whole batch with array operations, returning flat int32 ids for a
`offline.token_store.StoreBuilder`. `tokenize_pairs` does that for a list of pairs in memory;
`offline.tokenized` streams a whole dataset through it into an on-disk, cached store.
`tokenizer_identity` names what decides the ids (the cache key's tokenizer part).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from offline.pairs import PreferencePair
from offline.token_store import StoreBuilder, TokenizedPair, TokenizedPairs

__all__ = [
    "BATCH_PAIRS", "EncodedBatch", "TokenizedPair", "TokenizedPairs", "check_limits", "encode_batch",
    "kept_lengths", "tokenize_pairs", "tokenizer_identity", "truncate",
]

BATCH_PAIRS = 1024
"""Pairs per tokenizer call: enough texts (3 a pair) for the Rust side to use every core, few
enough that one batch's Python lists of ids stay small (~15 MB at 400 tokens a pair)."""


@dataclass(frozen=True)
class KeptLengths:
    """What the truncation rule keeps of prompts and responses (ints, or arrays of one shape)."""

    prompt: Any  # tokens kept of the prompt (its last ones)
    chosen: Any  # tokens of chosen + EOS kept (its first ones)
    rejected: Any
    prompt_cut: Any  # the prompt lost its first tokens
    response_cut: Any  # chosen or rejected (EOS included) lost its last tokens

    @property
    def truncated(self) -> Any:
        return self.prompt_cut | self.response_cut


def kept_lengths(
    prompt_len: Any, chosen_len: Any, rejected_len: Any, max_length: int, max_prompt_length: int
) -> KeptLengths:
    """The truncation rule on raw lengths (no EOS yet); ints or numpy arrays alike."""
    prompt = np.minimum(prompt_len, max_prompt_length)
    room = max_length - prompt  # >= 1 whenever max_prompt_length < max_length
    keep = np.maximum(room, 1)  # a response keeps at least its first token
    return KeptLengths(
        prompt=prompt,
        chosen=np.minimum(chosen_len + 1, keep),
        rejected=np.minimum(rejected_len + 1, keep),
        prompt_cut=np.asarray(prompt_len) > max_prompt_length,
        response_cut=(np.asarray(chosen_len) + 1 > room) | (np.asarray(rejected_len) + 1 > room),
    )


def truncate(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    eos_id: int,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[int], list[int], bool]:
    """Apply the truncation rule to one prompt/response; returns (prompt, response+eos, truncated)."""
    kept = kept_lengths(len(prompt_ids), len(response_ids), len(response_ids), max_length, max_prompt_length)
    n_prompt, n_response = int(kept.prompt), int(kept.chosen)
    prompt = list(prompt_ids)[len(prompt_ids) - n_prompt :]
    response = (list(response_ids) + [eos_id])[:n_response]
    return prompt, response, bool(kept.truncated)


def check_limits(tokenizer: Any, max_length: int, max_prompt_length: int) -> int:
    """The tokenizer's EOS id, after checking the limits leave room for a response."""
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token: set one before training")
    return int(eos_id)


def _plain_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a fast tokenizer when calling it directly gives exactly
    `tokenizer(texts, add_special_tokens=False)["input_ids"]`, else None.

    transformers' wrapper turns every `Encoding` into Python lists of all its fields (ids,
    attention mask, type ids, ...), ~40% of the tokenizer's own time on 400-token texts; only
    the ids are needed. Direct calls are safe when the backend would not truncate or pad (the
    wrapper switches both off for such a call) and special tokens in the text stay whole.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if getattr(tokenizer, "split_special_tokens", False) or getattr(backend, "encode_special_tokens", False):
        return None
    return backend


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`: one batched call (the fast
    tokenizer runs a batch on every core), straight to its Rust backend when that is the same."""
    if not texts:
        return []
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    return tokenizer(
        list(texts), add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
    """`token_ids` of `texts` and their lengths `(len(texts),)`."""
    ids = token_ids(tokenizer, texts)
    return ids, np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))


@dataclass(frozen=True)
class EncodedBatch:
    """B pairs after tokenising and truncating: kept ids back to back plus per-pair lengths."""

    tokens: np.ndarray  # (sum of lengths,) int32, pair by pair: prompt | chosen+EOS | rejected+EOS
    lengths: np.ndarray  # (B, 3) kept lengths
    raw_lengths: np.ndarray  # (B, 3) lengths before truncation (no EOS)
    truncated: np.ndarray  # (B,) bool


def encode_batch(
    tokenizer: Any, triples: Sequence[tuple[str, str, str]], eos_id: int, max_length: int,
    max_prompt_length: int,
) -> EncodedBatch:
    """Tokenise B (prompt, chosen, rejected) triples in one tokenizer call and truncate them.

    Each text is tokenised alone, as before: the prompt once, each response once.
    """
    ids, raw = token_lengths(tokenizer, [t for triple in triples for t in triple])
    raw = raw.reshape(-1, 3)  # (B, 3)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(raw.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= 2**31):
        raise ValueError("token ids must fit in int32")
    kept = kept_lengths(raw[:, 0], raw[:, 1], raw[:, 2], max_length, max_prompt_length)
    lengths = np.stack([kept.prompt, kept.chosen, kept.rejected], axis=1).reshape(-1)  # (3B,)
    raw_flat = raw.reshape(-1)  # (3B,) segments in text order
    src_start = np.cumsum(raw_flat) - raw_flat  # where each text starts in `flat`
    # the prompt keeps its end, the responses their start (then EOS when it fits)
    copy = np.minimum(lengths, raw_flat)  # tokens taken from the text itself
    src_start = src_start + np.where(np.arange(len(raw_flat)) % 3 == 0, raw_flat - copy, 0)
    out_start = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.int32)
    # ragged copy: position j of segment s goes from src_start[s] + j to out_start[s] + j
    within = np.arange(int(copy.sum())) - np.repeat(np.cumsum(copy) - copy, copy)
    out[np.repeat(out_start, copy) + within] = flat[np.repeat(src_start, copy) + within]
    eos = lengths > copy  # only responses: the prompt never gets one
    out[(out_start + copy)[eos]] = eos_id
    return EncodedBatch(
        tokens=out, lengths=lengths.reshape(-1, 3), raw_lengths=raw, truncated=np.asarray(kept.truncated)
    )


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
) -> TokenizedPairs:
    """Tokenise pairs without special tokens (the prompt text already carries any template),
    in batched tokenizer calls, into an in-memory store (`offline.tokenized` caches on disk)."""
    eos_id = check_limits(tokenizer, max_length, max_prompt_length)
    builder = StoreBuilder()
    for start in range(0, len(pairs), BATCH_PAIRS):
        batch = pairs[start : start + BATCH_PAIRS]
        enc = encode_batch(tokenizer, [(p.prompt, p.chosen, p.rejected) for p in batch], eos_id,
                           max_length, max_prompt_length)
        builder.append(enc.tokens, enc.lengths, enc.raw_lengths, enc.truncated,
                       [p.content_id for p in batch], [p.category for p in batch])
    return TokenizedPairs(builder.finish())


def tokenizer_identity(tokenizer: Any) -> dict[str, str]:
    """`{"name", "id"}`: the tokenizer's name (for people) and a 32-hex hash of everything that
    decides its ids and its chat renders (for cache keys).

    The id hashes the fast tokenizer's full definition (vocab, merges, normaliser,
    pre-tokeniser, added tokens; `backend_tokenizer.to_str()`), or a slow one's vocabulary, plus
    the chat template, the special tokens and the EOS id. The name is not hashed: the same
    tokenizer saved into every checkpoint directory has a new path each time but the same ids.
    """
    h = hashlib.sha256(b"tether-tokenizer-v1\n")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return {"name": str(name), "id": h.hexdigest()[:32]}
