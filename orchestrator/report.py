"""The efficacy report: does the hybrid loop do what it claims, on a task, with a fixed seed?

Any config with an online section: the demo task, the SmolLM2 instruction-constraints task
(configs/smollm2-constraints.yaml, scored by its pass rate), the SmolLM2 HH-RLHF path (win
rates). Stages, each scored the same way (the evaluation scorer's mean over the policy's own
samples on held-out prompts, with its standard error, clustered by prompt; KL to pi_0): the initial policy, the offline-only baseline, N online refresh cycles, and one
deliberate **budget probe** (a cycle run with its KL budget set below the KL the policy already
has), which must be rolled back. The probe runs with `promote=False`: whatever the gate says,
the pointer never moves, and a probe the gate would have passed (its KL estimate came out
within the halved budget) is reported "inconclusive", never promoted. The claims are checked
from the figures and the verdict of each is written next to them, true or not; a claim whose
evidence is missing (no promoted cycle because every cycle was inconclusive, a probe inside its
budget) or too noisy (a lift whose confidence interval includes zero) is "not shown", never
"holds":

1. offline DPO improves the covered categories over the initial policy;
2. online cycles improve the held-out categories beyond the offline-only baseline;
3. every promoted cycle is within the KL budget;
4. a cycle that breaks the budget is rolled back (the probe).

Every stage is scored by the configured judge, so the judge is audited first (`online.audit`,
when audits are on for it). A judge that fails its audit with `audit.enforce` on stops the
report before anything is built, trained or scored: the report is still written, and says so
plainly (its headline, every stage "not run" / "not scored", the probe "not tested", each claim
"not tested", the audit's table), and `tether report` exits 1. With `enforce` off the report
runs and its headline says that every figure is that failed judge's.

Outputs under `out_dir`: report.md (tables and verdicts), report.json (all figures),
report.png (reward per category and KL vs budget per stage).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from online.stats import normal_quantile
from orchestrator.artifacts import markdown_table


def fresh_state_dir(base_state: Path, out_dir: Path) -> Path:
    """A clean state dir for the report, reusing built models (the demo policy, SmolLM2)."""
    state = out_dir / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    models = base_state / "models"
    if models.is_dir():
        shutil.copytree(models, state / "models", symlinks=True,
                        ignore=shutil.ignore_patterns(".tmp-*", ".*.tmp"))
    return state


GATE_COLUMNS = ["gate/verdict", "gate/n", "gate/min_category_n", "gate/lower_bound",
                "gate/worst_category_lower_bound", "gate/threshold", "gate/length_ratio"]
"""The gate's evidence per cycle row: decisive judgments / reward samples (overall, and the
fewest in one category), the lower confidence bounds (overall, worst category) against the
threshold, the response-length ratio to the parent, and the verdict."""


def gate_columns(rep: dict[str, Any]) -> dict[str, Any]:
    """A cycle's gate evidence as row columns (NaN where the cycle did not reach the gate)."""
    gate = rep.get("gate", {})
    return {"gate/verdict": rep.get("verdict", "-"),
            **{c: gate.get(c, float("nan")) for c in GATE_COLUMNS if c != "gate/verdict"}}


def stderr_columns(stderr: dict[str, float] | None, covered: set[str]) -> dict[str, float]:
    """A stage's standard errors as row columns (pure): `stderr/<category>`, `stderr/mean`, and
    `stderr/covered` / `stderr/heldout` for the unweighted means of category means that
    `reward/covered` / `reward/heldout` are (independent categories: sqrt(sum se^2) / C).
    NaN throughout when the stage's evaluation carried no spread (`stderr` None)."""
    se = dict(stderr or {})
    cats = [c for c in se if c != "mean"]

    def pooled(group: list[str]) -> float:
        return math.sqrt(sum(se[c] ** 2 for c in group)) / len(group) if group else math.nan

    return {
        "stderr/covered": pooled([c for c in cats if c in covered]),
        "stderr/heldout": pooled([c for c in cats if c not in covered]),
        "stderr/mean": se.get("mean", math.nan),
        **{f"stderr/{c}": se[c] for c in sorted(cats)},
    }


