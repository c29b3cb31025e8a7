"""The constraint families: every checker on its edge cases (pure), instructions read back from
raw and chat-rendered prompts, the question-split prompt pool, and the checker plugged in as the
rule judge and as the evaluation scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from online.config import JudgeConfig, PromptPoolConfig, RuleJudgeConfig
from online.constraints import (
    FAMILIES,
    constraint_pass,
    constraint_prompt_pool,
    constraint_prompts,
    constraint_score,
    instruction,
    own_questions,
    parse_constraint,
    read_questions,
)
from online.evaluate import make_scorer
from online.judge import build_judge
from online.prompts import PromptError, load_prompt_pool
from online.types import Generation

ROOT = Path(__file__).resolve().parents[1]
MT_BENCH = ROOT.parent / "shared" / "data" / "mt-bench" / "question.jsonl"
Q = "What is interesting about trains?"


def score(family: str, response: str, param: str = "") -> float:
    """The checker's score through the public entry point: prompt = question + instruction."""
    return constraint_score(f"{Q} {instruction(family, param)}", response)


# -- each family -------------------------------------------------------------------------------


def test_lowercase():
    assert score("lowercase", "trains are fast. they carry 300 people!") == 1.0
    assert score("lowercase", "") == 0.0 and score("lowercase", "  42 ... ") == 0.0  # no letter: nothing was said
    # Each capital halves the credit: 1 -> 0.5, 3 -> 0.125; a shouted answer ~0.
    assert score("lowercase", "Trains are very fast") == 0.5
    assert score("lowercase", "Trains Are Fast") == 0.125
    assert score("lowercase", "TRAINS") == pytest.approx(0.5**6)
    assert score("lowercase", "é à ü ß") == 1.0  # lowercase non-ASCII letters pass
    assert score("lowercase", "straße É") == 0.5  # and a non-ASCII capital counts


def test_max_words():
    assert score("max_words", "Trains are fast.", "8") == 1.0
    assert score("max_words", "one two three four five six seven eight", "8") == 1.0  # exactly N passes
    assert score("max_words", "one two three four five six seven eight nine ten", "8") == pytest.approx(0.5 * 8 / 10)
    assert score("max_words", "", "8") == 0.0 and score("max_words", " - * ", "8") == 0.0  # bullets alone are no words
    assert score("max_words", "- trains - are - fast", "3") == 1.0  # markers do not count as words


def test_include_keyword():
    assert score("include_keyword", "Trains cross the River at dawn.", "river") == 1.0  # any case
    assert score("include_keyword", "Two rivers meet.", "river") == 1.0  # plural s
    assert score("include_keyword", "A riverbank and a deliver.", "river") == 0.0  # whole word only
    assert score("include_keyword", "", "river") == 0.0


def test_end_phrase():
    p = "That is all."
    assert score("end_phrase", "Trains are fast. That is all.", p) == 1.0
    assert score("end_phrase", "Trains are fast. That is all.\n\n", p) == 1.0  # trailing whitespace ignored
    assert score("end_phrase", '"Trains are fast. That is all."', p) == 1.0  # surrounding quotes ignored
    assert score("end_phrase", "That is all. Trains are fast.", p) == 0.5  # present but not at the end
    assert score("end_phrase", "Trains are fast. that is all.", p) == 0.0  # exact: case matters
    assert score("end_phrase", "Trains are fast. That is all", p) == 0.0  # exact: the period too
    assert score("end_phrase", "", p) == 0.0


def test_no_commas():
    assert score("no_commas", "Trains are fast and loud.") == 1.0
    assert score("no_commas", "Trains are fast, loud.") == 0.5
    assert score("no_commas", "a, b, c, d") == pytest.approx(0.5 / 3)
    assert score("no_commas", "a，b") == 0.5  # the full-width comma counts too
    assert score("no_commas", "") == 0.0 and score("no_commas", "   ") == 0.0  # saying nothing is not compliance


def test_json():
    assert score("json", '{"trains": "fast", "seats": 300}') == 1.0
    assert score("json", '```json\n{"a": 1}\n```') == 1.0 and score("json", '```\n{"a": 1}\n```') == 1.0
    assert score("json", '[1, 2]') == 0.0  # an array is no object
    assert score("json", '"trains"') == 0.0 and score("json", "") == 0.0
    assert score("json", 'Sure! {"a": 1} Hope it helps.') == 0.5  # an object inside prose: half
    assert score("json", '{"a": 1,}') == 0.0  # invalid JSON
    assert score("json", "{" * 5000 + "}" * 5000) == 0.0  # deep nesting: no RecursionError escapes


