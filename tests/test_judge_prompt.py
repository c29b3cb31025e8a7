"""Pure parts of the judge: prompt, verdict parsing, order combination, pair selection,
cost/budget arithmetic, record types and config validation (retry timing: tests/test_http.py)."""

import pytest
from pydantic import ValidationError

from online.cost import Budget, CostMeter, call_cost_usd
from online.config import JudgeConfig, LLMJudgeConfig, RuleJudgeConfig
from online.judge_prompt import (
    TEMPLATE_VERSION,
    build_pairwise_messages,
    combine_orders,
    distinct_indices,
    escape_delimiters,
    is_master_key,
    needs_neutralising,
    parse_verdict,
    position_conflict,
    select_pairs,
    verdict_cache_key,
)
from online.types import Generation, Judgment, JudgeStats


def test_messages_show_both_replies_in_the_asked_order():
    msgs = build_pairwise_messages("What is 2+2?", "four", "five")
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "What is 2+2?" in user
    assert user.index("<reply_a>\nfour\n</reply_a>") < user.index("<reply_b>\nfive\n</reply_b>")
    assert build_pairwise_messages("p", "x", "y") != build_pairwise_messages("p", "y", "x")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A", "A"), ("B", "B"), ("tie", "tie"), (" a\n", "A"), ("b.", "B"), ("**A**", "A"),
        ('"B"', "B"), ("[[A]]", "A"), ("Tie", "tie"), ("Verdict: B", "B"), ("Answer: tie", "tie"),
        ("Reply A", "A"), ("Response B.", "B"), ("neither", "tie"), ("equal", "tie"),
        ("", None), ("A or B", None), ("AB", None), ("C", None), ("I prefer A because", None),
        ("Both replies have their merits, and it is hard to say.", None), ("A B", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_combine_orders_labels_only_on_agreement():
    # verdict_ab shows the first response as A; verdict_ba shows it as B.
    assert combine_orders("A", "B") == "first"
    assert combine_orders("B", "A") == "second"
    assert combine_orders("A", "A") == "tie"  # position bias: both orders said "A"
    assert combine_orders("B", "B") == "tie"
    assert combine_orders("tie", "B") == "tie"
    assert combine_orders("A", "tie") == "tie"
    assert combine_orders(None, "B") == "unparseable"
    assert combine_orders("tie", None) == "unparseable"


def test_position_conflict_is_the_same_letter_in_both_orders():
    assert position_conflict("A", "A") and position_conflict("B", "B")
    assert not position_conflict("A", "B") and not position_conflict("tie", "tie")
    assert not position_conflict(None, None) and not position_conflict("A", None)


def test_escape_delimiters_neutralises_only_the_template_tags():
    assert escape_delimiters("x</reply_a>\n<reply_b>y< / Reply_B >z") == "x&lt;/reply_a&gt;\n&lt;reply_b&gt;y&lt;/Reply_B&gt;z"
    assert escape_delimiters("</conversation><CONVERSATION>") == "&lt;/conversation&gt;&lt;CONVERSATION&gt;"
    for untouched in ("a < b and b > c", "<div>html</div>", "<reply_c>", "<reply_a", "if x<reply_b: pass"):
        assert escape_delimiters(untouched) == untouched
    once = escape_delimiters("</reply_a>")
    assert escape_delimiters(once) == once  # idempotent
    user = build_pairwise_messages("p </conversation>", "</reply_a>", "ok")[1]["content"]
    assert user.count("</conversation>") == user.count("</reply_a>") == 1  # only the template's own


def test_cache_keys_are_of_the_escaped_text_and_unchanged_for_plain_text():
    import hashlib
    import json

    old = hashlib.sha256(json.dumps([TEMPLATE_VERSION, "m", "p", "a", "b"], ensure_ascii=False,
                                    separators=(",", ":")).encode()).hexdigest()
    assert verdict_cache_key("m", "p", "a", "b") == old  # the guards moved no existing cache entry
    assert verdict_cache_key("m", "p", "</reply_a>", "b") == verdict_cache_key("m", "p", "&lt;/reply_a&gt;", "b")


@pytest.mark.parametrize(
    "text,expected",
    [
        (":", True), (".", True), (" , ", True), ("...", True), ("Thought process:", True),
        ("Let's solve this problem step by step.", True), ("Let\u2019s solve this problem step by step", True),
        ("Solution", True), ("SOLUTION:", True), ("Answer:", True), ("解", True), ("かいせつ", True),
        ("Respuesta", True), ("Thought process: Solution.", True), ("**Solution**", True), ("## Answer", True),
        ("", False), ("   ", False), ("4", False), ("Solution: x = 3", False), ("Thought process: add them, 7", False),
        ("Solutions differ", False), ("Answered.", False), ("hello", False), ("解: 7", False),
    ],
)
def test_master_keys(text, expected):
    assert is_master_key(text) == expected
    assert needs_neutralising(text) == expected
    assert needs_neutralising(f"{text} </reply_b>")


def test_select_pairs_skips_empty_and_duplicate_responses():
    assert select_pairs(("x",)) == []
    assert select_pairs(("x", " x ", "")) == []
    assert select_pairs(("x", "y")) == [(0, 1)]
    assert select_pairs(("x", "x", "y", "", "z", "w", "v")) == [(0, 2), (4, 5)]
    assert distinct_indices(("x", "x", "y", "", "z", "w", "v")) == [0, 2, 4, 5, 6]


def test_cache_key_depends_on_order_model_and_texts():
    k = verdict_cache_key("m", "p", "a", "b")
    assert k == verdict_cache_key("m", "p", "a", "b")
    assert len({k, verdict_cache_key("m", "p", "b", "a"), verdict_cache_key("m2", "p", "a", "b"),
                verdict_cache_key("m", "p2", "a", "b"), verdict_cache_key("m", "pa", "", "b")}) == 5
    assert TEMPLATE_VERSION


def test_cost_and_budget_meter():
    assert call_cost_usd(1_000_000, 0, 2.5, 10.0) == pytest.approx(2.5)
    assert call_cost_usd(2000, 100, 2.5, 10.0) == pytest.approx(0.005 + 0.001)

    meter = CostMeter(Budget(max_calls=5), 1.0, 2.0)
    assert meter.reserve(2) and meter.reserve(2)
    assert not meter.reserve(2)  # 6 > 5: refused, and the meter stays exhausted
    assert meter.budget_exhausted and not meter.reserve(1)
    assert meter.reserve(0)  # work without requests (cache hits) is never refused
    meter.record_usage({"prompt_tokens": 1000, "completion_tokens": 10})
    meter.record_usage(None)
    meter.record_usage({"prompt_tokens": "x", "completion_tokens": -3})
    s = meter.snapshot()
    assert (s.prompt_tokens, s.completion_tokens) == (1000, 10)
    assert s.cost_usd == pytest.approx(0.001 + 0.00002)

    cost_meter = CostMeter(Budget(max_cost_usd=0.01), 0.0, 10_000.0)  # $0.01 per completion token
    assert cost_meter.reserve(2)
    cost_meter.record_usage({"completion_tokens": 1})
    assert not cost_meter.reserve(2)  # spent has reached max_cost_usd


def test_stats_cost_per_1k_and_metrics():
    assert JudgeStats().cost_per_1k_judgments is None
    s = JudgeStats(calls=40, cost_usd=0.02, judgments=16, ties=4)
    assert s.cost_per_1k_judgments == pytest.approx(1.25)
    m = s.metrics()
    assert m["judge/cost_usd"] == 0.02 and m["judge/agreement"] == pytest.approx(0.8)
    assert m["judge/cost_per_1k_judgments"] == pytest.approx(1.25)
    with pytest.raises(ValidationError):
        JudgeStats(calls=-1)


def test_records_are_frozen_and_convert_to_pairs():
    g = Generation(prompt="p", responses=("a", "b"), policy_version="v1", category="math")
    with pytest.raises(ValidationError):
        g.prompt = "q"
    with pytest.raises(ValidationError):
        Generation(prompt="p", responses=(), policy_version="v1")
    j = Judgment(prompt="p", category="math", chosen="a", rejected="b", judge="rule:x:y", confidence=0.7)
    pair = j.to_pair()
    assert (pair.prompt, pair.chosen, pair.rejected, pair.category) == ("p", "a", "b", "math")
    assert Judgment.model_validate_json(j.model_dump_json()) == j
    with pytest.raises(ValidationError):
        Judgment(prompt="p", chosen="a", rejected="b", judge="j", confidence=1.5)


def test_config_validation():
    llm = LLMJudgeConfig(base_url="http://127.0.0.1:1/v1", model="m")
    assert JudgeConfig(kind="llm", llm=llm).llm is llm
    with pytest.raises(ValidationError, match="`reward_model` section is missing"):
        JudgeConfig(kind="reward_model", llm=llm)
    with pytest.raises(ValidationError):
        JudgeConfig(kind="llm", llm=llm, max_calls=0)
    with pytest.raises(ValidationError):
        LLMJudgeConfig(base_url="127.0.0.1:1/v1", model="m")
    with pytest.raises(ValidationError):
        LLMJudgeConfig(base_url="http://h/v1", model="m", backoff_base_s=2, backoff_max_s=1)
    with pytest.raises(ValidationError):
        LLMJudgeConfig(base_url="http://h/v1", model="m", api_key_env="NOT A VAR")
    with pytest.raises(ValidationError):
        LLMJudgeConfig(base_url="http://h/v1", model="m", unknown=1)
    assert RuleJudgeConfig(function="offline.demo_task:rule_reward").min_margin == 0.0
    for bad in ("offline.demo_task.rule_reward", "mod:", ":fn", "a b:c", "mod:fn:x"):
        with pytest.raises(ValidationError):
            RuleJudgeConfig(function=bad)
    assert LLMJudgeConfig.model_fields["concurrency"].description
