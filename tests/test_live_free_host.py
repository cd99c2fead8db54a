"""``POST /free`` while a live stream runs (real host): frames keep coming, valid and as expected."""

from __future__ import annotations

import asyncio
import gc
import io
import time

import numpy as np
import pytest
import torch
from conftest import live_workflow
from PIL import Image
from reliability import record

from turbostream.live_client import LiveClient

SIZE = 64
FRAMES = 6
FREE_AFTER = 2
"""``/free`` is posted once the host has started frame 2 (its "executing" message for the stream node):
the host reads its flags after each prompt, so it acts on it after frame 2 and before frame 3. Posted
any earlier, it could land before the host's flag check after frame 1 (the host sends a prompt's
success before it reads the flags) and take effect before frame 2."""
STREAM_NODE = "7"
"""The live stream node's id (TurboStreamLiveImg2Img) in the bundled live workflow."""


def textured_png(seed: int) -> bytes:
    """A gradient, a checkerboard and seeded noise: the tiny model's output then depends on the frame."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    checker = ((x // (4 + seed % 5) + y // 8) % 2).float()
    rgb = torch.stack([x / SIZE, y / SIZE, checker], dim=-1) * 0.7 + 0.3 * torch.rand(SIZE, SIZE, 3, generator=g)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).round().to(torch.uint8).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def stream(host, stream_id: str, seeds: list[int], free: dict | None = None) -> tuple[np.ndarray, int, list[float]]:
    """Feed one frame per prompt; with ``free``, POST /free while frame FREE_AFTER runs.
    Returns the saved output frames (0..1), how many frames were pushed, and seconds per frame."""
    prefix = f"livefree/{stream_id}"

    async def main():
        async with LiveClient(host.url) as cl:
            await cl.open(stream_id)
            seconds = []
            for k, seed in enumerate(seeds):
                started = time.monotonic()
                await cl.send_frame(textured_png(seed), content_type="image/png")
                prompt_id = await cl.queue(
                    live_workflow(stream_id, SIZE, save_every=1, filename_prefix=prefix)
                )  # lossless frames
                if free is not None and k == FREE_AFTER:
                    await cl.wait_for_node(prompt_id, STREAM_NODE, timeout=60)
                    async with cl.session.post(f"{host.url}/free", json=free) as resp:
                        assert resp.status == 200
                assert await cl.wait(prompt_id) == "execution_success", cl.errors
                await cl.next_frame(timeout=30)
                seconds.append(time.monotonic() - started)
            await cl.close()
            return cl.frames.qsize() + len(seeds), seconds

    pushed, seconds = asyncio.run(main())
    paths = sorted(host.output_dir.glob(f"{prefix}_*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in paths])
    return images, pushed, seconds


@pytest.mark.parametrize(
    "free",
    [{"unload_models": True}, {"unload_models": True, "free_memory": True}],
    ids=["unload_models", "unload_models+free_memory"],
)
def test_free_during_a_live_stream(host, free):
    """``unload_models``: the host unloads the models and loads them again for the next frame; the
    stream's state (pack-side, on the intermediate device) goes on, so every frame equals the
    uninterrupted stream's. ``free_memory`` also drops the host's node cache: the checkpoint is loaded
    again as a new model object and the stream restarts (its first frame after is the warm-up
    estimate), so the frames after equal a stream started at that frame."""
    tag = "free-mem" if free.get("free_memory") else "unload"
    seeds = list(range(10, 10 + FRAMES))
    log_start = len(host.log_text())
    ref, _, _ = stream(host, f"{tag}-ref", seeds)
    cam_start = len(host.log_text())
    out, pushed, seconds = stream(host, f"{tag}-cam", seeds, free=free)
    log = host.log_text()[log_start:]
    cam_log = host.log_text()[cam_start:]
    restarts = [line for line in cam_log.splitlines() if f"stream {tag}-cam restarts" in line]
    if free.get("free_memory"):
        ref_after, _, _ = stream(host, f"{tag}-restart", seeds[FREE_AFTER + 1 :])
    else:
        ref_after = ref[FREE_AFTER + 1 :]

    assert pushed == FRAMES and out.shape == ref.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.isfinite(out).all() and (out.std(axis=(1, 2, 3)) > 0.005).all()  # not blank or flat
    assert np.abs(np.diff(ref, axis=0)).max() > 0.02  # the frames differ: the comparisons below mean something
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    before = np.abs(out[: FREE_AFTER + 1] - ref[: FREE_AFTER + 1]).max()
    after = np.abs(out[FREE_AFTER + 1 :] - ref_after).max()
    uninterrupted = np.abs(out[FREE_AFTER + 1 :] - ref[FREE_AFTER + 1 :]).max()
    record(
        "faults",
        case=f"free during live stream ({'+'.join(free)})",
        frames=FRAMES,
        free_after_frame=FREE_AFTER,
        restarts=[line.split("restarts: ", 1)[-1] for line in restarts],
        max_diff_before=float(before),
        max_diff_after_vs_expected=float(after),
        max_diff_after_vs_uninterrupted=float(uninterrupted),
        seconds_per_frame=[round(s, 3) for s in seconds],
    )
    assert before == 0
    assert after == 0, f"frames after /free differ from the expected stream by {after:.3f}"
    assert "Requested to load BaseModel" in cam_log  # /free did unload the model (loaded again for frame 3)
    assert len(restarts) == (1 if free.get("free_memory") else 0), cam_log[-3000:]


def test_a_reloaded_model_restarts_the_stream(pack):
    """The live node tells models apart by weak reference, not ``id()``: a model loaded again after
    ``/free`` may land at the freed one's address, and must not pass for it; the log says why."""
    nodes = pack.nodes.stream_live

    class Sampling:
        pass

    class Model:
        def __init__(self):
            self.model, self.sampling = type("BaseModel", (), {})(), Sampling()

        def get_model_object(self, name):
            assert name == "model_sampling"
            return self.sampling

    old = Model()
    sig = (0, 1, (4, 8, 8))
    entry = pack.turbostream.registry.Entry({"model_refs": nodes._model_refs(old)}, 0, 0.0, 0.0, {"signature": sig})
    entry.meta["size"] = [64, 64]
    assert nodes._restart_reason(entry, sig, old, [64, 64]) is None
    new_f = (0, 2, (4, 8, 8))
    assert nodes._restart_reason(entry, new_f, old, [64, 64]) == "frame_buffer_size changed"
    new_lora = (118, 2, (4, 8, 8))
    assert nodes._restart_reason(entry, new_lora, old, [64, 64]) == "the model's patches and frame_buffer_size changed"
    assert nodes._restart_reason(entry, new_f, old, [64, 72]) == "the frame size changed"  # in the signature too
    assert nodes._restart_reason(entry, sig, Model(), [64, 64]) == "the model changed"
    del old
    gc.collect()
    again = Model()  # may reuse the freed objects' ids
    assert "loaded again" in nodes._restart_reason(entry, sig, again, [64, 64])