def test_bullets():
    three = "* fast\n* loud\n* long"
    assert score("bullets", three, "3") == 1.0
    assert score("bullets", "- fast\n- loud\n- long", "3") == 1.0 and score("bullets", "• a\n• b\n• c", "3") == 1.0
    assert score("bullets", "Intro:\n* fast\n* loud\n* long\nDone.", "3") == 1.0  # text around bullets is allowed
    assert score("bullets", "* fast\n* loud", "3") == pytest.approx(0.5 * 2 / 3)
    assert score("bullets", "* a\n* b\n* c\n* d\n* e\n* f", "3") == 0.0  # twice too many: floored at 0
    assert score("bullets", "*bold* text\n*\n* ", "2") == 0.0  # a marker needs a space and some text
    assert score("bullets", "", "2") == 0.0


def test_start_word():
    assert score("start_word", "Yes, trains are fast.", "Yes") == 1.0
    assert score("start_word", "**yes** trains are fast.", "Yes") == 1.0  # markdown and case ignored
    assert score("start_word", '"Yes." Trains are fast.', "Yes") == 1.0
    assert score("start_word", "Yesterday trains ran.", "Yes") == 0.0  # a whole word, not a prefix
    assert score("start_word", "Trains: yes.", "Yes") == 0.0 and score("start_word", "", "Yes") == 0.0


def test_every_family_scores_in_unit_interval_and_passes_only_at_one():
    responses = ["", "x", "Yes, a River. That is all.", "* a\n* b", '{"a": 1}', "WORDS " * 40, "no caps here"]
    for name, fam in FAMILIES.items():
        for param in fam.params:
            prompt = f"{Q} {instruction(name, param)}"
            for r in responses:
                s = constraint_score(prompt, r)
                assert 0.0 <= s <= 1.0, (name, param, r, s)
                assert constraint_pass(prompt, r) == (1.0 if s == 1.0 else 0.0)


# -- reading the constraint back ----------------------------------------------------------------


def test_each_instruction_is_read_back_from_raw_and_rendered_prompts():
    for name, fam in FAMILIES.items():
        for param in fam.params:
            text = f"{Q} {instruction(name, param)}"
            rendered = f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
            assert parse_constraint(text) == (name, param)
            assert parse_constraint(rendered) == (name, param)


def test_parse_errors_name_the_problem():
    with pytest.raises(ValueError, match="no constraint instruction"):
        constraint_score("What is interesting about trains?", "fast")
    with pytest.raises(ValueError, match="unknown constraint family 'caps'"):
        instruction("caps")
    with pytest.raises(ValueError, match="needs a parameter"):
        instruction("max_words")


def test_the_last_instruction_wins():
    # A question quoting one instruction, then the prompt's own: the checker reads the last one.
    prompt = f"Explain the rule '{instruction('no_commas')}'. {instruction('max_words', '8')}"
    assert parse_constraint(prompt) == ("max_words", "8")


# -- prompts ------------------------------------------------------------------------------------


def test_constraint_prompts_interleave_families_and_are_seeded():
    rows = constraint_prompts(["Q1?", "Q2?"], ["max_words", "no_commas"], variants=2)
    assert [f for _, _, f in rows[:4]] == ["max_words", "no_commas", "max_words", "no_commas"]
    assert len(rows) == 2 * 2 + 2 * 1  # no_commas has one parameter value, not two
    assert rows == constraint_prompts(["Q1?", "Q2?"], ["max_words", "no_commas"], variants=2)
    # Adding a family changes no other family's prompts.
    more = constraint_prompts(["Q1?", "Q2?"], ["max_words", "no_commas", "json"], variants=2)
    assert [r for r in more if r[2] != "json"] == rows


