"""The report opened in a real headless Chromium, driven over the DevTools protocol.

We talk CDP over ``--remote-debugging-pipe`` (NUL-separated JSON on fds 3 and 4), so no
websocket library or port is needed. The test checks that the page loads, every image
decodes, the tables are there, nothing reaches for the network and the console stays
clean; a sabotaged copy proves the checks can fail. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hippocrates.report.build import build_report

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

PROBE = """(async () => {
  const imgs = [...document.images];
  const decoded = await Promise.all(imgs.map(i => i.decode().then(() => true, () => false)));
  return {
    title: document.title,
    sections: [...document.querySelectorAll("section")].map(s => s.id),
    tables: document.querySelectorAll("table").length,
    images: imgs.length,
    broken: imgs.filter((im, k) => !(im.complete && im.naturalWidth > 0 && decoded[k])).map(im => im.alt),
    external: [...document.querySelectorAll("[src], [href]")]
      .map(e => e.getAttribute("src") || e.getAttribute("href"))
      .filter(u => !u.startsWith("data:") && !u.startsWith("#")),
    scripts: document.scripts.length,
    missing: document.querySelectorAll(".missing").length,
    firstTables: document.querySelector("section").querySelectorAll("table").length,
    firstText: document.querySelector("section h2").textContent,
    height: document.documentElement.scrollHeight,
  };
})()"""


def _chromium() -> str:
    # Debian's /usr/bin/chromium is a shell wrapper that sources /etc/chromium.d (which turns
    # on remote extensions); the binary beside it takes our flags as they are.
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not installed (`make test` installs Debian's chromium when run as root)")


class Browser:
    """A headless Chromium and a minimal CDP client over the remote-debugging pipe."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def wire_fds() -> None:  # Chromium reads commands on fd 3 and writes replies on fd 4
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--window-size=1280,1400", f"--user-data-dir={profile}",
                 "--remote-debugging-pipe", "about:blank"]  # fmt: skip
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [binary, *flags],
            preexec_fn=wire_fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.events = b"", 0, []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=self.session)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            if not select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("no message from chromium in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (rc {self.proc.poll()})")
            self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return json.loads(message)

    def call(
        self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60
    ) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._read(deadline))

    def open(self, url: str) -> dict[str, Any]:
        """Navigate, wait for the load event and return the page probe's findings."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, self.session)
        self.wait_for("Page.loadEventFired")
        result = self.call(
            "Runtime.evaluate",
            {"expression": PROBE, "awaitPromise": True, "returnByValue": True},
            self.session,
        )
        return result["result"]["value"]

    def console_errors(self) -> list[str]:
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", []))
                )
            elif method == "Runtime.exceptionThrown":
                out.append(params.get("exceptionDetails", {}).get("text", "exception"))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append(params["entry"].get("text", ""))
        return out

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": 1280,
                "height": min(metrics["height"], 16000),
                "scale": 1,
            }
        data = self.call("Page.captureScreenshot", params, self.session)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        self._log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = _chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"), ARTIFACTS / "chromium.log")
    yield b
    b.close()


def _copy(tiny_run: Path, where: Path, keep: tuple[str, ...] | None = None) -> Path:
    if keep is None:
        shutil.copytree(tiny_run, where)
    else:
        for name in keep:
            shutil.copytree(tiny_run / name, where / name)
    return where


def test_report_renders_in_chromium(browser: Browser, tiny_run: Path, tmp_path: Path) -> None:
    html_path = build_report(_copy(tiny_run, tmp_path / "run"))
    page = browser.open(html_path.as_uri())

    assert page["title"] == "Hippocrates report: run"
    assert page["sections"] == [
        "glance",
        "manifest",
        "training",
        "eval",
        "ablation",
        "prompting",
        "calibration",
    ]
    assert page["tables"] >= 10
    assert page["firstText"] == "At a glance" and page["firstTables"] >= 3  # results first
    # 4 training curves + (2 final-model shot counts + 6 ablation variants) x (reliability + density)
    assert page["images"] == 4 + 8 * 2
    assert page["broken"] == []
    assert page["external"] == []
    assert page["scripts"] == 0
    assert page["missing"] == 0
    assert browser.console_errors() == []
    browser.screenshot(ARTIFACTS / "report.png")
    browser.screenshot(ARTIFACTS / "report-full.png", full_page=True)
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_probe_catches_broken_images_and_network_use(
    browser: Browser, tiny_run: Path, tmp_path: Path
) -> None:
    """The checks above can fail: an undecodable image and a remote one are both reported."""
    html_path = build_report(_copy(tiny_run, tmp_path / "run", ("cpt", "eval")))
    text = html_path.read_text(encoding="utf-8").replace(
        "</main>",
        '<img alt="bad" src="data:image/png;base64,AAAA"><img alt="remote" src="https://example.com/x.png"></main>',
    )
    sabotaged = tmp_path / "sabotaged.html"
    sabotaged.write_text(text, encoding="utf-8")
    page = browser.open(sabotaged.as_uri())
    assert set(page["broken"]) == {"bad", "remote"}
    assert page["external"] == ["https://example.com/x.png"]
    assert any("Content Security Policy" in e or "example.com" in e for e in browser.console_errors())


def test_partial_run_report_renders_with_missing_notices(
    browser: Browser, tiny_run: Path, tmp_path: Path
) -> None:
    html_path = build_report(_copy(tiny_run, tmp_path / "run", ("cpt", "eval")))
    page = browser.open(html_path.as_uri())
    assert page["broken"] == [] and page["images"] == 1 + 2 * 2
    assert page["missing"] >= 4  # manifest, training, ablation, prompting
    assert browser.console_errors() == []
    browser.screenshot(ARTIFACTS / "report-partial.png")
