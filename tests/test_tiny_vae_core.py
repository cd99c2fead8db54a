"""Tiny VAE core: layouts read from tensors, both file formats, exact parity with the host's TAESD."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from turbostream import tiny_vae as core


@pytest.fixture(scope="module")
def halves(tiny_models_dir):
    load = lambda name: {k: v.float() for k, v in load_file(str(tiny_models_dir / "vae_approx" / name)).items()}  # noqa: E731
    return load("taesd_encoder.safetensors"), load("taesd_decoder.safetensors")


def test_layouts_come_from_tensors(halves):
    enc, dec = halves
    assert core.encoder_layout(enc) == core.HalfLayout((64, 64, 64, 64), (1, 3, 3, 3), 4)
    assert core.decoder_layout(dec) == core.HalfLayout((64, 64, 64, 64), (3, 3, 3, 1), 4)


def test_halves_are_told_apart_by_their_tensors_not_their_order(halves):
    enc, dec = halves
    assert core.split_halves([dec, enc]) == (enc, dec)
    assert core.split_halves([dec]) == (None, dec)


def test_diffusers_single_file_layout(halves):
    enc, dec = halves
    single = {f"encoder.layers.{k}": v for k, v in enc.items()}
    for k, v in dec.items():
        index, rest = k.split(".", 1)
        single[f"decoder.layers.{int(index) - 1}.{rest}"] = v
    e2, d2 = core.split_halves([single])
    assert e2.keys() == enc.keys() and d2.keys() == dec.keys()
    assert all(torch.equal(d2[k], dec[k]) for k in dec)


def test_matches_the_host_taesd_exactly(comfy, halves):
    import comfy.sd

    enc, dec = halves
    ours = core.TinyAutoencoder(core.FAMILIES["taesd"], enc, dec)
    host = comfy.sd.VAE(sd=core.to_taesd_state_dict(enc, dec, core.FAMILIES["taesd"])).first_stage_model.float()
    latents = torch.randn(3, 4, 6, 10, generator=torch.Generator().manual_seed(0)) * 5
    images = torch.rand(3, 3, 48, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(ours.decode(latents), host.decode(latents), rtol=0, atol=0)
        torch.testing.assert_close(ours.encode(images), host.encode(images), rtol=0, atol=0)
        out = ours.decode(latents)
    assert out.shape == (3, 3, 48, 80)  # unclamped: the nodes clamp after mapping to [0, 1], like the host


def test_scale_and_shift_are_applied(halves):
    enc, dec = halves
    a = core.TinyAutoencoder(core.FAMILIES["taesd"], enc, dec)
    b = core.TinyAutoencoder(core.FAMILIES["taesdxl"], enc, dec)
    x = torch.randn(1, 4, 4, 4)
    with torch.inference_mode():
        torch.testing.assert_close(a.decode(x), b.decode(x * (0.18215 / 0.13025)))


def test_wrong_family_channels_names_the_ones_that_fit(halves):
    with pytest.raises(
        core.TinyVAEError, match="4 latent channels but taef1 latents have 16; families with 4: taesd, taesdxl"
    ):
        core.TinyAutoencoder(core.FAMILIES["taef1"], *halves)


def test_decoder_only_refuses_to_encode(halves):
    tiny = core.TinyAutoencoder(core.FAMILIES["taesd"], None, halves[1], source="vae_approx/taesd")
    assert tiny.decode(torch.zeros(1, 4, 2, 2)).shape == (1, 3, 16, 16)
    with pytest.raises(core.TinyVAEError, match="has no encoder; add the taesd_encoder file"):
        tiny.encode(torch.zeros(1, 3, 16, 16))


def test_not_a_taesd_file():
    with pytest.raises(core.TinyVAEError, match="not a TAESD"):
        core.split_halves([{"decoder.conv_in.weight": torch.zeros(1)}])
    with pytest.raises(core.TinyVAEError, match="not a TAESD or AutoencoderTiny file"):
        core.split_halves([{"foo": torch.zeros(2, 2)}])


def test_family_from_name():
    assert core.family_from_name("taesdxl_decoder.safetensors").name == "taesdxl"
    assert core.family_from_name("vae_approx/taesd_encoder.pth").name == "taesd"
    assert core.family_from_name("taef1_decoder.safetensors").name == "taef1"
    assert core.family_from_name("my_tiny.safetensors") is None


def test_image_channel_policy():
    grey = torch.rand(2, 8, 8, 1)
    rgb, note = core.to_rgb(grey)
    assert rgb.shape == (2, 8, 8, 3) and torch.equal(rgb[..., 2], grey[..., 0]) and "grey" in note
    rgba = torch.rand(2, 8, 8, 4)
    rgb, note = core.to_rgb(rgba)
    assert torch.equal(rgb, rgba[..., :3]) and "alpha" in note
    with pytest.raises(core.TinyVAEError, match="2 channels"):
        core.to_rgb(torch.rand(1, 8, 8, 2))


def test_crop_policy_matches_the_host():
    x = torch.arange(1 * 21 * 19 * 3).reshape(1, 21, 19, 3).float()
    out = core.crop_to_multiple(x)
    assert out.shape == (1, 16, 16, 3)
    assert torch.equal(out, x[:, 2:18, 1:17])  # offset (size % 8) // 2, as comfy.sd.VAE.vae_encode_crop_pixels
    with pytest.raises(core.TinyVAEError, match="at least 8"):
        core.crop_to_multiple(torch.zeros(1, 7, 16, 3))


def test_chunk_size():
    assert core.chunk_size(10e9, 1e9) == 10
    assert core.chunk_size(0.5e9, 1e9) == 1
    assert core.chunk_size(1e12, 1e6, limit=8) == 8
    per = core.decode_bytes_per_item((64, 64))
    assert per == 512 * 512 * 64 * 4 * 6
