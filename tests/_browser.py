"""Headless Chromium driven over the DevTools protocol: navigate, read the rendered text, screenshot.

`chromium(profile_dir)` starts the system browser (`/usr/bin/chromium`, Debian package
`chromium`) headless with a throwaway profile and no network beyond what a page asks for,
yields a `Page`, and always kills the browser's whole process group on exit. Nothing is
downloaded: the protocol is spoken directly over a websocket (`websockets`, a Prefect
dependency), so no Playwright or driver is needed. `TETHER_CHROMIUM` names another binary.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

CHROMIUM = os.environ.get("TETHER_CHROMIUM", "/usr/bin/chromium")

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
    "--window-size=1440,1000", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"{CHROMIUM} not found: install the Debian package `chromium` (scripts/setup.sh with TETHER_SETUP_SYSTEM_EXTRAS=1)"
    return None


class Page:
    """One browser tab, driven by DevTools protocol commands over its websocket."""

    def __init__(self, ws_url: str, width: int = 1440, height: int = 1400) -> None:
        self._ws = connect(ws_url, max_size=None, open_timeout=30)
        self._ids = itertools.count(1)
        # A tall viewport, so a screenshot shows a flow run's graph and the tab below it.
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, timeout_s: float = 60.0, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events arriving meanwhile are dropped)."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values only)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def goto(self, url: str, timeout_s: float = 60.0) -> str:
        """Navigate and wait until the new document has replaced the old one; returns location.href."""
        self.evaluate("window.__tetherOldPage = true")
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.evaluate("!window.__tetherOldPage && document.readyState !== 'loading'"):
                    return self.evaluate("location.href")
            except RuntimeError:  # the context was torn down mid-navigation
                pass
            time.sleep(0.2)
        raise TimeoutError(f"navigation to {url} did not finish in {timeout_s:.0f}s")

    def text(self) -> str:
        """The rendered text of the page (what a reader sees, not the HTML)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles: list[str], timeout_s: float = 60.0, screenshot: Path | None = None) -> str:
        """Poll the rendered text until every needle is in it; returns the text.

        The Prefect UI is a single-page app that fills itself in from API calls after load, so
        the page is polled rather than read once. On timeout a screenshot is saved (if a path
        is given) and the assertion names what is missing.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                if screenshot:
                    self.screenshot(screenshot)
                raise AssertionError(
                    f"not on the page after {timeout_s:.0f}s: {missing}\n"
                    f"(url {self.evaluate('location.href')}, screenshot {screenshot})\npage text:\n{text[:3000]}"
                )
            time.sleep(0.5)

    def scroll_to(self, needle: str) -> bool:
        """Scroll the first text node containing `needle` to mid-screen (for the screenshot)."""
        return bool(self.evaluate(
            "((needle) => { const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);"
            " while (w.nextNode()) { if (w.currentNode.textContent.includes(needle)) {"
            " w.currentNode.parentElement.scrollIntoView({block: 'center'}); return true; } } return false; })"
            f"({json.dumps(needle)})"
        ))

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport to `path`."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self._ws.close()


def _wait_for_devtools(profile: Path, proc: subprocess.Popen, log: Path, timeout_s: float) -> int:
    """The DevTools port Chromium picked (it writes it to <profile>/DevToolsActivePort)."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        if port_file.exists():
            first = port_file.read_text().split("\n", 1)[0].strip()
            if first.isdigit():
                return int(first)
        time.sleep(0.1)
    raise TimeoutError(f"chromium did not open its DevTools port in {timeout_s:.0f}s:\n{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def chromium(profile_dir: Path, timeout_s: float = 60.0) -> Iterator[Page]:
    """Headless Chromium with a fresh profile under `profile_dir`; yields its first tab."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    # A fresh profile each time: a stale DevToolsActivePort would name a dead browser's port.
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=profile_dir))
    log = profile.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    page = None
    try:
        port = _wait_for_devtools(profile, proc, log, timeout_s)
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        tabs = [t for t in targets if t.get("type") == "page"]
        if not tabs:
            tabs = [httpx.put(f"http://127.0.0.1:{port}/json/new?about:blank", timeout=10).json()]
        page = Page(tabs[0]["webSocketDebuggerUrl"])
        yield page
    finally:
        if page is not None:
            page.close()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # renderer/zygote children can outlive the browser process
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
