"""Live path under load in the real host: abandoned streams, two streaming clients with API prompts
queued beside them, and (``-m soak``, run by ``make reliability``) 1,000 frames with memory watched."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import LIVE_MAX_SOURCES, STREAM_IDLE_S, history, live_workflow, textured_png, tiny_txt2img
from PIL import Image
from reliability import record, rss_mib, slope_per_1000

from turbostream.live_client import LiveClient

SIZE = 64


def run(coro):
    return asyncio.run(coro)


def frame(seed: int) -> bytes:
    return textured_png(seed, SIZE, grid=4, mode="bilinear")


def api_txt2img(seed: int) -> dict:
    return tiny_txt2img(seed, f"load/api_{seed}")


async def stream(cl: LiveClient, stream_id: str, frames: int, in_flight: int, on_frame=None) -> dict:
    """Send ``frames`` frames, one prompt each, at most ``in_flight`` prompts pending; close the source.

    Returns counts of prompts by outcome and the pushed frames' stream ids."""
    await cl.open(stream_id)
    pending: list[str] = []
    outcomes: dict[str, int] = {}
    pushed: list[str] = []

    async def settle(prompt_id: str) -> None:
        status = await cl.wait(prompt_id, timeout=300)
        outcomes[status] = outcomes.get(status, 0) + 1
        assert status == "execution_success", cl.errors.get(prompt_id)

    for i in range(frames):
        await cl.send_frame(frame(i), content_type="image/png")
        pending.append(await cl.queue(live_workflow(stream_id, SIZE)))
        if len(pending) >= in_flight:
            await settle(pending.pop(0))
        while not cl.frames.empty():
            pushed.append(cl.frames.get_nowait()["stream_id"])
        if on_frame is not None:
            on_frame(i)
    for prompt_id in pending:
        await settle(prompt_id)
    deadline = time.monotonic() + 30
    while len(pushed) < frames and time.monotonic() < deadline:
        pushed.append((await cl.next_frame(timeout=max(0.1, deadline - time.monotonic())))["stream_id"])
    await cl.close()
    return {"outcomes": outcomes, "pushed": pushed}


def run_api(host, wf: dict) -> bytes:
    """Run an API prompt with its own websocket client; the saved image's pixels."""

    async def main():
        async with LiveClient(host.url) as cl:
            prompt_id = await cl.queue(wf)
            assert await cl.wait(prompt_id, timeout=300) == "execution_success", cl.errors
            return prompt_id

    entry = history(host, run(main()))
    [image] = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    with Image.open(host.output_dir / image["subfolder"] / image["filename"]) as im:
        return im.convert("RGB").tobytes()


def test_two_live_clients_and_api_prompts_at_once(host):
    """Two clients stream concurrently (2 in flight each) while API prompts are queued beside them:
    each client gets exactly its own frames, and the API prompts give the images they give alone."""
    seeds = (101, 102, 103)
    alone = {seed: run_api(host, api_txt2img(seed)) for seed in seeds}
    n = 8

    async def main():
        async with LiveClient(host.url) as alice, LiveClient(host.url) as bob, LiveClient(host.url) as api:

            async def api_prompts():
                ids = []
                for seed in seeds:
                    ids.append(await api.queue(api_txt2img(seed)))
                    await asyncio.sleep(0.3)
                return [await api.wait(pid, timeout=300) for pid in ids], ids

            return await asyncio.gather(stream(alice, "load-alice", n, 2), stream(bob, "load-bob", n, 2), api_prompts())

    a, b, (api_status, api_ids) = run(main())
    foreign = sum(s != "load-alice" for s in a["pushed"]) + sum(s != "load-bob" for s in b["pushed"])
    assert a["outcomes"] == {"execution_success": n} and b["outcomes"] == {"execution_success": n}
    assert a["pushed"] == ["load-alice"] * n, a["pushed"]
    assert b["pushed"] == ["load-bob"] * n, b["pushed"]
    assert api_status == ["execution_success"] * len(seeds)
    for seed, prompt_id in zip(seeds, api_ids, strict=True):
        entry = history(host, prompt_id)
        [image] = [img for out in entry["outputs"].values() for img in out.get("images", [])]
        with Image.open(host.output_dir / image["subfolder"] / image["filename"]) as im:
            assert im.convert("RGB").tobytes() == alone[seed], f"API prompt {seed} changed under live load"
    record("concurrency", case="two live clients + API prompts", frames_per_client=n, api_prompts=len(seeds),
           foreign_frames=foreign)  # fmt: skip


