"""``make bench-gpu``: 1-step img2img at 512x512 on an NVIDIA GPU, SD-Turbo's architecture (random weights).

One headless host on the GPU, driven over its HTTP API by the Python live client (upload frames,
queue, at most 2 prompts in flight, frames pushed back over the websocket; no browser), three paths:

* video: ``TurboStreamStreamImg2Img`` over 8 frames per prompt (Live Input's ``frames_per_prompt``);
* live: ``TurboStreamLiveImg2Img``, one frame per prompt on one stream;
* loop: the host-native per-frame loop, VAEEncode -> KSampler (1 step, denoise 0.5, cfg 1) -> VAEDecode;

each with and without the host's ``TorchCompileModel`` (inductor) after the model loader. All use the
tiny VAE (``taesd``) both sides and end in Live Output (JPEG + push: the same sink for every path).
Windows of the configurations alternate round by round; compile time is the first (warm-up) window's
extra time over the plain model's. Evaluation-count limit: with 1 step every path makes one UNet call
per frame (the stream saves calls only with 2+ steps), so stream vs loop can only win on overhead: 1.0.

The model: a real-size SD2.1-layout UNet (``tiny_models.REAL_SD21_UNET``, ~866M parameters, random
weights, what SD-Turbo runs) with ``ModelSamplingDiscrete`` eps; the text encoder of the tiny SD2.1
checkpoint (OpenCLIP ViT-H layout). On a machine without an NVIDIA GPU it says so and exits 0.
``--smoke`` runs the same script on the CPU with the tiny SD2.1 UNet at 64x64, no compile, few frames
(a check of the script itself; its numbers mean nothing and are not written).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))

from harness import Comparison, host_version, machine_line  # noqa: E402

PATHS = ("video", "live", "loop")
VIDEO_FRAMES_PER_PROMPT = 8
IN_FLIGHT = 2
T_INDEX = "25"
"""One step: t_index 25 of LCM's 50-index grid is t = 499 (half strength), as KSampler's denoise 0.5."""


def gpu_problem() -> str | None:
    """Why this machine cannot run the GPU benchmark (None: it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    if torch.version.hip:
        return f"the GPU is AMD (ROCm {torch.version.hip}); this benchmark is written for NVIDIA"
    return None


def _workflow(path: str, compiled: bool, size: int, smoke: bool) -> dict:
    from turbostream import tiny_models

    api = REPO_ROOT / "workflows" / "api"
    live_node = json.loads((api / "live_webcam_img2img.json").read_text())["7"]["inputs"]
    video_node = json.loads((api / "stream_video_img2img.json").read_text())["8"]["inputs"]
    wf: dict = {
        "c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_models.CHECKPOINTS["sd21"].name}},
        "2": {
            "class_type": "ModelSamplingDiscrete",
            "inputs": {"model": ["c", 0] if smoke else ["1", 0], "sampling": "eps", "zsnr": False},
        },
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox, soft light", "clip": ["c", 1]}},
        "4n": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["c", 1]}},
        "5": {
            "class_type": "TurboStreamTinyVAELoader",
            "inputs": {"vae_name": "vae_approx/taesd", "latent_family": "auto"},
        },
        "6": {
            "class_type": "TurboStreamLiveInput",
            "inputs": {
                "stream_id": f"gpu-{path}-{int(compiled)}",
                "width": size,
                "height": size,
                "frames_per_prompt": VIDEO_FRAMES_PER_PROMPT if path == "video" else 1,
            },
        },
        "8": {"class_type": "TurboStreamLiveOutput", "inputs": {"images": ["7", 0], "stream_id": ["6", 1]}},
    }
    if not smoke:  # the smoke run takes the tiny checkpoint's own UNet
        wf["1"] = {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": tiny_models.REAL_SD21_UNET.name, "weight_dtype": "default"},
        }
    model = ["2", 0]
    if compiled:
        wf["3"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["2", 0], "backend": "inductor"}}
        model = ["3", 0]
    stream = {"model": model, "positive": ["4", 0], "vae": ["5", 0], "t_index_list": T_INDEX, "cfg_type": "none"}
    stream["guidance"] = 1.0
    if path == "live":
        inputs = {**live_node, **stream, "image": ["6", 0], "stream_id": ["6", 1]}
        wf["7"] = {"class_type": "TurboStreamLiveImg2Img", "inputs": inputs}
    elif path == "video":
        inputs = {**video_node, **stream, "images": ["6", 0]}
        wf["7"] = {"class_type": "TurboStreamStreamImg2Img", "inputs": inputs}
    else:
        wf["7e"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["5", 0]}}
        sampler = {"model": model, "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal"}
        sampler.update(positive=["4", 0], negative=["4n", 0], latent_image=["7e", 0], denoise=0.5)
        wf["7s"] = {"class_type": "KSampler", "inputs": sampler}
        wf["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7s", 0], "vae": ["5", 0]}}
    return wf


