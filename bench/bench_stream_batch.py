"""Stream batch ratios, in process on the host's modules, 256x256 frames.

(a) ``TurboStreamStreamImg2Img`` vs the host-native per-frame loop (VAEEncode -> KSampler lcm, same
    2 steps and guidance 1.2 with a negative -> VAEDecode): once with the same tiny VAE on both
    sides, once against the host's default recipe with the full SD VAE.
(b) stream batch (one batched call per frame) vs sequential denoising of the same schedule.
(c) residual CFG ``self`` vs conventional ``full`` CFG.
(d) similarity filter (0.98) on a static clip vs off.
(a)-(c) run on the tiny SD1.5 model and on a real-size SD1.5 UNet with random weights (the
architecture people run; the real-size rows are timed once each, the tiny rows interleaved).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness import Comparison, host_in_process, interleaved, lcm_sampling, tiny_lcm_sd15  # noqa: E402

from turbostream import host as host_mod  # noqa: E402
from turbostream import tiny_models  # noqa: E402
from turbostream.cli import TINY_MODELS_DIR  # noqa: E402

FRAMES, SIZE, T_INDEX = 4, 256, "32,45"


def _setup():
    pack, host_nodes = host_in_process()
    host = host_mod.ensure_host()
    full_vae = tiny_models.make_full_vae(TINY_MODELS_DIR, host)
    real_unet = tiny_models.make_real_sd15_unet(TINY_MODELS_DIR, host)
    import comfy.sd
    import comfy.utils

    tiny_lcm, clip = tiny_lcm_sd15(host_nodes)
    real_lcm = lcm_sampling(comfy.sd.load_diffusion_model(str(real_unet)))
    encode = host_nodes.CLIPTextEncode().encode
    ctx = {
        "pack": pack,
        "host_nodes": host_nodes,
        "models": {"tiny SD1.5": tiny_lcm, "real-size SD1.5 UNet": real_lcm},
        "pos": encode(clip, "a watercolor fox")[0],
        "neg": encode(clip, "blurry")[0],
        "tiny_vae": pack.nodes.tiny_vae.load_tiny_vae("bench", "vae_approx/taesd"),
        "full_vae": comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(full_vae))),
        "frames": torch.rand(FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0)),
    }
    return ctx


def _stream(c, model, frames, cfg_type="self", threshold=0.0):
    node = c["pack"].nodes.stream_batch.TurboStreamStreamImg2Img
    return node.execute(
        model, c["pos"], c["tiny_vae"], frames, T_INDEX, cfg_type, 1.2, 1, True, 0, threshold, 10, negative=c["neg"]
    )


def _native_loop(c, model, vae):
    """Per frame: VAEEncode -> KSampler(lcm, 2 steps, cfg 1.2, negative) -> VAEDecode, host nodes only."""
    host_nodes = c["host_nodes"]
    for i in range(c["frames"].shape[0]):
        latent = host_nodes.VAEEncode().encode(vae, c["frames"][i : i + 1])[0]
        out = host_nodes.common_ksampler(
            model, 0, 2, 1.2, "lcm", "sgm_uniform", c["pos"], c["neg"], latent, denoise=0.36
        )[0]
        host_nodes.VAEDecode().decode(vae, out)


def _sequential(c, model):
    """The same schedule and RCFG, one frame and one step per model call (no stream batch)."""
    sb = c["pack"].nodes.stream_batch
    latents = sb._to_model_space(model, sb.tiny_encode("bench", c["tiny_vae"], c["frames"]))
    timesteps = sb.core.parse_t_index_list(T_INDEX)
    denoise = c["pack"].nodes.host_sampling.host_denoiser(model, 0)
    for z in latents:
        for t in timesteps:  # each step on its own engine of one slot: n calls of batch 1 per frame
            engine = sb._engine("bench", model, [t], 1, "self", 1.2, 1.0, True, 0, tuple(z.shape))
            engine.img2img(z[None], denoise, c["pos"], c["neg"])


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(ctx) -> list[Comparison]:
    c = _setup()
    rows = []
    with torch.inference_mode():
        for label, model in c["models"].items():
            real = label.startswith("real")
            n = 1 if real else ctx.n

            def pair(a, b, n=n, real=real):
                if real:
                    a(-1)  # load weights once
                    return _timed(lambda: a(0)), _timed(lambda: b(0))
                return interleaved(a, b, n=n)

            ours = lambda i, m=model: _stream(c, m, c["frames"])  # noqa: E731
            a, b = pair(ours, lambda i, m=model: _native_loop(c, m, c["tiny_vae"]))
            rows.append(
                Comparison(
                    f"(a) stream vs per-frame loop, {label}",
                    f"StreamImg2Img {FRAMES}x{SIZE}² RCFG self",
                    "VAEEncode+KSampler(cfg 1.2)+VAEDecode, tiny VAE both",
                    a,
                    b,
                    n,
                    f"goal A/B <= 0.5; frames/s {FRAMES / a:.2f} vs {FRAMES / b:.2f}",
                )
            )
            a, b = pair(ours, lambda i, m=model: _native_loop(c, m, c["full_vae"]))
            rows.append(
                Comparison(
                    f"(a) stream vs host default recipe, {label}",
                    "StreamImg2Img + tiny VAE",
                    "per-frame loop + full SD VAE",
                    a,
                    b,
                    n,
                    "goal A/B <= 0.1",
                )
            )
            a, b = pair(lambda i, m=model: _stream(c, m, c["frames"]), lambda i, m=model: _sequential(c, m))
            rows.append(
                Comparison(
                    f"(b) stream batch vs sequential, {label}",
                    "one batched call per frame",
                    "one call per step and frame",
                    a,
                    b,
                    n,
                    "same schedule and RCFG",
                )
            )
            a, b = pair(ours, lambda i, m=model: _stream(c, m, c["frames"], cfg_type="full"))
            rows.append(
                Comparison(
                    f"(c) RCFG self vs full CFG, {label}",
                    "cfg_type self",
                    "cfg_type full",
                    a,
                    b,
                    n,
                    "paper: up to 2.05x",
                )
            )
        static = c["frames"][:1].expand(8, -1, -1, -1).contiguous()
        model = c["models"]["tiny SD1.5"]
        a, b = interleaved(
            lambda i: _stream(c, model, static, threshold=0.98),
            lambda i: _stream(c, model, static, threshold=0.0),
            n=ctx.n,
        )
        rows.append(
            Comparison(
                "(d) similarity filter on a static clip, tiny SD1.5",
                "threshold 0.98",
                "filter off",
                a,
                b,
                ctx.n,
                "8 identical frames, max_skip_frames 10",
            )
        )
    return rows
