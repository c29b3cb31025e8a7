"""Markdown renderings of results, for Prefect artifacts and the CLI (pure string building)."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping


def fmt(value: Any) -> str:
    """Compact cell text: floats to 4 significant decimals, the rest as str."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub-flavoured markdown table from a list of dicts."""
    if not rows:
        return "_(no rows)_"
    cols = columns or list(rows[0].keys())
    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def metrics_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`{"a": 1, ...}` -> `[{"metric": "a", "value": 1}, ...]` (table-artifact friendly)."""
    return [{"metric": k, "value": v} for k, v in metrics.items()]


def config_markdown(config: Mapping[str, Any]) -> str:
    """The resolved (redacted) config as a fenced JSON block."""
    return "```json\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```"


def sparkline(values: list[float]) -> str:
    """A one-line unicode chart of a series (loss curves, KL history) for markdown artifacts."""
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(bars[min(7, int((v - lo) / span * 7.999))] for v in values)


def audit_markdown(audit: Any, cfg: Any) -> str:
    """A judge audit (`online.audit.JudgeAudit`) under its thresholds (`JudgeAuditConfig`), as markdown."""
    from online.audit import audit_failures, audit_rows

    failures = audit_failures(audit, cfg)
    verdict = ("passes: it may label" if not failures
               else "FAILS: " + "; ".join(f.text() for f in failures)
               + ("" if cfg.enforce else " (enforce is off: labelling anyway)"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(audit.created_at))
    return "\n\n".join([
        f"# Judge audit: `{audit.judge}`",
        f"Verdict: **{verdict}**.",
        f"{audit.counts.requested} held-out pairs of `{audit.dataset_source}` (fingerprint "
        f"`{audit.dataset_fingerprint[:12]}`), "
        + ("each asked in both orders" if audit.position_conflict is not None
           else "each reply scored alone (no order to swap)")
        + f"; measured {when} "
        f"in {audit.seconds:.1f} s; audit `{audit.key}` (cached under the state dir's judge-audits/).",
        markdown_table(audit_rows(audit, cfg)),
        "Judge identity: `" + json.dumps(audit.identity, sort_keys=True) + "`",
    ])
