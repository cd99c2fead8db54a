"""Host round trip: how much of a one-step frame is host overhead (what the live path pays per frame).

A: one-step txt2img on the tiny SD1.5 model at 256x256 (host-native nodes), queued over the API.
B: a trivial prompt (EmptyImage -> SaveImage 64x64) over the same API.
Both change a value every call so the host's cache never answers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Comparison, interleaved  # noqa: E402

from turbostream import client, tiny_models  # noqa: E402
from turbostream.workflow import native_txt2img  # noqa: E402


def run(ctx) -> list[Comparison]:

    host, out = ctx.host, ctx.out_dir / "bench_host"

    def frame(i: int) -> None:
        wf = native_txt2img(tiny_models.CHECKPOINTS["sd15"].name, size=256, seed=1000 + i, prefix="bench/frame")
        client.run_jobs([wf], [host.address], out, progress=False)

    def trivial(i: int) -> None:
        wf = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": (i * 7919) % 0xFFFFFF},
            },
            "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench/trivial", "images": ["1", 0]}},
        }
        client.run_jobs([wf], [host.address], out, progress=False)

    a, b = interleaved(frame, trivial, n=ctx.n)
    return [
        Comparison(
            "host round trip",
            "1-step txt2img 256² tiny SD1.5",
            "trivial prompt",
            a,
            b,
            ctx.n,
            "B is the per-prompt floor a prompt-per-frame live path pays",
        )
    ]