def _ids(host) -> tuple[set[str], set[str]]:
    sources = {s["stream_id"] for s in host.get_json("/turbostream/live")["sources"]}
    streams = {s["stream_id"] for s in host.get_json("/turbostream/streams")["streams"]}
    return sources, streams


def test_abandoned_streams_are_evicted_after_the_idle_timeout(host):
    """50 clients open a stream each (10 also run a frame through the stream node) and vanish
    without closing: all 50 sources and their engines are gone once the idle timeout has passed."""
    ids = [f"abandoned-{i:02d}" for i in range(50)]
    assert len(ids) <= LIVE_MAX_SOURCES

    async def main():
        for group in range(0, len(ids), 10):
            clients = [LiveClient(host.url) for _ in ids[group : group + 10]]
            for cl in clients:
                await cl.__aenter__()
            for cl, stream_id in zip(clients, ids[group : group + 10], strict=True):
                await cl.open(stream_id)
                await cl.send_frame(frame(group), content_type="image/png")
            if group == 0:  # engines in the stream registry too
                for cl, stream_id in zip(clients, ids[:10], strict=True):
                    assert await cl.wait(await cl.queue(live_workflow(stream_id, SIZE)), 300) == "execution_success"
            for cl in clients:  # gone without a close: the websocket just drops
                await cl.__aexit__(None, None, None)

    t0 = time.monotonic()
    run(main())
    sources, streams = _ids(host)
    open_after = len(set(ids) & sources)
    assert open_after > 0, "the sources expired before the idle timeout"
    time.sleep(max(0.0, STREAM_IDLE_S + 2 - (time.monotonic() - t0)))
    deadline = time.monotonic() + STREAM_IDLE_S + 10
    while True:
        sources, streams = _ids(host)  # each listing sweeps
        left = (set(ids) & sources) | (set(ids) & streams)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"abandoned streams still held after {time.monotonic() - t0:.0f} s: {sorted(left)}"
    record("soak", case="abandoned stream ids", opened=len(ids), with_engines=10, still_open_before_timeout=open_after,
           left_after_timeout=len(left), idle_timeout_s=STREAM_IDLE_S, evicted_after_s=round(time.monotonic() - t0))  # fmt: skip


@pytest.mark.soak
@pytest.mark.timeout(3600)  # ~4 min on a quiet 2-core CPU; several times that when the CPU is shared
def test_soak_1000_live_frames(host):
    """1,000 frames through the live path (2 in flight): the host's memory stays flat and the pack's
    registries stay bounded. Run by ``make reliability`` (``-m soak``), not by ``make test``."""
    frames, every = 1000, 50
    pid = host.process.pid
    samples: list[tuple[int, float, int, int, float]] = []

    def sample(i: int) -> None:
        if i % every == 0 or i == frames - 1:
            sources, streams = _ids(host)
            history_mib = len(json.dumps(host.get_json("/history", timeout=60))) / 2**20  # the host's own
            samples.append((i, rss_mib(pid), len(sources), len(streams), history_mib))

    async def main():
        async with LiveClient(host.url) as cl:
            return await stream(cl, "soak", frames, 2, on_frame=sample)

    t0 = time.perf_counter()
    result = run(main())
    seconds = time.perf_counter() - t0
    assert result["outcomes"] == {"execution_success": frames}
    assert result["pushed"] == ["soak"] * frames
    warm = [s for s in samples if s[0] >= 200]  # after the first 200 frames (allocator warm-up)
    slope = slope_per_1000([s[0] for s in warm], [s[1] for s in warm])
    start, end = samples[0][1], samples[-1][1]
    max_sources, max_streams = max(s[2] for s in samples), max(s[3] for s in samples)
    history_slope = slope_per_1000([s[0] for s in warm], [s[4] for s in warm])
    record("soak", case="1000 live frames", frames=frames, seconds=round(seconds, 1),
           frames_per_s=round(frames / seconds, 2), rss_start_mib=round(start), rss_end_mib=round(end),
           rss_slope_mib_per_1000_frames=round(slope, 1), max_live_sources=max_sources,
           max_streams=max_streams, host_history_json_mib_per_1000_frames=round(history_slope, 1),
           rss_series=[[s[0], round(s[1])] for s in samples])  # fmt: skip
    assert slope < 32, f"host memory grows by {slope:.1f} MiB per 1,000 frames after warm-up: {samples}"
    assert max_sources <= 2 and max_streams <= 8, samples
