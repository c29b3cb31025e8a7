"""online/evaluate.py's summaries: the counts, spread, per-prompt rewards and response lengths
the gate's confidence bounds need, from real judges (a rule, in-process) and a real tokenizer."""

from __future__ import annotations

import pytest

from _tokenizers import byte_tokenizer
from online.config import JudgeConfig
from online.evaluate import prompt_key, reward_summary, win_rate_summary
from online.types import Generation


def sevens(prompt: str, response: str) -> float:
    """The rule: more 7s is better."""
    return float(response.count("7"))


def gen(prompt: str, category: str | None, *responses: str) -> Generation:
    return Generation(prompt=prompt, category=category, responses=responses, policy_version="eval")


def test_reward_summary_carries_counts_spread_prompts_and_lengths():
    """Rewards (7s): p1 math (1, 3), p2 math (0, 0), p3 no category (2, 2).
    math: mean 1, n 4, sd sqrt(((0)^2+2^2+1+1)/3) = sqrt(2); overall mean 8/6, n 6.
    Lengths (bytes = tokens): 1, 3, 2, 4, 2, 2 -> 14/6."""
    gens = [gen("p1", "math", "7", "777"), gen("p2", "math", "ab", "abcd"), gen("p3", None, "77", "77")]
    s = reward_summary(gens, lambda items: [sevens(p, r) for p, r in items], byte_tokenizer())
    assert s.per_category == {"(none)": 2.0, "math": 1.0} and s.mean == pytest.approx(8 / 6)
    assert (s.n, s.per_category_n) == (6, {"(none)": 2, "math": 4})
    assert s.per_category_std["math"] == pytest.approx(2 ** 0.5) and s.per_category_std["(none)"] == 0.0
    assert [(p.key, p.category, p.rewards) for p in s.prompt_rewards] == [
        (prompt_key("p1"), "math", (1.0, 3.0)), (prompt_key("p2"), "math", (0.0, 0.0)), (prompt_key("p3"), "(none)", (2.0, 2.0))]
    assert s.mean_response_length == pytest.approx(14 / 6)
    assert reward_summary(gens, lambda items: [0.0] * len(items)).mean_response_length is None  # no tokenizer


def test_win_rate_summary_counts_wins_losses_and_ties_per_category():
    """Candidate vs current, sample by sample, judged by the rule (a tie: equal 7s or identical):
    math p1: '77' vs '7' win, '77' vs '777' loss (the same text won and lost: each comparison is
    matched whole); math p2: 'x' vs 'x' tie; code p3: '7' vs 'y' win.
    math: 1 win, 1 loss, 1 tie -> win rate (1 + 0.5) / 3 = 0.5; code 1/1; overall (2 + 0.5) / 4."""
    judge = JudgeConfig(kind="rule", rule={"function": "test_online_evaluate:sevens"})
    candidate = [gen("p1", "math", "77", "77"), gen("p2", "math", "x"), gen("p3", "code", "7")]
    current = [gen("p1", "math", "7", "777"), gen("p2", "math", "x"), gen("p3", "code", "y")]
    s = win_rate_summary(candidate, current, judge, byte_tokenizer())
    math_, code = s.per_category_counts["math"], s.per_category_counts["code"]
    assert (math_.wins, math_.losses, math_.ties) == (1, 1, 1) and (code.wins, code.losses, code.ties) == (1, 0, 0)
    assert (s.counts.wins, s.counts.losses, s.counts.ties, s.counts.decisive) == (2, 1, 1, 3)
    assert s.per_category_win_rate == {"code": 1.0, "math": 0.5} and s.win_rate == pytest.approx(2.5 / 4)
    assert s.n == 4 and s.per_category_n == {"code": 1, "math": 3}
    assert s.mean_response_length == pytest.approx((2 + 2 + 1 + 1) / 4)  # the candidate's samples
