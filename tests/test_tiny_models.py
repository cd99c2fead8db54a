"""Tiny models: the host detects each family, and every LoRA key maps (no "lora key not loaded")."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from turbostream import tiny_models

UNET_PREFIX = "model.diffusion_model."


def _unet_sd(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}


@pytest.mark.parametrize("family", sorted(tiny_models.UNET_CONFIGS))
def test_host_detects_family(comfy, tiny_models_dir, family):
    path = tiny_models_dir / "checkpoints" / tiny_models.CHECKPOINTS[family].name
    config = comfy.model_detection.model_config_from_unet(_unet_sd(path), UNET_PREFIX)
    assert config is not None, f"the host does not recognise {path.name}"
    assert type(config).__name__ == tiny_models.FAMILY_CLASSES[family]


def test_checkpoints_embed_taesd_and_text_encoders(tiny_models_dir):
    expect = {
        "sd15": "cond_stage_model.transformer.",
        "sd21": "cond_stage_model.model.",
        "sdxl": "conditioner.embedders.1.",
    }
    for family, prefix in expect.items():
        with safe_open(str(tiny_models_dir / "checkpoints" / tiny_models.CHECKPOINTS[family].name), "pt") as f:
            keys = set(f.keys())
            scale = f.get_tensor("first_stage_model.vae_scale").item()
        assert any(k.startswith(prefix) for k in keys), family
        assert "first_stage_model.taesd_decoder.1.weight" in keys
        assert scale == pytest.approx(tiny_models.TAESD_SCALE[tiny_models.FAMILY_TAESD[family]], rel=1e-3)


def test_unet_is_tiny(tiny_models_dir):
    sizes = {}
    for family, tf in tiny_models.CHECKPOINTS.items():
        sizes[family] = sum(t.numel() for t in _unet_sd(tiny_models_dir / tf.folder / tf.name).values())
    assert sizes["sd15"] < 60e6 and sizes["sd21"] < 60e6, sizes
    assert sizes["sdxl"] < 200e6, sizes


def test_generation_is_deterministic(comfy):
    a = tiny_models.lora_state_dict("sd15", "kohya", seed=7)
    b = tiny_models.lora_state_dict("sd15", "kohya", seed=7)
    c = tiny_models.lora_state_dict("sd15", "kohya", seed=8)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if k.endswith("lora_up.weight"))


@pytest.mark.parametrize("family,fmt", sorted(tiny_models.LORA_FILES))
def test_every_lora_key_maps(comfy, tiny_models_dir, caplog, family, fmt):
    _, model, clip_model = tiny_models._meta_model(family)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip_model, key_map)
    lora = load_file(str(tiny_models_dir / "loras" / tiny_models.LORA_FILES[(family, fmt)].name))
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    assert "lora key not loaded" not in caplog.text
    modules = {k.removesuffix(".alpha").rsplit(".lora", 1)[0].rsplit("_lora", 1)[0] for k in lora}
    assert len(patches) == len(modules) > 0
    if fmt == "kohya":
        assert any(k.startswith("lora_te") for k in lora), "kohya files cover the text encoder too"
        assert all(k.startswith(("lora_unet_", "lora_te")) for k in lora)
    else:
        assert all(k.startswith("unet.") for k in lora)


@pytest.mark.parametrize("family", sorted(tiny_models.UNET_CONFIGS))
def test_unet_output_is_live(comfy, tiny_models_dir, family):
    """The tiny UNets must react to their input: a zero norm gain once made every output exactly 0,
    which hid weight changes (LoRA, fusing) from every latent-parity test."""
    tf = tiny_models.CHECKPOINTS[family]
    import comfy.sd

    model, *_ = comfy.sd.load_checkpoint_guess_config(
        str(tiny_models_dir / tf.folder / tf.name), output_vae=False, output_clip=False
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    sigma = torch.tensor([14.6, 1.0])
    context = torch.randn(2, 77, model.model.model_config.unet_config["context_dim"], generator=gen)
    extra = {}
    if family == "sdxl":
        extra["y"] = torch.randn(2, model.model.model_config.unet_config["adm_in_channels"], generator=gen)
    with torch.inference_mode():
        out = model.model.apply_model(x, sigma, c_crossattn=context, **extra)
        out2 = model.model.apply_model(x * 0.5, sigma, c_crossattn=context, **extra)
    assert torch.isfinite(out).all()
    eps = (x - out) / sigma.view(-1, 1, 1, 1)  # the denoised output back to the UNet's eps
    assert eps.abs().mean() > 1e-3, "the tiny UNet outputs zero"
    assert not torch.allclose(out, out2 * 2), "the UNet output does not depend on its input"