def decision_columns(rep: dict[str, Any]) -> dict[str, Any]:
    """Why a cycle was promoted or not (the gate's reasons, joined), and the judge's time per
    1,000 labels (a rule judge costs no money, but it costs CPU)."""
    labels = rep.get("judge", {}).get("judge/judgments", 0.0)
    seconds = rep.get("seconds", {}).get("judge", math.nan)
    return {"gate/reasons": "; ".join(rep.get("reasons") or []) or "-",
            "judge/seconds_per_1k_judgments": 1000.0 * seconds / labels if labels else math.nan}


def probe_label(verdict: str) -> str:
    """The probe's outcome: rolled back by the gate, or inconclusive (never "yes": it cannot promote)."""
    if verdict == "reject":
        return "no (rolled back)"
    if verdict == "promote":
        return "inconclusive (the gate passed it: not a test of the budget; the probe never promotes)"
    return "inconclusive (too little evidence; not promoted)"


CLAIM_OFFLINE = "offline DPO improves the covered categories"
CLAIM_ONLINE = "online cycles improve the held-out categories beyond offline-only"
CLAIM_KL = "every promoted cycle is within the KL budget"
CLAIM_PROBE = "a cycle that breaks the budget is rolled back"


def lift_verdict(before: dict[str, Any], after: dict[str, Any], group: str, confidence: float = 0.95,
                 tolerance: float = 0.0) -> tuple[bool | None, str]:
    """Does `after` score higher than `before` on `group` ("covered"/"heldout")? (pure)

    With both standard errors known, a lift holds only when the low end of its two-sided
    `confidence` interval is above `tolerance`; a positive lift inside the noise is not shown
    (None), never "holds". The interval treats the two stages as independent samples, which
    is conservative: they are scored on the same held-out prompts, whose shared difficulty
    pairing would cancel. Without standard errors the point estimates decide. Returns the
    verdict and a note for the evidence ("" when the point estimates decide).
    """
    diff = after[f"reward/{group}"] - before[f"reward/{group}"]
    se = math.hypot(_stderr(before, group), _stderr(after, group))
    if not math.isfinite(se):
        return diff > tolerance, ""
    half = normal_quantile(0.5 + confidence / 2) * se
    interval = f"lift {diff:+.3f}, {confidence:.0%} interval [{diff - half:+.3f}, {diff + half:+.3f}]"
    if diff <= tolerance:
        return False, f"; {interval}"
    if diff - half > tolerance:
        return True, f"; {interval}"
    return None, f"; not shown: {interval} includes {tolerance:g} (within the noise)"


