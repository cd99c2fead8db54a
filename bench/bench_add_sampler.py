"""ADD sampler overhead: TurboStreamADDSampler vs the host's SamplerCustom recipe, same model and steps.

Row 1 (through the host API, interleaved): one prompt = sampler + SaveLatent on the tiny SD2.1-layout
model (``sd_turbo.safetensors`` stand-in), 2 steps, 256x256, a new seed every call (the text encoding
stays cached, so the difference is the sampler's). Expect A/B close to 1.0.
Row 2 (in process): the update loops alone with a trivial denoiser, our ``core.sample`` vs the host's
``sample_euler_ancestral``: the per-step bookkeeping cost, model excluded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Comparison, interleaved  # noqa: E402

from turbostream import add_sampler as core  # noqa: E402
from turbostream import client  # noqa: E402

SIZE, STEPS = 256, 2


def _workflow(ours: bool, seed: int) -> dict:
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_turbo.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    }
    if ours:
        wf["5"] = {
            "class_type": "TurboStreamADDSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": STEPS,
                "schedule": "stability",
                "timesteps": "",
                "denoise": 1.0,
                "update": "ancestral",
                "cfg": 1.0,
            },
        }
    else:
        wf["6"] = {"class_type": "SDTurboScheduler", "inputs": {"model": ["1", 0], "steps": STEPS, "denoise": 1.0}}
        wf["7"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}
        wf["5"] = {
            "class_type": "SamplerCustom",
            "inputs": {
                "model": ["1", 0],
                "add_noise": True,
                "noise_seed": seed,
                "cfg": 1.0,
                "positive": ["2", 0],
                "negative": ["3", 0],
                "sampler": ["7", 0],
                "sigmas": ["6", 0],
                "latent_image": ["4", 0],
            },
        }
    wf["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "bench/add"}}
    return wf


def run(ctx) -> list[Comparison]:
    host, out = ctx.host, ctx.out_dir / "bench_add_sampler"

    def ours(i: int) -> None:
        client.run_jobs([_workflow(True, 5000 + i)], [host.address], out, progress=False)

    def native(i: int) -> None:
        client.run_jobs([_workflow(False, 5000 + i)], [host.address], out, progress=False)

    a, b = interleaved(ours, native, n=max(ctx.n, 9))
    rows = [
        Comparison(
            "ADD sampler vs host recipe",
            f"TurboStreamADDSampler {STEPS} steps {SIZE}²",
            "SamplerCustom+SDTurboScheduler+euler_ancestral",
            a,
            b,
            max(ctx.n, 9),
            "tiny SD2.1 layout, prompt incl. SaveLatent; target < 1.03",
        )
    ]

    from turbostream.tiny_models import _import_host

    _import_host(ctx.host.host_dir)
    from comfy.k_diffusion.sampling import sample_euler_ancestral

    class Trivial:  # k-diffusion model wrapper shape: model(x, sigma) -> x0, plus the attribute path
        class inner_model:  # noqa: N801
            class inner_model:  # noqa: N801
                model_sampling = None

        def __call__(self, x, sigma, **kw):
            return x * 0.5

    x = torch.randn(1, 4, 64, 64)
    sigmas = core.sigmas_for_timesteps([999, 749, 499, 249])
    model = Trivial()
    reps = 200

    def core_loop(i: int) -> None:
        for _ in range(reps):
            core.sample(model, x, sigmas, "ancestral", extra_args={"seed": 1})

    def host_loop(i: int) -> None:
        for _ in range(reps):
            sample_euler_ancestral(model, x, sigmas, extra_args={"seed": 1}, disable=True)

    a, b = interleaved(core_loop, host_loop, n=ctx.n)
    rows.append(
        Comparison(
            "ancestral update loop",
            "core.sample (4 steps, 64² latent)",
            "host sample_euler_ancestral",
            a / reps,
            b / reps,
            ctx.n,
            "trivial denoiser: bookkeeping + noise draws only",
        )
    )
    return rows
