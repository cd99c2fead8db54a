"""The stream nodes on the real-size SD1.5 UNet (random weights), 256x256, 16 frames, vs the host loop.

A (video): ``TurboStreamStreamImg2Img`` over the 16 frames in one prompt.
A (live): ``TurboStreamLiveImg2Img``, one call per frame on one stream (what each live prompt runs).
B: the host-native per-frame loop: VAEEncode -> KSampler (lcm, 2 steps, cfg 1.2, a negative) ->
   VAEDecode, tiny VAE both sides.
All: t_index_list 32,45 (n = 2 steps), guidance 1.2, RCFG self for the stream. Evaluation-count limits
(model calls of batch 2, stream vs loop): the loop makes n calls per frame (cfg 1.2 batches cond and
uncond into one call), the video node N + n - 1 calls of its n slots for N frames (the drain adds
n - 1): (N + n - 1) / (n N) = 0.53 for N = 16; the live node one call per frame: 1 / n = 0.5.
Both paths encode and decode every frame as the loop does, and on a CPU the tiny VAE is not small
beside the UNet at 256² (the loop's VAEEncode + VAEDecode are timed apart): the limit with that time
counted, (limit x (loop - VAE) + VAE) / loop, is given beside each.
Frames of live and loop alternate (live frame i, loop frame i); the video prompt runs before and after.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness import Comparison, host_in_process, lcm_sampling  # noqa: E402

from turbostream import host as host_mod  # noqa: E402
from turbostream import tiny_models  # noqa: E402
from turbostream.cli import TINY_MODELS_DIR  # noqa: E402

FRAMES, SIZE, T_INDEX, STEPS = 16, 256, "32,45", 2


def run(ctx) -> list[Comparison]:
    pack, host_nodes = host_in_process()
    import comfy.sd

    unet_path = tiny_models.make_real_sd15_unet(TINY_MODELS_DIR, host_mod.ensure_host())
    model = lcm_sampling(comfy.sd.load_diffusion_model(str(unet_path)))
    clip = host_nodes.CheckpointLoaderSimple().load_checkpoint(tiny_models.CHECKPOINTS["sd15"].name)[1]
    encode = host_nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, "a watercolor fox")[0], encode(clip, "blurry")[0]
    vae = pack.nodes.tiny_vae.load_tiny_vae("bench", "vae_approx/taesd")
    frames = torch.rand(FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    video = pack.nodes.stream_batch.TurboStreamStreamImg2Img
    live = pack.nodes.stream_live.TurboStreamLiveImg2Img

    def run_video():
        video.execute(model, pos, vae, frames, T_INDEX, "self", 1.2, negative=neg)

    vae_s = [0.0]

    def loop_frame(i):
        t0 = time.perf_counter()
        latent = host_nodes.VAEEncode().encode(vae, frames[i : i + 1])[0]
        t1 = time.perf_counter()
        out = host_nodes.common_ksampler(model, 0, STEPS, 1.2, "lcm", "sgm_uniform", pos, neg, latent, denoise=0.36)[0]
        t2 = time.perf_counter()
        host_nodes.VAEDecode().decode(vae, out)
        vae_s[0] += t1 - t0 + time.perf_counter() - t2

    def live_frame(i, stream_id):
        live.execute(model, pos, vae, frames[i : i + 1], stream_id, T_INDEX, "self", 1.2, negative=neg)

    with torch.inference_mode():
        live_frame(0, "bench-real-warmup")  # loads the weights, warms the paths
        loop_frame(0)
        vae_s[0] = 0.0
        video_s = []
        t0 = time.perf_counter()
        run_video()
        video_s.append(time.perf_counter() - t0)
        live_s, loop_s = 0.0, 0.0
        for i in range(FRAMES):
            for name in ("live", "loop") if i % 2 == 0 else ("loop", "live"):
                t0 = time.perf_counter()
                live_frame(i, "bench-real") if name == "live" else loop_frame(i)
                if name == "live":
                    live_s += time.perf_counter() - t0
                else:
                    loop_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        run_video()
        video_s.append(time.perf_counter() - t0)
    pack.nodes.stream_live.REGISTRY.remove("bench-real")
    pack.nodes.stream_live.REGISTRY.remove("bench-real-warmup")
    per_video = sum(video_s) / len(video_s) / FRAMES
    per_live, per_loop = live_s / FRAMES, loop_s / FRAMES
    limit_video = (FRAMES + STEPS - 1) / (2 * FRAMES)
    per_vae = vae_s[0] / FRAMES

    def with_vae(limit: float) -> str:
        counted = (limit * (per_loop - per_vae) + per_vae) / per_loop
        return f"{counted:.3f} with the VAE's {per_vae:.2f} s per frame counted"

    note = f"real-size SD1.5 UNet, {FRAMES} frames {SIZE}², tiny VAE, 2 steps, cfg 1.2 (RCFG self); s per frame"
    return [
        Comparison(
            "real-size stream vs host loop: video node",
            f"StreamImg2Img, {FRAMES} frames in one prompt",
            "VAEEncode+KSampler+VAEDecode per frame",
            per_video,
            per_loop,
            1,
            f"{note}; evaluation-count limit (N+n-1)/(nN) = {limit_video:.3f} (goal: within 10 % of the limit), "
            f"{with_vae(limit_video)}",
        ),
        Comparison(
            "real-size stream vs host loop: live node",
            "LiveImg2Img, one call per frame",
            "VAEEncode+KSampler+VAEDecode per frame",
            per_live,
            per_loop,
            1,
            f"{note}; evaluation-count limit 1/n = 0.5 (goal: within 10 %), {with_vae(0.5)}",
        ),
    ]