def check_claims(rows: list[dict[str, Any]], probe: dict[str, Any] | None, tolerance: float = 0.0,
                 confidence: float = 0.95) -> list[dict[str, Any]]:
    """Each claim with the figures behind it and whether they bear it out (pure).

    `holds` is True, False, or None when the figures cannot say: not measurable (e.g. the
    static dataset shares no category with the prompt pool, so there is no "covered" score) or
    not shown (the evidence is missing: no cycle was promoted and some were inconclusive; the
    probe stayed within its budget), or a lift whose interval includes zero (`lift_verdict`).
    """
    by = {r["stage"]: r for r in rows}
    initial, offline = by.get("initial"), by.get("offline")
    cycles = [r for r in rows if r["stage"].startswith("cycle")]
    promoted = [r for r in cycles if r["promoted"] == "yes"]
    inconclusive = [r["stage"] for r in cycles if r.get("gate/verdict") == "inconclusive"]
    best_row = max(promoted, key=lambda r: r["reward/heldout"], default={})
    best_cycle = best_row.get("reward/heldout", float("nan"))
    out = []
    if initial and offline:
        before, after = initial["reward/covered"], offline["reward/covered"]
        measurable = math.isfinite(before) and math.isfinite(after)
        holds, note = lift_verdict(initial, offline, "covered", confidence, tolerance) if measurable else (None, "")
        out.append({
            "claim": CLAIM_OFFLINE,
            "evidence": f"covered reward {before:.3f}{_pm(initial, 'covered')} -> {after:.3f}{_pm(offline, 'covered')}{note}"
                        if measurable
                        else "not measurable: no prompt-pool category is in the static dataset",
            "holds": holds,
        })
    if offline:
        measurable = math.isfinite(offline["reward/heldout"])
        # No promoted cycle because the evidence was too thin is not "online did not help": not shown.
        unshown = not promoted and bool(inconclusive)
        holds, note = (lift_verdict(offline, best_row, "heldout", confidence, tolerance) if measurable and promoted
                       else (None if unshown or not measurable else False, ""))
        out.append({
            "claim": CLAIM_ONLINE,
            "evidence": (f"held-out reward offline {offline['reward/heldout']:.3f}{_pm(offline, 'heldout')}, "
                         f"best promoted cycle {best_cycle:.3f}{_pm(best_row, 'heldout')}{note}"
                         if promoted else "no cycle was promoted"
                         + (f"; not shown: {', '.join(inconclusive)} inconclusive (too little evidence)"
                            if inconclusive else "")) if measurable
                        else "not measurable: every prompt-pool category is in the static dataset",
            "holds": holds,
        })
    over = [r for r in promoted if not (r["kl/policy_ref"] <= r["kl_budget"])]
    out.append({
        "claim": CLAIM_KL,
        "evidence": ", ".join(f"{r['stage']}: KL {r['kl/policy_ref']:.3f} <= {r['kl_budget']:g}" for r in promoted)
                    or "not tested: no cycle was promoted",
        "holds": not over if promoted else None,
    })
    if probe is not None:
        broke = probe["kl/policy_ref"] > probe["kl_budget"]
        gate = probe.get("gate/verdict") or ("promote" if probe["promoted"] == "yes" else "reject")
        out.append({
            "claim": CLAIM_PROBE,
            "evidence": f"probe: KL {probe['kl/policy_ref']:.3f} vs budget {probe['kl_budget']:.3g}; "
                        f"gate verdict: {gate}; {probe['promoted']}"
                        + ("" if broke else "; not shown: the probe stayed within its budget (the current "
                                            "policy's KL is too small to halve meaningfully)"),
            # A probe inside its budget tests nothing about over-budget cycles; one over it must
            # have been rejected (KL over budget is a hard failure, never merely inconclusive).
            "holds": gate == "reject" if broke else None,
        })
    return out


NOT_RUN = {
    "initial": "not scored (the judge failed its audit)",
    "offline": "not run (no judge to score it)",
    "cycle": "no: not run (no label, no training)",
    "budget probe": "not tested (no cycle ran)",
}
"""Each stage's outcome in a report stopped by its judge's failed audit."""


def judge_failed_rows(cycles: int, budget: float) -> list[dict[str, Any]]:
    """The stages of a report whose judge failed its audit: none scored, trained or run (pure)."""
    nan = math.nan

    def row(stage: str, outcome: str, kl_budget: float = budget) -> dict[str, Any]:
        return {"stage": stage, "reward/covered": nan, "reward/heldout": nan, "reward/mean": nan,
                "kl/policy_ref": nan, "kl/stderr": nan, "kl_budget": kl_budget, "promoted": outcome}

    return [row("initial", NOT_RUN["initial"]), row("offline", NOT_RUN["offline"]),
            *(row(f"cycle {i + 1}", NOT_RUN["cycle"]) for i in range(cycles)),
            row("budget probe", NOT_RUN["budget probe"], nan)]  # its budget is half a KL never measured


def judge_failed_claims() -> list[dict[str, Any]]:
    """Every claim, untested, with why (pure): the judge that scores every stage failed its audit."""
    return [
        {"claim": CLAIM_OFFLINE, "holds": None,
         "evidence": "not tested: every stage is scored by the judge, which failed its audit; nothing was "
                     "trained or scored"},
        {"claim": CLAIM_ONLINE, "holds": None,
         "evidence": "not tested: no cycle ran (the judge failed its audit): nothing labelled, trained or promoted"},
        {"claim": CLAIM_KL, "holds": None, "evidence": "not tested: no cycle ran, so none was promoted"},
        {"claim": CLAIM_PROBE, "holds": None,
         "evidence": "not tested: the budget probe did not run (the judge failed its audit)"},
    ]


