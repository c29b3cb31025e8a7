"""Reference log-probs: computed once per (reference, pair), cached on disk, reused every epoch.

Contract: `ReferenceLogpCache(directory)` maps (reference_id, pair_id) -> (chosen_logp,
rejected_logp) as Python floats. Each reference has its own JSON file under `directory`, written
atomically (`offline.atomic`), so a kill never leaves a torn cache; a different
`reference_id` never sees another reference's values. Each entry also stores a digest of the pair's
token ids, so a pair re-tokenised differently (other `max_length`, other tokenizer) is a miss,
not a stale hit. `directory=None` keeps the cache in memory only.

`compute_reference_logps(model, tokenized_pairs, reference_id, cache, ...)` runs the reference
forward only for the pairs the cache lacks and returns values for all pairs. With LoRA the
reference is the policy with its adapter disabled (`model.disable_adapter()`, detected for peft
models), so no second copy of the weights is loaded; `reference_context` overrides that.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from offline.atomic import atomic_write_json
from offline.logps import (
    AutocastDtype,
    PreferenceBatch,
    autocast,
    collate_pairs,
    resolve_autocast,
    sequence_logps,
    supports_shared_prompt,
)
from offline.token_store import TokenizedPairs, pair_ids, pair_lengths
from offline.tokenize import TokenizedPair

if TYPE_CHECKING:
    from offline.models import LoadedPolicy

log = logging.getLogger(__name__)

_FORMAT = 1
# Persist after this many batches too, so a long reference pass killed midway keeps its work.
_SAVE_EVERY_BATCHES = 50


def token_digest(pair: TokenizedPair) -> str:
    """16-hex-digit hash of a pair's token ids (what the log-probs actually depend on)."""
    blob = json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ReferenceLogpCache:
    """(reference_id, pair_id) -> (chosen_logp, rejected_logp), one atomic JSON file per reference."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        # reference_id -> pair_id -> (chosen, rejected, token digest)
        self._entries: dict[str, dict[str, tuple[float, float, str]]] = {}
        self._dirty: set[str] = set()

    def path(self, reference_id: str) -> Path | None:
        """The file holding `reference_id`'s values (named by a hash: ids may contain '/')."""
        if self.directory is None:
            return None
        name = hashlib.sha256(reference_id.encode()).hexdigest()[:24]
        return self.directory / f"reference-logps-{name}.json"

    def _load(self, reference_id: str) -> dict[str, tuple[float, float, str]]:
        if reference_id in self._entries:
            return self._entries[reference_id]
        entries: dict[str, tuple[float, float, str]] = {}
        path = self.path(reference_id)
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            if data.get("format") != _FORMAT or data.get("reference_id") != reference_id:
                raise ValueError(f"{path} is not a reference log-prob cache for {reference_id!r}; delete it")
            entries = {k: (float(c), float(r), str(d)) for k, (c, r, d) in data["entries"].items()}
        self._entries[reference_id] = entries
        return entries

    def get(self, reference_id: str, pair: TokenizedPair) -> tuple[float, float] | None:
        """Cached values for `pair` under `reference_id`, or None (absent or tokenised differently)."""
        hit = self._load(reference_id).get(pair.pair_id)
        if hit is None or hit[2] != token_digest(pair):
            return None
        return hit[0], hit[1]

    def put(self, reference_id: str, pair: TokenizedPair, chosen: float, rejected: float) -> None:
        self._load(reference_id)[pair.pair_id] = (float(chosen), float(rejected), token_digest(pair))
        self._dirty.add(reference_id)

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def save(self) -> None:
        """Write every changed reference's file atomically (no-op in memory-only mode)."""
        if self.directory is None:
            self._dirty.clear()
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for reference_id in sorted(self._dirty):
            entries = self._entries[reference_id]
            payload = {
                "format": _FORMAT,
                "reference_id": reference_id,
                # json writes floats with repr, which round-trips float64 exactly
                "entries": {k: [c, r, d] for k, (c, r, d) in entries.items()},
            }
            atomic_write_json(self.path(reference_id), payload, separators=(",", ":"))
        self._dirty.clear()


