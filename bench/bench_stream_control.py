"""ControlNet in the stream: per-frame cost of one ControlNet vs none, in process on the host's modules.

Real-size SD1.5 UNet and a real-size SD1.5 ControlNet (both random weights, the architectures people
run), 256x256 frames, t_index_list 32,45, RCFG self, the tiny VAE. A ControlNet is the UNet's encoder
and middle block once more (plus its hint encoder) per evaluated slot, so the ratio should be about
1 + the ControlNet's share of the UNet's compute (it has ~42% of the UNet's parameters; its share of
the FLOPs is lower, the decoder being the UNet's heavier half), no more: the per-slot hint routing
itself adds a copy of the control chain and a per-slot strength vector per call.
Measured on the 2-core CPU (2026-12-01): 5.06 vs 3.83 s per frame, 1.32.
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

FRAMES, SIZE, T_INDEX = 4, 256, "32,45"


def _setup():
    pack, host_nodes = host_in_process()
    host = host_mod.ensure_host()
    real_unet = tiny_models.make_real_sd15_unet(TINY_MODELS_DIR, host)
    real_cn = tiny_models.make_real_sd15_controlnet(TINY_MODELS_DIR, host)
    import comfy.controlnet
    import comfy.sd

    _, clip, _ = host_nodes.CheckpointLoaderSimple().load_checkpoint(tiny_models.CHECKPOINTS["sd15"].name)
    model = lcm_sampling(comfy.sd.load_diffusion_model(str(real_unet)))
    encode = host_nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, "a watercolor fox")[0], encode(clip, "blurry")[0]
    frames = torch.rand(FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    net = comfy.controlnet.load_controlnet(str(real_cn))
    hints = torch.rand(FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1))
    cpos, cneg = host_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, net, hints, 1.0, 0.0, 1.0)
    return {
        "pack": pack,
        "model": model,
        "vae": pack.nodes.tiny_vae.load_tiny_vae("bench", "vae_approx/taesd"),
        "frames": frames,
        "plain": (pos, neg),
        "controlled": (cpos, cneg),
    }


def _stream(c, conds):
    node = c["pack"].nodes.stream_batch.TurboStreamStreamImg2Img
    pos, neg = conds
    return node.execute(c["model"], pos, c["vae"], c["frames"], T_INDEX, "self", 1.2, negative=neg)


def run(ctx) -> list[Comparison]:
    c = _setup()
    with torch.inference_mode():
        _stream(c, c["controlled"])  # load both models once
        times: dict[str, list[float]] = {"controlled": [], "plain": []}
        for i in range(2):  # interleaved, each configuration twice (real size: ~30 s a run)
            for key in ("controlled", "plain") if i % 2 == 0 else ("plain", "controlled"):
                t0 = time.perf_counter()
                _stream(c, c[key])
                times[key].append(time.perf_counter() - t0)
    a, b = (sorted(times[k])[len(times[k]) // 2] for k in ("controlled", "plain"))
    return [
        Comparison(
            "ControlNet in the stream, real-size SD1.5 UNet + ControlNet",
            f"StreamImg2Img {FRAMES}x{SIZE}² RCFG self + 1 ControlNet (per-frame hints)",
            "the same without ControlNet",
            a / FRAMES,
            b / FRAMES,
            2,
            "seconds per frame; expected at most 1 + the ControlNet's share of the UNet (~1.42 by parameters)",
        )
    ]
