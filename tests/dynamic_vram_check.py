"""The pack on the host's dynamic-VRAM patcher (``ModelPatcherDynamic``) on CPU; prints one JSON line.

Run by ``tests/test_dynamic_vram.py`` as ``python dynamic_vram_check.py <tiny models dir>`` in a fresh
process whose working directory is the host tree: comfy-aimdo has to be initialised before the host's
modules import it, as the host's ``main.py`` does.

On CPU the host never uses this patcher: ``ModelPatcherDynamic.__new__`` hands out a classic
``ModelPatcher`` for a CPU load device (clones included). ``CPUDynamicPatcher`` removes only that
redirect, so everything else that runs is the host's own dynamic-VRAM code, as on NVIDIA. What CPU
cannot show: the host applies a dynamic patcher's LoRA patches only on its VRAM path (``comfy/ops.py``
``cast_bias_weight`` with a vbar), so on CPU unmerged patches leave the weights as they are — for the
host's own LoraLoader exactly as for the pack.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import comfy_aimdo.control

AIMDO = bool(comfy_aimdo.control.init())

sys.path.insert(0, str(Path.cwd()))
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import comfy.model_patcher as mp  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA = "tiny-sd15-kohya.safetensors"


class CPUDynamicPatcher(mp.ModelPatcherDynamic):
    """The host's dynamic patcher without its CPU redirect (see the module docstring)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _pack():
    spec = importlib.util.spec_from_file_location(
        "turbostream_pack", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["turbostream_pack"] = module
    spec.loader.exec_module(module)
    return module


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def main(tiny: Path) -> dict:
    for folder in ("loras", "vae_approx"):
        folder_paths.add_model_folder_path(folder, str(tiny / folder))
    pack = _pack()
    records = Records()
    logging.getLogger("turbostream").addHandler(records)
    logging.getLogger("turbostream").setLevel(logging.INFO)
    fuse_node = pack.nodes.lcm_lora.TurboStreamLCMLoRAFuse
    lcm_sampling = pack.nodes.lcm_lora._lcm_sampling

    def load(dynamic: bool):
        model, clip, *_ = comfy.sd.load_checkpoint_guess_config(
            str(tiny / "checkpoints" / "tiny-sd15.safetensors"), output_vae=False, output_clip=True
        )
        if dynamic:
            model = CPUDynamicPatcher(model.model, model.load_device, model.offload_device)
        return model, clip

    classic, clip = load(False)
    dynamic, _ = load(True)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox"))
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)

    def sample(model) -> torch.Tensor:
        return comfy.sample.sample(model, noise, 2, 1.0, "lcm", "sgm_uniform", cond, cond, latent, seed=3)

    import nodes as host_nodes

    def host_lora(model):
        return lcm_sampling(host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA, 1.0)[0])

    out: dict = {
        "aimdo": AIMDO,
        "dynamic_class": type(dynamic).__name__,
        "dynamic": pack.nodes.lcm_lora.is_dynamic(dynamic),
    }
    results = {}
    for name, base in (("classic", classic), ("dynamic", dynamic)):
        before = len(records.messages)
        fused = fuse_node.execute(base, LORA, 1.0, fuse=True).result[0]
        unfused = fuse_node.execute(base, LORA, 1.0, fuse=False).result[0]
        out[f"{name}_fused_is_dynamic"] = pack.nodes.lcm_lora.is_dynamic(fused)
        out[f"{name}_fused_weight_patches"] = len(fused.patches)
        out[f"{name}_fused_object_weights"] = sum(k.endswith(".weight") for k in fused.object_patches)
        out[f"{name}_messages"] = records.messages[before:]
        results[name] = {
            "fused": sample(fused),
            "unfused": sample(unfused),
            "host": sample(host_lora(base)),
            "plain": sample(lcm_sampling(base)),
        }
    c, d = results["classic"], results["dynamic"]
    out["classic_fused_vs_classic_host"] = _diff(c["fused"], c["host"])
    out["classic_host_vs_plain"] = _diff(c["host"], c["plain"])
    out["dynamic_fused_vs_dynamic_host"] = _diff(d["fused"], d["host"])
    out["dynamic_unfused_vs_dynamic_host"] = _diff(d["unfused"], d["host"])
    out["dynamic_plain_vs_classic_plain"] = _diff(d["plain"], c["plain"])

    # tiny VAE: the host's patcher class is what main.py installs on NVIDIA (the dynamic one)
    tiny_vae = pack.nodes.tiny_vae
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    classic_vae = tiny_vae.load_tiny_vae("test", "taesd")
    saved, mp.CoreModelPatcher = mp.CoreModelPatcher, CPUDynamicPatcher
    try:
        dynamic_vae = tiny_vae.load_tiny_vae("test", "taesd")
    finally:
        mp.CoreModelPatcher = saved
    out["tiny_vae_patcher"] = type(dynamic_vae.patcher).__name__
    decoded = tiny_vae.tiny_decode("test", dynamic_vae, latents)
    out["tiny_vae_decode_diff"] = _diff(decoded, tiny_vae.tiny_decode("test", classic_vae, latents))
    pixels = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    out["tiny_vae_encode_diff"] = _diff(
        tiny_vae.tiny_encode("test", dynamic_vae, pixels), tiny_vae.tiny_encode("test", classic_vae, pixels)
    )

    # stream nodes: the video node and the live node on the dynamic patcher vs the classic one
    stream = pack.nodes.stream_batch
    frames = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    videos = {}
    for name, base in (("classic", classic), ("dynamic", dynamic)):
        model = lcm_sampling(base)
        vae = dynamic_vae if name == "dynamic" else classic_vae
        videos[name] = stream.TurboStreamStreamImg2Img.execute(
            model, cond, vae, frames, "32,45", "self", 1.2, seed=5
        ).result[0]
        live = []
        for i in range(3):
            live.append(
                pack.nodes.stream_live.TurboStreamLiveImg2Img.execute(
                    model, cond, vae, frames[i : i + 1], f"dyn-{name}", "32,45", "self", 1.2, seed=5
                ).result[0]
            )
        videos[f"{name}_live"] = torch.cat(live)
    out["video_frames"] = int(videos["dynamic"].shape[0])
    out["video_diff"] = _diff(videos["dynamic"], videos["classic"])
    out["live_diff"] = _diff(videos["dynamic_live"], videos["classic_live"])
    return out


if __name__ == "__main__":
    sys.stdout.write("RESULT " + json.dumps(main(Path(sys.argv[1]))) + "\n")
    sys.stdout.flush()