def audit_meta(audit: Any, audit_cfg: Any) -> dict[str, Any] | None:
    """The judge audit's verdict for report.json and the headline (None: audits off for this judge)."""
    if audit is None:
        return None
    from online.audit import audit_failures, conflict_text

    failures = [f.text() for f in audit_failures(audit, audit_cfg)]
    return {"judge": audit.judge, "key": audit.key, "passes": not failures, "failures": failures,
            "enforce": audit_cfg.enforce, "pairs": audit.counts.requested,
            "agreement": audit.agreement.text(), "position_conflict": conflict_text(audit),
            "unparseable": audit.unparseable.text()}


def audit_headline(info: dict[str, Any] | None) -> str:
    """One plain sentence on the judge's audit and what it meant for this report (pure)."""
    if info is None:
        return "Judge audit: off for this judge (online.judge.audit.enabled); its labels are taken as given."
    if info["passes"]:
        return (f"The judge {info['judge']} passed its audit on {info['pairs']} held-out pairs (agreement with "
                f"human labels {info['agreement']}).")
    failed = f"The judge {info['judge']} FAILED its audit on {info['pairs']} held-out pairs: " + "; ".join(info["failures"])
    if info["enforce"]:
        return (failed + ". Every stage is scored by that judge, so nothing was scored with it: no stage was "
                "scored, no cycle labelled, trained or promoted, and the budget probe was not tested. Use a "
                "stronger judge (re-measure with `tether judge audit --config CFG --refresh`), or see what it "
                "would do anyway with --set online.judge.audit.enforce=false.")
    return (failed + ". online.judge.audit.enforce is off, so it labelled and scored anyway: every win rate, "
            "label and gate verdict below is that judge's, and says little.")


def _stderr(row: dict[str, Any], group: str) -> float:
    """A row's standard error of its covered/held-out score; NaN when it has none."""
    se = row.get(f"stderr/{group}", math.nan)
    return float(se) if isinstance(se, (int, float)) and math.isfinite(se) else math.nan


def _pm(row: dict[str, Any], group: str) -> str:
    """" ± s.e." of a row's covered/held-out score, when the row has one."""
    se = _stderr(row, group)
    return f" ± {se:.3f}" if math.isfinite(se) else ""


def plot(rows: list[dict[str, Any]], path: Path, metric: str = "reward") -> Path:
    """Reward per category and KL vs budget, per stage (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [r["stage"] for r in rows]
    cats = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("reward/")} - {"covered", "heldout", "mean"})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c in cats:
        ax1.plot(stages, [r.get(f"reward/{c}", math.nan) for r in rows], marker="o", label=c)
    for group, style, label in (("covered", "k--", "covered (mean)"), ("heldout", "k:", "held-out (mean)")):
        # Error bars: +-1 standard error where the evaluation carried one.
        err = [r.get(f"stderr/{group}", math.nan) for r in rows]
        ax1.errorbar(stages, [r[f"reward/{group}"] for r in rows], yerr=[0.0 if math.isnan(e) else e for e in err],
                     fmt=style, lw=2, capsize=3, label=label)
    ax1.set_title("reward on held-out prompts" if metric == "reward" else "win rate vs the initial policy")
    ax1.set_ylabel(metric)
    ax1.legend(fontsize=7, ncol=2)
    ax1.tick_params(axis="x", rotation=30)
    ax2.bar(stages, [r["kl/policy_ref"] for r in rows],
            color=["tab:blue" if r["promoted"] in ("yes", "-") else "tab:red" for r in rows])
    ax2.plot(stages, [r["kl_budget"] for r in rows], "r--", label="KL budget")
    ax2.set_title("KL(pi || pi_0), nats/sequence (red: not promoted)")
    ax2.legend(fontsize=8)
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


METRIC_LABEL = {
    "reward": "the mean score ({scorer}) of the policy's own samples on held-out prompts",
    "win_rate": "win rate of the policy's samples against the initial policy's (LLM judge, both orders; "
                "ties count half), on held-out prompts",
}


JUDGE_COLUMNS = [
    "judge/asked", "judge/judgments", "judge/ties", "judge/position_conflicts", "judge/unparseable",
    "judge/dropped", "judge/retries", "judge/cost_usd", "judge/neutralised", "train/fresh_pairs", "train/anchor_pairs",
]
"""What each cycle's judge did and what it trained on: pairs asked, labels, ties, position conflicts,
unparseable, dropped, retries, cost, samples neutralised; fresh and anchor pairs actually trained."""


def judge_columns(cycle: dict[str, Any]) -> dict[str, Any]:
    """A cycle report's judge counters and trained mix as row entries (NaN where missing), and
    its flags and audit agreement."""
    found = {**cycle.get("judge", {}), **cycle.get("mix", {})}
    out: dict[str, Any] = {c: found.get(c, float("nan")) for c in JUDGE_COLUMNS}
    audit = cycle.get("audit")
    out["judge_audit/agreement"] = (audit or {}).get("agreement", {}).get("value") if audit else None
    out["flags"] = "; ".join(cycle.get("flags") or []) or "-"
    return out


def verdict(holds: bool | None) -> str:
    """How a claim's verdict reads in the report."""
    return "not shown" if holds is None else "yes" if holds else "NO"


