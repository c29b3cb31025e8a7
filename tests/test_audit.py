"""The judge audit (online/audit.py): its statistics by hand, against a real loopback judge
(tests/fake_openai_server.py) answering well, with position bias, or against the humans; the
cache; a cycle refusing a bad judge before it loads or generates anything; `tether judge audit`.

The dataset is explicit pairs whose human-chosen reply contains "GOOD" (the fake judge's
marker), so a judge in "rule" mode agrees with the humans, `marker="meh"` disagrees with them,
and `mode="always_a"` answers "A" in both orders (position bias, like SmolLM2-135M as a judge).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from fake_openai_server import FakeOpenAIServer

from offline.pairs import PreferencePair
from online.audit import (
    AuditCounts,
    JudgeAuditFailed,
    audit_failures,
    audit_path,
    audit_rows,
    count_outcomes,
    neutralised_flag,
    rate,
    require_usable,
    run_audit,
    select_audit_pairs,
    summarise,
    wilson_interval,
)
from online.config import JudgeAuditConfig
from online.types import JudgeStats, Judgment
from orchestrator.config import load_config, with_setting

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 12  # audit pairs per test: 24 calls


# -- statistics, by hand ------------------------------------------------------------------------


def test_wilson_interval_matches_values_worked_by_hand():
    """z = 1.959964, z^2 = 3.841459; each value rounded to 6 decimals.

    k=5, n=10: p = 0.5, centre = 0.5; half = z * sqrt(0.025 + z^2/400) / (1 + z^2/10)
      = 1.959964 * sqrt(0.0346036) / 1.3841459 = 1.959964 * 0.186021 / 1.3841459 = 0.263407
      -> (0.236593, 0.763407) (the textbook 0.2366-0.7634).
    k=0, n=10: centre = half = (z^2/20) / 1.3841459 = 0.192073 / 1.3841459 = 0.138766 -> (0, 0.277533).
    k=10, n=10: the mirror image -> (0.722467, 1).
    k=48, n=64: p = 0.75; centre = (0.75 + z^2/128) / (1 + z^2/64) = 0.780011 / 1.060023 = 0.735844;
      half = 1.959964 * sqrt(0.1875/64 + z^2/16384) / 1.060023
      = 1.959964 * sqrt(0.00292969 + 0.00023446) / 1.060023 = 1.959964 * 0.0562508 / 1.060023 = 0.104007
      -> (0.631837, 0.839851).
    """
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert wilson_interval(48, 64) == pytest.approx((0.631837, 0.839851), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing known
    for bad in ((-1, 3), (4, 3), (0, -1)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    r = rate(48, 64)
    assert (r.k, r.n, r.value) == (48, 64, 0.75) and r.text() == "0.750 (48/64; 95% CI 0.632-0.840)"
    assert rate(0, 0).value is None and rate(0, 0).text() == "undefined (0/0)"


def counts(**kw) -> AuditCounts:
    base = dict(requested=64, agree=0, disagree=0, ties=0, position_conflicts=0, unparseable=0, errors=0, not_asked=0)
    return AuditCounts(**{**base, **kw})


def audit_of(c: AuditCounts, stats: JudgeStats = JudgeStats()):
    return summarise(c, stats, key="k", judge="llm:j", identity={}, fingerprint="f" * 64, source="data.jsonl",
                     seed=0, seconds=0.1, created_at=0.0)


def test_figures_and_the_failures_they_cause():
    """40 agree, 8 disagree, 6 ties, 6 position conflicts, 2 unparseable, 2 failed: 62 answered.
    agreement 40/48 = 0.833 of decided and 40/62 = 0.645 of answered; conflicts 6/62 = 0.097.
    128 calls over 64 pairs asked = 2,000 per 1,000 pairs; $0.064 -> $1 per 1,000 pairs and
    $0.064 / 48 labels * 1000 = $1.333 per 1,000 labels."""
    c = counts(agree=40, disagree=8, ties=6, position_conflicts=6, unparseable=2, errors=2)
    stats = JudgeStats(calls=128, cost_usd=0.064, judgments=48, ties=12, position_conflicts=6, unparseable=2, errors=2)
    a = audit_of(c, stats)
    assert (c.decisive, c.answered) == (48, 62)
    assert (a.agreement.k, a.agreement.n) == (40, 48) and a.agreement.value == pytest.approx(40 / 48)
    assert (a.agreement_all.k, a.agreement_all.n) == (40, 62)
    assert a.position_conflict.value == pytest.approx(6 / 62) and a.tie.value == pytest.approx(6 / 62)
    assert a.unparseable.value == pytest.approx(2 / 62)
    assert a.calls_per_1k_pairs == pytest.approx(2000) and a.cost_per_1k_pairs == pytest.approx(1.0)
    assert a.cost_per_1k_labels == pytest.approx(0.064 / 48 * 1000)
    assert audit_failures(a, JudgeAuditConfig()) == []
    strict = JudgeAuditConfig(min_agreement=0.9, max_position_conflict=0.05, max_unparseable=0.01)
    texts = [f.text() for f in audit_failures(a, strict)]
    assert texts == [
        "agreement with human labels 0.833 (40/48; 95% CI 0.704-0.913) < online.judge.audit.min_agreement 0.9",
        "position-conflict rate 0.097 (6/62; 95% CI 0.045-0.195) > online.judge.audit.max_position_conflict 0.05",
        "unparseable rate 0.032 (2/62; 95% CI 0.009-0.110) > online.judge.audit.max_unparseable 0.01",
    ]


def test_a_judge_with_no_decided_pair_has_no_usable_label():
    a = audit_of(counts(position_conflicts=60, ties=4))
    (fail_agreement, fail_conflict) = audit_failures(a, JudgeAuditConfig())
    assert fail_agreement.figure == "agreement with human labels" and "no usable label" in fail_agreement.value
    assert fail_conflict.figure == "position-conflict rate" and fail_conflict.value.startswith("0.938 (60/64")
    nothing = audit_failures(audit_of(counts(errors=64)), JudgeAuditConfig())
    assert [f.figure for f in nothing] == ["answered pairs"] and "64 failed requests" in nothing[0].value
    # Thresholds are checked at use, not stored: the same audit passes a looser config.
    assert audit_failures(audit_of(counts(agree=3, disagree=2)), JudgeAuditConfig(min_agreement=0.6)) == []
    assert audit_failures(audit_of(counts(agree=3, disagree=2)), JudgeAuditConfig(min_agreement=0.61)) != []


def pair(i: int, chosen: str | None = None, rejected: str | None = None) -> PreferencePair:
    return PreferencePair(prompt=f"question {i}?", chosen=chosen or f"answer {i} is GOOD",
                          rejected=rejected or f"answer {i} is meh")


def test_labels_are_matched_to_the_human_choice():
    pairs = [pair(0), pair(1), pair(2), pair(3)]

    def j(p: PreferencePair, agree: bool) -> Judgment:
        c, r = (p.chosen, p.rejected) if agree else (p.rejected, p.chosen)
        return Judgment(prompt=p.prompt, chosen=c, rejected=r, judge="x", confidence=1.0)

    stats = JudgeStats(judgments=2, ties=2, position_conflicts=1)
    c = count_outcomes(pairs, [j(pairs[0], True), j(pairs[2], False)], stats)
    assert (c.agree, c.disagree, c.ties, c.position_conflicts, c.not_asked) == (1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="not asked about"):
        count_outcomes(pairs[:1], [j(pairs[2], True)], JudgeStats(judgments=1))


def test_audit_pairs_are_a_seeded_sample_of_judgeable_pairs():
    heldout = [pair(i) for i in range(30)] + [
        pair(90, "same", " same "),  # identical after stripping: the judge would skip it
        pair(0, "answer 0 is meh", "answer 0 is GOOD"),  # pair 0 with its replies swapped
    ]
    a = select_audit_pairs(heldout, 10, seed=3)
    assert a == select_audit_pairs(heldout, 10, seed=3) and a != select_audit_pairs(heldout, 10, seed=4)
    assert len(a) == len(set(a)) == 10
    everything = select_audit_pairs(heldout, 100, seed=3)
    assert len(everything) == 30 and all(p.prompt != "question 90?" for p in everything)


def test_neutralised_flag_is_raised_above_the_configured_share():
    assert neutralised_flag(0, 0, 0.1) is None and neutralised_flag(10, 100, 0.1) is None
    flag = neutralised_flag(11, 100, 0.1)
    assert flag is not None and "11 of 100 samples (11.0%)" in flag and "max_neutralised_fraction 0.1" in flag


# -- against a real loopback judge --------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """60 explicit pairs, the human's choice marked GOOD; a held-out fraction of 0.5."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in (pair(i) for i in range(60))))
    return path