def test_pool_splits_by_question_so_no_heldout_question_trains(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"category": c, "turns": [t, "second turn"]}) + "\n" for c, t in [
        ("writing", "Describe a lighthouse at night."), ("coding", "Write a C program."),
        ("stem", "Why is the sky blue? Answer in 20 words."), ("humanities", "Who was Socrates?"),
    ]))
    assert read_questions(questions) == ["Describe a lighthouse at night.", "Who was Socrates?"]  # coding, format-laden out
    fams = ["max_words", "start_word", "json"]
    pool = constraint_prompt_pool(str(questions), families=fams, variants=2, heldout_fraction=0.4)
    assert {f for _, f, _ in pool} == set(fams)
    side: dict[str, set[bool]] = {}
    for prompt, _, held in pool:
        side.setdefault(prompt.split("?")[0].split(".")[0], set()).add(held)
    assert all(len(s) == 1 for s in side.values())  # every question on one side, in every family
    # Own questions: split by topic, so a held-out topic is held out in every template.
    topics = {t: {h for p, _, h in pool if t in p} for _, t in own_questions()}
    assert all(len(s) == 1 for s in topics.values()) and {True, False} <= set().union(*topics.values())


def test_pool_loads_through_the_prompt_config_with_its_own_split(tmp_path):
    cfg = PromptPoolConfig(function="online.constraints:constraint_prompt_pool",
                           function_kwargs={"questions": None, "families": ["no_commas", "bullets"], "heldout_fraction": 0.5})
    pool = load_prompt_pool(cfg)
    expected = constraint_prompt_pool(None, families=["no_commas", "bullets"], heldout_fraction=0.5)
    assert len(pool.train) + len(pool.heldout) == len(expected)
    assert sorted(pool.heldout) == sorted((p, f) for p, f, h in expected if h)  # the function's split, not the hash
    bad = PromptPoolConfig(function="online.constraints:constraint_prompt_pool", function_kwargs={"colours": 3})
    with pytest.raises(PromptError, match="function_kwargs.*colours"):
        load_prompt_pool(bad)


@pytest.mark.skipif(not MT_BENCH.exists(), reason=f"MT-Bench questions not found at {MT_BENCH}")
def test_mt_bench_questions_are_short_and_read_in_place():
    qs = read_questions(MT_BENCH)
    assert 15 <= len(qs) <= 80 and all(len(q.split()) <= 25 for q in qs)


# -- plugged in --------------------------------------------------------------------------------


def test_checker_is_the_rule_judge_and_the_pass_rate_is_the_eval_scorer():
    cfg = JudgeConfig(kind="rule", rule=RuleJudgeConfig(
        function="online.constraints:constraint_score", eval_function="online.constraints:constraint_pass",
        min_margin=0.2))
    prompt = f"{Q} {instruction('max_words', '4')}"
    gens = [Generation(prompt=prompt, category="max_words", policy_version="v0", responses=(
        "one two three four five six seven eight", "Trains are fast.", "one two three four five"))]
    judgments, stats = build_judge(cfg).judge_generations(gens)
    # Best (passes: 1.0) vs worst (8 words: 0.25); the 5-word one (0.4) is neither.
    assert [(j.chosen, j.rejected) for j in judgments] == [("Trains are fast.", "one two three four five six seven eight")]
    assert judgments[0].category == "max_words" and stats.judgments == 1
    scorer = make_scorer(cfg)
    assert scorer([(prompt, r) for r in gens[0].responses]) == [0.0, 1.0, 0.0]  # pass/fail, not partial credit
    # Without eval_function the scorer is the judge's own function.
    plain = JudgeConfig(kind="rule", rule=RuleJudgeConfig(function="online.constraints:constraint_score"))
    assert make_scorer(plain)([(prompt, "one two three four five")]) == [pytest.approx(0.4)]


def test_two_near_failures_make_no_pair_under_the_margin():
    cfg = JudgeConfig(kind="rule", rule=RuleJudgeConfig(function="online.constraints:constraint_score", min_margin=0.3))
    prompt = f"{Q} {instruction('lowercase')}"
    gens = [Generation(prompt=prompt, category="lowercase", policy_version="v0",
                       responses=("Trains are fast", "Trains Are fast"))]  # 0.5 vs 0.25: a tie at margin 0.3
    judgments, stats = build_judge(cfg).judge_generations(gens)
    assert judgments == [] and stats.ties == 1


def test_function_kwargs_need_a_function():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="function_kwargs is set but there is no `function`"):
        PromptPoolConfig(path="prompts.jsonl", function_kwargs={"questions": "q.jsonl"})