def judge_stopped(meta: dict[str, Any]) -> bool:
    """Whether the report was stopped by its judge's failed (enforced) audit: nothing measured."""
    info = meta.get("judge_audit")
    return bool(info) and not info["passes"] and info["enforce"]


def write_report(out_dir: Path, rows: list[dict[str, Any]], claims: list[dict[str, Any]], meta: dict[str, Any],
                 audit: Any = None, audit_cfg: Any = None) -> dict[str, Path]:
    """report.md / report.json / report.png under `out_dir` (no png when nothing was measured);
    `audit` (a `JudgeAudit`, with its `JudgeAuditConfig`) adds the audit's table."""
    from orchestrator.artifacts import audit_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    head = [
        "# tether efficacy report",
        f"Measured {meta['date']} on {meta['machine']}; config `{meta['config']}`, seed {meta['seed']}, "
        f"{meta['cycles']} cycles + 1 budget probe; {meta['seconds']:.0f} s.",
        f"**{audit_headline(meta.get('judge_audit'))}**",
    ]
    audit_md = [] if audit is None else ["#" + audit_markdown(audit, audit_cfg)]  # its "# Judge audit" as a section
    paths = {"md": out_dir / "report.md", "json": out_dir / "report.json"}
    if judge_stopped(meta):
        md = "\n\n".join([
            *head,
            "## Stages", markdown_table(rows, ["stage", "promoted"]),
            "## Claims",
            markdown_table([{**c, "holds": verdict(c["holds"])} for c in claims], ["claim", "holds", "evidence"]),
            *audit_md,
        ])
        paths["md"].write_text(md + "\n", encoding="utf-8")
        paths["json"].write_text(json.dumps({"meta": meta, "stages": rows, "claims": claims}, indent=2, default=str))
        return paths
    cols = ["stage", "reward/covered", "stderr/covered", "reward/heldout", "stderr/heldout", "reward/mean",
            "kl/policy_ref", "kl/stderr", "kl_budget", "promoted", "judge/cost_per_1k_judgments",
            "judge/seconds_per_1k_judgments"]
    md = "\n\n".join([
        *head,
        f"Covered categories (in the static dataset): {', '.join(meta['covered']) or 'none'}. "
        f"Score: {METRIC_LABEL[meta.get('metric', 'reward')].format(scorer=meta.get('scorer', 'the judge'))}; "
        "± is one standard error (clustered by prompt; covered/held-out: of the mean of category means).",
        markdown_table(rows, cols),
        "## Why each cycle was promoted or not",
        markdown_table([r for r in rows if "gate/reasons" in r], ["stage", "promoted", "gate/reasons"]),
        "## Gate evidence per cycle",
        f"Lower bounds are the low end of a two-sided {meta.get('confidence', 0.95):.0%} interval; a unit passes when "
        f"its bound is >= the threshold, and needs at least {meta.get('min_decisive', '?')} decisive judgments / "
        "reward samples (else inconclusive). n: overall; min category n: the fewest in one category.",
        markdown_table([r for r in rows if r.get("gate/verdict", "-") != "-"], ["stage", *GATE_COLUMNS]),
        "## Claims",
        markdown_table([{**c, "holds": verdict(c["holds"])} for c in claims], ["claim", "holds", "evidence"]),
        "## Judge and training mix per cycle",
        "Pairs the judge was asked, labels it gave, ties (position conflicts included), unparseable, dropped "
        "(asked but no label), retries, cost, samples neutralised by the reward-hacking guards; fresh vs "
        "anchor pairs the cycle's training actually saw; the judge audit's agreement with human labels.",
        markdown_table([r for r in rows if "judge/asked" in r],
                       ["stage", *JUDGE_COLUMNS, "judge_audit/agreement", "flags"]),
        "## Score per category (± one standard error)",
        markdown_table(per_category_rows(rows)),
        *audit_md,
    ])
    paths["png"] = out_dir / "report.png"
    paths["md"].write_text(md + "\n", encoding="utf-8")
    paths["json"].write_text(json.dumps({"meta": meta, "stages": rows, "claims": claims}, indent=2, default=str))
    plot(rows, paths["png"], meta.get("metric", "reward"))
    return paths


