"""Real data: all 2,312 Anthropic HH-RLHF harmless-base test pairs load, and the coverage report
matches counts made independently here (own JSON reading, own prompt recovery, per-text
tokenisation, numpy percentiles, the truncation rule redone as arithmetic).

The file lives outside the repository (`../shared/data/` from the project root); the tests skip
when it is absent.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from _tokenizers import bpe_tokenizer
from offline.coverage import UNCATEGORISED, CategoryCount, coverage_report
from offline.data import dataset_fingerprint, load_preference_dataset, split_pairs
from offline.config import DataConfig

# ../shared/data from the project root (tests/ -> project root -> its parent).
HH_PATH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless/test.jsonl.gz"
N_RECORDS = 2312
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256
TAG = "\n\nAssistant:"

pytestmark = pytest.mark.skipif(
    not HH_PATH.is_file(), reason=f"real HH-RLHF data not found at {HH_PATH}"
)


@pytest.fixture(scope="module")
def originals() -> list[dict]:
    with gzip.open(HH_PATH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def dataset():
    return load_preference_dataset(
        DataConfig(path=str(HH_PATH), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    )


@pytest.fixture(scope="module")
def tokenizer(originals):
    # A real subword tokenizer trained here on a slice of the data (no download).
    return bpe_tokenizer([r["chosen"] for r in originals[:300]], vocab_size=2000)


@pytest.fixture(scope="module")
def prompts(originals) -> list[str]:
    """Each record's prompt by the definition, literally: the common prefix, cut after its last TAG."""
    out = []
    for r in originals:
        shared = os.path.commonprefix([r["chosen"], r["rejected"]])
        assert TAG in shared, "every record of this file shares at least one Assistant turn"
        out.append(shared[: shared.rindex(TAG) + len(TAG)])
    return out


def test_every_pair_loads_with_the_prompt_as_common_prefix(dataset, originals, prompts):
    assert len(originals) == N_RECORDS
    assert (len(dataset.pairs), dataset.duplicates, dict(dataset.skipped)) == (N_RECORDS, 0, {})
    assert dataset.format == "hh"
    by_text = {(r["chosen"], r["rejected"]): i for i, r in enumerate(originals)}
    seen = set()
    for pair in dataset.pairs:
        key = (pair.prompt + pair.chosen, pair.prompt + pair.rejected)
        i = by_text[key]  # prompt + response == the original dialogue, exactly
        seen.add(key)
        assert pair.prompt == prompts[i]
        assert pair.prompt.startswith("\n\nHuman:") and pair.prompt.endswith(TAG)
        # Convention: the response keeps the space that follows "Assistant:".
        assert pair.chosen.startswith(" ") and pair.rejected.startswith(" ")
        assert pair.chosen != pair.rejected and (pair.category, pair.source_id) == (None, None)
    assert seen == set(by_text)
    # Four chosen replies in this file are a lone space; they are real data and are kept.
    assert sum(p.chosen == " " for p in dataset.pairs) == 4


def test_split_and_fingerprint_on_real_data(dataset):
    train_ids = {p.content_id for p in dataset.train}
    assert train_ids.isdisjoint(p.content_id for p in dataset.heldout)
    assert 160 <= len(dataset.heldout) <= 300  # Binomial(2312, 0.1): mean 231, sd 14.4
    again = load_preference_dataset(DataConfig(path=str(HH_PATH), on_bad_record="skip"))
    assert (again.train, again.heldout, again.fingerprint) == (
        dataset.train, dataset.heldout, dataset.fingerprint
    )
    reseeded = split_pairs(dataset.pairs, 0.1, seed=1)
    assert dataset_fingerprint(*reseeded, "hh") != dataset.fingerprint
    assert dataset_fingerprint(dataset.train, dataset.heldout, "hh") == dataset.fingerprint


def test_coverage_matches_an_independent_count(dataset, originals, prompts, tokenizer):
    report = coverage_report(dataset, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    # Pairs, duplicates, identical responses: counted from the raw records.
    distinct = {(r["chosen"], r["rejected"]) for r in originals}
    assert report.n_pairs == len(distinct) == N_RECORDS
    assert report.duplicates == len(originals) - len(distinct)
    assert report.identical_responses == sum(r["chosen"] == r["rejected"] for r in originals) == 0
    assert report.categories == [
        CategoryCount(category=UNCATEGORISED, train=len(dataset.train), heldout=len(dataset.heldout))
    ]
    # Lengths: one tokenizer call per text (the report batches), prompts recovered here.
    def n_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    prompt_lens, chosen_lens, rejected_lens = [], [], []
    for r, prompt in zip(originals, prompts):
        prompt_lens.append(n_tokens(prompt))
        chosen_lens.append(n_tokens(r["chosen"][len(prompt) :]))
        rejected_lens.append(n_tokens(r["rejected"][len(prompt) :]))
    for stats, lengths in (
        (report.prompt_tokens, prompt_lens),
        (report.chosen_tokens, chosen_lens),
        (report.rejected_tokens, rejected_lens),
    ):
        assert [stats.p50, stats.p90, stats.p99] == pytest.approx(np.percentile(lengths, [50, 90, 99]))
        assert (stats.max, stats.mean) == (max(lengths), pytest.approx(np.mean(lengths)))
    # Truncation as arithmetic: the prompt keeps its last 256 tokens; a response plus EOS must
    # fit in what is left of 512.
    prompt_cut = response_cut = any_cut = 0
    for p, c, j in zip(prompt_lens, chosen_lens, rejected_lens):
        room = MAX_LENGTH - min(p, MAX_PROMPT_LENGTH)
        p_cut, r_cut = p > MAX_PROMPT_LENGTH, (c + 1 > room) or (j + 1 > room)
        prompt_cut += p_cut
        response_cut += r_cut
        any_cut += p_cut or r_cut
    assert (report.prompt_truncated, report.response_truncated, report.truncated_pairs) == (
        prompt_cut, response_cut, any_cut
    )
    assert report.truncation_rate == pytest.approx(any_cut / N_RECORDS)
    assert 0 < any_cut < N_RECORDS  # the budget bites on some real dialogues, not all
    n_train, n_heldout = len(dataset.train), len(dataset.heldout)
    assert f"| pairs | 2,312 (train {n_train:,}, held-out {n_heldout:,}) |" in report.to_markdown()
