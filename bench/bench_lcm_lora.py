"""LCM-LoRA fuse: fused vs unfused (host patches) vs the base model, tiny SD1.5 + its tiny LCM-LoRA.

Rows 1-3 (through the host API, round robin, one prompt = node + model load + 1 KSampler lcm step at
128² + SaveLatent): *first run* gives the node a new strength every round, so neither the host's
cache nor the fused-weight cache can answer and the LoRA math runs once per prompt (fused: in the
node; unfused: when the host patches the weights at load). Base = the checkpoint with
ModelSamplingDiscrete lcm, no LoRA. Each prompt loads another clone of the same model, so every
prompt pays its load.
Row 4 (host API): *re-run*, the same two graphs alternately with a fixed strength: the host drops
the other graph's outputs, so the node runs again; fused re-uses its cached weights, unfused has the
host patch the weights again at load.
Rows 5-8 (in process): one UNet call (128², = one sampling step) on the loaded model, fully loaded and with every layer streamed
the way the host's low-VRAM mode does it (``lowvram_model_memory`` of 1 byte, weights cast per call):
there the unfused model recomputes each LoRA patch in every call.
Peak memory: the first run of each configuration once in a fresh process (VmHWM reset just before,
``/proc/self/clear_refs``), in the notes of rows 1-2 (model only; the CLIP is not loaded there).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness import Comparison, import_pack  # noqa: E402

from turbostream import client, tiny_models  # noqa: E402
from turbostream import host as host_mod  # noqa: E402
from turbostream.cli import TINY_MODELS_DIR  # noqa: E402

CKPT = "v1-5-pruned-emaonly-fp16.safetensors"  # tiny SD1.5 under the standard name
LORA = "lcm-lora-sdv1-5.safetensors"  # its tiny LCM-LoRA
SIZE = 128
CONFIGS = ("fused", "unfused", "base")
UNET_CALL_REPS = 3


def _workflow(config: str, seed: int, strength: float) -> dict:
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    }
    if config == "base":
        wf["5"] = {
            "class_type": "ModelSamplingDiscrete",
            "inputs": {"model": ["1", 0], "sampling": "lcm", "zsnr": False},
        }
    else:
        wf["5"] = {
            "class_type": "TurboStreamLCMLoRAFuse",
            "inputs": {
                "model": ["1", 0],
                "lora_name": LORA,
                "strength_model": strength,
                "strength_clip": 1.0,
                "fuse": config == "fused",
                "sampling": "lcm",
            },
        }
    wf["6"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": ["5", 0],
            "seed": seed,
            "steps": 1,
            "cfg": 1.0,
            "sampler_name": "lcm",
            "scheduler": "sgm_uniform",
            "positive": ["2", 0],
            "negative": ["3", 0],
            "latent_image": ["4", 0],
            "denoise": 1.0,
        },
    }
    wf["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "bench/lcm_lora"}}
    return wf


def round_robin(fns: dict[str, Callable[[int], None]], n: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each ``fns[name](i)``, called in a rotating order ``n`` times after ``warmup`` rounds."""
    names = list(fns)
    for i in range(warmup):
        for name in names:
            fns[name](-1 - i)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            fns[name](i)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# -- in process ------------------------------------------------------------------------------------
def _setup():
    """The tiny SD1.5 UNet as a host patcher and the pack's node, in this process."""
    host = host_mod.ensure_host()
    tiny_models.make_all(TINY_MODELS_DIR, host)
    tiny_models._import_host(host)
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(TINY_MODELS_DIR / "loras"))
    path = TINY_MODELS_DIR / "checkpoints" / tiny_models.CHECKPOINTS["sd15"].name
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)
    lora = tiny_models.LORA_FILES[("sd15", "kohya")].name  # the file behind LORA
    return model, import_pack().nodes.lcm_lora, lora


def _patcher(nodes, model, lora: str, config: str):
    if config == "base":
        from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

        return ModelSamplingDiscrete().patch(model, "lcm", False)[0]
    return nodes.TurboStreamLCMLoRAFuse.execute(model, lora, 1.0, 1.0, config == "fused", "lcm").result[0]


def _first_run(nodes, model, lora: str, config: str) -> None:
    import comfy.sample

    patcher = _patcher(nodes, model, lora, config)
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    cond = [[torch.randn(1, 77, 768), {}]]
    noise = comfy.sample.prepare_noise(latent, 0)
    comfy.sample.sample(patcher, noise, 1, 1.0, "lcm", "sgm_uniform", cond, cond, latent, seed=0, disable_pbar=True)


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _peak_main(config: str) -> None:
    """In a fresh process: seconds, peak and retained resident memory of one first run."""
    model, nodes, lora = _setup()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass
    rss = _status_kib("VmRSS")
    t0 = time.perf_counter()
    _first_run(nodes, model, lora, config)
    seconds = time.perf_counter() - t0
    out = {
        "seconds": seconds,
        "peak_mib": (_status_kib("VmHWM") - rss) / 1024,
        "kept_mib": (_status_kib("VmRSS") - rss) / 1024,
    }
    print(json.dumps(out))


