"""Tiny VAE vs the host's own TAESD path vs the host's full SD VAE, at 512x512, batch 1 and 8.

In process, on the host's modules: ours = ``TurboStreamTinyVAEDecode``/``Encode`` on the tiny taesd
pair (diffusers AutoencoderTiny), host TAESD = ``comfy.sd.VAE`` built from the same files, full =
``comfy.sd.VAE`` with a full-size SD KL VAE of random weights (same cost as the real one). Ours vs
host TAESD is timed interleaved; the full VAE (~35 s per 512² decode on this CPU) runs once, batch 1
only (batch 8 would take minutes and most of the memory). Peak memory: each configuration once in
a fresh subprocess, VmHWM after minus before the call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness import Comparison, import_pack, interleaved, peak_rss_gib  # noqa: E402

from turbostream import host as host_mod  # noqa: E402
from turbostream import tiny_models  # noqa: E402
from turbostream.cli import TINY_MODELS_DIR  # noqa: E402

LATENT_HW = (64, 64)  # 512x512 images


def _setup():
    host = host_mod.ensure_host()
    tiny_models.make_all(TINY_MODELS_DIR, host)
    full = tiny_models.make_full_vae(TINY_MODELS_DIR, host)
    tiny_models._import_host(host)
    import comfy.sd
    import comfy.utils
    import folder_paths

    folder_paths.add_model_folder_path("vae_approx", str(TINY_MODELS_DIR / "vae_approx"))
    nodes = import_pack().nodes.tiny_vae
    ours = nodes.load_tiny_vae("bench", "vae_approx/taesd")
    host_taesd = comfy.sd.VAE(sd=nodes.core.to_taesd_state_dict(*_halves(), nodes.core.FAMILIES["taesd"]))
    host_full = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(full)))
    return nodes, {"ours": ours, "host_taesd": host_taesd, "full": host_full}


def _halves():
    from safetensors.torch import load_file

    return tuple(
        {k: v.float() for k, v in load_file(str(TINY_MODELS_DIR / "vae_approx" / f"taesd_{p}.safetensors")).items()}
        for p in ("encoder", "decoder")
    )


def _call(nodes, vaes, config: str, op: str, batch: int):
    vae = vaes[config]
    if op == "decode":
        x = torch.randn(batch, 4, *LATENT_HW)
        return (lambda: nodes.tiny_decode("bench", vae, x)) if config == "ours" else (lambda: vae.decode(x))
    x = torch.rand(batch, LATENT_HW[0] * 8, LATENT_HW[1] * 8, 3)
    return (lambda: nodes.tiny_encode("bench", vae, x)) if config == "ours" else (lambda: vae.encode(x))


def _peak_main(config: str, op: str, batch: int) -> None:
    nodes, vaes = _setup()
    fn = _call(nodes, vaes, config, op, batch)
    before = peak_rss_gib()
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_delta_gib": peak_rss_gib() - before}))


def _peak(config: str, op: str, batch: int) -> dict:
    out = subprocess.run([sys.executable, __file__, config, op, str(batch)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(ctx) -> list[Comparison]:
    nodes, vaes = _setup()
    rows = []
    for op in ("decode", "encode"):
        peaks = {}
        for batch in (1, 8):
            a_fn, b_fn = _call(nodes, vaes, "ours", op, batch), _call(nodes, vaes, "host_taesd", op, batch)
            with torch.inference_mode():
                a, b = interleaved(lambda i, f=a_fn: f(), lambda i, f=b_fn: f(), n=ctx.n)
            peaks[batch] = {c: _peak(c, op, batch)["peak_delta_gib"] for c in ("ours", "host_taesd")}
            rows.append(
                Comparison(
                    f"tiny VAE {op} 512² batch {batch}",
                    "TurboStreamTinyVAE",
                    "host TAESD (VAELoader taesd)",
                    a,
                    b,
                    ctx.n,
                    f"images/s {batch / a:.2f} vs {batch / b:.2f}; peak +{peaks[batch]['ours']:.2f} "
                    f"vs +{peaks[batch]['host_taesd']:.2f} GiB",
                )
            )
        full = _peak("full", op, 1)
        with torch.inference_mode():
            t0 = time.perf_counter()
            _call(nodes, vaes, "ours", op, 1)()
            ours_once = time.perf_counter() - t0
        rows.append(
            Comparison(
                f"tiny vs full VAE {op} 512² batch 1",
                "TurboStreamTinyVAE",
                "host full SD VAE (KL)",
                ours_once,
                full["seconds"],
                1,
                f"images/s {1 / ours_once:.2f} vs {1 / full['seconds']:.3f}; peak +{peaks[1]['ours']:.2f} vs "
                f"+{full['peak_delta_gib']:.2f} GiB; full VAE once (fresh process), batch 8 skipped",
            )
        )
    rows.append(_cpu_chunks(nodes, vaes["ours"], ctx.n))
    return rows


def _cpu_chunks(nodes, vae, n: int) -> Comparison:
    """Encode + decode 16 frames of 256x256: the CPU chunk budget (default) vs the whole batch at once."""
    frames = torch.rand(16, 256, 256, 3, generator=torch.Generator().manual_seed(0))
    default = nodes.CPU_CHUNK_BYTES

    def roundtrip(budget):
        nodes.CPU_CHUNK_BYTES = budget
        try:
            nodes.tiny_decode("bench", vae, nodes.tiny_encode("bench", vae, frames))
        finally:
            nodes.CPU_CHUNK_BYTES = default

    with torch.inference_mode():
        a, b = interleaved(lambda i: roundtrip(default), lambda i: roundtrip(1 << 62), n=n)
    return Comparison(
        "tiny VAE encode+decode 16 frames 256², CPU chunk budget vs one batch",
        f"chunks of <= {default >> 20} MiB activations",
        "all 16 frames in one batch",
        a,
        b,
        n,
        f"s per 16 frames; {16 / a:.1f} vs {16 / b:.1f} frames/s (CPU only: GPUs batch as memory allows)",
    )


if __name__ == "__main__":
    _peak_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