def overrides(tmp_path: Path, dataset: Path, base_url: str, **audit) -> dict:
    return {
        "state_dir": str(tmp_path / "state"),
        "model": {"name_or_path": str(tmp_path / "no-model-needed")},  # explicit data: no tokenizer loaded
        "data": {"path": str(dataset), "format": "explicit", "heldout_fraction": 0.5},
        "train": {},
        "online": {
            "prompts": {"function": "offline.demo_task:demo_prompt_pool"},
            "judge": {"kind": "llm", "audit": {"pairs": PAIRS, **audit},
                      "llm": {"base_url": base_url, "model": "fake-judge", "max_retries": 1, "backoff_base_s": 0.01,
                              "backoff_max_s": 0.02, "timeout_s": 5}},
            "gate": {"metric": "win_rate"},
        },
    }


def test_a_position_biased_judge_fails_on_its_position_conflicts(tmp_path, dataset):
    with FakeOpenAIServer(mode="always_a") as server:
        cfg = load_config(None, overrides(tmp_path, dataset, server.base_url))
        audit = run_audit(cfg)
        assert server.n_requests == audit.calls == 2 * PAIRS  # both orders of every pair
    assert (audit.position_conflict.k, audit.position_conflict.n) == (PAIRS, PAIRS)
    assert audit.position_conflict.value == 1.0 and audit.agreement.value is None
    assert audit.counts.decisive == 0 and audit.judge == "llm:fake-judge"
    with pytest.raises(JudgeAuditFailed) as info:
        require_usable(audit, cfg.online.judge.audit)
    msg = str(info.value)
    assert f"position-conflict rate 1.000 ({PAIRS}/{PAIRS}; 95% CI 0.758-1.000) > " \
           "online.judge.audit.max_position_conflict 0.4" in msg
    assert "no usable label" in msg and "--set online.judge.audit.enforce=false" in msg
    assert "tether judge audit --config CFG --refresh" in msg


