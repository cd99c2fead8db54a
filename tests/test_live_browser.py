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
UI_WORKFLOW = REPO_ROOT / "example_workflows" / "live_webcam_img2img.json"
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
    # The node definitions register after the graph exists: load the workflow only once ours are there.
    context, page, errors = _open_front_end(browser, host, width, height)
    page.wait_for_function("() => window.comfyAPI?.api?.api?.clientId", timeout=90_000)
    page.evaluate(JS_HELPERS)
    # the robust loader: a newer front end may still be opening its start-up workflow and replace ours
    page.evaluate(LOAD_GRAPH_JS, json.loads(UI_WORKFLOW.read_text()))
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
            return {frames: v.frames, fps: v.fps, latency: v.latencyMs, queued: s.stats.queued, captured: s.stats.captured,
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


def wait_until_stopped(page, timeout=30):
    page.wait_for_function(
        "() => !window.ts.node('TurboStreamLiveInput').turbostreamLive.running", timeout=timeout * 1000
    )


def test_live_webcam_in_the_browser(browser, host, tmp_path):
    ctx_a, page_a, errors_a = open_live_workflow(browser, host, 1920, 1080)
    ctx_b, page_b, errors_b = open_live_workflow(browser, host, 800, 600)
    # the second tab sends 2 frames per prompt (Live Input's frames_per_prompt, the stream's frame_buffer_size)
    page_b.evaluate(
        """() => {
            window.ts.widget('TurboStreamLiveInput', 'frames_per_prompt').value = 2;
            window.ts.widget('TurboStreamLiveImg2Img', 'frame_buffer_size').value = 2;
        }"""
    )
    try:
        start_or_stop(page_a)
        start_or_stop(page_b)
        a = wait_for_frames(page_a, 5)
        b = wait_for_frames(page_b, 5)
        assert a["fps"] > 0 and a["latency"] is not None and a["latency"] > 0
        assert b["fps"] > 0
        # a prompt per frame in tab A, per 2 frames in tab B (a group may be part uploaded, or queueing)
        assert 0 <= a["captured"] - a["queued"] <= 1, a
        assert b["queued"] >= 2 and 0 <= b["captured"] - 2 * b["queued"] <= 2, b

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
        history = set(host.get_json("/history?max_items=10000"))
        time.sleep(3)
        assert view_stats(page_a)["queued"] == stopped["queued"]
        # no new prompt ran (the finished frames' entries are deleted, in batches, even after Stop)
        assert set(host.get_json("/history?max_items=10000")) <= history
        assert not host.get_json("/queue")["queue_pending"]
        sources = {s["stream_id"] for s in host.get_json("/turbostream/live")["sources"]}
        assert a["streamId"] not in sources, "Stop did not close the live source"
    finally:
        ctx_a.close()
        ctx_b.close()
    assert not errors_a and not errors_b, errors_a + errors_b


def test_live_failure_reaches_the_front_end(browser, host):
    """Live prompts go under the live channel's own websocket client id, so the front end gets none of
    their execution events; a failing one still reaches it (the error dialog) and stops the session."""
    context, page, errors = open_live_workflow(browser, host)
    page.evaluate(
        """() => {
            window.__tsErrors = [];
            window.__tsExecuting = 0;
            window.ts.api().addEventListener('execution_error', (e) => window.__tsErrors.push(e.detail));
            window.ts.api().addEventListener('executing', () => window.__tsExecuting++);
            window.__tsStatus = [];
            window.ts.api().addEventListener('status', (e) => window.__tsStatus.push(e.detail));
        }"""
    )
    try:
        start_or_stop(page)
        wait_for_frames(page, 3)
        assert page.evaluate("() => window.__tsExecuting") == 0, "the tab got the live prompts' execution events"
        # the host broadcasts "status" twice per prompt; while live the tab's listeners get one a second
        q0, n0, t0 = view_stats(page)["queued"], page.evaluate("() => window.__tsStatus.length"), time.monotonic()
        while view_stats(page)["queued"] - q0 < 10 and time.monotonic() - t0 < 30:
            time.sleep(0.5)
        queued, statuses = view_stats(page)["queued"] - q0, page.evaluate("() => window.__tsStatus.length") - n0
        assert statuses <= time.monotonic() - t0 + 2 and statuses < queued, (statuses, queued)
        # frame_buffer_size 2 against frames_per_prompt 1: the next prompt fails in Live Img2Img
        page.evaluate("() => { window.ts.widget('TurboStreamLiveImg2Img', 'frame_buffer_size').value = 2; }")
        page.wait_for_function("() => window.__tsErrors.length > 0", timeout=60_000)
        error = page.evaluate("() => window.__tsErrors[0]")
        assert error["node_type"] == "TurboStreamLiveImg2Img", error
        assert "frames_per_prompt" in error["exception_message"], error
        wait_until_stopped(page)
        assert "the workflow failed" in view_stats(page)["message"]
        # the front end shows it as for any prompt: its error dialog with the message (front end 1.32),
        # or its error overlay naming the node (1.49)
        shown = page.get_by_text("(frame_buffer_size), got shape").or_(
            page.get_by_text("Live Img2Img (stream batch) failed")
        )
        shown.first.wait_for(timeout=30_000)
        # stopped: the newest status reaches the front end (the queue it shows is empty again)
        page.wait_for_function("() => window.__tsStatus.at(-1)?.exec_info?.queue_remaining === 0", timeout=30_000)
    finally:
        context.close()
    assert not errors, errors


def test_live_connection_lost_started_again_and_interrupted(browser, host):
    """The live channel's websocket closing stops the session with a message (its prompts' end events
    are gone with it); Start opens a new connection and frames flow again; an interrupt stops it."""
    from turbostream.host import PACK_FOLDER_NAME

    context, page, errors = open_live_workflow(browser, host)
    try:
        start_or_stop(page)
        first = wait_for_frames(page, 2)
        page.evaluate(
            "async (url) => (await import(url)).liveChannel.socket.close()",
            f"/extensions/{PACK_FOLDER_NAME}/live_channel.js",
        )
        wait_until_stopped(page)
        assert view_stats(page)["message"] == "stopped: lost the live connection to the server"
        start_or_stop(page)
        again = wait_for_frames(page, first["frames"] + 2)
        assert again["running"] and again["streamId"] == first["streamId"], again
        # what the front end's Cancel button sends with no prompt of its own running: the live prompt
        # running is interrupted, and the session stops saying so (the host clears an interrupt that
        # comes between two prompts when the next starts: pressed again until one lands)
        deadline = time.monotonic() + 30
        while view_stats(page)["running"]:
            assert time.monotonic() < deadline, "no interrupt reached a live prompt"
            host.post_json("/interrupt", {})
            time.sleep(0.3)
        assert view_stats(page)["message"] == "stopped: the prompt was interrupted"
    finally:
        context.close()
    assert not errors, errors


def _open_front_end(browser, host, width=1280, height=800):
    """A fresh tab on the host's front end, once the pack's node types are registered."""
    for key, value in FRONT_END_SETTINGS.items():
        host.post_json(f"/settings/{key}", value)
    context = browser.new_context(viewport={"width": width, "height": height})
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(host.url, wait_until="domcontentloaded")
    page.wait_for_function(
        "() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.TurboStreamLiveOutput",
        timeout=90_000,
    )
    return context, page, errors


LOAD_GRAPH_JS = """async (wf) => {
    // load wf and wait until the canvas shows exactly its nodes (newer front ends switch graphs
    // asynchronously, and may still be opening their start-up workflow): up to 3 tries
    const app = window.comfyAPI.app.app;
    const expected = wf.nodes.map((n) => n.type).sort().join();
    const onCanvas = () => app.graph._nodes.map((n) => n.type).sort().join();
    for (let attempt = 0; attempt < 3 && onCanvas() !== expected; attempt++) {
        await app.loadGraphData(wf);
        for (let i = 0; i < 50 && onCanvas() !== expected; i++) await new Promise((r) => setTimeout(r, 100));
    }
    return app.graph._nodes.map((n) => n.type).sort();
}"""


def test_every_template_loads_in_the_front_end(browser, host):
    """Each workflow Browse Templates lists for the pack loads in the real front end with no missing node
    types (every node of the file is on the canvas and its type is registered)."""
    from turbostream.host import PACK_FOLDER_NAME

    names = host.get_json("/workflow_templates")[PACK_FOLDER_NAME]
    assert len(names) == len(list((REPO_ROOT / "example_workflows").glob("*.json")))
    context, page, errors = _open_front_end(browser, host)
    try:
        for name in sorted(names):
            result = page.evaluate(
                """async (url) => {
                    const wf = await (await fetch(url)).json();
                    const expected = wf.nodes.map((n) => n.type).sort();
                    const onCanvas = await (LOAD_GRAPH)(wf);
                    const types = window.LiteGraph.registered_node_types;
                    return {expected, onCanvas, missing: expected.filter((t) => !types[t])};
                }""".replace("LOAD_GRAPH", LOAD_GRAPH_JS),
                f"/api/workflow_templates/{PACK_FOLDER_NAME}/{name}.json",
            )
            assert result["missing"] == [], (name, result["missing"])
            assert result["onCanvas"] == result["expected"], name
    finally:
        context.close()
    assert not errors, errors


def test_node_docs_panel_shows_the_pack_page(browser, host):
    """The node docs panel renders js/docs/TurboStreamLiveImg2Img.md (its heading is visible), opened as a
    user does: click the node on the canvas, then the selection toolbox's info button."""
    context, page, errors = _open_front_end(browser, host)
    try:
        page.keyboard.press("Escape")
        assert "TurboStreamLiveImg2Img" in page.evaluate(LOAD_GRAPH_JS, json.loads(UI_WORKFLOW.read_text()))
        # move the node into view and click its title bar
        x, y = page.evaluate(
            """() => {
                const c = window.comfyAPI.app.app.canvas;
                const n = window.comfyAPI.app.app.graph._nodes.find((n) => n.type === 'TurboStreamLiveImg2Img');
                const rect = c.canvas.getBoundingClientRect();
                n.pos = [rect.width * 0.5 / c.ds.scale - c.ds.offset[0], 200 / c.ds.scale - c.ds.offset[1]];
                c.setDirty(true, true);
                return [rect.left + (n.pos[0] + c.ds.offset[0] + 40) * c.ds.scale,
                        rect.top + (n.pos[1] + c.ds.offset[1] - 15) * c.ds.scale];
            }"""
        )
        page.wait_for_timeout(300)
        page.mouse.click(x, y)
        page.wait_for_function(
            "() => Object.values(window.comfyAPI.app.app.canvas.selected_nodes || {})"
            ".some((n) => n.type === 'TurboStreamLiveImg2Img')",
            timeout=10_000,
        )
        # the toolbox's info button: data-testid on older front ends, an aria-label on newer ones
        page.locator('[data-testid="info-button"], button[aria-label="Node Info"]').first.click(timeout=15_000)
        heading = page.get_by_role("heading", name="Live Img2Img (stream)", exact=True)
        heading.wait_for(state="visible", timeout=30_000)
        for section in ("When to use it", "Common mistakes"):
            assert page.get_by_role("heading", name=section, exact=True).first.is_visible()
    finally:
        context.close()
    assert not errors, errors


def test_read_only_view_for_obs(browser, host):
    """The tab that owns a live stream opens a read-only view URL (its own token): in a second browser
    context it shows that stream's output frames only, full window, and stops when the stream closes; a
    missing or wrong view token gets 403."""
    import urllib.error
    import urllib.request

    ctx_a, page_a, errors_a = open_live_workflow(browser, host, 1280, 800)
    ctx_b, page_b, errors_b = open_live_workflow(browser, host, 800, 600)
    ctx_v = browser.new_context(viewport={"width": 640, "height": 360})
    try:
        start_or_stop(page_a)
        start_or_stop(page_b)
        a = wait_for_frames(page_a, 2)
        wait_for_frames(page_b, 2)
        view_url = page_a.evaluate("() => window.ts.node('TurboStreamLiveInput').turbostreamLive.viewUrl")
        assert view_url and "/view?token=" in view_url
        view = ctx_v.new_page()
        view_errors: list[str] = []
        view.on("pageerror", lambda exc: view_errors.append(str(exc)))
        view.goto(view_url)
        view.wait_for_function("() => window.__tsView && window.__tsView.frames >= 3", timeout=120_000)
        seen = view.evaluate("() => [...new Set(window.__tsView.streams)]")
        assert seen == [a["streamId"]], "the view shows that stream only"
        assert view.locator("#frame").bounding_box()["width"] == 640, "full window"

        stream_path = view_url.split("/view?", 1)[0].split(host.url, 1)[-1]
        for bad in ("", "?token=", "?token=not-the-token"):
            for route in ("/latest", "/view"):
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(f"{host.url}{stream_path}{route}{bad}", timeout=15)
                assert err.value.code == 403, (route, bad)
        upload_token = view_url.split("token=", 1)[1]
        req = urllib.request.Request(
            f"{host.url}{stream_path}/close", method="POST", headers={"X-TurboStream-Token": upload_token}
        )
        with pytest.raises(urllib.error.HTTPError) as err:  # the view token cannot close (or feed) the stream
            urllib.request.urlopen(req, timeout=15)
        assert err.value.code == 403

        start_or_stop(page_a)  # stop: the stream closes, the view ends
        view.wait_for_function("() => window.__tsView.ended", timeout=60_000)
        frames = view.evaluate("() => window.__tsView.frames")
        time.sleep(2)
        assert view.evaluate("() => window.__tsView.frames") == frames
        assert view.evaluate("() => window.__tsView.status") == 404
        start_or_stop(page_b)
    finally:
        ctx_v.close()
        ctx_a.close()
        ctx_b.close()
    assert not errors_a and not errors_b and not view_errors, errors_a + errors_b + view_errors
