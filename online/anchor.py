"""A static dataset built once from the initial policy's own samples: the offline anchor of a
task whose preferences a judge can label (e.g. `online.constraints`).

Contract:
- `data.path: "online:anchor"` with an `online.anchor` section: `resolve_static_data(cfg)`
  returns the data section pointing at `<state_dir>/data/anchor-<key>.jsonl`, building the file
  first when it is missing. `<key>` hashes everything the build reads (pi_0's weights'
  identity, the prompt pool, the anchor and generation settings, the judge, the seed), so a
  changed setting builds a new file and never reuses a stale one (the judge's *code* is not in
  the key: after editing a rule function, bump `_BUILD_VERSION` or delete the file). Any other `data.path` goes to
  `offline.pipeline.resolve_data` unchanged.
- The build: pi_0 samples `anchor.k` responses for `anchor.prompts_per_category` TRAINING-side
  prompts of each covered category (the pool's held-out prompts are never used, so evaluation
  stays on unseen prompts); the configured judge pairs the best with the worst (only where
  best > worst by its `min_margin`); the pairs are written as explicit-format JSONL in one
  atomic write (`offline.data.write_jsonl`), with a sidecar `anchor-<key>.json` recording how
  (prompts, samples, pairs, ties, seconds).
- From then on the file is a static dataset like any other: the offline flow loads and
  fingerprints it (`offline.data`), and cycles only read it (anchor pairs in the buffer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from offline.atomic import atomic_write_json
from offline.config import DataConfig, ModelConfig
from offline.seeds import derive_seed
from online.config import AnchorConfig, OnlineConfig
from online.prompts import Prompt, PromptPool

log = logging.getLogger(__name__)

ANCHOR_PATH = "online:anchor"
"""`data.path` of a static dataset built from pi_0's samples (`online.anchor`)."""
_BUILD_VERSION = "1"  # bump when the build changes in a way the settings do not capture


class StaticDataInputs(Protocol):
    """What resolving the static dataset reads: `TetherConfig` and `CycleInputs` both have it."""

    model: ModelConfig
    data: DataConfig
    online: OnlineConfig | None
    state_dir: Path
    seed: int


@dataclass(frozen=True)
class AnchorBuild:
    """What a build wrote and how it came out."""

    path: Path
    pairs: int
    info: dict[str, Any]


def resolve_static_data(cfg: StaticDataInputs) -> DataConfig:
    """The data section with `data.path` resolved to a file (built here when it is the anchor)."""
    from offline.pipeline import resolve_data

    if cfg.data.path != ANCHOR_PATH:
        return resolve_data(cfg.data, cfg.state_dir)
    if cfg.online is None or cfg.online.anchor is None:
        raise ValueError(f'data.path is "{ANCHOR_PATH}" but there is no online.anchor section to build it from')
    path = anchor_path(cfg.state_dir, anchor_key(cfg))
    if not path.is_file():
        build_anchor(cfg, path)
    return cfg.data.model_copy(update={"path": str(path), "format": "explicit"})


def anchor_path(state_dir: Path, key: str) -> Path:
    return Path(state_dir) / "data" / f"anchor-{key}.jsonl"