def precision_id(
    reference_id: str, autocast_dtype: torch.dtype | None, weights_dtype: torch.dtype = torch.float32
) -> str:
    """The cache key of a reference scored in `autocast_dtype` with weights stored in
    `weights_dtype`: log-probs computed in bf16 on a GPU, or by a bf16-stored LoRA base, must not
    be reused by a float32 run (or the other way round). fp32 storage adds nothing to the key."""
    key = reference_id if autocast_dtype is None else f"{reference_id}@{str(autocast_dtype).removeprefix('torch.')}"
    return key if weights_dtype == torch.float32 else f"{key}+w:{str(weights_dtype).removeprefix('torch.')}"


def reference_id_of(
    model_dir: Path, autocast_dtype: torch.dtype | None, weights_dtype: torch.dtype = torch.float32
) -> str:
    """The reference's cache key: the content id of the checkpoint it is loaded from, and the
    precision its log-probs are computed in (`precision_id`)."""
    from offline.checkpoint import model_id

    return precision_id(model_id(model_dir), autocast_dtype, weights_dtype)


def ensure_reference_logps(
    policy: LoadedPolicy,
    pairs: Sequence[TokenizedPair],
    reference_dir: Path,
    cache_dir: Path | None,
    batch_size: int,
    progress: bool = True,
    *,
    num_processes: int = 1,
    accelerate_config: str | None = None,
) -> dict[str, tuple[float, float]]:
    """pi_0's log-probs for `pairs`, computed once per (reference, precision, pair) and cached.

    The one place reference log-probs come from, for the offline phase and every cycle alike.
    `reference_dir` is pi_0 (the cache key is its content id and the policy's precision). With
    LoRA the reference is the policy with its adapter disabled, no second copy; that base must
    BE pi_0 (`policy.base_dir == reference_dir`), else the values would be the parent's and the
    KL budget would drift with every cycle, so a mismatch is an error. For full fine-tuning a
    frozen copy of pi_0 is loaded only when some pair is missing from the cache, then freed.

    With `num_processes > 1` the missing pairs are computed by a launched job of that many ranks
    (`offline.launch.launch_reference`: each rank takes every N-th of the batches this process
    would run, the values are gathered on rank 0) and this process caches them, the one writer.
    """
    reference_id = reference_id_of(reference_dir, policy.autocast_dtype, policy.reference_dtype)
    cache = ReferenceLogpCache(cache_dir)
    pad = policy.tokenizer.pad_token_id
    missing = [p for p in pairs if cache.get(reference_id, p) is None]
    kw = dict(progress=progress, pad_token_id=pad, autocast_dtype=policy.autocast_dtype)
    if missing and policy.reference is not None and not policy.reference_runs(reference_dir):
        raise ValueError(
            f"the LoRA policy's base ({policy.base_dir}) is not the reference {reference_dir}: "
            "its adapter-disabled log-probs would not be pi_0's"
        )
    if missing and num_processes > 1:
        from offline.launch import launch_reference  # the launched (multi-process) path

        values = launch_reference(
            policy, missing, reference_dir, batch_size, num_processes, accelerate_config, progress,
        )
        for pair in missing:
            cache.put(reference_id, pair, *values[pair.pair_id])
        cache.save()
        out = compute_reference_logps(policy.model, pairs, reference_id, cache, batch_size, **kw)
    elif not missing:
        out = compute_reference_logps(policy.model, pairs, reference_id, cache, batch_size, **kw)
    else:
        with reference_model(policy, reference_dir) as (model, context):
            out = compute_reference_logps(
                model, pairs, reference_id, cache, batch_size, reference_context=context, **kw,
            )
    log.info("reference log-probs: %d cached, %d computed", len(pairs) - len(missing), len(missing))
    return out


@contextlib.contextmanager
def reference_model(
    policy: LoadedPolicy, reference_dir: Path
) -> Iterator[tuple[nn.Module, Callable[[], ContextManager] | None]]:
    """The network that runs pi_0, and how to switch it into pi_0: the LoRA policy itself with its
    adapter disabled, or a frozen copy of `reference_dir` loaded for the block and freed after.
    The one rule for every process that computes reference log-probs (this one, or a rank)."""
    from offline.models import load_reference

    if policy.reference is not None:
        yield policy.model, policy.reference
        return
    ref_model = load_reference(reference_dir, device=policy.model.device)
    try:
        yield ref_model, None
    finally:
        del ref_model
        gc.collect()


