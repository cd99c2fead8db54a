"""Temporal feedback: frame-to-frame change and per-frame cost at feedback 0, 0.3 and 0.6.

A slowly panning clip (a smooth colour field moved one pixel a frame), 64x64, the tiny SD1.5 with its
LCM-LoRA and LCM sampling, Stream Img2Img (t_index_list 32,45, RCFG self), in process on the host's
modules. The frame-to-frame change is the mean absolute difference of consecutive output frames (0..1
pixels). Caveat: the tiny model has random weights, so its x0 is no image latent; how much feedback
steadies a real model's stream is not measured here (no real weights can be downloaded on this machine).
The cost should be about zero: one blend of two latents per frame.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness import Comparison, host_in_process, interleaved, tiny_lcm_sd15  # noqa: E402

FRAMES, SIZE = 16, 64


def _setup():
    pack, host_nodes = host_in_process()
    lcm, clip = tiny_lcm_sd15(host_nodes)
    encode = host_nodes.CLIPTextEncode().encode
    field = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    big = torch.nn.functional.interpolate(field, size=(SIZE * 2, SIZE * 2), mode="bicubic", align_corners=False)
    frames = torch.stack([big[0, :, :SIZE, i : i + SIZE] for i in range(FRAMES)]).permute(0, 2, 3, 1).clamp(0, 1)
    return {
        "node": pack.nodes.stream_batch.TurboStreamStreamImg2Img,
        "model": lcm,
        "pos": encode(clip, "a watercolor fox")[0],
        "neg": encode(clip, "blurry")[0],
        "vae": pack.nodes.tiny_vae.load_tiny_vae("bench", "vae_approx/taesd"),
        "frames": frames.contiguous(),
    }


def _run(c, feedback: float) -> torch.Tensor:
    out = c["node"].execute(
        c["model"], c["pos"], c["vae"], c["frames"], "32,45", "self", 1.2, negative=c["neg"], feedback=feedback
    )
    return out.result[0]


def _change(images: torch.Tensor) -> float:
    return float((images[1:] - images[:-1]).abs().mean())


def run(ctx) -> list[Comparison]:
    c = _setup()
    rows = []
    with torch.inference_mode():
        base_change = _change(_run(c, 0.0))
        for fb in (0.3, 0.6):
            a, b = interleaved(lambda i, fb=fb: _run(c, fb), lambda i: _run(c, 0.0), n=ctx.n)
            rows.append(
                Comparison(
                    f"temporal feedback {fb} vs 0, tiny SD1.5, {FRAMES} panning frames {SIZE}²",
                    f"feedback {fb}",
                    "feedback 0",
                    a / FRAMES,
                    b / FRAMES,
                    ctx.n,
                    f"s per frame (expected ratio ~1); frame-to-frame change {_change(_run(c, fb)):.4f} vs "
                    f"{base_change:.4f} (random weights: not a measure of steadiness)",
                )
            )
    return rows
