"""Conditioning Blend: lerp is the host's ConditioningAverage, slerp keeps norms; both on SD1.5 and SDXL."""

from __future__ import annotations

import pytest
import torch

from turbostream import conditioning as core


def test_slerp_endpoints_norm_and_direction():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 77, 16, generator=gen), torch.randn(2, 77, 16, generator=gen)
    torch.testing.assert_close(core.slerp(a, b, 0.0), a)
    torch.testing.assert_close(core.slerp(a, b, 1.0), b)
    mid = core.slerp(a, b, 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), (a.norm(dim=-1) + b.norm(dim=-1)) / 2, rtol=1e-5, atol=1e-5)
    ua, ub, um = (v / v.norm(dim=-1, keepdim=True) for v in (a, b, mid))
    torch.testing.assert_close((um * ua).sum(-1), (um * ub).sum(-1), rtol=1e-5, atol=1e-5)  # half-way in angle
    assert (core.lerp(a, b, 0.5).norm(dim=-1) < mid.norm(dim=-1)).float().mean() > 0.9  # lerp shrinks
    same = core.slerp(a, a.clone(), 0.3)  # parallel vectors: no division by sin(0)
    assert torch.isfinite(same).all()
    torch.testing.assert_close(same, a)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lerp_equals_conditioning_average_and_slerp_blends_pooled(comfy, pack, tiny_models_dir, family):
    import comfy.sd

    import nodes as host_nodes
    from turbostream import tiny_models

    ckpt = str(tiny_models_dir / "checkpoints" / tiny_models.CHECKPOINTS[family].name)
    _, clip, *_ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=True)
    a = host_nodes.CLIPTextEncode().encode(clip, "a red fox in the snow")[0]
    b = host_nodes.CLIPTextEncode().encode(clip, "a blue whale at night, oil painting")[0]
    node = pack.nodes.conditioning.TurboStreamConditioningBlend
    for w in (0.0, 0.3, 1.0):
        ours = node.execute(a, b, w, "lerp").result[0]
        theirs = host_nodes.ConditioningAverage().addWeighted(a, b, 1.0 - w)[0]
        torch.testing.assert_close(ours[0][0], theirs[0][0], rtol=0, atol=0)
        if family == "sdxl":
            torch.testing.assert_close(ours[0][1]["pooled_output"], theirs[0][1]["pooled_output"], rtol=0, atol=0)
    half = node.execute(a, b, 0.5, "slerp").result[0]
    torch.testing.assert_close(half[0][0], core.slerp(a[0][0], b[0][0], 0.5))
    if family == "sdxl":
        pa, pb = a[0][1]["pooled_output"], b[0][1]["pooled_output"]
        torch.testing.assert_close(half[0][1]["pooled_output"], core.slerp(pa, pb, 0.5))
        assert not torch.allclose(half[0][1]["pooled_output"], pa)


def test_blend_refuses_mismatched_prompts(pack):
    node = pack.nodes.conditioning.TurboStreamConditioningBlend
    a = [[torch.zeros(1, 77, 768), {}]]
    b = [[torch.zeros(1, 77, 2048), {}]]
    with pytest.raises(ValueError, match="TurboStreamConditioningBlend: conditioning_b: its embeddings are 2048-wide"):
        node.execute(a, b, 0.5, "slerp")
    with pytest.raises(ValueError, match="TurboStreamConditioningBlend: conditioning_a: is empty"):
        node.execute([], b, 0.5, "lerp")
