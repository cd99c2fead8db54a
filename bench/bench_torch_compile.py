"""The host's ``TorchCompileModel`` (inductor) under the stream, real-size SD1.5 UNet on this CPU.

A: stream model calls (``nodes/host_sampling.py``, prepared once per pass) on the model from the
   host's ``TorchCompileModel`` node, backend inductor; B: the same calls on the plain model. 256x256
(32x32 latents), batch 2 (two stream slots), the stream's timesteps 359 and 99. The first compiled
call (the compile itself) is timed separately and reported in the note; then passes of CALLS calls
alternate between A and B. The recipe: put TorchCompileModel between the model loader (after any
LoRA / ModelSamplingDiscrete nodes) and the stream node; the first frame compiles, later frames and
prompts reuse the compiled UNet while the stream's shape (n*f slots, frame size) stays the same.
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

from harness import Comparison, host_in_process, lcm_sampling  # noqa: E402

from turbostream import host as host_mod  # noqa: E402
from turbostream import tiny_models  # noqa: E402
from turbostream.cli import TINY_MODELS_DIR  # noqa: E402

CALLS, SIZE = 3, 256


def run(ctx) -> list[Comparison]:
    pack, host_nodes = host_in_process()
    import comfy.sd
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    unet_path = tiny_models.make_real_sd15_unet(TINY_MODELS_DIR, host_mod.ensure_host())
    model = lcm_sampling(comfy.sd.load_diffusion_model(str(unet_path)))
    compiled = TorchCompileModel.execute(model, "inductor")
    compiled = compiled.args[0] if hasattr(compiled, "args") else compiled[0]
    clip = host_nodes.CheckpointLoaderSimple().load_checkpoint(tiny_models.CHECKPOINTS["sd15"].name)[1]
    positive = host_nodes.CLIPTextEncode().encode(clip, "a watercolor fox")[0]
    hs = pack.nodes.host_sampling
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([359, 99])
    sigmas = [float(s) for s in model.get_model_object("model_sampling").sigma(t.float())]
    times: dict[str, list[float]] = {"compiled": [], "plain": []}
    outputs: dict[str, torch.Tensor] = {}

    def calls(name, m, count):
        def body(denoise):
            for _ in range(count):
                t0 = time.perf_counter()
                outputs[name] = denoise(x, t, positive)
                times[name].append(time.perf_counter() - t0)

        hs.with_host_sampling(m, 0, positive, None, sigmas, tuple(x.shape), body)

    with torch.inference_mode():
        calls("plain", model, 1)  # loads the weights
        t0 = time.perf_counter()
        calls("compiled", compiled, 1)
        compile_s = time.perf_counter() - t0
        times = {"compiled": [], "plain": []}
        for i in range(max(1, ctx.n // 2)):
            for name, m in (("compiled", compiled), ("plain", model))[:: 1 if i % 2 == 0 else -1]:
                calls(name, m, CALLS)
    diff = float((outputs["compiled"] - outputs["plain"]).abs().max())
    a, b = statistics.median(times["compiled"]), statistics.median(times["plain"])
    return [
        Comparison(
            "TorchCompileModel (inductor) vs plain, real-size SD1.5 UNet, stream calls",
            "compiled UNet",
            "plain UNet",
            a,
            b,
            len(times["compiled"]),
            f"{SIZE}², batch 2, s per call; speed-up {b / a:.2f}x; first call (compile) {compile_s:.0f} s; "
            f"max |x0 difference| {diff:.1e}",
        )
    ]