def anchor_key(cfg: StaticDataInputs) -> str:
    """12 hex digits naming a build: pi_0 (its dir name and config.json), the pool, the anchor,
    generation and judge settings, and the seed."""
    from offline.models import resolve_model_dir

    assert cfg.online is not None and cfg.online.anchor is not None
    model_dir = resolve_model_dir(cfg.model, cfg.state_dir)
    config_json = (model_dir / "config.json").read_bytes() if (model_dir / "config.json").is_file() else b""
    gen = cfg.online.generation
    blob = json.dumps({
        "version": _BUILD_VERSION, "seed": cfg.seed,
        "model": [model_dir.name, hashlib.sha256(config_json).hexdigest(), cfg.model.dtype],
        "prompts": cfg.online.prompts.model_dump(mode="json"),
        "anchor": cfg.online.anchor.model_dump(mode="json"),
        "generation": {"temperature": gen.temperature, "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens,
                       "batch_size": gen.batch_size},
        "judge": cfg.online.judge.model_dump(mode="json", exclude={"audit"}),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def anchor_prompts(pool: PromptPool, anchor: AnchorConfig, seed: int) -> list[Prompt]:
    """`prompts_per_category` training-side prompts of each covered category, drawn without
    replacement (all of them when there are fewer), categories interleaved.

    A covered category missing from the pool's training side is an error: the static dataset
    would silently cover less than the config says.
    """
    by_cat: dict[str, list[Prompt]] = {}
    for p in pool.train:
        by_cat.setdefault(p[1] or "", []).append(p)
    missing = [c for c in anchor.categories if c not in by_cat]
    if missing:
        raise ValueError(
            f"online.anchor.categories {missing} have no training-side prompt in the pool "
            f"({pool.source}); its categories are {pool.categories}"
        )
    drawn = {}
    for c in anchor.categories:
        group = list(by_cat[c])
        random.Random(derive_seed(seed, "anchor-prompts", c)).shuffle(group)
        drawn[c] = group[: anchor.prompts_per_category]
    width = max(len(v) for v in drawn.values())
    return [drawn[c][i] for i in range(width) for c in anchor.categories if i < len(drawn[c])]


def build_anchor(cfg: StaticDataInputs, path: Path) -> AnchorBuild:
    """Sample pi_0 on covered-category prompts, label best vs worst with the judge, write JSONL."""
    from offline.data import write_jsonl
    from offline.models import load_policy
    from online.generate import build_generator
    from online.judge import build_judge
    from online.prompts import load_prompt_pool

    assert cfg.online is not None and cfg.online.anchor is not None
    online, anchor = cfg.online, cfg.online.anchor
    t0 = time.perf_counter()
    # Plain pi_0 (no adapter): the samples are the initial policy's, whatever the training setup.
    policy = load_policy(cfg.model.model_copy(update={"lora": None}), cfg.state_dir)
    pool = load_prompt_pool(online.prompts, tokenizer=policy.tokenizer)
    prompts = anchor_prompts(pool, anchor, cfg.seed)
    gen_cfg = online.generation.model_copy(update={"backend": "hf", "k": anchor.k})
    generator = build_generator(gen_cfg, policy.model_dir, "initial", model=policy.model, tokenizer=policy.tokenizer)
    log.info("building the static anchor: %d prompts x %d samples of pi_0 (%s)", len(prompts), anchor.k, path.name)
    generations = generator.generate(prompts, anchor.k, derive_seed(cfg.seed, "anchor-generate"))
    seconds_generate = time.perf_counter() - t0
    judgments, stats = build_judge(online.judge).judge_generations(generations)
    pairs = [j.to_pair().model_copy(update={"source_id": f"anchor-{i:05d}"}) for i, j in enumerate(judgments)]
    if not pairs:
        raise ValueError(
            f"the judge found no best > worst pair in {len(generations)} prompts x {anchor.k} samples of pi_0: "
            "raise online.anchor.k or prompts_per_category, or lower the judge's min_margin"
        )
    scores = _sample_scores(online, generations)
    per_cat: dict[str, int] = {}
    for p in pairs:
        per_cat[p.category or "(none)"] = per_cat.get(p.category or "(none)", 0) + 1
    info = {
        "key": path.stem.removeprefix("anchor-"), "created_at": time.time(), "model_dir": str(policy.model_dir),
        "categories": list(anchor.categories), "prompts": len(prompts), "k": anchor.k, "samples": len(prompts) * anchor.k,
        "pairs": len(pairs), "pairs_per_category": per_cat, "judge": stats.model_dump(mode="json"),
        "sample_score_per_category": scores,
        "seconds_generate": round(seconds_generate, 2), "seconds": round(time.perf_counter() - t0, 2),
    }
    # The sidecar first: the JSONL's presence is what says "built".
    atomic_write_json(path.with_suffix(".json"), info, indent=2)
    write_jsonl(pairs, path)
    log.info("static anchor %s: %d pairs from %d prompts in %.0f s", path.name, len(pairs), len(prompts), info["seconds"])
    return AnchorBuild(path=path, pairs=len(pairs), info=info)


def _sample_scores(online: OnlineConfig, generations: list) -> dict[str, float] | None:
    """Mean evaluation score (`make_scorer`: e.g. the pass rate) of pi_0's samples per category;
    None for a judge without a scalar score (an LLM judge)."""
    from online.evaluate import make_scorer

    if online.judge.kind == "llm":
        return None
    scorer = make_scorer(online.judge)
    per: dict[str, list[float]] = {}
    for g in generations:
        for r, s in zip(g.responses, scorer([(g.prompt, r) for r in g.responses])):
            per.setdefault(g.category or "(none)", []).append(s)
    return {c: sum(v) / len(v) for c, v in sorted(per.items())}
