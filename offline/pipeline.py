"""The offline baseline as plain functions, one per pipeline step.

load + validate + tokenise (cached) -> coverage -> reference log-probs -> train -> evaluate -> save.
`orchestrator/flows.py` wraps each step in a Prefect task; tests and benchmarks call these
directly, so every step runs (and is measured) without Prefect. Online cycles reuse
`train_policy` and `save_policy` unchanged; reference log-probs have one home for both phases,
`offline.reference.ensure_reference_logps`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from offline.checkpoint import CheckpointRef, code_version, save_checkpoint
from offline.coverage import CoverageReport, coverage_of
from offline.data import PreferenceDataset
from offline.config import DataConfig, ModelConfig, TrainConfig
from offline.evaluate import EvalResult, evaluate_preferences
from offline.models import LoadedPolicy, load_policy
from offline.tokenize import TokenizedPair
from offline.tokenized import TokenizedDataset, load_tokenized_dataset
from offline.tokenized import tokenize_dataset as _tokenize_loaded
from offline.train import TrainResult, train

log = logging.getLogger(__name__)


def resolve_data(cfg: DataConfig, state_dir: Path) -> DataConfig:
    """`path: "demo:pairs"` -> the built-in demo dataset, generated once under the state dir."""
    if cfg.path == "demo:pairs":
        from offline.demo_task import demo_dataset_path

        return cfg.model_copy(update={"path": str(demo_dataset_path(state_dir))})
    return cfg


def load_and_validate(
    cfg: DataConfig, tokenizer, cache_dir: Path | None = None, progress: bool = False
) -> TokenizedDataset:
    """Load, validate, split, fingerprint and tokenise the static dataset (errors name file,
    line and field). With `cache_dir` the token ids are stored there, memory-mapped, and the
    next run of the same data, tokenizer and limits reads them back instead (offline.tokenized)."""
    dataset = load_tokenized_dataset(cfg, tokenizer, cache_dir, progress)
    log.info(
        "loaded %d train / %d held-out pairs from %s (fingerprint %s, %s, %.1f MB of token ids)",
        len(dataset.train), len(dataset.heldout), dataset.source, dataset.fingerprint[:12],
        "from the cache" if dataset.cached else "tokenized", dataset.token_bytes / 1e6,
    )
    return dataset


def build_coverage(dataset: TokenizedDataset) -> CoverageReport:
    """What the static data covers: counts, categories, lengths, duplicates, truncation (from
    the stored lengths: no second tokenizer pass)."""
    return coverage_of(dataset)


def tokenize_dataset(dataset: PreferenceDataset, tokenizer, cfg: DataConfig) -> TokenizedDataset:
    """Token ids for both splits of an already loaded dataset, in memory (no cache)."""
    return _tokenize_loaded(dataset, tokenizer, cfg.max_length, cfg.max_prompt_length)


def train_policy(
    policy: LoadedPolicy,
    pairs: Sequence[TokenizedPair],
    reference_logps: Mapping[str, tuple[float, float]],
    cfg: TrainConfig,
    resume_dir: Path | None,
    on_step: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run the one training loop on `pairs` (resumable from `resume_dir` after a kill): in this
    process, or, with `cfg.num_processes > 1` / `cfg.accelerate_config`, as a launched job of
    that many ranks whose trained weights come back into `policy` (offline/launch.py)."""
    if cfg.launched:
        from offline.launch import launch_training

        return launch_training(policy, pairs, reference_logps, cfg, resume_dir, on_step, progress)
    policy.model.train()
    return train(
        policy.model, pairs, reference_logps, cfg,
        pad_token_id=policy.tokenizer.pad_token_id,
        resume_dir=resume_dir, on_step=on_step, progress=progress, autocast_dtype=policy.autocast_dtype,
    )


@dataclass(frozen=True)
class Evaluation:
    """Held-out preference metrics.

    `implicit` orders pairs by DPO's implicit reward beta*(log pi - log pi_ref), the standard
    DPO accuracy (all ties, so 0, for the initial policy, which *is* the reference);
    `likelihood` orders them by the policy's own log-probs, meaningful before and after.
    """

    implicit: EvalResult
    likelihood: EvalResult


def evaluate_policy(
    policy: LoadedPolicy,
    heldout: Sequence[TokenizedPair],
    reference_logps: Mapping[str, tuple[float, float]],
    beta: float,
    batch_size: int,
) -> Evaluation:
    """Preference accuracy and margin on the held-out split, overall and per category."""
    policy.model.eval()
    pad = policy.tokenizer.pad_token_id
    zeros = {p.pair_id: (0.0, 0.0) for p in heldout}
    with torch.no_grad():
        kw = dict(pad_token_id=pad, batch_size=batch_size, autocast_dtype=policy.autocast_dtype)
        implicit = evaluate_preferences(policy.model, heldout, reference_logps, beta, **kw)
        likelihood = evaluate_preferences(policy.model, heldout, zeros, 1.0, **kw)
    return Evaluation(implicit=implicit, likelihood=likelihood)


def save_policy(
    policy: LoadedPolicy,
    root: Path,
    name: str,
    *,
    kind: str,
    fingerprint: str,
    config: dict[str, Any],
    parent: CheckpointRef | None,
    seed: int,
    result: TrainResult,
    metrics: dict[str, Any],
    overwrite: bool = False,
) -> CheckpointRef:
    """Atomically write an HF-format checkpoint with its full lineage."""
    lineage = {
        "kind": kind,
        "dataset_fingerprint": fingerprint,
        "config": config,
        "parent": parent.model_dump() if parent is not None else None,
        "code_version": code_version(),
        "seed": seed,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "step_pair_ids": result.step_pair_ids,
        "final_metrics": metrics,
    }
    return save_checkpoint(policy.model, policy.tokenizer, root, name, lineage, overwrite=overwrite)


def load_initial_policy(cfg: ModelConfig, state_dir: Path) -> LoadedPolicy:
    """The policy to start from (built/converted into the state dir when needed)."""
    return load_policy(cfg, state_dir)
