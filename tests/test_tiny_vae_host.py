"""Tiny VAE nodes in the real host: parity with the host's TAESD path, model management, bad input."""

from __future__ import annotations

import shutil
import uuid

import numpy as np
import pytest
import torch
from conftest import queue
from PIL import Image
from safetensors.torch import load_file

from turbostream import client


def _images(host, prefix: str) -> np.ndarray:
    paths = sorted(host.output_dir.glob(f"{prefix}_*.png"))
    assert paths, prefix
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths])


def _latent(host, prefix: str) -> torch.Tensor:
    [path] = list(host.output_dir.glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"]


@pytest.mark.parametrize("family", ["taesd", "taesdxl"])
def test_decode_and_encode_match_the_host_taesd(host, tmp_path, family):
    """Batch 1 and 8, non-square and not-multiple-of-8 sizes: ours == VAELoader(taesd*) + VAEDecode/VAEEncode."""
    run = f"tvae/{family}_{uuid.uuid4().hex[:6]}"
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "turbostream_example.png"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 100, "height": 70, "crop": "disabled"},
        },
        "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 8}},
        "4": {
            "class_type": "ImageBlend",
            "inputs": {"image1": ["3", 0], "image2": ["3", 0], "blend_factor": 0.5, "blend_mode": "multiply"},
        },
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": family}},
        "11": {
            "class_type": "TurboStreamTinyVAELoader",
            # both spellings: our own for taesd, the host VAELoader's bare name for taesdxl
            "inputs": {"vae_name": f"vae_approx/{family}" if family == "taesd" else family, "latent_family": "auto"},
        },
        "20": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["10", 0]}},
        "21": {"class_type": "TurboStreamTinyVAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["11", 0]}},
        "22": {"class_type": "SaveLatent", "inputs": {"samples": ["20", 0], "filename_prefix": f"{run}/host_enc"}},
        "23": {"class_type": "SaveLatent", "inputs": {"samples": ["21", 0], "filename_prefix": f"{run}/ours_enc"}},
        "24": {"class_type": "LatentFromBatch", "inputs": {"samples": ["20", 0], "batch_index": 3, "length": 1}},
    }
    for name, latent in (("b8", ["20", 0]), ("b1", ["24", 0])):
        wf[f"30{name}"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": ["10", 0]}}
        wf[f"31{name}"] = {"class_type": "TurboStreamTinyVAEDecode", "inputs": {"samples": latent, "vae": ["11", 0]}}
        wf[f"32{name}"] = {
            "class_type": "VAEDecode",
            "inputs": {"samples": latent, "vae": ["11", 0]},
        }  # host node, our VAE
        for src, label in ((f"30{name}", "host"), (f"31{name}", "ours"), (f"32{name}", "hostnode_ourvae")):
            wf[f"4{src}"] = {
                "class_type": "SaveImage",
                "inputs": {"images": [src, 0], "filename_prefix": f"{run}/{label}_{name}"},
            }
    queue(host, wf, tmp_path)
    host_enc, ours_enc = _latent(host, f"{run}/host_enc"), _latent(host, f"{run}/ours_enc")
    assert ours_enc.shape == (8, 4, 8, 12)  # 100x70 centre-cropped to 96x64
    torch.testing.assert_close(ours_enc, host_enc, rtol=1e-5, atol=1e-5)
    for name, batch in (("b8", 8), ("b1", 1)):
        ref = _images(host, f"{run}/host_{name}")
        assert ref.shape == (batch, 64, 96, 3)
        for label in ("ours", "hostnode_ourvae"):
            assert np.abs(_images(host, f"{run}/{label}_{name}") - ref).max() <= 1, (label, name)


def test_host_model_management_owns_the_tiny_vae(comfy, pack, tiny_models_dir):
    """Loaded through load_models_gpu, dropped by unload_all_models (what /free does), reloaded on use."""
    import comfy.model_management as mm
    import folder_paths

    folder_paths.add_model_folder_path("vae_approx", str(tiny_models_dir / "vae_approx"))
    nodes = pack.nodes.tiny_vae
    vae = nodes.load_tiny_vae("test", "vae_approx/taesd")
    loaded = lambda: any(m.model is vae.patcher for m in mm.current_loaded_models)  # noqa: E731
    latents = torch.randn(2, 4, 8, 8)
    assert not loaded()
    first = nodes.tiny_decode("test", vae, latents)
    assert loaded()
    mm.unload_all_models()
    assert not loaded()
    second = nodes.tiny_decode("test", vae, latents)
    assert loaded() and torch.equal(first, second)
    assert first.shape == (2, 64, 64, 3) and 0 <= first.min() and first.max() <= 1


def test_loader_takes_the_host_spelling_and_lists_valid_names(comfy, pack, tiny_models_dir):
    """``taesd`` (as the host's VAELoader lists it) is the same pair as ``vae_approx/taesd``; a name that is
    neither is refused with the list of valid names."""
    import folder_paths

    folder_paths.add_model_folder_path("vae_approx", str(tiny_models_dir / "vae_approx"))
    nodes = pack.nodes.tiny_vae
    assert {"taesd", "taesdxl", "vae_approx/taesd", "vae_approx/taesdxl"} <= set(nodes.installed_tiny_vaes())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    bare = nodes.tiny_decode("test", nodes.load_tiny_vae("test", "taesd"), latents)
    prefixed = nodes.tiny_decode("test", nodes.load_tiny_vae("test", "vae_approx/taesd"), latents)
    assert torch.equal(bare, prefixed)
    for bad in ("taesd9", "vae_approx/taesd9", "models/taesd", 7):
        with pytest.raises(ValueError, match="is not an installed tiny VAE; valid names: .*vae_approx/taesd") as err:
            nodes.load_tiny_vae("TurboStreamTinyVAELoader", bad)
        assert str(err.value).startswith("TurboStreamTinyVAELoader: vae_name: ")


def test_chunked_decode_equals_one_batch(comfy, pack, tiny_models_dir, monkeypatch):
    """A batch split into chunks of 1 gives the same frames as one chunk (no frame mixed up or lost)."""
    import folder_paths

    folder_paths.add_model_folder_path("vae_approx", str(tiny_models_dir / "vae_approx"))
    nodes = pack.nodes.tiny_vae
    vae = nodes.load_tiny_vae("test", "vae_approx/taesdxl")
    latents = torch.randn(5, 4, 6, 4)
    whole = nodes.tiny_decode("test", vae, latents)
    monkeypatch.setattr(nodes.core, "chunk_size", lambda *a, **k: 1)
    torch.testing.assert_close(nodes.tiny_decode("test", vae, latents), whole)
    pixels = torch.rand(3, 33, 41, 4)  # RGBA, not multiples of 8
    lat = nodes.tiny_encode("test", vae, pixels)
    assert lat.shape == (3, 4, 4, 5)


def _run_error(host, tmp_path, wf) -> str:
    with pytest.raises(client.ClientError) as err:
        queue(host, wf, tmp_path)
    return str(err.value)


def test_bad_inputs_are_clear_and_the_host_keeps_serving(host, tmp_path, tiny_models_dir):
    approx = host.models_dir / "vae_approx"
    decoder = tiny_models_dir / "vae_approx" / "taesd_decoder.safetensors"
    shutil.copyfile(decoder, approx / "taef1_decoder.safetensors")  # 4-channel weights under a 16-channel name
    shutil.copyfile(decoder, approx / "solo_decoder.safetensors")  # a decoder without its encoder
    (approx / "broken_decoder.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")

    def decode_wf(vae_name, family="auto", latent=None):
        return {
            "1": {"class_type": "TurboStreamTinyVAELoader", "inputs": {"vae_name": vae_name, "latent_family": family}},
            "2": latent or {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "TurboStreamTinyVAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "tvae/bad"}},
        }

    msg = _run_error(host, tmp_path, decode_wf("vae_approx/taef1"))
    assert "TurboStreamTinyVAELoader: vae_name" in msg and "4 latent channels but taef1 latents have 16" in msg
    msg = _run_error(host, tmp_path, decode_wf("vae_approx/broken"))
    assert "corrupt or truncated" in msg
    msg = _run_error(host, tmp_path, decode_wf("vae_approx/solo"))
    assert "latent_family" in msg and "taesdxl (SDXL)" in msg
    sd3_latent = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    msg = _run_error(host, tmp_path, decode_wf("vae_approx/taesd", latent=sd3_latent))
    assert (
        "TurboStreamTinyVAEDecode: samples: the latent has 16 channels" in msg and "taesd3 (SD3) or taef1 (Flux)" in msg
    )

    # a decoder alone decodes, and says what is missing when asked to encode
    queue(host, decode_wf("vae_approx/solo", family="taesd"), tmp_path)
    enc = decode_wf("vae_approx/solo", family="taesd")
    enc["5"] = {"class_type": "TurboStreamTinyVAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 0]}}
    enc["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "tvae/solo"}}
    msg = _run_error(host, tmp_path, enc)
    assert "TurboStreamTinyVAEEncode: vae: vae_approx/solo has no encoder" in msg

    # 0.3.75 does not check V3 combo values at validation; newer hosts answer 400 — both are clear
    status, body = host.post_json("/prompt", {"prompt": decode_wf("vae_approx/missing")})
    if status == 400:
        assert "vae_name" in str(body["node_errors"])
    else:
        msg = _run_error(host, tmp_path, decode_wf("vae_approx/missing"))
        assert "TurboStreamTinyVAELoader: vae_name: 'vae_approx/missing' is not an installed tiny VAE" in msg
        assert "valid names: " in msg and "vae_approx/taesd" in msg
    queue(host, decode_wf("vae_approx/taesd"), tmp_path)  # the host keeps serving