def test_a_good_judge_passes_and_its_audit_is_cached(tmp_path, dataset):
    with FakeOpenAIServer() as server:
        cfg = load_config(None, overrides(tmp_path, dataset, server.base_url))
        audit = run_audit(cfg)
        assert server.n_requests == 2 * PAIRS
        assert (audit.agreement.k, audit.agreement.n) == (PAIRS, PAIRS) and audit.position_conflict.value == 0.0
        require_usable(audit, cfg.online.judge.audit)  # passes: no exception
        path = audit_path(cfg.state_dir, audit.key)
        assert json.loads(path.read_text())["key"] == audit.key
        assert audit.identity == {"kind": "llm", "model": "fake-judge", "endpoint": server.base_url,
                                  "template": "pairwise-v1", "temperature": 0.0}

        again = run_audit(cfg)
        assert again == audit and server.n_requests == 2 * PAIRS  # the cache answered: no second round
        refreshed = run_audit(cfg, refresh=True)
        assert server.n_requests == 4 * PAIRS and refreshed.created_at > audit.created_at
        # Another judge model (or template, endpoint, dataset) is another audit.
        other = with_setting(cfg, "online.judge.llm.model", "judge-2")
        assert run_audit(other).key != audit.key and server.n_requests == 6 * PAIRS


def test_a_judge_that_contradicts_the_humans_fails_on_agreement(tmp_path, dataset, caplog):
    with FakeOpenAIServer(marker="meh") as server:
        cfg = load_config(None, overrides(tmp_path, dataset, server.base_url))
        audit = run_audit(cfg)
    assert (audit.agreement.k, audit.agreement.n) == (0, PAIRS)
    (failure,) = audit_failures(audit, cfg.online.judge.audit)
    assert failure.figure == "agreement with human labels" and "< online.judge.audit.min_agreement 0.6" in failure.text()
    lenient = cfg.online.judge.audit.model_copy(update={"enforce": False})
    with caplog.at_level(logging.WARNING, logger="online.audit"):
        require_usable(audit, lenient)  # warns instead of raising
    assert "agreement with human labels 0.000" in caplog.text and "enforce is off" in caplog.text


