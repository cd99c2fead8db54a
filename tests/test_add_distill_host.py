"""ADD distillation node against the host: it trains on the tiny SD1.5 model with the tiny ViT, writes a
LoRA the host's loader maps completely, the ADD sampler runs with it, the host's model is unchanged,
and bad input is refused naming the node and input. In the real host and in process."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import pytest
import torch
from conftest import queue
from safetensors.torch import load_file, save_file

from turbostream import client, tiny_models

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"  # the tiny SD1.5 model under the standard name
NODE = "TurboStreamADDDistill"
BUILTIN_VIT = "tiny-vit (built-in, random weights: tests only)"
UNET_MODULES = 118
"""Linear + Conv2d layers of the tiny SD1.5 UNet: every one gets a LoRA module."""
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _distill(save_name: str, steps: int = 2, prompts: str = "a red fox\na fox in the snow", **extra) -> dict:
    inputs = {
        "model": ["1", 0],
        "clip": ["1", 1],
        "vae": ["1", 2],
        "images": ["8", 0],
        "prompts": prompts,
        "steps": steps,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "distill_weight": 2.5,
        "feature_network": BUILTIN_VIT,
        "seed": 3,
        "save_name": save_name,
        "batch_size": 2,
        "discriminator_lr": 1e-3,
        "adversarial_weight": 1.0,
        "r1_weight": 1e-5,
        "student_timesteps": "999,749,499,249",
        "teacher_cfg": 1.0,
        **extra,
    }
    return {"class_type": NODE, "inputs": inputs}


def _base() -> dict:
    """Tiny SD1.5, a prompt, an empty 64x64 latent and two 64x64 training images."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "turbostream_example.png"}},
        "6": {
            "class_type": "ImageScale",
            "inputs": {"image": ["5", 0], "upscale_method": "bilinear", "width": 64, "height": 64, "crop": "center"},
        },
        "7": {"class_type": "ImageFlip", "inputs": {"image": ["6", 0], "flip_method": "y-axis: horizontally"}},
        "8": {"class_type": "ImageBatch", "inputs": {"image1": ["6", 0], "image2": ["7", 0]}},
    }


def _add_sampler(model, seed: int = 5, steps: int = 4) -> dict:
    return {
        "class_type": "TurboStreamADDSampler",
        "inputs": {
            "model": model,
            "positive": ["2", 0],
            "latent_image": ["4", 0],
            "seed": seed,
            "steps": steps,
            "schedule": "trailing",
            "timesteps": "999,499",
            "denoise": 1.0,
            "update": "renoise",
            "cfg": 1.0,
        },
    }


def _ksampler(model, seed: int = 9, advanced: bool = False) -> dict:
    """2 euler steps; ``advanced`` gives the same computation in another node (the host's cache cannot answer it)."""
    inputs = {
        "model": model,
        "steps": 2,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "positive": ["2", 0],
        "negative": ["3", 0],
        "latent_image": ["4", 0],
    }
    if not advanced:
        return {"class_type": "KSampler", "inputs": {**inputs, "seed": seed, "denoise": 1.0}}
    extra = {"add_noise": "enable", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}
    return {"class_type": "KSamplerAdvanced", "inputs": {**inputs, "noise_seed": seed, **extra}}


def _save(samples, prefix: str) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": prefix}}


def _read_latent(host, prefix: str) -> torch.Tensor:
    [path] = list(host.output_dir.glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"]


# -- the real host ---------------------------------------------------------------------------------
def test_trains_saves_a_complete_lora_and_the_add_sampler_runs_with_it(host, tmp_path):
    run = uuid.uuid4().hex[:8]
    name = f"add-{run}"
    # 1. the bare model before training
    wf = _base()
    wf["40"], wf["41"] = _ksampler(["1", 0]), _save(["40", 0], f"add/{run}_before")
    queue(host, wf, tmp_path)

    # 2. train; sample with the node's model output; save the loss curve
    wf = _base()
    wf["10"] = _distill(name)
    wf["11"], wf["12"] = _add_sampler(["10", 0]), _save(["11", 0], f"add/{run}_node")
    wf["13"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 2], "filename_prefix": f"add/{run}_curve"}}
    before = len(host.log_text())
    result = queue(host, wf, tmp_path)
    log = host.log_text()[before:]
    saved = host.models_dir / "loras" / f"{name}.safetensors"
    assert saved.is_file(), log[-3000:]
    assert re.search(rf"{NODE}: 2 steps on 2 images in [\d.]+ s; saved {name}.safetensors \({UNET_MODULES} LoRA", log)
    assert [p.name for p in result.images if "curve" in p.name], result.images
    node_latent = _read_latent(host, f"add/{run}_node")
    assert node_latent.shape == (1, 4, 8, 8) and torch.isfinite(node_latent).all()

    # 3. the host's own LoRA loader maps every key, and gives the node's model output exactly;
    #    the LCM-LoRA fuser accepts the file too; the bare model is unchanged after training
    wf = _base()
    wf["20"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["1", 0], "lora_name": saved.name, "strength_model": 1.0},
    }
    wf["21"], wf["22"] = _add_sampler(["20", 0]), _save(["21", 0], f"add/{run}_loader")
    wf["30"] = {
        "class_type": "TurboStreamLCMLoRAFuse",
        "inputs": {
            "model": ["1", 0],
            "lora_name": saved.name,
            "strength_model": 1.0,
            "strength_clip": 1.0,
            "fuse": True,
            "sampling": "keep",
        },
    }
    wf["31"], wf["32"] = _add_sampler(["30", 0]), _save(["31", 0], f"add/{run}_fused")
    wf["40"], wf["41"] = _ksampler(["1", 0], advanced=True), _save(["40", 0], f"add/{run}_after")
    wf["50"], wf["51"] = _add_sampler(["1", 0]), _save(["50", 0], f"add/{run}_bare")
    before = len(host.log_text())
    queue(host, wf, tmp_path)
    log = host.log_text()[before:]
    assert "lora key not loaded" not in log, log[-3000:]
    assert f"{saved.name}: applied {UNET_MODULES} of {UNET_MODULES} LoRA keys (model {UNET_MODULES}, clip 0)" in log
    torch.testing.assert_close(_read_latent(host, f"add/{run}_loader"), node_latent, rtol=0, atol=0)
    torch.testing.assert_close(_read_latent(host, f"add/{run}_fused"), node_latent, **TOL)
    assert torch.equal(_read_latent(host, f"add/{run}_after"), _read_latent(host, f"add/{run}_before"))
    assert not torch.equal(_read_latent(host, f"add/{run}_bare"), node_latent)  # the LoRA is not a no-op


