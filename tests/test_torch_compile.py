"""The stream nodes behind the host's own ``TorchCompileModel`` node (inductor), in process.

The host compiles the diffusion model inside its ``apply_model`` wrapper; the stream's calls go
through that wrapper (``nodes/host_sampling.py``), so the compiled UNet serves every engine call.
Pinned here: the same frames within float tolerance, no recompilation from frame to frame or from
prompt to prompt (the timestep and sigma vectors are tensors of a fixed shape n*f), and the live
stream's state kept across prompts on the compiled model. One inductor compile of the tiny UNet
takes ~1.5 min on the 2-core CI machine; the speed-up on the real-size UNet is in docs/benchmarks.md.
"""

from __future__ import annotations

import pytest
import torch
from conftest import live_tiny_sd15, text_conditioning


@pytest.fixture(scope="module")
def setup(comfy, pack, tiny_models_dir):
    import folder_paths
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    folder_paths.add_model_folder_path("vae_approx", str(tiny_models_dir / "vae_approx"))
    base, clip = live_tiny_sd15(tiny_models_dir)
    return {
        "model": ModelSamplingDiscrete().patch(base, "lcm", False)[0],
        "positive": text_conditioning(clip, "a watercolor fox"),
        "vae": pack.nodes.tiny_vae.load_tiny_vae("test", "vae_approx/taesd"),
    }


def _frames(seed: int, count: int = 4) -> torch.Tensor:
    return torch.rand(count, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def test_stream_nodes_behind_torch_compile_model(pack, setup):
    import torch._dynamo
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = TorchCompileModel.execute(setup["model"], "inductor")
    compiled = compiled.args[0] if hasattr(compiled, "args") else compiled[0]
    video = pack.nodes.stream_batch.TurboStreamStreamImg2Img
    live = pack.nodes.stream_live.TurboStreamLiveImg2Img
    args = (setup["positive"], setup["vae"])

    def run_video(model, seed):
        return video.execute(model, *args, _frames(seed), "32,45", "self", 1.2).args[0]

    want_a, want_b = run_video(setup["model"], 1), run_video(setup["model"], 2)
    assert counters["stats"]["unique_graphs"] == 0  # the plain model never reaches dynamo
    got_a = run_video(compiled, 1)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "the stream's calls did not reach the compiled UNet"
    got_b = run_video(compiled, 2)  # a new prompt with other frames
    assert (got_a - want_a).abs().max() < 1e-4 and (got_b - want_b).abs().max() < 1e-4
    assert (want_a - want_b).abs().max() > 1e-2  # the frames matter: the comparisons can fail

    # the live node on the compiled model: one prompt per frame, the stream's state carried across
    # prompts, the same frames as the plain model's live stream
    frames = _frames(3, 5)
    outs = {}
    for name, model in (("plain", setup["model"]), ("compiled", compiled)):
        stream_id = f"compile-{name}"
        outs[name] = torch.cat(
            [live.execute(model, *args, frames[i : i + 1], stream_id, "32,45", "self", 1.2).args[0] for i in range(5)]
        )
        pack.nodes.stream_live.REGISTRY.remove(stream_id)
    assert (outs["compiled"] - outs["plain"]).abs().max() < 1e-4
    assert (outs["plain"][2] - outs["plain"][3]).abs().max() > 1e-2
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled for a new frame or prompt"
    assert not counters["recompiles"], dict(counters["recompiles"])