def test_a_rule_judge_is_audited_without_calls(tmp_path):
    from offline.demo_task import write_demo_dataset

    data = write_demo_dataset(tmp_path / "demo.jsonl", n=300)
    o = {"state_dir": str(tmp_path / "state"), "model": {"name_or_path": "demo:tiny"},
         "data": {"path": str(data), "format": "explicit"}, "train": {},
         "online": {"prompts": {"function": "offline.demo_task:demo_prompt_pool"},
                    "judge": {"kind": "rule", "rule": {"function": "offline.demo_task:rule_reward", "min_margin": 0.1},
                              "audit": {"pairs": 20}}}}
    cfg = load_config(None, o)
    assert not cfg.online.judge.audit.active("rule") and cfg.online.judge.audit.active("llm")
    audit = run_audit(cfg)
    # The demo's chosen replies are the right answers and its rejected ones 1-2 digits off.
    assert (audit.agreement.k, audit.agreement.n) == (20, 20) and audit.calls == 0
    # A rule scores each reply alone: no position-conflict rate (not a silent 0), no threshold on it.
    assert audit.position_conflict is None and audit.cost_per_1k_labels == 0.0
    (row,) = [r for r in audit_rows(audit, cfg.online.judge.audit) if r["figure"] == "position-conflict rate"]
    assert row["value"] == "n/a" and row["ok"] == "" and "not applicable" in row["threshold"]
    assert "judge_audit/position_conflict" not in audit.summary()


# -- a reward-model judge: one score per reply, no order ----------------------------------------


def rm_overrides(tmp_path: Path, data: Path, rm: Path, pairs: int = PAIRS, min_margin: float = 0.0) -> dict:
    return {
        "state_dir": str(tmp_path / "state"), "model": {"name_or_path": str(tmp_path / "no-model-needed")},
        "data": {"path": str(data), "format": "explicit", "heldout_fraction": 0.5}, "train": {},
        "online": {"prompts": {"function": "offline.demo_task:demo_prompt_pool"},
                   "judge": {"kind": "reward_model", "audit": {"pairs": pairs},
                             "reward_model": {"path": str(rm), "device": "cpu", "batch_size": 5,
                                              "min_margin": min_margin}}},
    }


def test_a_reward_model_agrees_when_it_scores_the_human_choice_higher(tmp_path):
    """Agreement for a scalar judge is reward(prompt + chosen) > reward(prompt + rejected) (by at
    least min_margin), each reply scored alone: checked against scores computed here one text at
    a time, with a random reward model and replies whose last words vary, so every outcome
    (agree, disagree, tie) occurs. It has no position-conflict rate: n/a, not 0."""
    import random as _random

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from _reward_models import save_reward_model
    from offline.data import load_preference_dataset
    from offline.seeds import derive_seed

    rm = save_reward_model(tmp_path / "rm", direction=None)
    rng, ends = _random.Random(1), ["GOOD", "meh", "fine", "is", "answer", "question", ".", "?"]
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as f:
        for i in range(80):
            a, b = rng.sample(ends, 2)
            f.write(json.dumps({"prompt": f"question {i}?", "chosen": f"answer {i % 10} is {a}",
                                "rejected": f"answer {i % 10} is {b}"}) + "\n")
    cfg = load_config(None, rm_overrides(tmp_path, data, rm, pairs=30))
    audit = run_audit(cfg)

    tok, model = AutoTokenizer.from_pretrained(rm), AutoModelForSequenceClassification.from_pretrained(rm).eval()

    def reward(text: str) -> float:
        with torch.inference_mode():
            return model(**tok(text, return_tensors="pt")).logits[0, 0].item()  # (1, 1) -> scalar

    heldout = load_preference_dataset(cfg.data).heldout
    asked = select_audit_pairs(heldout, 30, derive_seed(cfg.seed, "judge-audit"))
    margins = [reward(p.prompt + p.chosen) - reward(p.prompt + p.rejected) for p in asked]

    def expected(min_margin: float) -> tuple[int, int, int]:
        agree = sum(m > 0 and m >= min_margin for m in margins)
        disagree = sum(-m > 0 and -m >= min_margin for m in margins)
        return agree, disagree, len(margins) - agree - disagree

    c = audit.counts
    assert (c.requested, c.answered) == (30, 30) and audit.calls == 0 and audit.cost_usd == 0.0
    assert (c.agree, c.disagree, c.ties) == expected(0.0) and c.agree > 0 and c.disagree > 0
    assert (audit.agreement.k, audit.agreement.n) == (c.agree, c.agree + c.disagree)
    assert c.position_conflicts == 0 and c.unparseable == 0 and audit.position_conflict is None
    assert audit.judge == "reward_model:rm" and audit.identity["kind"] == "reward_model"

    # A margin halfway between two measured ones turns the smaller margins into ties.
    sizes = sorted(abs(m) for m in margins)
    min_margin = (sizes[12] + sizes[13]) / 2
    strict = run_audit(load_config(None, rm_overrides(tmp_path, data, rm, pairs=30, min_margin=min_margin)))
    assert strict.key != audit.key  # min_margin is part of the judge's identity
    assert (strict.counts.agree, strict.counts.disagree, strict.counts.ties) == expected(min_margin)
    assert strict.counts.ties >= 13 and strict.tie.value == pytest.approx(strict.counts.ties / 30)

    # The tables and messages say n/a for position conflicts, never a silent 0.
    (row,) = [r for r in audit_rows(audit, cfg.online.judge.audit) if r["figure"] == "position-conflict rate"]
    assert row == {"figure": "position-conflict rate", "value": "n/a", "k/n": "", "95% CI": "",
                   "threshold": "not applicable: scores each reply alone, in no order", "ok": ""}
    assert set(audit.summary()) == {"judge_audit/key", "judge_audit/pairs", "judge_audit/agreement",
                                    "judge_audit/agreement_all", "judge_audit/tie", "judge_audit/unparseable",
                                    "judge_audit/cost_per_1k_labels"}