def test_an_existing_file_is_never_overwritten(host, tmp_path):
    name = f"add-exists-{uuid.uuid4().hex[:6]}"
    existing = host.models_dir / "loras" / f"{name}.safetensors"
    save_file({"x": torch.zeros(1)}, str(existing))
    wf = _base()
    wf["10"] = _distill(name, steps=1)
    wf["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 2]}}
    queue(host, wf, tmp_path)
    assert set(load_file(str(existing))) == {"x"}
    assert (host.models_dir / "loras" / f"{name}_00001.safetensors").is_file()


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"prompts": "one\ntwo\nthree"}, f"{NODE}: prompts: has 3 prompts (non-empty lines) for 2 images"),
        ({"prompts": " \n "}, f"{NODE}: prompts: is empty"),
    ],
    ids=["prompt-count", "no-prompt"],
)
def test_bad_input_fails_naming_the_node_and_input(host, tmp_path, change, fragment):
    wf = _base()
    wf["10"] = _distill(f"never-{uuid.uuid4().hex[:6]}", steps=1, **change)
    with pytest.raises(client.ExecutionFailed) as err:
        queue(host, wf, tmp_path)
    assert err.value.node_type == NODE
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"save_name": "../escape"}, "'../escape' is not a plain file name"),
        ({"student_timesteps": "249,999"}, "student_timesteps: timesteps must be strictly decreasing"),
    ],
    ids=["save-name", "timesteps"],
)
def test_widget_mistakes_are_rejected_before_running(host, tmp_path, change, fragment):
    wf = _base()
    wf["10"] = _distill("never", steps=1)
    wf["10"]["inputs"].update(change)
    with pytest.raises(client.ClientError) as err:
        queue(host, wf, tmp_path)
    assert not isinstance(err.value, client.ExecutionFailed)
    assert f"node 10 ({NODE})" in str(err.value) and fragment in str(err.value), str(err.value)
    assert not (host.models_dir / "escape.safetensors").exists()


# -- in process ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(comfy, tmp_path_factory):
    """This process writes LoRAs, feature networks and previews to temporary folders (first in line)."""
    import folder_paths

    root = tmp_path_factory.mktemp("add_distill")
    loras, features, temp = root / "loras", root / "features", root / "temp"
    for p in (loras, features, temp):
        p.mkdir()
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    folder_paths.add_model_folder_path("turbostream_features", str(features), is_default=True)
    old_temp = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(temp))
    yield {"loras": loras, "features": features}
    folder_paths.set_temp_directory(old_temp)
    folder_paths.folder_names_and_paths["loras"][0].remove(str(loras))
    folder_paths.folder_names_and_paths["turbostream_features"][0].remove(str(features))


@pytest.fixture(scope="module")
def sd15(comfy, tiny_models_dir):
    """The tiny SD1.5 model, CLIP and VAE as host objects loaded in this process (under inference mode,
    as the host loads them)."""
    import comfy.sd

    path = tiny_models_dir / "checkpoints" / tiny_models.CHECKPOINTS["sd15"].name
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    return model, clip, vae


@pytest.fixture(scope="module")
def node(pack, folders):
    return pack.nodes.add_distill.TurboStreamADDDistill


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, size, size, 3, generator=g)


