"""The live path's fixed cost per frame, no model: ``TurboStreamLiveInput`` -> ``TurboStreamLiveOutput``.

The Python live client uploads a 64x64 frame, queues the two-node prompt and gets the frame pushed
back over the websocket, with 1 or 2 prompts in flight, PNG or JPEG frames. Per setting: frames per
second (the ceiling any model's frame rate sits under), end-to-end latency (capture stamp to push
received) median and p90, and the split seen by the client: upload round trip, queue round trip
(the host's validation and cache checks), and queued -> frame pushed (the host executing the prompt
and pushing the frame). Settings alternate round by round.
"""

from __future__ import annotations

import asyncio
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Comparison  # noqa: E402

from turbostream.live_client import LiveClient  # noqa: E402

FRAMES, SIZE = 300, 64
WORKFLOW = {
    "1": {"class_type": "TurboStreamLiveInput", "inputs": {"stream_id": "passthrough", "width": SIZE, "height": SIZE}},
    "2": {"class_type": "TurboStreamLiveOutput", "inputs": {"images": ["1", 0], "stream_id": ["1", 1]}},
}


def _frames(fmt: str) -> list[bytes]:
    import torch
    from PIL import Image

    out = []
    for i in range(8):
        rgb = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(i))
        buf = io.BytesIO()
        Image.fromarray((rgb * 255).byte().numpy()).save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


async def _round(host, fmt: str, in_flight_max: int) -> dict:
    frames, content_type = _frames(fmt), f"image/{fmt.lower()}"
    upload, queue, queued_at = [], [], {}
    async with LiveClient(host.url) as cl:
        await cl.open("passthrough")
        in_flight: set[str] = set()
        t0 = time.perf_counter()
        for k in range(FRAMES):
            while len(in_flight) >= in_flight_max:
                await asyncio.sleep(0.0002)
                in_flight = {p for p in in_flight if p not in cl.finished}
            a = time.perf_counter()
            await cl.send_frame(frames[k % len(frames)], content_type=content_type)
            b = time.perf_counter()
            prompt_id = await cl.queue(WORKFLOW)
            c = time.perf_counter()
            in_flight.add(prompt_id)
            upload.append(b - a)
            queue.append(c - b)
            queued_at[prompt_id] = c
        got = [await cl.next_frame(timeout=60) for _ in range(FRAMES)]
        wall = time.perf_counter() - t0
        await cl.close()
    latency = [f["received_ms"] - f["captured_ms"] for f in got]
    return {
        "fps": FRAMES / wall,
        "latency": latency,
        "upload_ms": 1000 * statistics.median(upload),
        "queue_ms": 1000 * statistics.median(queue),
        "host_ms": statistics.median(f["compute_ms"] for f in got if f.get("compute_ms") is not None),
    }


def run(ctx) -> list[Comparison]:
    host = ctx.host
    settings = [("JPEG", 2), ("PNG", 2), ("JPEG", 1)]
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
                f"{s[0]}, {s[1]} in flight",
                f"{base[0]}, {base[1]} in flight",
                1 / fps,
                1 / statistics.median(r["fps"] for r in results[base]),
                len(rs),
                f"64², Python live client; {fps:.0f} fps (goal >= 200); latency median {statistics.median(lat):.1f} ms, "
                f"p90 {statistics.quantiles(lat, n=10)[-1]:.1f} ms; split (median ms): upload "
                f"{statistics.median(r['upload_ms'] for r in rs):.2f}, queue {statistics.median(r['queue_ms'] for r in rs):.2f}, "
                f"frame taken -> pushed {statistics.median(r['host_ms'] for r in rs):.2f}",
            )
        )
    return rows
