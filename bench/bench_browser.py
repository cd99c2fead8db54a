"""The live loop in the real front end (Chromium, fake camera) vs the Python live client, same workflow.

A: the bundled UI workflow ``example_workflows/live_webcam_img2img.json`` in the host's front end,
   Start pressed on Live Input (``js/live_input.js``, its prompts queued under the live channel's own
   client id, ``js/live_channel.js``), 64x64, target 30 fps, 2 prompts in flight;
   frames per second = Live Output frames over the measuring window.
B: the same workflow in API form driven by ``turbostream.live_client`` (what a script or OBS plugin
   would do): upload a frame, queue, at most 2 in flight, frames of the bundled clip as JPEG.
Each with 1 and with 4 frames per prompt (Live Input's frames_per_prompt = Live Img2Img's
frame_buffer_size), on the default host and on one with torch on one thread.
Both on the tiny SD1.5 + LCM-LoRA stand-in; rounds alternate A, B. On this 2-core machine the browser
takes CPU from the host: its cores are reported beside the ratio, with the front end's requests per
second (what it does after each prompt).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from harness import Comparison, noise_frames  # noqa: E402

from turbostream.live_client import LiveClient  # noqa: E402

WARMUP_S, WINDOW_S, SIZE, IN_FLIGHT = 8.0, 25.0, 64, 2


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of Chromium's processes and of the host's."""
    total = {"browser": 0.0, "host": 0.0}
    for d in glob.glob("/proc/[0-9]*"):
        try:
            stat, cmd = open(f"{d}/stat").read(), open(f"{d}/cmdline").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if "chrom" in cmd:
            total["browser"] += seconds
        elif "main.py" in cmd:
            total["host"] += seconds
    return total


def _browser_round(browser, host, tlb, per_prompt: int) -> dict:
    context, page, errors = tlb.open_live_workflow(browser, host)
    requests: collections.Counter = collections.Counter()
    page.on("request", lambda r: requests.update([f"{r.method} {r.url.split('?')[0].replace(host.url, '')}"]))
    page.evaluate(
        """(f) => {
        window.ts.widget('TurboStreamLiveInput', 'fps').value = 30;
        window.ts.widget('TurboStreamLiveInput', 'frames_per_prompt').value = f;
        window.ts.widget('TurboStreamLiveImg2Img', 'frame_buffer_size').value = f;
        }""",
        per_prompt,
    )
    try:
        tlb.start_or_stop(page)
        time.sleep(WARMUP_S)
        s0, c0, t0 = tlb.view_stats(page), _cpu_seconds(), time.monotonic()
        requests.clear()
        time.sleep(WINDOW_S)
        s1, c1, t1 = tlb.view_stats(page), _cpu_seconds(), time.monotonic()
        timings = page.evaluate("() => window.ts.node('TurboStreamLiveInput').turbostreamLive.timings")
        tlb.start_or_stop(page)
    finally:
        context.close()
    assert not errors, errors
    span = t1 - t0
    return {
        "fps": (s1["frames"] - s0["frames"]) / span,
        "latency_ms": s1["latency"],
        "cores": {k: (c1[k] - c0[k]) / span for k in c0},
        "requests": {k: round(v / span, 1) for k, v in requests.most_common(4)},
        "split_ms": {k: round(statistics.median(v), 1) for k, v in timings.items() if v},
    }


async def _python_round(host, workflow: dict, frames: list[bytes], stream_id: str, per_prompt: int) -> dict:
    wf = copy.deepcopy(workflow)
    wf["6"]["inputs"].update(stream_id=stream_id, frames_per_prompt=per_prompt)
    wf["7"]["inputs"]["frame_buffer_size"] = per_prompt
    latencies, done = [], 0
    async with LiveClient(host.url) as cl:
        await cl.open(stream_id, frames_per_prompt=per_prompt)
        start = time.monotonic()
        c0 = t0 = None
        k = 0
        while time.monotonic() - start < WARMUP_S + WINDOW_S:
            await cl.wait_for_slot(IN_FLIGHT, 0.002)
            while not cl.frames.empty():
                frame = cl.frames.get_nowait()
                if t0 is not None:
                    done += 1
                    latencies.append(frame["received_ms"] - frame["captured_ms"])
            if t0 is None and time.monotonic() - start >= WARMUP_S:
                c0, t0 = _cpu_seconds(), time.monotonic()
            await cl.send_frames([frames[(k + j) % len(frames)] for j in range(per_prompt)])
            k += per_prompt
            await cl.queue(wf)
        span = time.monotonic() - t0
        c1 = _cpu_seconds()
        for prompt_id in list(cl.in_flight):
            await cl.wait(prompt_id, timeout=120)
        await cl.close()
    return {
        "fps": done / span,
        "latency_ms": statistics.median(latencies),
        "cores": {k: (c1[k] - c0[k]) / span for k in c0},
    }


