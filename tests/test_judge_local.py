"""The rule judge and the reward-model judge end to end, with a rule defined here and a tiny
Llama reward model + word-level tokenizer built in-process (no downloads)."""

import math

import pytest
import torch

from online.judge import build_judge
from online.config import JudgeConfig, RewardModelJudgeConfig, RuleJudgeConfig
from online.judge_local import RewardModelJudge
from online.types import Generation


def marker_rule(prompt: str, response: str) -> float:
    """1.0 for a response containing GOOD, 0.6 for OK, 0.2 otherwise."""
    return 1.0 if "GOOD" in response else 0.6 if "OK" in response else 0.2


def nan_rule(prompt: str, response: str) -> float:
    return float("nan")


def rule_judge(fn="marker_rule", min_margin=0.0):
    return build_judge(JudgeConfig(kind="rule", rule=RuleJudgeConfig(function=f"{__name__}:{fn}", min_margin=min_margin)))


def test_rule_judge_pairs_best_with_worst():
    gens = [
        Generation(prompt="p1", responses=("an OK one", "a GOOD one", "bad", "bad", ""), policy_version="v3", category="x"),
        Generation(prompt="p2", responses=("bad", "worse"), policy_version="v3"),  # equal scores: tie
        Generation(prompt="p3", responses=("GOOD",), policy_version="v3"),  # one sample: nothing to pair
        Generation(prompt="p4", responses=("OK", "GOOD"), policy_version="v3"),
    ]
    judge = rule_judge()
    judgments, stats = judge.judge_generations(gens)
    assert judge.name == f"rule:{__name__}:marker_rule"
    assert [(j.prompt, j.chosen, j.rejected) for j in judgments] == [("p1", "a GOOD one", "bad"), ("p4", "GOOD", "OK")]
    assert judgments[0].confidence == pytest.approx(0.8) and judgments[1].confidence == pytest.approx(0.4)
    assert judgments[0].details["scores"] == [0.6, 1.0, 0.2, None, None]
    assert judgments[0].to_pair().category == "x"
    assert (stats.judgments, stats.ties, stats.calls, stats.cost_usd) == (2, 1, 0, 0.0)

    judgments, stats = rule_judge(min_margin=0.5).judge_generations(gens)
    assert [j.prompt for j in judgments] == ["p1"] and stats.ties == 2


def test_rule_judge_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="no callable 'missing'"):
        rule_judge("missing")
    with pytest.raises(ValueError, match="nan_rule returned nan"):
        rule_judge("nan_rule").judge_generations([Generation(prompt="p", responses=("a", "b"), policy_version="v")])


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = "[PAD] [UNK] [EOS] the answer is good bad fine maybe 1 2 3 4 5 what ? . yes no".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("rm") / "tiny-rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_judge_scores_batched_like_one_by_one(tiny_reward_model):
    gens = [
        Generation(prompt="what is 2 ? ", responses=("the answer is 4", "maybe 5 . no", "yes", "yes"), policy_version="v1"),
        Generation(prompt="what ? ", responses=("good", "bad bad bad bad bad bad fine", "the answer is fine ."), policy_version="v1"),
        Generation(prompt="what ? ", responses=("no",), policy_version="v1"),
    ]
    cfg = JudgeConfig(kind="reward_model", reward_model=RewardModelJudgeConfig(path=str(tiny_reward_model), batch_size=3, device="cpu"))
    judge = build_judge(cfg)
    assert isinstance(judge, RewardModelJudge) and judge.name == "reward_model:tiny-rm"
    judgments, stats = judge.judge_generations(gens)
    assert stats.judgments == len(judgments) == 2 and stats.calls == 0

    # Reference: each prompt+response alone, no padding. Batching (size 3, ragged) must not change scores.
    def alone(text):
        ids = judge.tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            return judge.model(**ids).logits[0, 0].item()  # (1, 1) -> scalar

    for gen, j in zip(gens, judgments):
        distinct = list(dict.fromkeys(gen.responses))
        ref = {r: alone(gen.prompt + r) for r in distinct}
        assert j.chosen == max(ref, key=ref.get) and j.rejected == min(ref, key=ref.get)
        margin = ref[j.chosen] - ref[j.rejected]
        assert j.details["margin"] == pytest.approx(margin, abs=1e-4)
        assert j.confidence == pytest.approx(1 / (1 + math.exp(-margin)), abs=1e-4)
        got = [s for s in j.details["scores"] if s is not None]
        assert got == pytest.approx([ref[r] for r in distinct], abs=1e-4)

    strict = RewardModelJudge(RewardModelJudgeConfig(path=str(tiny_reward_model), min_margin=1e6))
    judgments, stats = strict.judge_generations(gens)
    assert judgments == [] and stats.ties == 2
