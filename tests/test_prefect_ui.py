"""The Prefect UI in a real browser: flow runs, task runs, logs and artifacts render.

A real `prefect server start` on a free loopback port; `tether offline` then `tether cycle` run
against it in subprocesses (PREFECT_API_URL set; the cycle's buffer is the session's
redis-server). Headless Chromium (the Debian package `chromium`, driven over the DevTools
protocol by `_browser.py`) loads the UI the server opens by default, and each test polls the
rendered text, since the UI is a single-page app that fills itself in from the API after load.
Every page is screenshotted into the test's tmp dir; the paths are printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from _browser import Page, chromium, chromium_missing
from _prefect_server import ROOT, api_post, prefect_server, run_tether, shared_state_dir

pytestmark = [pytest.mark.slow, pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))]

CONFIG = str(ROOT / "configs" / "demo.yaml")
# The demo config shrunk so that the offline run and one cycle take seconds of compute each.
SMALL = [
    "data.limit=300", "train.epochs=1", "online.prompts.sample_per_cycle=24", "online.train_pairs=64",
    "online.eval_max_prompts=12", "online.kl_prompts=4", "online.train.epochs=1",
]


@dataclass
class Site:
    """The browser, pointed at a server that holds one offline run and one refresh cycle."""

    ui: str  # root of the V2 UI, the one the server opens by default: http://127.0.0.1:<port>/v2
    page: Page
    runs: dict[str, dict]  # flow run name -> flow run, as the REST API returns it
    artifacts: dict[str, dict]  # artifact key -> artifact

    def flow_run_url(self, name: str, tab: str) -> str:
        """A flow run's page, opened on a tab: `Logs`, `TaskRuns` or `Artifacts`."""
        return f"{self.ui}/runs/flow-run/{self.runs[name]['id']}?tab={tab}"

    def show(self, url: str, needles: list[str], shot: Path, timeout_s: float = 60.0) -> str:
        """Load `url`, wait until every needle is rendered, screenshot it (the last needle in view); returns the text."""
        self.page.goto(url)
        text = self.page.wait_for_text(needles, timeout_s=timeout_s, screenshot=shot)
        self.page.scroll_to(needles[-1])
        print(f"screenshot: {self.page.screenshot(shot)}  ({url})")
        return text


@pytest.fixture(scope="module")
def site(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("prefect-ui")
    state, home = shared_state_dir(tmp_path_factory), tmp / "prefect"
    redis_server.command("FLUSHALL")
    common = ["--config", CONFIG, "--set", f"state_dir={state}", *[a for s in SMALL for a in ("--set", s)]]
    with prefect_server(home) as base:
        api = f"{base}/api"
        run_tether(["offline", *common], state, home, api_url=api, log_path=tmp / "offline.log")
        run_tether(["cycle", *common, "--set", f"buffer.url={redis_server.url}"], state, home, api_url=api, log_path=tmp / "cycle.log")
        runs = {r["name"]: r for r in api_post(base, "flow_runs/filter", {})}
        assert set(runs) == {"offline-baseline", "cycle-manual"}, set(runs)
        artifacts = {a["key"]: a for a in api_post(base, "artifacts/filter", {}) if a["key"]}
        # The URLs and tab names below are the V2 UI's (V1 resets a `tab` it has not loaded yet).
        settings = httpx.get(f"{base}/ui-settings", timeout=10).json()
        assert settings.get("default_ui") == "v2", f"these tests drive Prefect's V2 UI; the server defaults to {settings}"
        with chromium(tmp / "chromium") as page:
            yield Site(ui=base + settings["v2_base_url"].rstrip("/"), page=page, runs=runs, artifacts=artifacts)


def test_runs_page_lists_the_offline_run_and_the_cycle(site, tmp_path):
    site.show(f"{site.ui}/runs", ["offline-baseline", "cycle-manual", "Completed"], tmp_path / "runs.png")


@pytest.mark.parametrize("run, tasks, log_line", [
    ("offline-baseline",
     ["load-policy", "load-and-validate", "coverage-report", "reference-logps", "train", "evaluate", "save-checkpoint"],
     "promoted as current policy"),
    ("cycle-manual",
     ["load-current-policy", "evaluate-current", "generate", "judge", "update-buffer", "reference-logps", "train",
      "evaluate-candidate", "save-checkpoint"],
     "cycle 1: "),
])
def test_flow_run_page_shows_its_task_runs_and_logs(site, tmp_path, run, tasks, log_line):
    site.show(site.flow_run_url(run, "TaskRuns"), tasks, tmp_path / f"{run}-task-runs.png")
    site.show(site.flow_run_url(run, "Logs"), [f"Beginning flow run '{run}'", log_line], tmp_path / f"{run}-logs.png")


@pytest.mark.parametrize("run, key, rendered", [
    ("offline-baseline", "coverage-report", ["Dataset coverage", "fingerprint", "duplicates dropped"]),
    ("offline-baseline", "offline-metrics", ["Held-out evaluation: initial vs trained", "eval/accuracy", "Resolved config"]),
    ("cycle-manual", "refresh-cycle-metrics", ["Refresh cycle 1", "KL(pi||pi_0)", "Reward per category", "Judge, mix, training"]),
    ("cycle-manual", "kl-history", ["KL and reward history", "KL budget", "kl/sequence", "anchor_fraction next"]),
])
def test_metric_and_kl_artifacts_render(site, tmp_path, run, key, rendered):
    artifact = site.artifacts[key]
    # Listed on its flow run's Artifacts tab and on its key's page...
    site.show(site.flow_run_url(run, "Artifacts"), [key, artifact["description"]], tmp_path / f"{run}-artifacts.png")
    site.show(f"{site.ui}/artifacts/key/{key}", [key, artifact["description"], run], tmp_path / f"{key}-key.png")
    # ...and its own page renders the markdown: headings and tables, not the source.
    text = site.show(f"{site.ui}/artifacts/artifact/{artifact['id']}", rendered, tmp_path / f"{key}.png")
    assert "|---" not in text and "\n# " not in text, "the artifact's markdown was shown as source, not rendered"
