"""The judge audit where users meet it: a refresh cycle refusing a position-biased judge before it
loads or generates anything (with the audit as a Prefect artifact), `tether judge audit` and
`tether eval` through typer's CliRunner. Real Prefect (test harness), real redis-server, a tiny
real policy checkpoint, the loopback judge of tests/fake_openai_server.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fake_openai_server import FakeOpenAIServer

from orchestrator.runtime import configure_prefect

configure_prefect()

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from offline.checkpoint import save_checkpoint  # noqa: E402
from offline.demo_task import build_demo_tokenizer  # noqa: E402
from offline.registry import PolicyRegistry  # noqa: E402
from online.audit import JudgeAuditFailed  # noqa: E402
from orchestrator import flows  # noqa: E402
from orchestrator.cli import app  # noqa: E402

PAIRS = 8


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def family(tmp_path: Path, redis_url: str):
    """A state dir whose current policy is a tiny real checkpoint; the config as YAML-ready dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_demo_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    ))
    state = tmp_path / "state"
    ref = save_checkpoint(model, tok, state / "checkpoints" / "audit", "initial", {"kind": "offline"})
    PolicyRegistry(state, "audit").promote(ref, kind="offline")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": f"answer {i} is GOOD",
                                        "rejected": f"answer {i} is meh"}) + "\n" for i in range(40)))
    cfg = {
        "name": "audit", "state_dir": str(state), "model": {"name_or_path": ref.path},
        "data": {"path": str(data), "format": "explicit", "heldout_fraction": 0.5},
        "train": {}, "buffer": {"url": redis_url},
        "online": {
            "prompts": {"function": "offline.demo_task:demo_prompt_pool", "heldout_fraction": 0.25},
            "generation": {"max_new_tokens": 4},
            "judge": {"kind": "llm", "audit": {"pairs": PAIRS},
                      "llm": {"base_url": "http://127.0.0.1:9/v1", "model": "fake-judge", "max_retries": 1,
                              "backoff_base_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 5}},
            "gate": {"metric": "win_rate"},
            "eval_samples": 1, "eval_max_prompts": 3, "kl_prompts": 2, "kl_samples": 1,
        },
    }
    return state, cfg


def write(tmp_path: Path, cfg: dict, base_url: str) -> Path:
    cfg = json.loads(json.dumps(cfg))
    cfg["online"]["judge"]["llm"]["base_url"] = base_url
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def artifact_markdown(flow_run_id, key: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])))
    assert len(arts) == 1, [a.key for a in arts]
    return arts[0].data


def test_a_cycle_refuses_a_position_biased_judge_before_loading_or_generating(harness, family, tmp_path, monkeypatch):
    import online.cycle

    state, cfg = family

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cycle went on past a failed judge audit")

    monkeypatch.setattr(online.cycle, "load_current", must_not_run)
    monkeypatch.setattr(online.cycle, "generate", must_not_run)
    with FakeOpenAIServer(mode="always_a") as server:
        path = write(tmp_path, cfg, server.base_url)
        run = flows.refresh_cycle(str(path), None, run_label="audit", progress=False, return_state=True)
        assert run.is_failed(), run
        with pytest.raises(JudgeAuditFailed, match=r"position-conflict rate 1\.000 \(8/8; 95% CI 0\.676-1\.000\) > "
                                                   r"online\.judge\.audit\.max_position_conflict 0\.4"):
            run.result()
        assert server.n_requests == 2 * PAIRS  # the audit's calls, nothing else
        prompts = {r.body["messages"][1]["content"].split("\n")[1] for r in server.requests}
        assert all(p.startswith("question ") for p in prompts)  # the static dataset's pairs only
        md = artifact_markdown(run.state_details.flow_run_id, "judge-audit")
        assert "FAILS" in md and "| position-conflict rate | 1.000 | 8/8 | 0.676-1.000 | <= 0.4 | NO |" in md
        assert PolicyRegistry(state, "audit").history() == []  # no cycle happened
        assert [p.name for p in (state / "checkpoints" / "audit").iterdir()] == ["initial"]

        # The user's override: the same (cached) audit, and the cycle goes on to load the policy.
        cfg["online"]["judge"]["audit"]["enforce"] = False
        path = write(tmp_path, cfg, server.base_url)
        run = flows.refresh_cycle(str(path), None, run_label="audit-override", progress=False, return_state=True)
        with pytest.raises(AssertionError, match="went on past a failed judge audit"):
            run.result()
        assert server.n_requests == 2 * PAIRS  # no second audit: the cache answered


def test_tether_judge_audit_and_eval_print_the_audit(harness, family, tmp_path):
    state, cfg = family
    runner = CliRunner()
    with FakeOpenAIServer(mode="always_a") as server:
        path = write(tmp_path, cfg, server.base_url)
        bad = runner.invoke(app, ["judge", "audit", "--config", str(path)])
    assert bad.exit_code == 1, bad.output
    assert "position-conflict rate" in bad.output and "the judge fails its audit" in bad.output
    assert "online.judge.audit.max_position_conflict 0.4" in bad.output

    with FakeOpenAIServer() as server:
        path = write(tmp_path, cfg, server.base_url)
        good = runner.invoke(app, ["judge", "audit", "--config", str(path)])
        assert good.exit_code == 0, good.output
        assert "the judge passes its audit" in good.output and server.n_requests == 2 * PAIRS
        again = runner.invoke(app, ["judge", "audit", "--config", str(path)])
        assert again.exit_code == 0 and server.n_requests == 2 * PAIRS  # cached
        fresh = runner.invoke(app, ["judge", "audit", "--config", str(path), "--refresh"])
        assert fresh.exit_code == 0 and server.n_requests == 4 * PAIRS
        ev = runner.invoke(app, ["eval", "--config", str(path)])
        assert ev.exit_code == 0, ev.output
        assert "judge audit of llm:fake-judge" in ev.output and "the judge passes its audit" in ev.output
        assert server.n_requests == 4 * PAIRS  # eval showed the cached audit
    audits = sorted((state / "judge-audits").glob("*.json"))
    assert len(audits) == 2  # one per endpoint: each fake server listens on its own port