def test_a_reward_model_that_ranks_against_the_humans_fails_and_never_on_position(tmp_path, dataset):
    from _reward_models import save_reward_model

    good = run_audit(load_config(None, rm_overrides(tmp_path, dataset, save_reward_model(tmp_path / "good", 1.0))))
    assert (good.agreement.k, good.agreement.n) == (PAIRS, PAIRS) and good.position_conflict is None
    assert audit_failures(good, JudgeAuditConfig()) == []

    bad_cfg = load_config(None, rm_overrides(tmp_path, dataset, save_reward_model(tmp_path / "bad", -1.0)))
    bad = run_audit(bad_cfg)
    assert (bad.agreement.k, bad.agreement.n) == (0, PAIRS)
    (failure,) = audit_failures(bad, bad_cfg.online.judge.audit)  # agreement only: no position figure
    # Wilson at k=0, n=12: upper = 2 (z^2/24) / (1 + z^2/12) = 0.320122 / 1.320122 = 0.242 (z^2 = 3.841459).
    assert failure.text() == (f"agreement with human labels 0.000 (0/{PAIRS}; 95% CI 0.000-0.242) "
                              "< online.judge.audit.min_agreement 0.6")
    with pytest.raises(JudgeAuditFailed, match="judge reward_model:bad failed its audit"):
        require_usable(bad, bad_cfg.online.judge.audit)

    # Every margin below min_margin: all ties, no usable label; the message names no position conflicts.
    tied_cfg = load_config(None, rm_overrides(tmp_path, dataset, tmp_path / "good", min_margin=1e6))
    (tied,) = audit_failures(run_audit(tied_cfg), tied_cfg.online.judge.audit)
    assert tied.value == f"undefined: the judge produced no usable label ({PAIRS} ties, 0 unparseable of {PAIRS})"


def test_a_reward_model_saved_again_under_the_same_path_is_audited_again(tmp_path, dataset):
    """The cache key stamps the model's files: new weights at the same path are a new judge."""
    from _reward_models import save_reward_model

    rm = save_reward_model(tmp_path / "rm", 1.0)
    cfg = load_config(None, rm_overrides(tmp_path, dataset, rm))
    first = run_audit(cfg)
    assert run_audit(cfg) == first  # cached
    for f in rm.iterdir():
        f.unlink()
    save_reward_model(rm, -1.0)  # retrained in place, the same path
    again = run_audit(cfg)
    assert again.key != first.key and again.identity["files"] != first.identity["files"]
    assert (first.agreement.k, again.agreement.k) == (PAIRS, 0)


def test_an_audit_on_fewer_pairs_than_asked_for_says_so(tmp_path, dataset, caplog):
    from _reward_models import save_reward_model

    cfg = load_config(None, rm_overrides(tmp_path, dataset, save_reward_model(tmp_path / "rm", 1.0), pairs=100))
    with caplog.at_level(logging.WARNING, logger="online.audit"):
        audit = run_audit(cfg)
    n = audit.counts.requested
    assert 20 <= n <= 40  # about half of 60 pairs are held out
    assert f"only {n} of the 100 pairs asked for (online.judge.audit.pairs)" in caplog.text
    assert "raise data.heldout_fraction" in caplog.text