def per_category_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each stage's score per category as "value ± s.e." cells (pure)."""
    cats = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("reward/")} - {"covered", "heldout", "mean"})
    out = []
    for r in rows:
        cell = {}
        for c in [*cats, "covered", "heldout", "mean"]:
            v, se = r.get(f"reward/{c}", math.nan), r.get(f"stderr/{c}", math.nan)
            cell[c] = f"{v:.3f}" + (f" ± {se:.3f}" if isinstance(se, float) and math.isfinite(se) else "")
        out.append({"stage": r["stage"], **cell})
    return out


def scorer_name(cfg: Any) -> str:
    """What the stages are scored by, for the report's heading."""
    judge = cfg.online.judge
    if judge.kind == "rule" and judge.rule is not None:
        return f"`{judge.rule.eval_function or judge.rule.function}`"
    return "the reward model" if judge.kind == "reward_model" else "the judge"


def machine() -> str:
    """A one-line description of where the figures were measured."""
    import os

    import torch

    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, " + (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    )


def run_report(config_path: str, overrides: dict[str, Any] | None, cycles: int, out_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Run every stage (as Prefect flows) on a clean state dir, then write and return the report."""
    from orchestrator.config import load_config, with_setting
    from orchestrator.flows import hybrid_demo, refresh_cycle

    from online.audit import JudgeAuditFailed, cycle_audit
    from orchestrator.flows import cycle_inputs

    t0 = time.perf_counter()
    base = load_config(config_path, overrides)
    state = fresh_state_dir(base.state_dir, out_dir)
    o = {**(overrides or {}), "state_dir": str(state)}
    base = with_setting(base, "state_dir", state)
    try:
        # Before any flow: a failed audit is this report's finding, not an error to log with a
        # traceback. Cached under the report's state dir, so the flows below reuse it.
        cycle_audit(cycle_inputs(base))
    except JudgeAuditFailed as exc:
        return judge_failed_report(exc, base, config_path, cycles, out_dir, t0)
    demo = hybrid_demo(config_path, o, run_label="report", cycles=cycles, progress=progress, config=base)
    rows = [dict(r) for r in demo["stages"]]
    cost = {f"cycle {c['index']}": c["judge"].get("judge/cost_per_1k_judgments", 0.0) for c in demo["cycles"] if not c.get("skipped")}
    judged = {f"cycle {c['index']}": judge_columns(c) for c in demo["cycles"] if not c.get("skipped")}
    gates = {f"cycle {c['index']}": gate_columns(c) for c in demo["cycles"] if not c.get("skipped")}
    decided = {f"cycle {c['index']}": decision_columns(c) for c in demo["cycles"] if not c.get("skipped")}
    covered = set(demo["covered"])
    for r in rows:
        r["judge/cost_per_1k_judgments"] = cost.get(r["stage"], float("nan"))
        r.update(judged.get(r["stage"], {}))
        r.update(gates.get(r["stage"], gate_columns({})))
        r.update(decided.get(r["stage"], {}))
        summary = demo["summaries"].get(r["stage"])
        r.update(stderr_columns(summary.stderr() if summary is not None else None, covered))

    # The budget probe: the current policy already sits at KL ~ k from pi_0; a budget of k/2
    # must make the gate refuse the next candidate, however good its reward.
    last_kl = next((r["kl/policy_ref"] for r in reversed(rows) if r["promoted"] == "yes"), 1.0)
    probe_budget = max(last_kl / 2, 1e-3)
    po = {**o, "online": {**(o.get("online") or {}), "controller": {"kl_budget": probe_budget}}}
    probe_cfg = with_setting(base, "online.controller.kl_budget", probe_budget)
    # promote=False: the probe tests the gate; it is never the policy the report leaves current.
    rep = refresh_cycle(config_path, po, run_label="report-budget-probe", progress=progress, config=probe_cfg,
                        promote=False)
    probe = None
    if not rep.get("skipped"):
        from orchestrator.flows import cycle_inputs, cycle_summary, stage_row
        from online.evaluate import evaluate_checkpoint

        after, summary = rep["after"], cycle_summary(rep)
        if demo["metric"] == "win_rate" and rep["checkpoint"]:  # the same yardstick as the other rows: vs pi_0
            rescored = evaluate_checkpoint(cycle_inputs(probe_cfg), rep["checkpoint"]["path"], base.seed,
                                           demo["baseline"], with_kl=False)
            after, summary = rescored["reward"], rescored["summary"]
        probe = stage_row("budget probe", after, rep["kl"], probe_budget, covered, probe_label(rep["verdict"]))
        probe.update(decision_columns(rep))
        probe.update(stderr_columns(summary.stderr() if summary is not None else None, covered))
        probe["judge/cost_per_1k_judgments"] = rep["judge"].get("judge/cost_per_1k_judgments", 0.0)
        probe.update(judge_columns(rep))
        probe.update(gate_columns(rep))
        rows.append(probe)
    claims = check_claims(rows, probe, confidence=base.online.gate.confidence)
    meta = {**report_meta(base, config_path, cycles, demo["metric"], t0), "covered": demo["covered"],
            "judge_audit": audit_meta(demo.get("audit"), base.online.judge.audit)}
    paths = write_report(out_dir, rows, claims, meta, demo.get("audit"), base.online.judge.audit)
    return {"stages": rows, "claims": claims, "meta": meta, "audit": demo.get("audit"),
            "paths": {k: str(v) for k, v in paths.items()}}


def report_meta(cfg: Any, config_path: str, cycles: int, metric: str, t0: float) -> dict[str, Any]:
    """What every report says about where, when and how it was measured."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "config": config_path, "seed": cfg.seed, "cycles": cycles, "covered": [], "metric": metric,
        "confidence": cfg.online.gate.confidence, "min_decisive": cfg.online.gate.min_decisive,
        "scorer": scorer_name(cfg), "seconds": time.perf_counter() - t0,
    }


def judge_failed_report(exc: Any, cfg: Any, config_path: str, cycles: int, out_dir: Path, t0: float) -> dict[str, Any]:
    """The report of a run stopped by its judge's failed audit (`JudgeAuditFailed` `exc`): written,
    with nothing measured and everything saying why."""
    audit_cfg = cfg.online.judge.audit
    rows = judge_failed_rows(cycles, cfg.online.controller.kl_budget)
    claims = judge_failed_claims()
    meta = {**report_meta(cfg, config_path, cycles, cfg.online.gate.metric, t0),
            "judge_audit": audit_meta(exc.audit, audit_cfg)}
    paths = write_report(out_dir, rows, claims, meta, exc.audit, audit_cfg)
    return {"stages": rows, "claims": claims, "meta": meta, "audit": exc.audit,
            "paths": {k: str(v) for k, v in paths.items()}}
