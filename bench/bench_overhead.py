"""Per-call overhead of the stream's host sampling path, in process on the host's modules.

A stream model call is one evaluation of the host's model wrapper inside a sampling pass the host
prepared once for the prompt (``nodes/host_sampling.py``: model loading, LoRA patches, conditioning).
Its overhead is measured inside each call: the call's time minus the time spent in the UNet's own
forward (timed by forward hooks on the host's diffusion model), so the UNet's ~65 ms and this CPU's
drift do not drown a ~1 ms difference. For the ratio, the call is also timed against a raw UNet
forward on the same batch, pair by pair (the physical floor: the UNet itself). The same is measured
for one host sampling pass per call (what the stream cost per call before, and what a custom
sampler node costs per step). Tiny SD1.5 + LCM-LoRA, 64x64 frames (8x8 latents), batch 2.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness import Comparison, host_in_process, tiny_lcm_sd15  # noqa: E402

CALLS = 20
STEPS = 200
"""Calls per configuration and round; a round times the prepared calls against raw forwards inside one
sampling pass, then one-pass-per-call calls against raw forwards (each pair back to back)."""


def run(ctx) -> list[Comparison]:
    pack, host_nodes = host_in_process()
    model, clip = tiny_lcm_sd15(host_nodes)
    positive = host_nodes.CLIPTextEncode().encode(clip, "a watercolor fox")[0]
    hs = pack.nodes.host_sampling
    sampling = model.get_model_object("model_sampling")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([359, 99])
    sigmas = [float(s) for s in sampling.sigma(t.float())]
    context = positive[0][0].repeat(2, 1, 1)
    per_call = hs.host_denoiser(model, 0)
    pairs: dict[str, list[tuple[float, float, float]]] = {"prepared": [], "per_call": []}

    def raw():
        unet = model.model.diffusion_model
        device = next(unet.parameters()).device
        unet(x.to(device), t.float().to(device), context=context.to(device))

    inside: list[float] = []

    def time_pairs(name, fn, warmup):
        for _ in range(warmup):
            fn()
            raw()
        for i in range(CALLS):
            got = {}
            for key, f in (("a", fn), ("b", raw))[:: 1 if i % 2 else -1]:
                inside.clear()
                t0 = time.perf_counter()
                f()
                got[key] = time.perf_counter() - t0
                if key == "a":
                    got["unet"] = sum(inside)
            pairs[name].append((got["a"], got["b"], got["unet"]))

    unet = model.model.diffusion_model
    started: list[float] = []
    hooks = [
        unet.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
        unet.register_forward_hook(lambda *_: inside.append(time.perf_counter() - started.pop())),
    ]
    with torch.inference_mode():
        for r in range(max(1, ctx.n)):
            hs.with_host_sampling(
                model, 0, positive, None, sigmas, tuple(x.shape),
                lambda denoise, r=r: time_pairs("prepared", lambda: denoise(x, t, positive), 3 if r == 0 else 1),
            )  # fmt: skip
            time_pairs("per_call", lambda: per_call(x, t, positive), 3 if r == 0 else 1)
    for h in hooks:
        h.remove()
    # the host path alone: the same prepared calls with the UNet's forward replaced by a no-op
    unet.forward = lambda x, *args, **kwargs: torch.zeros_like(x)
    noop: list[float] = []
    try:
        with torch.inference_mode():

            def body(denoise):
                for i in range(5 + CALLS * 10):
                    t0 = time.perf_counter()
                    denoise(x, t, positive)
                    if i >= 5:
                        noop.append(time.perf_counter() - t0)

            hs.with_host_sampling(model, 0, positive, None, sigmas, tuple(x.shape), body)
            # the host's own floor: a KSampler step on the same no-op UNet (its model wrapper, cfg 1,
            # euler), from the time of 1 + STEPS steps minus 1 step, interleaved
            latent = {"samples": torch.zeros(2, 4, 8, 8)}

            def ksampler(steps):
                host_nodes.common_ksampler(model, 0, steps, 1.0, "euler", "normal", positive, positive, latent)

            one, many = [], []
            for i in range(max(3, ctx.n)):
                for steps, acc in ((1, one), (1 + STEPS, many))[:: 1 if i % 2 else -1]:
                    t0 = time.perf_counter()
                    ksampler(steps)
                    acc.append(time.perf_counter() - t0)
            host_step = (statistics.median(many) - statistics.median(one)) / STEPS
    finally:
        del unet.forward  # the class's forward again

    def summary(name):
        a = statistics.median(p[0] for p in pairs[name])
        b = statistics.median(p[1] for p in pairs[name])
        return a, b, statistics.median(p[0] - p[2] for p in pairs[name])

    rows = []
    for name, label in (
        ("prepared", "stream call (host sampling prepared once per prompt)"),
        ("per_call", "one host sampling pass per call (before)"),
    ):
        a, b, overhead = summary(name)
        rows.append(
            Comparison(
                "per-call overhead vs raw UNet forward",
                label,
                "raw UNet forward, same batch",
                a,
                b,
                len(pairs[name]),
                f"tiny SD1.5, 64², batch 2; overhead {1000 * overhead:.2f} ms per call (call minus its UNet forward, median)"
                + (
                    f"; the host path alone (UNet forward a no-op): {1000 * statistics.median(noop):.2f} ms "
                    "per call (goal <= 1 ms)"
                    if name == "prepared"
                    else ""
                ),
            )
        )
    rows.append(
        Comparison(
            "the host path alone (UNet forward a no-op), per model evaluation",
            "stream call (prepared once per prompt)",
            "host KSampler step (euler, cfg 1)",
            statistics.median(noop),
            host_step,
            len(noop),
            f"tiny SD1.5, 64², batch 2; {1000 * statistics.median(noop):.2f} vs {1000 * host_step:.2f} ms; "
            "the host's own per-evaluation work (its model wrapper builds the "
            "conditioning batch, reads free memory, applies the model sampling) is the floor for any path "
            "that stays on it: A - B is what the pack adds per call",
        )
    )
    return rows
