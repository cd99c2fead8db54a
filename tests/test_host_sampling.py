"""The stream's host sampling pass (``nodes/host_sampling.py``), in process on the host's modules.

The stream nodes prepare the host's sampling once per prompt and evaluate its model wrapper for every
engine call inside that pass. These tests pin what that must keep: the same x0 as one host sampling
pass per call (LoRA patches and conditioning included), the right conditioning per call, and one
preparation (model loading) per prompt instead of one per call.
"""

from __future__ import annotations

import pytest
import torch
from conftest import live_tiny_sd15, text_conditioning


@pytest.fixture(scope="module")
def models(comfy, pack, tiny_models_dir):
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    base, clip = live_tiny_sd15(tiny_models_dir)
    lora = comfy.utils.load_torch_file(str(tiny_models_dir / "loras" / "tiny-sd15-kohya.safetensors"))
    patched = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0]
    lcm = lambda m: ModelSamplingDiscrete().patch(m, "lcm", False)[0]  # noqa: E731
    encode = lambda text: text_conditioning(clip, text)  # noqa: E731
    return {"lora": lcm(patched), "plain": lcm(base), "pos": encode("a watercolor fox"), "neg": encode("blurry")}


def _batch():
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([359, 99])


def test_prepared_calls_equal_one_pass_per_call(pack, models):
    hs = pack.nodes.host_sampling
    model, pos, neg = models["lora"], models["pos"], models["neg"]
    x, t = _batch()
    sigmas = [float(s) for s in model.get_model_object("model_sampling").sigma(t.float())]
    per_call = hs.host_denoiser(model, 0)
    want_pos, want_neg = per_call(x, t, pos), per_call(x, t, neg)
    got = hs.with_host_sampling(
        model, 0, pos, neg, sigmas, tuple(x.shape), lambda d: (d(x, t, pos), d(x, t, neg), d(x, t, pos))
    )
    assert torch.equal(got[0], want_pos) and torch.equal(got[2], want_pos)
    assert torch.equal(got[1], want_neg)
    # the comparisons can fail: the conditioning and the LoRA each change x0
    assert (want_pos - want_neg).abs().max() > 1e-3
    plain = hs.host_denoiser(models["plain"], 0)(x, t, pos)
    assert (plain - want_pos).abs().max() > 1e-3


def test_the_video_node_prepares_once_per_prompt(pack, models, tiny_models_dir, monkeypatch):
    import comfy.sampler_helpers
    import folder_paths

    folder_paths.add_model_folder_path("vae_approx", str(tiny_models_dir / "vae_approx"))

    prepared, evaluated = [], []
    real_prepare = comfy.sampler_helpers.prepare_sampling
    monkeypatch.setattr(
        comfy.sampler_helpers, "prepare_sampling", lambda *a, **k: prepared.append(1) or real_prepare(*a, **k)
    )
    unet = models["lora"].model.diffusion_model
    hook = unet.register_forward_hook(lambda *_: evaluated.append(1))
    try:
        vae = pack.nodes.tiny_vae.load_tiny_vae("test", "vae_approx/taesd")
        frames = torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(2))
        node = pack.nodes.stream_batch.TurboStreamStreamImg2Img
        images, _ = node.execute(models["lora"], models["pos"], vae, frames, "32,45", "self", 1.2).args[:2]
    finally:
        hook.remove()
    assert images.shape == (5, 64, 64, 3)
    assert len(evaluated) == 5 + 1  # one batched call per frame, one drain call (2 steps)
    assert len(prepared) == 1  # one host sampling pass for the whole prompt
