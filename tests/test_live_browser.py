"""The live workflow in the host's real front end, driven by Playwright in Debian's Chromium.

Chromium's fake camera (``--use-fake-device-for-media-stream``) feeds getUserMedia. Two browser
contexts run the same workflow at once: each must see only its own stream's frames.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from conftest import REPO_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
UI_WORKFLOW = REPO_ROOT / "workflows" / "ui" / "live_webcam_img2img.json"
SCREENSHOT = REPO_ROOT / "docs" / "live_webcam.png"
UPDATE_DOCS = os.environ.get("TURBOSTREAM_UPDATE_DOCS") == "1"
"""The committed screenshot is rewritten only on purpose (``make docs-pictures``); a normal run writes
its screenshot to the test's temporary folder, so the suite leaves the work tree clean."""
FRAME_SIZE = 64
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(
            f"{CHROMIUM} is missing: `make test` installs Debian's chromium (turbostream setup --browser)"
        )
    pytest.skip(
        "Debian's chromium is not installed (run: python -m turbostream setup --browser)", allow_module_level=True
    )

sync_api = pytest.importorskip("playwright.sync_api")

# Runs in the page: the host's app and api objects, and the pack's live nodes.
JS_HELPERS = """
window.ts = {
  app: () => window.comfyAPI.app.app,
  api: () => window.comfyAPI.api.api,
  node: (type) => window.comfyAPI.app.app.graph._nodes.find((n) => n.type === type),
  widget: (type, name) => window.ts.node(type).widgets.find((w) => w.name === name),
};
window.__tsFrames = [];
window.ts.api().addEventListener("turbostream.live.frame", (e) => window.__tsFrames.push(e.detail.stream_id));
"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


FRONT_END_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
"""First-run dialogs and the minimap would cover the canvas in the screenshot."""


def open_live_workflow(browser, host, width=1280, height=800):
    for key, value in FRONT_END_SETTINGS.items():
        host.post_json(f"/settings/{key}", value)
    context = browser.new_context(viewport={"width": width, "height": height})
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(host.url, wait_until="domcontentloaded")
    # The node definitions register after the graph exists: load the workflow only once ours are there.
    page.wait_for_function(
        "() => window.comfyAPI?.api?.api?.clientId && window.LiteGraph?.registered_node_types?.TurboStreamLiveOutput",
        timeout=90_000,
    )
    page.evaluate(JS_HELPERS)
    page.evaluate("(wf) => window.ts.app().loadGraphData(wf)", json.loads(UI_WORKFLOW.read_text()))
    page.keyboard.press("Escape")  # any start-up dialog
    page.evaluate("() => window.ts.app().extensionManager?.command?.execute?.('Comfy.Canvas.FitView')")
    page.wait_for_function("() => window.ts.node('TurboStreamLiveInput')?.turbostreamLive", timeout=30_000)
    page.evaluate(
        """(size) => {
            window.ts.widget('TurboStreamLiveInput', 'width').value = size;
            window.ts.widget('TurboStreamLiveInput', 'height').value = size;
            window.ts.widget('TurboStreamLiveInput', 'fps').value = 4;
        }""",
        FRAME_SIZE,
    )
    return context, page, errors


def start_or_stop(page):
    page.evaluate("() => window.ts.widget('TurboStreamLiveInput', 'start').callback()")


def view_stats(page) -> dict:
    return page.evaluate(
        """() => {
            const v = window.ts.node('TurboStreamLiveOutput').turbostreamView;
            const s = window.ts.node('TurboStreamLiveInput').turbostreamLive;
            return {frames: v.frames, fps: v.fps, latency: v.latencyMs, queued: s.stats.queued,
                    running: s.running, message: s.message, streamId: s.streamId,
                    seen: [...new Set(window.__tsFrames)]};
        }"""
    )


def wait_for_frames(page, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = view_stats(page)
        if stats["frames"] >= n:
            return stats
        assert stats["running"], f"live stopped: {stats['message']}"
        time.sleep(0.5)
    raise AssertionError(f"only {view_stats(page)['frames']} frames arrived in {timeout} s")


def test_live_webcam_in_the_browser(browser, host, tmp_path):
    ctx_a, page_a, errors_a = open_live_workflow(browser, host, 1920, 1080)
    ctx_b, page_b, errors_b = open_live_workflow(browser, host, 800, 600)
    try:
        start_or_stop(page_a)
        start_or_stop(page_b)
        a = wait_for_frames(page_a, 5)
        b = wait_for_frames(page_b, 5)
        assert a["fps"] > 0 and a["latency"] is not None and a["latency"] > 0
        assert b["fps"] > 0

        # Same workflow, same default id: the second tab got its own id, and nobody sees the other's frames.
        assert a["streamId"] != b["streamId"]
        assert a["seen"] == [a["streamId"]] and b["seen"] == [b["streamId"]]

        page_a.screenshot(path=str(SCREENSHOT if UPDATE_DOCS else tmp_path / SCREENSHOT.name))

        # Stopping stops the queueing: after the in-flight prompts finish, nothing new is queued.
        start_or_stop(page_a)
        start_or_stop(page_b)
        stopped = view_stats(page_a)
        assert not stopped["running"]
        deadline = time.monotonic() + 60
        while host.get_json("/queue")["queue_running"] or host.get_json("/queue")["queue_pending"]:
            assert time.monotonic() < deadline, "the queue did not drain after Stop"
            time.sleep(0.5)
        history = len(host.get_json("/history?max_items=10000"))
        time.sleep(3)
        assert view_stats(page_a)["queued"] == stopped["queued"]
        assert len(host.get_json("/history?max_items=10000")) == history
        assert not host.get_json("/queue")["queue_pending"]
        sources = {s["stream_id"] for s in host.get_json("/turbostream/live")["sources"]}
        assert a["streamId"] not in sources, "Stop did not close the live source"
    finally:
        ctx_a.close()
        ctx_b.close()
    assert not errors_a and not errors_b, errors_a + errors_b