def _run(node, sd15, save_name: str, images=None, prompts="a red fox", steps=2, **extra):
    model, clip, vae = sd15
    args = dict(learning_rate=1e-3, lora_rank=4, distill_weight=2.5, feature_network=BUILTIN_VIT, seed=3)
    args.update(extra)
    with torch.inference_mode():  # as the host executes nodes
        return node.execute(
            model, clip, vae, _images() if images is None else images, prompts, steps, save_name=save_name, **args
        ).result


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.model.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sample(model, seed: int = 4) -> torch.Tensor:
    import comfy.sample

    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5)), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, 2, 1.0, "euler", "normal", cond, cond, latent, seed=seed, disable_pbar=True
        )


def test_in_process_training_leaves_the_model_bit_identical(node, sd15, folders):
    import comfy.lora

    model = sd15[0]
    digest, bare = _digest(model), _sample(model)
    patched, name, curve = _run(node, sd15, "inproc", steps=3)
    assert _digest(model) == digest and not model.patches
    torch.testing.assert_close(_sample(model), bare, rtol=0, atol=0)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.dtype == torch.float32
    # the file maps completely onto the model with the host's key map
    lora = load_file(str(folders["loras"] / name))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    assert len(lora) == 3 * UNET_MODULES and len(patches) == UNET_MODULES
    assert set(patched.patches) == set(patches)
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith(".lora_up.weight"))  # it trained
    assert not torch.allclose(_sample(patched), bare, **TOL)


def test_same_seed_same_lora(node, sd15, folders):
    a = load_file(str(folders["loras"] / _run(node, sd15, "det", steps=2)[1]))
    b = load_file(str(folders["loras"] / _run(node, sd15, "det", steps=2)[1]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_dinov2_layout_file_from_the_features_folder(node, sd15, folders):
    from turbostream import add_distill as core

    save_file(core.tiny_vit(9).state_dict(), str(folders["features"] / "my-vit.safetensors"))
    [combo] = [i for i in node.define_schema().inputs if i.id == "feature_network"]
    assert "my-vit.safetensors" in combo.options
    _, name, _ = _run(node, sd15, "with-file", steps=1, feature_network="my-vit.safetensors")
    assert (folders["loras"] / name).is_file()
    save_file(
        {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4)},
        str(folders["features"] / "clip.safetensors"),
    )
    with pytest.raises(ValueError, match=f"{NODE}: feature_network: clip.safetensors: not a ViT in the DINOv2"):
        _run(node, sd15, "never", steps=1, feature_network="clip.safetensors")


def test_interrupt_stops_training_without_writing(node, sd15, folders):
    import comfy.model_management

    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(node, sd15, "interrupted", steps=50)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not list(folders["loras"].glob("interrupted*"))


def test_a_failed_save_leaves_no_file(pack, node, sd15, folders, monkeypatch):
    """The LoRA is written under a hidden name and renamed: a write that fails half-way (disk full,
    killed) leaves neither a truncated LoRA nor the partial file behind."""
    module = pack.nodes.add_distill

    def half_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "save_file", half_write)
    with pytest.raises(OSError, match="No space left"):
        _run(node, sd15, "disk-full", steps=1)
    assert sorted(p.name for p in folders["loras"].iterdir() if "disk-full" in p.name) == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"images": torch.zeros(0, 64, 64, 3)}, "images: the image batch is empty"),
        ({"images": torch.zeros(1, 32, 64, 3)}, "images: are 64x32; the trainer needs at least 64 pixels"),
        ({"prompts": "a\nb\nc"}, "prompts: has 3 prompts (non-empty lines) for 2 images"),
        ({"save_name": "sub/dir"}, "save_name: 'sub/dir' is not a plain file name"),
        ({"save_name": ".hidden"}, "save_name: '.hidden' is not a plain file name"),
        ({"student_timesteps": "1000"}, "student_timesteps:"),
        ({"batch_size": 0}, "batch_size: 0 is outside the allowed range 1 to 256"),
    ],
    ids=["empty", "small", "prompts", "folder", "dot", "timesteps", "batch"],
)
def test_bad_input_in_process(node, sd15, kwargs, message):
    extra = dict(kwargs)
    save_name = extra.pop("save_name", "never")
    with pytest.raises(ValueError) as err:
        _run(node, sd15, save_name, **extra)
    assert str(err.value).startswith(f"{NODE}: ") and message in str(err.value), str(err.value)


def test_validate_inputs_reports_widget_mistakes(node):
    assert node.validate_inputs("fine name", "999,749,499,249") is True
    assert "is not a plain file name" in node.validate_inputs("a/b", "999")
    assert node.validate_inputs(None, None) is True


def test_models_the_trainer_cannot_feed_are_refused(node, sd15, comfy, tiny_models_dir):
    import comfy.model_sampling

    model, clip, vae = sd15
    flow_sampling = type("Flow", (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST), {})
    flow = model.clone()
    flow.add_object_patch("model_sampling", flow_sampling(model.model.model_config))
    with pytest.raises(ValueError, match=f"{NODE}: model: this SD15 model is not a discrete"):
        _run(node, (flow, clip, vae), "never")