def rank_shard(
    pairs: Sequence[TokenizedPair], batch_size: int, rank: int, num_processes: int
) -> Sequence[TokenizedPair]:
    """The pairs rank `rank` of `num_processes` computes: every N-th of the batches
    `compute_reference_logps` would form from `pairs` (sorted by length, cut into `batch_size`).

    Whole batches, in order, so `compute_reference_logps` on the shard forms exactly those
    batches again (same rows, same padding) and each value equals the one-process value up to
    the kernels' own float rounding; the N shards are disjoint and cover `pairs`.
    """
    n = pair_lengths(pairs)  # (N, 3): array reads, no pair is built for a store view
    order = np.argsort(2 * n[:, 0] + n[:, 1] + n[:, 2], kind="stable")  # by n_tokens, as sorted() does
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[rank::num_processes]
    rows = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    if isinstance(pairs, TokenizedPairs):
        return TokenizedPairs(pairs.store, pairs.rows[rows])  # a view of the same mapped store
    return [pairs[i] for i in rows.tolist()]


def reference_context_for(model: nn.Module) -> Callable[[], ContextManager]:
    """How to turn `model` into its reference: disable the adapter of a peft model, else nothing."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return model.disable_adapter
    return contextlib.nullcontext


def compute_reference_logps(
    model: nn.Module,
    tokenized_pairs: Sequence[TokenizedPair],
    reference_id: str,
    cache: ReferenceLogpCache,
    batch_size: int = 16,
    progress: bool = True,
    *,
    pad_token_id: int = 0,
    reference_context: Callable[[], ContextManager] | None = None,
    autocast_dtype: AutocastDtype = "auto",
) -> dict[str, tuple[float, float]]:
    """Fill `cache` for the pairs it lacks under `reference_id`; return pair_id -> (chosen, rejected).

    The forward runs in eval mode without gradients, batched by length to cut padding, in the
    precision the training loop's policy forward will use (`autocast_dtype`; "auto": bf16 on a
    bf16-capable GPU, float32 elsewhere), so the two log-probs agree at step 0; `reference_id`
    should name that precision too (`precision_id`). `pad_token_id` only fills padding, which
    never changes the result.
    """
    result: dict[str, tuple[float, float]] = {}
    missing: dict[str, TokenizedPair] = {}
    for pair in tokenized_pairs:
        hit = cache.get(reference_id, pair)
        if hit is None:
            missing[pair.pair_id] = pair
        else:
            result[pair.pair_id] = hit
    if not missing:
        return result

    device = next(model.parameters()).device
    amp = resolve_autocast(device, autocast_dtype)
    share_prompt = supports_shared_prompt(model)
    todo = sorted(missing.values(), key=lambda p: p.n_tokens)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(batches, desc=f"reference log-probs ({len(todo)} pairs)", disable=not progress)
        for n, group in enumerate(bar, start=1):
            batch = collate_pairs(group, pad_token_id, share_prompt=share_prompt).to(device)
            chosen, rejected = reference_batch_logps(model, batch, reference_context, amp)
            for pair, c, r in zip(group, chosen.tolist(), rejected.tolist()):
                cache.put(reference_id, pair, c, r)
                result[pair.pair_id] = (c, r)
            if n % _SAVE_EVERY_BATCHES == 0:
                cache.save()
    finally:
        model.train(was_training)
        cache.save()
    return result


def reference_batch_logps(
    model: nn.Module,
    batch: PreferenceBatch,
    reference_context: Callable[[], ContextManager] | None = None,
    autocast_dtype: AutocastDtype = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference `(B,)` chosen and `(B,)` rejected log-probs of one batch, float32, no gradient.

    In the training forward's precision (`autocast_dtype`, see `compute_reference_logps`), so
    policy and reference agree at step 0. Dropout is whatever mode `model` is in.
    """
    device = batch.input_ids.device
    context = reference_context or reference_context_for(model)
    with torch.no_grad(), context(), autocast(device, resolve_autocast(device, autocast_dtype)):
        logps = sequence_logps(model, batch).float()  # (2B,)
    return logps.chunk(2)


def check_reference_logps(
    reference_logps: Mapping[str, tuple[float, float]], pairs: Sequence[TokenizedPair]
) -> None:
    """Raise if `reference_logps` lacks any of `pairs`, saying how many and which (first few)."""
    missing = [pid for pid in pair_ids(pairs) if pid not in reference_logps]
    if missing:
        raise ValueError(
            f"reference_logps lacks {len(missing)} of {len(pairs)} pairs (e.g. {missing[:3]}): "
            "run offline.reference.compute_reference_logps on the same tokenized pairs first"
        )