def run(ctx) -> list[Comparison]:
    sys.path.insert(0, str(REPO / "tests"))
    import shutil

    if not (shutil.which("chromium") or os.path.exists("/usr/bin/chromium")):
        print("bench_browser: Debian's chromium is not installed (python -m turbostream setup --browser); skipped")
        return []
    import test_live_browser as tlb
    from playwright.sync_api import sync_playwright

    workflow = json.loads((REPO / "workflows/api/live_webcam_img2img.json").read_text())
    workflow["6"]["inputs"].update(width=SIZE, height=SIZE)
    frames = noise_frames(SIZE)
    rounds = max(1, min(ctx.n, 2))
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=tlb.CHROMIUM, headless=True, args=tlb.CHROMIUM_ARGS)
        try:
            for threads in (None, 1):
                host = ctx.host if threads is None else _host_with_threads(threads)
                try:
                    for per_prompt in (1, 4):
                        rows.append(_compare(browser, host, tlb, workflow, frames, rounds, threads, per_prompt))
                finally:
                    if threads is not None:
                        host.cleanup()
        finally:
            browser.close()
    return rows


def _host_with_threads(threads: int):
    """A second headless host whose torch uses ``threads`` CPU threads (OMP_NUM_THREADS)."""
    from turbostream import host as host_mod
    from turbostream.cli import TINY_MODELS_DIR
    from turbostream.server import HeadlessHost, demo_model_links

    env = {"OMP_NUM_THREADS": str(threads)}
    return HeadlessHost(host_mod.ensure_host(), model_links=demo_model_links(TINY_MODELS_DIR), env=env).start()


def _compare(browser, host, tlb, workflow, frames, rounds, threads, per_prompt) -> Comparison:
    a, b = [], []
    for i in range(rounds):
        a.append(_browser_round(browser, host, tlb, per_prompt))
        # in a thread of its own: Playwright's sync API keeps an event loop running in this one
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            coro = _python_round(host, workflow, frames, f"bench-py-{threads}-{per_prompt}-{i}", per_prompt)
            b.append(pool.submit(asyncio.run, coro).result())
    fa, fb = statistics.median(r["fps"] for r in a), statistics.median(r["fps"] for r in b)
    cores = lambda rs, k: statistics.median(r["cores"][k] for r in rs)  # noqa: E731
    setting = f"host torch threads {threads}" if threads else f"host torch threads default ({os.cpu_count()} cores)"
    return Comparison(
        f"browser live loop vs Python live client (s per frame), {setting}, {per_prompt} frame(s) per prompt",
        "front end in Chromium, fake camera",
        "turbostream.live_client",
        1 / fa,
        1 / fb,
        rounds,
        f"64², tiny SD1.5, 2 in flight, frames_per_prompt = frame_buffer_size = {per_prompt}, {WINDOW_S:.0f} s windows; {fa:.2f} vs {fb:.2f} fps (goal: A/B <= 1.5); "
        f"median latency {statistics.median(r['latency_ms'] for r in a):.0f} vs "
        f"{statistics.median(r['latency_ms'] for r in b):.0f} ms; CPU cores: browser {cores(a, 'browser'):.2f}, "
        f"host {cores(a, 'host'):.2f} vs {cores(b, 'host'):.2f}; front-end requests/s {a[-1]['requests']}; "
        f"browser split (median ms) {a[-1]['split_ms']}",
    )
