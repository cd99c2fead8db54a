"""Live path overhead: the browser's loop (upload a frame, queue a prompt, get the frame pushed back)
vs the video node computing the same frames in one prompt, tiny SD1.5 + LCM-LoRA stand-in, 256².

A: ``workflows/api/live_webcam_img2img.json`` driven the way ``js/live_input.js`` drives it (a
   Python stand-in, ``turbostream.live_client``): at most 2 prompts in flight, frames of the
   bundled clip; per-frame time = wall time / frames; end-to-end latency = push received - capture.
B: ``TurboStreamStreamImg2Img`` over the same frames in one prompt (wall time / frames).
Both use the same model, schedule (t_index_list 32,45, RCFG self) and tiny VAE. Rounds alternate A, B.
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Comparison  # noqa: E402

from turbostream import client  # noqa: E402
from turbostream.live_client import LiveClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IN_FLIGHT = 2


def _clip_frames(host, out: Path) -> list[bytes]:
    """The bundled clip's frames as PNG bytes, decoded by the host's own video loader."""
    wf = {
        "1": {"class_type": "LoadVideo", "inputs": {"file": "turbostream_clip.mp4"}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench/clip"}},
    }
    [result] = client.run_jobs([wf], [host.address], out, progress=False)
    return [p.read_bytes() for p in sorted(result.images)]


async def _live_round(host, workflow: dict, frames: list[bytes], stream_id: str) -> tuple[float, list[float]]:
    workflow = copy.deepcopy(workflow)
    workflow["6"]["inputs"]["stream_id"] = stream_id
    async with LiveClient(host.url) as cl:
        await cl.open(stream_id)
        in_flight: set[str] = set()
        t0 = time.perf_counter()
        for data in frames:
            while len(in_flight) >= IN_FLIGHT:
                await asyncio.sleep(0.005)
                in_flight = {p for p in in_flight if p not in cl.finished}
            await cl.send_frame(data, content_type="image/png")
            in_flight.add(await cl.queue(workflow))
        got = [await cl.next_frame(timeout=600) for _ in frames]
        wall = time.perf_counter() - t0
        await cl.close()
    bad = [p for p, how in cl.finished.items() if how != "execution_success"]
    assert not bad, f"live prompts failed: {cl.errors}"
    return wall, [f["received_ms"] - f["captured_ms"] for f in got]


def run(ctx) -> list[Comparison]:
    host, out = ctx.host, ctx.out_dir / "bench_live"
    frames = _clip_frames(host, out)
    n_frames = len(frames)
    live_wf = json.loads((REPO / "workflows/api/live_webcam_img2img.json").read_text())
    live_wf["6"]["inputs"].update(width=256, height=256)
    video_wf = json.loads((REPO / "workflows/api/stream_video_img2img.json").read_text())
    for node in ("9", "10"):  # keep the frames in memory: a PreviewImage instead of two savers
        video_wf.pop(node)
    video_wf["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}

    live_s, video_s, latencies = [], [], []
    for i in range(ctx.n + 1):  # round 0 warms both paths up
        wf = copy.deepcopy(live_wf)
        wf["7"]["inputs"]["seed"] = 100 + i
        wall, lat = asyncio.run(_live_round(host, wf, frames, f"bench-{i}"))
        v = copy.deepcopy(video_wf)
        v["8"]["inputs"]["seed"] = 100 + i
        t0 = time.perf_counter()
        client.run_jobs([v], [host.address], out, progress=False)
        video = time.perf_counter() - t0
        if i:
            live_s.append(wall / n_frames)
            video_s.append(video / n_frames)
            latencies += lat
    a, b = statistics.median(live_s), statistics.median(video_s)
    return [
        Comparison(
            "live path vs video node (per frame)",
            f"live loop, {IN_FLIGHT} in flight",
            "StreamImg2Img, one prompt",
            a,
            b,
            ctx.n,
            f"{n_frames} frames 256², tiny SD1.5; live {1 / a:.2f} fps vs video {1 / b:.2f} fps; "
            f"median end-to-end latency {statistics.median(latencies):.0f} ms (p90 "
            f"{statistics.quantiles(latencies, n=10)[-1]:.0f} ms)",
        )
    ]