def _peak(config: str) -> dict:
    out = subprocess.run([sys.executable, __file__, config], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _unet_call(patcher, lowvram: bool) -> float:
    """Seconds per UNet call with ``patcher`` loaded fully or with every layer streamed (low-VRAM mode)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=1 if lowvram else 0)
    try:
        x, sigma = torch.randn(1, 4, SIZE // 8, SIZE // 8), torch.tensor([5.0])
        context = torch.randn(1, 77, 768)
        with torch.no_grad():
            patcher.model.apply_model(x, sigma, c_crossattn=context)
            t0 = time.perf_counter()
            for _ in range(UNET_CALL_REPS):
                patcher.model.apply_model(x, sigma, c_crossattn=context)
            return (time.perf_counter() - t0) / UNET_CALL_REPS
    finally:
        patcher.unpatch_model(patcher.offload_device)


# -- rows ------------------------------------------------------------------------------------------
def run(ctx) -> list[Comparison]:
    host, out = ctx.host, ctx.out_dir / "bench_lcm_lora"

    def prompt(config: str, fixed: bool) -> Callable[[int], None]:
        def call(i: int) -> None:
            strength = 1.0 if fixed else 1.0 - 0.001 * (i + 2)  # a new strength: nothing cached
            client.run_jobs([_workflow(config, 7000 + i, strength)], [host.address], out, progress=False)

        return call

    first = round_robin({c: prompt(c, fixed=False) for c in CONFIGS}, n=ctx.n)
    peaks = {c: _peak(c) for c in CONFIGS}

    def mem(c: str) -> str:
        return f"peak +{peaks[c]['peak_mib']:.0f} MiB, kept +{peaks[c]['kept_mib']:.0f} MiB"

    rows = [
        Comparison(
            "LCM-LoRA first run (node + load + 1 step)",
            f"fused {SIZE}²",
            "base model (no LoRA)",
            first["fused"],
            first["base"],
            ctx.n,
            f"host API, tiny SD1.5, new strength per round; memory (fresh process, model only): fused "
            f"{mem('fused')}; base {mem('base')}",
        ),
        Comparison(
            "LCM-LoRA first run (node + load + 1 step)",
            f"unfused {SIZE}²",
            "base model (no LoRA)",
            first["unfused"],
            first["base"],
            ctx.n,
            f"host API; memory: unfused {mem('unfused')}",
        ),
        Comparison(
            "LCM-LoRA first run (node + load + 1 step)",
            f"fused {SIZE}²",
            f"unfused {SIZE}²",
            first["fused"],
            first["unfused"],
            ctx.n,
            "same LoRA math, once either way: in the node (fused) or at load (unfused)",
        ),
    ]
    again = round_robin({c: prompt(c, fixed=True) for c in ("fused", "unfused")}, n=ctx.n)
    rows.append(
        Comparison(
            "LCM-LoRA re-run after another prompt (node + reload + 1 step)",
            f"fused {SIZE}²",
            f"unfused {SIZE}²",
            again["fused"],
            again["unfused"],
            ctx.n,
            "host API; fused re-uses cached weights, unfused re-patches the weights at every load",
        )
    )

    model, nodes, lora = _setup()
    patchers = {c: _patcher(nodes, model, lora, c) for c in CONFIGS}
    for lowvram in (False, True):
        per_call: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for i in range(ctx.n + 1):  # round robin, the first round is a warm-up
            for c in CONFIGS[i % 3 :] + CONFIGS[: i % 3]:
                seconds = _unet_call(patchers[c], lowvram)
                if i:
                    per_call[c].append(seconds)
        med = {c: statistics.median(t) for c, t in per_call.items()}
        mode = "every layer streamed (low-VRAM mode)" if lowvram else "fully loaded"
        for config in ("fused", "unfused"):
            rows.append(
                Comparison(
                    f"per UNet call (= per step), {mode}",
                    f"{config} {SIZE}²",
                    "base model (no LoRA)",
                    med[config],
                    med["base"],
                    ctx.n,
                    f"in process, median of {UNET_CALL_REPS}-call means",
                )
            )
    return rows


if __name__ == "__main__":
    _peak_main(sys.argv[1])
