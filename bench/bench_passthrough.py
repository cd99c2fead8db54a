"""The live path's fixed cost per frame, no model: ``TurboStreamLiveInput`` -> ``TurboStreamLiveOutput``.

The Python live client uploads a 64x64 frame (or a group of ``frames_per_prompt`` frames), queues the
two-node prompt and gets the frames pushed back over the websocket, with 1 or 2 prompts in flight,
PNG or JPEG frames. Per setting: frames per
second (the ceiling any model's frame rate sits under), end-to-end latency (capture stamp to push
received) median and p90, and the split seen by the client: upload round trip, queue round trip
(the host's validation and cache checks), and queued -> frame pushed (the host executing the prompt
and pushing the frame). Settings alternate round by round.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Comparison, noise_frames  # noqa: E402

from turbostream.live_client import LiveClient  # noqa: E402

FRAMES, SIZE = 300, 64


def _workflow(per_prompt: int) -> dict:
    inputs = {"stream_id": "passthrough", "width": SIZE, "height": SIZE, "frames_per_prompt": per_prompt}
    return {
        "1": {"class_type": "TurboStreamLiveInput", "inputs": inputs},
        "2": {"class_type": "TurboStreamLiveOutput", "inputs": {"images": ["1", 0], "stream_id": ["1", 1]}},
    }


async def _round(host, fmt: str, in_flight_max: int, per_prompt: int) -> dict:
    frames, content_type = noise_frames(SIZE, fmt), f"image/{fmt.lower()}"
    upload, queue, workflow = [], [], _workflow(per_prompt)
    async with LiveClient(host.url) as cl:
        cl.timeline = {}
        await cl.open("passthrough", frames_per_prompt=per_prompt)
        t0 = time.perf_counter()
        for k in range(0, FRAMES, per_prompt):
            await cl.wait_for_slot(in_flight_max)
            a = time.perf_counter()
            await cl.send_frames([frames[(k + j) % len(frames)] for j in range(per_prompt)], content_type)
            b = time.perf_counter()
            prompt_id = await cl.queue(workflow)
            c = time.perf_counter()
            upload.append((b - a) / per_prompt)
            queue.append(c - b)
            cl.timeline.setdefault(prompt_id, {})["queued"] = c
        got = [await cl.next_frame(timeout=60) for _ in range(FRAMES)]
        wall = time.perf_counter() - t0
        for prompt_id in list(cl.in_flight):
            await cl.wait(prompt_id)
        await cl.close()
    latency = [f["received_ms"] - f["captured_ms"] for f in got]
    return {
        "fps": FRAMES / wall,
        "latency": latency,
        "upload_ms": 1000 * statistics.median(upload),
        "queue_ms": 1000 * statistics.median(queue),
        "host_ms": statistics.median(f["compute_ms"] for f in got if f.get("compute_ms") is not None),
        "host_split": _host_split(cl.timeline.values()),
    }


HOST_STAGES = [
    ("queued", "start", "queued -> started"),
    ("start", "node 1", "start -> Live Input"),
    ("node 1", "node 2", "Live Input"),
    ("node 2", "frame", "Live Output -> pushed"),
    ("frame", "done", "pushed -> prompt done"),
]
"""The host's side of a prompt, from its websocket messages as the client got them (the host hands its
messages to its event loop from the worker thread, so stages under ~0.1 ms mean "arrived together"): waiting in the
queue (with 2 in flight, behind the other prompt), the prompt's set-up (cache checks, the executing
message), Live Input's work, Live Output's until the frames arrive, and what follows (history, the
success message)."""


def _host_split(timelines) -> dict[str, float]:
    out = {}
    for a, b, name in HOST_STAGES:
        gaps = [t[b] - t[a] for t in timelines if a in t and b in t]
        out[name] = 1000 * statistics.median(gaps) if gaps else float("nan")
    return out


def run(ctx) -> list[Comparison]:
    host = ctx.host
    settings = [("JPEG", 2, 1), ("PNG", 2, 1), ("JPEG", 1, 1), ("JPEG", 2, 4), ("PNG", 2, 4)]
    results: dict[tuple, list[dict]] = {s: [] for s in settings}
    for i in range(max(2, ctx.n // 2) + 1):
        for s in settings:
            r = asyncio.run(_round(host, *s))
            if i:  # round 0 warms up
                results[s].append(r)
    rows = []
    base = settings[0]
    for s in settings:
        rs = results[s]
        fps = statistics.median(r["fps"] for r in rs)
        lat = [x for r in rs for x in r["latency"]]
        rows.append(
            Comparison(
                "live pass-through ceiling (seconds per frame, no model)",
                f"{s[0]}, {s[1]} in flight, {s[2]} per prompt",
                f"{base[0]}, {base[1]} in flight, {base[2]} per prompt",
                1 / fps,
                1 / statistics.median(r["fps"] for r in results[base]),
                len(rs),
                f"64², Python live client; {fps:.0f} fps (goal >= 200); latency median {statistics.median(lat):.1f} ms, "
                f"p90 {statistics.quantiles(lat, n=10)[-1]:.1f} ms; split (median ms): upload per frame "
                f"{statistics.median(r['upload_ms'] for r in rs):.2f}, queue per prompt (validation) "
                f"{statistics.median(r['queue_ms'] for r in rs):.2f}, frames taken -> pushed "
                f"{statistics.median(r['host_ms'] for r in rs):.2f}; host per prompt (median ms): "
                + ", ".join(
                    f"{name} {statistics.median(r['host_split'][name] for r in rs):.2f}" for *_, name in HOST_STAGES
                ),
            )
        )
    return rows
