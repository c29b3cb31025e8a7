"""Local judges: score each response, pair the best with the worst (no API calls, no budget).

`RuleJudge` (kind "rule") scores with a python callable `module:function(prompt, response)`;
confidence = score margin clipped to [0, 1]. `RewardModelJudge` (kind "reward_model") scores
prompt+response with a one-label sequence classifier; confidence = sigmoid(margin). Both pair
the best with the worst distinct response of each generation when the margin is > 0 and >=
`min_margin`, else count a tie. `online.judge.build_judge` makes them from a `JudgeConfig`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from online.cost import CostMeter
from online.judge_prompt import distinct_indices
from online.config import RewardModelJudgeConfig, RuleJudgeConfig
from online.types import Generation, Judgment, JudgeStats


def _best_vs_worst(
    gen: Generation,
    scores: dict[int, float],
    min_margin: float,
    judge: str,
    confidence: Callable[[float], float],
    meter: CostMeter,
) -> Judgment | None:
    """Best vs worst of the scored (distinct) responses, or None (tie / fewer than two)."""
    if len(scores) < 2:
        return None
    best = max(scores, key=lambda i: scores[i])  # first index wins a tie in score
    worst = min(scores, key=lambda i: scores[i])
    margin = scores[best] - scores[worst]
    if margin <= 0 or margin < min_margin:
        meter.ties += 1
        return None
    meter.judgments += 1
    return Judgment(
        prompt=gen.prompt,
        category=gen.category,
        chosen=gen.responses[best],
        rejected=gen.responses[worst],
        judge=judge,
        confidence=confidence(margin),
        details={
            "scores": [scores.get(i) for i in range(len(gen.responses))],
            "margin": margin,
            "policy_version": gen.policy_version,
        },
    )


def load_callable(spec: str) -> Callable[..., Any]:
    """Import `package.module:function`."""
    module_name, _, attr = spec.partition(":")
    fn = getattr(importlib.import_module(module_name), attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


class RuleJudge:
    """Scores responses with a python function; confidence = margin clipped to [0, 1]."""

    def __init__(self, cfg: RuleJudgeConfig) -> None:
        self.cfg = cfg
        self.name = f"rule:{cfg.function}"
        self._fn = load_callable(cfg.function)

    def judge_generations(self, generations: list[Generation]) -> tuple[list[Judgment], JudgeStats]:
        meter = CostMeter()
        judgments = []
        for gen in generations:
            scores = {i: self._score(gen.prompt, gen.responses[i], i) for i in distinct_indices(gen.responses)}
            j = _best_vs_worst(gen, scores, self.cfg.min_margin, self.name, _clip01, meter)
            if j is not None:
                judgments.append(j)
        return judgments, meter.snapshot()

    def _score(self, prompt: str, response: str, index: int) -> float:
        value = float(self._fn(prompt, response))
        if not math.isfinite(value):
            raise ValueError(
                f"{self.cfg.function} returned {value} for response {index} of prompt {prompt[:60]!r}"
            )
        return value


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class RewardModelJudge:
    """Scores prompt+response with a one-label sequence classifier; confidence = sigmoid(margin)."""

    def __init__(self, cfg: RewardModelJudgeConfig) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.cfg = cfg
        self.name = f"reward_model:{Path(cfg.path).name}"
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(cfg.path).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model at {cfg.path} has {self.model.config.num_labels} labels; "
                "it must have 1 (a scalar score)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.tokenizer.pad_token is None:
            raise ValueError(f"tokenizer at {cfg.path} has no pad, eos or unk token to pad batches with")
        # The classifier reads the last non-pad token; it finds it via config.pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # keep the end of the response, which the score reads
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)

    def score(self, texts: Sequence[str]) -> list[float]:
        """One scalar reward per text, in batches of `batch_size`."""
        import torch

        rewards: list[float] = []
        for start in range(0, len(texts), self.cfg.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.cfg.batch_size]),
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)  # input_ids, attention_mask: (B, T)
            with torch.inference_mode():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            rewards.extend(logits[:, 0].float().cpu().tolist())  # (B, 1) -> B floats
        return rewards

    def judge_generations(self, generations: list[Generation]) -> tuple[list[Judgment], JudgeStats]:
        meter = CostMeter()
        index = [(g, i) for g, gen in enumerate(generations) for i in distinct_indices(gen.responses)]
        flat = self.score([generations[g].prompt + generations[g].responses[i] for g, i in index])
        scores: list[dict[int, float]] = [{} for _ in generations]
        for (g, i), s in zip(index, flat):
            scores[g][i] = s
        judgments = []
        for gen, sc in zip(generations, scores):
            j = _best_vs_worst(gen, sc, self.cfg.min_margin, self.name, _sigmoid, meter)
            if j is not None:
                judgments.append(j)
        return judgments, meter.snapshot()
