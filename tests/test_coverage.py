"""offline/coverage.py: every figure of the report against counts worked out by hand.

The byte tokenizer maps each ASCII character to one token, so a text's token count is its
length and the expected truncation can be derived on paper (see each test's docstring).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from _tokenizers import byte_tokenizer
from offline.coverage import UNCATEGORISED, CoverageReport, coverage_report
from offline.data import load_preference_dataset
from offline.config import DataConfig

MAX_LENGTH, MAX_PROMPT_LENGTH = 16, 8

# (prompt, chosen, rejected, category); lengths in tokens = characters.
PAIRS = [
    ("abcdefgh", "1234567", "xyz", "a"),  # prompt 8 = budget (kept); chosen 7+EOS = 8 = room: fits
    ("0123456789", "ok", "no", "a"),  # prompt 10 > 8: prompt cut only
    ("p", "c" * 15, "r", "b"),  # room 15, chosen 15+EOS = 16: response cut only
    ("q" * 12, "yes", "r" * 8, None),  # prompt cut to 8, room 8, rejected 8+EOS = 9: both cut
    ("hi", "yo", "no", "b"),  # nothing cut
]
RECORDS = [
    {"prompt": p, "chosen": c, "rejected": r, **({"category": k} if k else {})} for p, c, r, k in PAIRS
]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture()
def dataset(tmp_path):
    """The five pairs plus two duplicates, one identical pair, one malformed line, one wrong type."""
    bad = ['{"prompt": ', json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
           json.dumps({"prompt": "p", "chosen": ["x"], "rejected": "r"})]
    lines = [json.dumps(r) for r in RECORDS] + [json.dumps(RECORDS[0]), json.dumps(RECORDS[3])] + bad
    path = tmp_path / "cov.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(path=str(path), heldout_fraction=0.4, on_bad_record="skip",
                     max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    return load_preference_dataset(cfg)


def test_counts_categories_and_drops(dataset, tokenizer):
    report = coverage_report(dataset, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    assert (report.n_train + report.n_heldout, report.n_pairs) == (5, 5)
    assert (report.n_train, report.n_heldout) == (len(dataset.train), len(dataset.heldout))
    assert report.n_heldout >= 1 and report.n_train >= 1
    assert report.duplicates == 2
    assert report.identical_responses == 1
    assert report.skipped == {"identical_responses": 1, "malformed_json": 1, "wrong_type": 1}
    assert report.n_skipped == 3
    heldout_prompts = {p.prompt for p in dataset.heldout}
    expected: dict[str, list[int]] = {}
    for prompt, _, _, category in PAIRS:
        expected.setdefault(category or UNCATEGORISED, [0, 0])[prompt in heldout_prompts] += 1
    assert {c.category: [c.train, c.heldout] for c in report.categories} == expected
    # Most frequent first: a (2) and b (2) before (none) (1), ties by name.
    assert [c.category for c in report.categories] == ["a", "b", UNCATEGORISED]
    assert (report.source, report.format, report.fingerprint) == (
        dataset.source, "explicit", dataset.fingerprint
    )


def test_length_percentiles(dataset, tokenizer):
    """Token counts equal character counts; percentiles are numpy's linear interpolation."""
    report = coverage_report(dataset, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    for stats, column in (
        (report.prompt_tokens, 0), (report.chosen_tokens, 1), (report.rejected_tokens, 2)
    ):
        lengths = [len(pair[column]) for pair in PAIRS]
        assert [stats.p50, stats.p90, stats.p99] == pytest.approx(np.percentile(lengths, [50, 90, 99]))
        assert (stats.max, stats.mean) == (max(lengths), pytest.approx(sum(lengths) / 5))
    # By hand: prompt lengths sorted 1, 2, 8, 10, 12 -> median 8, p90 = 10 + 0.6 * 2 = 11.2.
    assert (report.prompt_tokens.p50, report.prompt_tokens.p90) == (8.0, pytest.approx(11.2))


def test_truncation_follows_the_shared_rule(dataset, tokenizer):
    """Pairs 2 and 4 lose prompt tokens, 3 and 4 response tokens: 3 of 5 pairs cut (see PAIRS)."""
    report = coverage_report(dataset, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    assert (report.prompt_truncated, report.response_truncated) == (2, 2)
    assert (report.truncated_pairs, report.truncation_rate) == (3, pytest.approx(0.6))
    assert (report.max_length, report.max_prompt_length) == (MAX_LENGTH, MAX_PROMPT_LENGTH)
    # One more token of budget: pair 3's chosen (15 + EOS = 16 = room 16) and pair 4's rejected
    # (8 + EOS = 9 = room 17 - 8) now fit; the two prompt cuts stay.
    wider = coverage_report(dataset, tokenizer, MAX_LENGTH + 1, MAX_PROMPT_LENGTH)
    assert (wider.prompt_truncated, wider.response_truncated, wider.truncated_pairs) == (2, 0, 2)
    with pytest.raises(ValueError, match="must be below max_length"):
        coverage_report(dataset, tokenizer, 8, 8)


def test_report_is_frozen_json_and_markdown(dataset, tokenizer):
    report = coverage_report(dataset, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    data = json.loads(report.model_dump_json())
    assert data["truncated_pairs"] == 3 and data["skipped"]["malformed_json"] == 1
    assert CoverageReport.model_validate_json(report.model_dump_json()) == report
    with pytest.raises(ValidationError):
        report.duplicates = 0
    md = report.to_markdown()
    assert md.startswith(f"# Dataset coverage: `{dataset.source}`\n")
    expected_rows = [
        f"| fingerprint | `{dataset.fingerprint}` |",
        f"| pairs | 5 (train {report.n_train}, held-out {report.n_heldout}) |",
        "| duplicates dropped | 2 |",
        "| identical chosen/rejected skipped | 1 |",
        "| truncated pairs | 3 (60.0%) |",
        "| text | p50 | p90 | p99 | max | mean |",
        "| prompt | 8.0 | 11.2 | 11.9 | 12 | 6.6 |",
        "| response (chosen or rejected, EOS included) | 2 (40.0%) |",
        "| malformed_json | 1 |",
        f"| {UNCATEGORISED} | {report.categories[2].train} | {report.categories[2].heldout} | 1 |",
    ]
    for row in expected_rows:
        assert row + "\n" in md, row
    assert md.count("\n|---") == 5  # summary, lengths, truncation, categories, skipped tables


def test_markdown_without_skips_and_with_awkward_labels(tmp_path, tokenizer):
    path = tmp_path / "x.jsonl"
    record = {"prompt": "p", "chosen": "c", "rejected": "r", "category": "a|b"}
    path.write_text(json.dumps(record) + "\n")
    ds = load_preference_dataset(DataConfig(path=str(path)))
    md = coverage_report(ds, tokenizer, 16, 8).to_markdown()
    assert "## Skipped records\n\nNone.\n" in md
    assert "| a\\|b | " in md  # a pipe in a label does not break the table


def test_score_margin_filter_is_counted(tmp_path, tokenizer):
    """Margins 3 - 1 = 2, 0.5 (own column), 1 - 1 = 0, none: with min_score_margin 1, the pairs
    at 0.5 and 0 are dropped and counted; the unscored one is a bad record (skipped)."""
    records = [
        {"prompt": "a", "chosen": "x", "rejected": "y", "score_chosen": 3, "score_rejected": 1},
        {"prompt": "b", "chosen": "x", "rejected": "y", "margin": 0.5},
        {"prompt": "c", "chosen": "x", "rejected": "y", "score_chosen": 1, "score_rejected": 1},
        {"prompt": "d", "chosen": "x", "rejected": "y"},
        {"prompt": "e", "chosen": "x", "rejected": "y", "score_chosen": 5.5, "score_rejected": 2},
    ]
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DataConfig(path=str(path), min_score_margin=1, on_bad_record="skip")
    report = coverage_report(load_preference_dataset(cfg), tokenizer, 16, 8)
    assert (report.n_pairs, report.scored_pairs, report.below_min_score_margin) == (2, 2, 2)
    assert (report.min_score_margin, report.skipped) == (1.0, {"missing_field": 1})
    assert "| below min_score_margin dropped | 2 (margin < 1) |\n" in report.to_markdown()
    assert "| pairs with scores | 2 (100.0%) |\n" in report.to_markdown()
    unfiltered = coverage_report(
        load_preference_dataset(DataConfig(path=str(path))), tokenizer, 16, 8
    )
    assert (unfiltered.n_pairs, unfiltered.scored_pairs, unfiltered.below_min_score_margin) == (5, 4, 0)
    assert "| below min_score_margin dropped | off |\n" in unfiltered.to_markdown()
