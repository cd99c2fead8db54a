"""Shared benchmark helpers: interleaved timing, medians, the machine line.

This CPU's speed drifts by 15-25 % over minutes, so compared configurations are run interleaved
(A, B, A, B, ...) and summarised by their medians; only ratios measured in the same run are
reported side by side. Nothing here asserts a time.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Comparison:
    benchmark: str
    a: str
    b: str
    median_a_s: float
    median_b_s: float
    n: int
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.median_a_s / self.median_b_s if self.median_b_s else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio_a_over_b": round(self.ratio, 3)}


def interleaved(a: Callable[[int], None], b: Callable[[int], None], n: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``a(i)`` and ``b(i)`` called alternately ``n`` times each after ``warmup`` rounds."""
    for i in range(warmup):
        a(-1 - i)
        b(-1 - i)
    ta, tb = [], []
    for i in range(n):
        for fn, acc in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn(i)
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def noise_frames(size: int, fmt: str = "JPEG", count: int = 8) -> list[bytes]:
    """``count`` seeded ``size``x``size`` RGB noise frames, encoded as ``fmt`` (JPEG at quality 85)."""
    import io

    import torch
    from PIL import Image

    out = []
    for i in range(count):
        rgb = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(i))
        buf = io.BytesIO()
        Image.fromarray((rgb * 255).byte().numpy()).save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "CPU only"
    try:
        import torch

        if torch.cuda.is_available():
            device = f"GPU {torch.cuda.get_device_name(0)}"
        device += f", torch {torch.__version__}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {device}, Python {platform.python_version()}, ComfyUI {host_version()}"


def host_version() -> str:
    """The selected host's version (its ``comfyui_version.py``), for the machine line."""
    import re

    from turbostream import host as host_mod

    try:
        text = (host_mod.ensure_host() / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return found.group(1) if found else "unknown"


def import_pack():
    """The pack imported in this process the way the host imports it (the host must be on sys.path)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "comfyui_turbostream_bench"
    if name in sys.modules:
        return sys.modules[name]
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM) in GiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def host_in_process():
    """The host's modules in this process with the tiny models registered: ``(pack, host nodes module)``.

    The tiny models are made (cached) first; their folders are added to the host's model paths.
    """
    from turbostream import host as host_mod
    from turbostream import tiny_models
    from turbostream.cli import TINY_MODELS_DIR

    host = host_mod.ensure_host()
    tiny_models.make_all(TINY_MODELS_DIR, host)
    tiny_models._import_host(host)
    import folder_paths

    import nodes as host_nodes

    for folder in ("checkpoints", "vae_approx", "loras", "controlnet"):
        folder_paths.add_model_folder_path(folder, str(TINY_MODELS_DIR / folder))
    return import_pack(), host_nodes


def lcm_sampling(model):
    """``model`` with the host's ModelSamplingDiscrete ``lcm`` (as an LCM-LoRA workflow sets it)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    return ModelSamplingDiscrete().patch(model, "lcm", False)[0]


def tiny_lcm_sd15(host_nodes):
    """The tiny SD1.5 checkpoint with the tiny LCM-LoRA (host loader) and LCM sampling: ``(model, clip)``."""
    import comfy.sd
    import comfy.utils

    from turbostream import tiny_models
    from turbostream.cli import TINY_MODELS_DIR

    model, clip, _ = host_nodes.CheckpointLoaderSimple().load_checkpoint(tiny_models.CHECKPOINTS["sd15"].name)
    lora = comfy.utils.load_torch_file(str(TINY_MODELS_DIR / "loras" / "tiny-sd15-kohya.safetensors"))
    return lcm_sampling(comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]), clip