def _frames(size: int, count: int = 8) -> list[bytes]:
    import io

    import torch
    from PIL import Image

    out = []
    for i in range(count):
        coarse = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i))
        img = torch.nn.functional.interpolate(coarse[None], size=(size, size), mode="bilinear")[0]
        buf = io.BytesIO()
        Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


async def _window(host, workflow: dict, frames: list[bytes], count: int) -> dict:
    """``count`` frames through ``workflow``: frames per second (first upload to last frame back) and latency."""
    from turbostream.live_client import LiveClient

    per_prompt = workflow["6"]["inputs"]["frames_per_prompt"]
    count = -(-count // per_prompt) * per_prompt
    async with LiveClient(host.url) as cl:
        await cl.open(workflow["6"]["inputs"]["stream_id"] + "-" + cl.client_id[:6], frames_per_prompt=per_prompt)
        wf = copy.deepcopy(workflow)
        wf["6"]["inputs"]["stream_id"] = cl.stream_id
        t0 = time.perf_counter()
        queued = []
        for k in range(0, count, per_prompt):
            await cl.wait_for_slot(IN_FLIGHT, 0.001)
            await cl.send_frames([frames[(k + j) % len(frames)] for j in range(per_prompt)])
            queued.append(await cl.queue(wf))
        got = [await cl.next_frame(timeout=600) for _ in range(count)]
        wall = time.perf_counter() - t0
        for prompt_id in queued:
            if await cl.wait(prompt_id, timeout=600) != "execution_success":
                raise RuntimeError(f"{workflow['7']['class_type']}: {cl.errors.get(prompt_id)}")
        await cl.close()
    return {"fps": count / wall, "wall": wall, "latency": [f["received_ms"] - f["captured_ms"] for f in got]}


class VramPeak(threading.Thread):
    """The highest ``nvidia-smi`` memory.used (MiB) seen while running (the host's whole footprint)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib, self._stop = 0, threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10,
                ).stdout  # fmt: skip
                self.peak_mib = max(self.peak_mib, max(int(x) for x in out.split()))
            except (OSError, ValueError, subprocess.SubprocessError):
                return

    def stop(self) -> int:
        self._stop.set()
        return self.peak_mib


def _gpu_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no GPU (smoke run on the CPU)"
    return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def measure(args) -> tuple[list[Comparison], dict]:
    from turbostream import host as host_mod
    from turbostream import tiny_models
    from turbostream.cli import TINY_MODELS_DIR
    from turbostream.server import HeadlessHost, demo_model_links

    host_dir = host_mod.ensure_host()
    t_build = time.perf_counter()
    tiny_models.make_all(TINY_MODELS_DIR, host_dir)
    if not args.smoke:
        tiny_models.make_real_unet("sd21", TINY_MODELS_DIR, host_dir)
    build_s = time.perf_counter() - t_build
    compiles = (False, True) if args.compile else (False,)
    configs = [(path, c) for c in compiles for path in PATHS]
    frames = _frames(args.size)
    vram = VramPeak()
    host = HeadlessHost(host_dir, model_links=demo_model_links(TINY_MODELS_DIR)).start()
    try:
        vram.start()
        workflows = {cfg: _workflow(*cfg, args.size, args.smoke) for cfg in configs}
        warm = {cfg: asyncio.run(_window(host, workflows[cfg], frames, VIDEO_FRAMES_PER_PROMPT)) for cfg in configs}
        fps: dict[tuple, list[float]] = {cfg: [] for cfg in configs}
        latency: dict[tuple, list[float]] = {cfg: [] for cfg in configs}
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for cfg in order:
                got = asyncio.run(_window(host, workflows[cfg], frames, args.frames))
                fps[cfg].append(got["fps"])
                latency[cfg] += got["latency"]
    finally:
        peak = vram.stop()
        host.cleanup()
    med = {cfg: statistics.median(v) for cfg, v in fps.items()}
    lat = {cfg: statistics.median(v) for cfg, v in latency.items()}
    compile_s = (
        {path: warm[(path, True)]["wall"] - warm[(path, False)]["wall"] for path in PATHS} if args.compile else {}
    )
    facts = {
        "gpu": _gpu_line(),
        "peak_vram_mib": peak or None,
        "unet_build_s": round(build_s, 1),
        "compile_s": {k: round(v, 1) for k, v in compile_s.items()},
    }
    size = f"{args.size}²"
    rows = []
    for c in compiles:
        label = "TorchCompileModel (inductor)" if c else "no compile"
        loop = ("loop", c)
        for path in ("video", "live"):
            cfg = (path, c)
            rows.append(
                Comparison(
                    f"1-step img2img, s per frame, {label}",
                    f"{path} node" if path == "video" else "live node (Python live client)",
                    "host loop (VAEEncode -> KSampler -> VAEDecode)",
                    1 / med[cfg],
                    1 / med[loop],
                    args.rounds,
                    f"{size}, SD2.1-layout UNet (random); {med[cfg]:.1f} vs {med[loop]:.1f} fps; latency median "
                    f"{lat[cfg]:.0f} vs {lat[loop]:.0f} ms; evaluation-count limit 1.0 (1 step: one UNet call "
                    f"per frame on every path); {facts['gpu']}; peak VRAM {peak or 'n/a'} MiB",
                )
            )
    if args.compile:
        for path in PATHS:
            rows.append(
                Comparison(
                    "TorchCompileModel speed-up, s per frame",
                    f"{path}, compiled",
                    f"{path}, plain",
                    1 / med[(path, True)],
                    1 / med[(path, False)],
                    args.rounds,
                    f"{size}; {med[(path, True)]:.1f} vs {med[(path, False)]:.1f} fps; compile (first window's "
                    f"extra time) {compile_s[path]:.0f} s; {facts['gpu']}",
                )
            )
    return rows, facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=64, help="frames per timed window")
    parser.add_argument("--rounds", type=int, default=3, help="timed windows per configuration (median)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the TorchCompileModel rows")
    parser.add_argument("--smoke", action="store_true", help="check the script on the CPU (tiny UNet, nothing written)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.frames, args.rounds, args.compile = 64, min(args.frames, 8), 1, False
    elif problem := gpu_problem():
        print(f"make bench-gpu: no NVIDIA GPU here ({problem}); nothing was measured. Run it on a machine with one.")
        return 0
    started = time.time()
    rows, facts = measure(args)
    lines = [f"GPU: {facts['gpu']}; peak VRAM {facts['peak_vram_mib']} MiB; UNet built in {facts['unet_build_s']} s"]
    lines += ["| benchmark | A | B | A/B | note |", "|---|---|---|---:|---|"]
    lines += [f"| {r.benchmark} | {r.a} | {r.b} | {r.ratio:.2f} | {r.note} |" for r in rows]
    print("\n".join(lines))
    if not args.smoke:
        import run

        results = BENCH_DIR / "results"
        results.mkdir(exist_ok=True)
        rows_out = [{**r.as_dict(), "facts": facts} for r in rows]
        run._write_json(results / f"gpu@{host_version()}.json", machine_line(), time.time() - started, rows_out)
        run.regenerate_doc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