def rm_config(tmp_path: Path, cfg: dict, rm: Path, **audit) -> Path:
    """The family's config with a reward-model judge at `rm`, scoring by reward; written as YAML."""
    cfg = json.loads(json.dumps(cfg))
    cfg["online"]["judge"] = {"kind": "reward_model", "audit": {"pairs": PAIRS, **audit},
                              "reward_model": {"path": str(rm), "device": "cpu"}}
    cfg["online"]["gate"] = {"metric": "reward"}
    cfg["online"].update(min_fresh_pairs=1, train_pairs=16)  # a tiny policy's few samples: train on what there is
    path = tmp_path / "config-rm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tether_judge_audit_of_a_reward_model(harness, family, tmp_path):
    """`tether judge audit` on a reward-model judge: scored replies, no orders: the table shows
    the position-conflict rate as n/a, and the verdict rests on agreement alone."""
    from _reward_models import save_reward_model

    state, cfg = family
    runner = CliRunner()
    good = runner.invoke(app, ["judge", "audit", "--config", str(rm_config(tmp_path, cfg, save_reward_model(tmp_path / "good", 1.0)))])
    assert good.exit_code == 0, good.output
    text = " ".join(good.output.split())  # rich wraps long cells
    assert "judge audit of reward_model:good" in text and "the judge passes its audit" in text
    assert "n/a" in text and "not applicable" in text and "1.000" in text

    bad = runner.invoke(app, ["judge", "audit", "--config", str(rm_config(tmp_path, cfg, save_reward_model(tmp_path / "bad", -1.0)))])
    assert bad.exit_code == 1, bad.output
    verdict = " ".join(bad.output.split("the judge fails its audit:", 1)[1].split())
    assert verdict == (f"agreement with human labels 0.000 (0/{PAIRS}; 95% CI 0.000-0.324) "
                       "< online.judge.audit.min_agreement 0.6")  # no position-conflict failure
    assert len(list((state / "judge-audits").glob("*.json"))) == 2


def test_a_cycle_audits_a_reward_model_judge_when_enabled(harness, family, tmp_path, monkeypatch):
    """`audit.enabled: true` audits a reward-model judge at the cycle's start: one that ranks
    against the humans stops the cycle before it loads or generates anything; one that agrees
    lets it run, and its audit (without a position-conflict figure) goes into the lineage."""
    import online.cycle
    from _reward_models import save_reward_model
    from offline.checkpoint import read_lineage

    state, cfg = family
    bad = rm_config(tmp_path, cfg, save_reward_model(tmp_path / "bad", -1.0), enabled=True)
    load_current, generate = online.cycle.load_current, online.cycle.generate

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cycle went on past a failed judge audit")

    monkeypatch.setattr(online.cycle, "load_current", must_not_run)
    monkeypatch.setattr(online.cycle, "generate", must_not_run)
    run = flows.refresh_cycle(str(bad), None, run_label="rm-bad", progress=False, return_state=True)
    assert run.is_failed(), run
    with pytest.raises(JudgeAuditFailed, match=r"judge reward_model:bad failed its audit .*agreement with human "
                                               r"labels 0\.000 \(0/8; 95% CI 0\.000-0\.324\) < "):
        run.result()
    md = artifact_markdown(run.state_details.flow_run_id, "judge-audit")
    assert "FAILS" in md and "each reply scored alone" in md
    assert "| position-conflict rate | n/a |  |  | not applicable: scores each reply alone, in no order |  |" in md
    assert PolicyRegistry(state, "audit").history() == []

    monkeypatch.setattr(online.cycle, "load_current", load_current)
    monkeypatch.setattr(online.cycle, "generate", generate)
    good = rm_config(tmp_path, cfg, save_reward_model(tmp_path / "good", 1.0), enabled=True)
    run = flows.refresh_cycle(str(good), None, run_label="rm-good", progress=False, return_state=True)
    rep = run.result()
    assert rep["audit"]["judge"] == "reward_model:good" and rep["audit"]["position_conflict"] is None
    assert rep["audit"]["agreement"]["value"] == 1.0
    lineage = read_lineage(rep["checkpoint"]["path"])["final_metrics"]["judge_audit"]
    assert lineage["judge_audit/agreement"] == 1.0 and "judge_audit/position_conflict" not in lineage
    md = artifact_markdown(run.state_details.flow_run_id, "refresh-cycle-metrics")
    assert "Judge audit: reward_model:good, agreement with human labels 1.000 (8/8; " in md
    assert "position conflicts n/a (scores each reply alone)" in md
