"""ADD sampler nodes in the real host: parity with the host's recipes, bad input, model families."""

from __future__ import annotations

import uuid

import pytest
import torch
from conftest import queue
from safetensors.torch import load_file

from turbostream import client, tiny_models

SD_TURBO = "sd_turbo.safetensors"  # the tiny SD2.1-layout model under the standard name


def _base(ckpt: str = SD_TURBO, size: int = 64, batch: int = 2) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "turbostream_example.png"}},
        "6": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["5", 0],
                "upscale_method": "bilinear",
                "width": size,
                "height": size,
                "crop": "disabled",
            },
        },
        "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["1", 2]}},
    }


def _ours(model, latent, seed=7, steps=1, schedule="stability", denoise=1.0, update="ancestral", timesteps="999,499"):
    return {
        "class_type": "TurboStreamADDSampler",
        "inputs": {
            "model": model,
            "positive": ["2", 0],
            "latent_image": latent,
            "seed": seed,
            "steps": steps,
            "schedule": schedule,
            "timesteps": timesteps,
            "denoise": denoise,
            "update": update,
            "cfg": 1.0,
        },
    }


def _save(samples, prefix):
    return {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": prefix}}


def _read_latent(host, prefix: str) -> torch.Tensor:
    [path] = list(host.output_dir.glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"]


def test_stability_ancestral_matches_host_sdturbo_recipe(host, tmp_path):
    """steps 1-4 at denoise 1.0 and 1-2 at 0.5: == SamplerCustom + SDTurboScheduler + euler_ancestral."""
    run = uuid.uuid4().hex[:8]
    wf = _base()
    wf["8"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}
    configs = [(s, 1.0) for s in (1, 2, 3, 4)] + [(s, 0.5) for s in (1, 2)]
    for k, (steps, denoise) in enumerate(configs):
        latent = ["4", 0] if denoise == 1.0 else ["7", 0]
        wf[f"{100 + k}"] = {
            "class_type": "SDTurboScheduler",
            "inputs": {"model": ["1", 0], "steps": steps, "denoise": denoise},
        }
        wf[f"{200 + k}"] = {
            "class_type": "SamplerCustom",
            "inputs": {
                "model": ["1", 0],
                "add_noise": True,
                "noise_seed": 7,
                "cfg": 1.0,
                "positive": ["2", 0],
                "negative": ["3", 0],
                "sampler": ["8", 0],
                "sigmas": [f"{100 + k}", 0],
                "latent_image": latent,
            },
        }
        wf[f"{300 + k}"] = _save([f"{200 + k}", 0], f"parity/{run}_host_{k}")
        wf[f"{400 + k}"] = _ours(["1", 0], latent, steps=steps, denoise=denoise)
        wf[f"{500 + k}"] = _save([f"{400 + k}", 0], f"parity/{run}_ours_{k}")
    queue(host, wf, tmp_path)
    for k, config in enumerate(configs):
        ref, ours = _read_latent(host, f"parity/{run}_host_{k}"), _read_latent(host, f"parity/{run}_ours_{k}")
        assert ref.shape == ours.shape == ((2 if config[1] == 1.0 else 1), 4, 8, 8)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=f"config {config}")
    # different configurations really differ (the comparison is not vacuous)
    assert not torch.allclose(_read_latent(host, f"parity/{run}_ours_0"), _read_latent(host, f"parity/{run}_ours_1"))


def test_renoise_matches_host_lcm_sampler_on_an_lcm_model(host, tmp_path):
    """On an LCM-sampling model (ModelSamplingDiscrete lcm), renoise == the host's `lcm` sampler, and the
    SIGMAS + SAMPLER nodes give the same result as the one-node sampler."""
    run = uuid.uuid4().hex[:8]
    wf = _base(ckpt=tiny_models.CHECKPOINTS["sd15"].name)
    wf["10"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "lcm", "zsnr": False}}
    wf["11"] = {
        "class_type": "TurboStreamADDScheduler",
        "inputs": {"model": ["10", 0], "steps": 4, "schedule": "trailing", "timesteps": "", "denoise": 1.0},
    }
    wf["12"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}}
    wf["13"] = {"class_type": "TurboStreamRenoiseSampler", "inputs": {}}
    for name, sampler in (("host", ["12", 0]), ("nodes", ["13", 0])):
        node = f"2{len(name)}"
        wf[node] = {
            "class_type": "SamplerCustom",
            "inputs": {
                "model": ["10", 0],
                "add_noise": True,
                "noise_seed": 3,
                "cfg": 1.0,
                "positive": ["2", 0],
                "negative": ["3", 0],
                "sampler": sampler,
                "sigmas": ["11", 0],
                "latent_image": ["4", 0],
            },
        }
        wf[f"3{len(name)}"] = _save([node, 0], f"lcm/{run}_{name}")
    wf["40"] = _ours(["10", 0], ["4", 0], seed=3, steps=4, schedule="trailing", update="renoise")
    wf["41"] = _save(["40", 0], f"lcm/{run}_ours")
    queue(host, wf, tmp_path)
    ref = _read_latent(host, f"lcm/{run}_host")
    torch.testing.assert_close(_read_latent(host, f"lcm/{run}_nodes"), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_read_latent(host, f"lcm/{run}_ours"), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ckpt", [tiny_models.CHECKPOINTS["sd15"].name, "sd_xl_turbo_1.0_fp16.safetensors"])
def test_sampler_runs_on_other_families(host, tmp_path, ckpt):
    """SD1.5 and SDXL (pooled output and size conditioning come from the host's encoders)."""
    run = uuid.uuid4().hex[:8]
    wf = _base(ckpt=ckpt, batch=1)
    wf["8"] = _ours(["1", 0], ["4", 0], steps=2, schedule="custom", timesteps="999,499", update="renoise")
    wf["9"] = _save(["8", 0], f"families/{run}")
    queue(host, wf, tmp_path)
    out = _read_latent(host, f"families/{run}")
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.abs().sum() > 0


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "inputs,fragment",
    [
        ({"steps": 4, "denoise": 0.3}, "allows at most 3 steps"),
        ({"steps": 1, "denoise": 0.05}, "below 0.1"),
        ({"schedule": "trailing", "steps": 2, "denoise": 0.3}, "raise steps to 4"),
        ({"schedule": "custom", "timesteps": "999,abc"}, "not an integer"),
        ({"schedule": "custom", "timesteps": ""}, "empty"),
        ({"schedule": "custom", "timesteps": "400,700"}, "strictly decreasing"),
        ({"schedule": "custom", "timesteps": "1200"}, "outside 0-999"),
    ],
)
def test_schedule_mistakes_are_rejected_before_running(host, inputs, fragment):
    wf = _base(batch=1)
    wf["8"] = _ours(["1", 0], ["7", 0])
    wf["8"]["inputs"].update(inputs)
    wf["9"] = _save(["8", 0], "bad/never")
    status, body = host.post_json("/prompt", {"prompt": wf})
    assert status == 400, body
    errors = body["node_errors"]["8"]["errors"]
    assert errors[0]["type"] == "custom_validation_failed"
    assert fragment in errors[0]["details"], errors


def test_execution_error_names_node_and_input_then_host_keeps_serving(host, tmp_path):
    wf = _base(batch=1)
    wf["8"] = _ours(["1", 0], ["4", 0])
    wf["8"]["inputs"]["cfg"] = 2.0  # no negative connected
    wf["9"] = _save(["8", 0], "bad/cfg")
    with pytest.raises(client.ExecutionFailed) as err:
        queue(host, wf, tmp_path)
    assert err.value.node_type == "TurboStreamADDSampler"
    assert "TurboStreamADDSampler: negative: cfg 2 needs a negative conditioning" in str(err.value)
    wf["8"]["inputs"]["cfg"] = 1.0
    wf["9"]["inputs"]["filename_prefix"] = f"bad/recovered_{uuid.uuid4().hex[:6]}"
    queue(host, wf, tmp_path)


@pytest.fixture(scope="module")
def sd15_patcher(comfy, pack, tiny_models_dir):
    """The tiny SD1.5 UNet as a host ModelPatcher, loaded in this process (no CLIP, no VAE)."""
    import comfy.sd

    path = tiny_models_dir / "checkpoints" / tiny_models.CHECKPOINTS["sd15"].name
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)
    return model


def _sampler_node(pack):
    return pack.nodes.add_sampler.TurboStreamADDSampler


def test_wrong_latent_channels(pack, sd15_patcher):
    latent = {"samples": torch.randn(1, 16, 8, 8)}
    with pytest.raises(ValueError, match="latent_image: has 16 channels but this SD15 model expects 4"):
        _sampler_node(pack).execute(sd15_patcher, [], latent, 0, 1, "stability", "", 1.0)


def test_empty_latent_batch(pack, sd15_patcher):
    with pytest.raises(ValueError, match="latent_image: the latent batch is empty"):
        _sampler_node(pack).execute(sd15_patcher, [], {"samples": torch.zeros(0, 4, 8, 8)}, 0, 1, "stability", "", 1.0)


def test_execute_reports_schedule_errors_too(pack, sd15_patcher):
    """Linked (not widget) values skip validate_inputs; execute raises the same message."""
    node = _sampler_node(pack)
    assert node.validate_inputs(steps=4, schedule="stability", timesteps="", denoise=None) is True
    with pytest.raises(ValueError, match="TurboStreamADDSampler: steps: steps 4 at denoise 0.3"):
        node.execute(sd15_patcher, [], {"samples": torch.zeros(1, 4, 8, 8)}, 0, 4, "stability", "", 0.3)
