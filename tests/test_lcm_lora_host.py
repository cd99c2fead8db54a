"""LCM-LoRA fuser against the host: parity with LoraLoader + ModelSamplingDiscrete(lcm), untouched inputs,
no re-fusing, stacking, and bad LoRA files. In the real host (SaveLatent outputs) and in process.

The tiny checkpoints leave the gain of every GroupNorm whose key lacks "norm" (``in_layers.0``,
``out_layers.0``, ``out.0``) at 0, so their UNet output is exactly 0 whatever its weights: a fuse that
ignored the LoRA would pass any latent comparison. The parity tests therefore run the same tiny UNets
with those gains set to 1 ("live" UNets: a UNet-only file for the host's UNETLoader, in process the
loaded module), and each one checks that the LoRA visibly changes the latent.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import uuid

import pytest
import torch
from conftest import LIVE_GAIN as GROUP_NORM_GAIN
from conftest import live_tiny_sd15, queue
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from turbostream import client, tiny_models
from turbostream.server import demo_model_links

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"  # the tiny SD1.5 model under the standard name
LCM_SD15 = "lcm-lora-sdv1-5.safetensors"  # tiny-sd15-kohya
SDXL = "sd_xl_turbo_1.0_fp16.safetensors"  # tiny SDXL
LCM_SDXL = "lcm-lora-sdxl.safetensors"  # tiny-sdxl-diffusers
STYLE_SD15 = tiny_models.LORA_FILES[("sd15", "diffusers")].name
SEED, STEPS = 11, 4
TOL = {"rtol": 1e-4, "atol": 1e-4}
FUSED_LINE = "TurboStreamLCMLoRAFuse: fused "
REUSED_LINE = "TurboStreamLCMLoRAFuse: reused "
UNET_PREFIX = "model.diffusion_model."
MODEL = ["5", 0]  # the live UNet in every graph below


# -- the real host ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_unets(host, tiny_models_dir) -> dict[str, str]:
    """``{checkpoint name: UNet file}``: each tiny UNet with its GroupNorm gains at 1, in diffusion_models."""
    folder = host.models_dir / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for ckpt, family in ((SD15, "sd15"), (SDXL, "sdxl")):
        path = tiny_models_dir / "checkpoints" / tiny_models.CHECKPOINTS[family].name
        with safe_open(str(path), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
        gains = [k for k in sd if GROUP_NORM_GAIN.search(k[len(UNET_PREFIX) :])]
        assert gains
        sd.update({k: torch.ones_like(sd[k]) for k in gains})
        names[ckpt] = f"live-{family}-{uuid.uuid4().hex[:6]}.safetensors"
        save_file(sd, str(folder / names[ckpt]))
    return names


def _base(ckpt: str, unet: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
    }


def _ours(model, lora, fuse=True, sampling="lcm", strength=1.0, strength_clip=1.0) -> dict:
    return {
        "class_type": "TurboStreamLCMLoRAFuse",
        "inputs": {
            "model": model,
            "lora_name": lora,
            "strength_model": strength,
            "strength_clip": strength_clip,
            "fuse": fuse,
            "sampling": sampling,
        },
    }


def _host_lora(model, lora, strength=1.0) -> dict:
    return {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": model, "lora_name": lora, "strength_model": strength},
    }


def _lcm(model) -> dict:
    return {"class_type": "ModelSamplingDiscrete", "inputs": {"model": model, "sampling": "lcm", "zsnr": False}}


def _ksampler(model, seed=SEED, advanced=False) -> dict:
    inputs = {
        "model": model,
        "seed": seed,
        "steps": STEPS,
        "cfg": 1.0,
        "sampler_name": "lcm",
        "scheduler": "sgm_uniform",
        "positive": ["2", 0],
        "negative": ["3", 0],
        "latent_image": ["4", 0],
    }
    if not advanced:
        return {"class_type": "KSampler", "inputs": {**inputs, "denoise": 1.0}}
    # the same computation as KSampler, but another node: the host's cache cannot answer it
    inputs["noise_seed"] = inputs.pop("seed")
    extra = {"add_noise": "enable", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}
    return {"class_type": "KSamplerAdvanced", "inputs": {**inputs, **extra}}


def _save(samples, prefix) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": prefix}}


def _read_latent(host, prefix: str) -> torch.Tensor:
    [path] = list(host.output_dir.glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"]


def _parity_graph(ckpt: str, unet: str, lora: str, run: str) -> dict:
    """Host recipe (LoraLoaderModelOnly + ModelSamplingDiscrete lcm), ours fused and unfused, LCM without LoRA."""
    wf = _base(ckpt, unet)
    wf["10"], wf["11"] = _host_lora(MODEL, lora), _lcm(["10", 0])
    wf["20"] = _ours(MODEL, lora, fuse=True)
    wf["30"] = _ours(MODEL, lora, fuse=False)
    wf["40"] = _lcm(MODEL)
    for name, model in (("host", ["11", 0]), ("fused", ["20", 0]), ("unfused", ["30", 0]), ("nolora", ["40", 0])):
        wf[f"{name}_k"] = _ksampler(model)
        wf[f"{name}_s"] = _save([f"{name}_k", 0], f"lcm_lora/{run}_{name}")
    return wf


def _check_parity(host, run: str) -> None:
    ref = _read_latent(host, f"lcm_lora/{run}_host")
    assert ref.shape == (1, 4, 8, 8) and torch.isfinite(ref).all()
    torch.testing.assert_close(_read_latent(host, f"lcm_lora/{run}_fused"), ref, **TOL)
    torch.testing.assert_close(_read_latent(host, f"lcm_lora/{run}_unfused"), ref, **TOL)
    # the LoRA changes the result: the comparison above is not vacuous
    assert not torch.allclose(_read_latent(host, f"lcm_lora/{run}_nolora"), ref, **TOL)


def test_sd15_fused_and_unfused_match_the_host_recipe(host, live_unets, tmp_path):
    run = uuid.uuid4().hex[:8]
    before = len(host.log_text())
    queue(host, _parity_graph(SD15, live_unets[SD15], LCM_SD15, run), tmp_path)
    _check_parity(host, run)
    log = host.log_text()[before:]
    assert log.count(f"{LCM_SD15}: applied 118 of 118 LoRA keys (model 118, clip 0)") == 2, log[-3000:]
    assert "72 text-encoder keys unused (no clip connected)" in log


def test_sdxl_fused_and_unfused_match_the_host_recipe(host, live_unets, tmp_path):
    run = uuid.uuid4().hex[:8]
    before = len(host.log_text())
    queue(host, _parity_graph(SDXL, live_unets[SDXL], LCM_SDXL, run), tmp_path)
    _check_parity(host, run)
    assert f"{LCM_SDXL}: applied 402 of 402 LoRA keys (model 402, clip 0)" in host.log_text()[before:]


def test_stacked_style_then_lcm_matches_the_host_chain(host, live_unets, tmp_path):
    """Style LoRA first (sampling keep), LCM-LoRA second; every link logs its count."""
    run = uuid.uuid4().hex[:8]
    wf = _base(SD15, live_unets[SD15])
    wf["10"] = _host_lora(MODEL, STYLE_SD15, 0.6)
    wf["11"], wf["12"] = _host_lora(["10", 0], LCM_SD15), _lcm(["11", 0])
    wf["20"] = _ours(MODEL, STYLE_SD15, fuse=True, sampling="keep", strength=0.6)
    wf["21"] = _ours(["20", 0], LCM_SD15, fuse=True)
    wf["30"] = _ours(MODEL, STYLE_SD15, fuse=False, sampling="keep", strength=0.6)
    wf["31"] = _ours(["30", 0], LCM_SD15, fuse=True)
    wf["40"] = _ours(["20", 0], LCM_SD15, fuse=False)
    wf["50"], wf["51"] = _host_lora(MODEL, LCM_SD15), _lcm(["50", 0])  # without the style link
    for name, model in (
        ("host", ["12", 0]),
        ("ff", ["21", 0]),
        ("uf", ["31", 0]),
        ("fu", ["40", 0]),
        ("lcm", ["51", 0]),
    ):
        wf[f"{name}_k"] = _ksampler(model)
        wf[f"{name}_s"] = _save([f"{name}_k", 0], f"stack/{run}_{name}")
    before = len(host.log_text())
    queue(host, wf, tmp_path)
    ref = _read_latent(host, f"stack/{run}_host")
    for name in ("ff", "uf", "fu"):
        torch.testing.assert_close(_read_latent(host, f"stack/{run}_{name}"), ref, **TOL, msg=name)
    assert not torch.allclose(_read_latent(host, f"stack/{run}_lcm"), ref, **TOL)  # the style link counts
    log = host.log_text()[before:]
    assert log.count(f"{STYLE_SD15}: applied 118 of 118 LoRA keys") == 2
    assert log.count(f"{LCM_SD15}: applied 118 of 118 LoRA keys") == 3


def test_other_branches_keep_the_original_weights_and_requeueing_does_not_fuse_again(host, live_unets, tmp_path):
    run = uuid.uuid4().hex[:8]
    seed = 101

    def requeue(graph: dict, tag: str) -> str:
        graph["22"]["inputs"]["filename_prefix"] = f"branch/{run}_{tag}"
        before = len(host.log_text())
        queue(host, graph, tmp_path)
        return host.log_text()[before:]

    # 1. the bare model alone
    wf = _base(SD15, live_unets[SD15])
    wf["40"], wf["41"] = _ksampler(MODEL, seed), _save(["40", 0], f"branch/{run}_before")
    queue(host, wf, tmp_path)
    # 2. the fused model (a strength no other test uses, so this fuse is new): one fuse
    fused = _base(SD15, live_unets[SD15])
    fused["20"] = _ours(MODEL, LCM_SD15, fuse=True, strength=0.9)
    fused["21"], fused["22"] = _ksampler(["20", 0], seed), _save(["21", 0], "")
    assert requeue(fused, "fused").count(FUSED_LINE) == 1
    # 3. the same graph again: the host's cache answers, the node does not even run
    log = requeue(fused, "again")
    assert FUSED_LINE not in log and REUSED_LINE not in log
    # 4. the bare model again, after the fused clone was loaded: bit-identical to step 1
    wf = _base(SD15, live_unets[SD15])
    wf["42"], wf["43"] = _ksampler(MODEL, seed, advanced=True), _save(["42", 0], f"branch/{run}_after")
    queue(host, wf, tmp_path)
    assert torch.equal(_read_latent(host, f"branch/{run}_after"), _read_latent(host, f"branch/{run}_before"))
    assert not torch.allclose(_read_latent(host, f"branch/{run}_fused"), _read_latent(host, f"branch/{run}_before"))
    # 5. the fused graph after another prompt: the host dropped the node's output and runs it again
    #    (the checkpoint stays cached); the node re-uses the fused weights instead of fusing again
    log = requeue(fused, "rerun")
    assert FUSED_LINE not in log and log.count(REUSED_LINE) == 1, log[-2000:]
    assert torch.equal(_read_latent(host, f"branch/{run}_rerun"), _read_latent(host, f"branch/{run}_fused"))


@pytest.mark.parametrize(
    "ckpt,lora,fragments",
    [
        (
            SD15,
            LCM_SDXL,
            [
                f"{LCM_SDXL} is an SDXL LoRA (its cross-attention to_k/to_v layers read 2048-wide text features)",
                "the model is an SD1.x model (SD15, cross-attention width 768)",
                "Pick a LoRA made for SD1.x (for LCM: lcm-lora-sdv1-5.safetensors), or load an SDXL checkpoint.",
            ],
        ),
        (
            SDXL,
            LCM_SD15,
            [
                f"{LCM_SD15} is an SD1.x LoRA",
                "the model is an SDXL model (SDXL, cross-attention width 2048)",
                "(for LCM: lcm-lora-sdxl.safetensors), or load an SD1.x checkpoint",
            ],
        ),
    ],
    ids=["sdxl-lora-on-sd15", "sd15-lora-on-sdxl"],
)
def test_a_lora_for_another_base_fails_clearly_then_the_host_keeps_serving(
    host, live_unets, tmp_path, ckpt, lora, fragments
):
    wf = _base(ckpt, live_unets[ckpt])
    wf["20"] = _ours(MODEL, lora)
    wf["21"], wf["22"] = _ksampler(["20", 0]), _save(["21", 0], "bad/never")
    with pytest.raises(client.ExecutionFailed) as err:
        queue(host, wf, tmp_path)
    assert err.value.node_type == "TurboStreamLCMLoRAFuse"
    for fragment in fragments:
        assert fragment in str(err.value)
    wf["20"]["inputs"]["lora_name"] = LCM_SD15 if ckpt == SD15 else LCM_SDXL
    wf["22"]["inputs"]["filename_prefix"] = f"bad/recovered_{uuid.uuid4().hex[:6]}"
    queue(host, wf, tmp_path)


def test_a_truncated_lora_file_in_the_host(host, live_unets, tmp_path, tiny_models_dir):
    source = tiny_models_dir / "loras" / tiny_models.LORA_FILES[("sd15", "kohya")].name
    name = f"truncated-{uuid.uuid4().hex[:6]}.safetensors"
    target = host.models_dir / "loras" / name
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    try:
        wf = _base(SD15, live_unets[SD15])
        wf["20"] = _ours(MODEL, name)
        wf["21"], wf["22"] = _ksampler(["20", 0]), _save(["21", 0], "bad/never")
        with pytest.raises(client.ExecutionFailed) as err:
            queue(host, wf, tmp_path)
        assert f"TurboStreamLCMLoRAFuse: lora_name: cannot read {name}" in str(err.value)
        assert "truncated or corrupt" in str(err.value)
    finally:
        target.unlink()


# -- in process ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loras_dir(comfy, tmp_path_factory, tiny_models_dir):
    """A loras folder for this process: the tiny LoRAs (under their own and the standard names, as in
    the host) plus the bad files the tests write."""
    import folder_paths

    path = tmp_path_factory.mktemp("loras")
    for name, source in demo_model_links(tiny_models_dir)["loras"].items():
        shutil.copy(source, path / name)
    folder_paths.add_model_folder_path("loras", str(path))
    return path


@pytest.fixture(scope="module")
def sd15(comfy, pack, tiny_models_dir, loras_dir):
    """The tiny SD1.5 model (live UNet) and CLIP as host patchers, loaded in this process."""
    return live_tiny_sd15(tiny_models_dir)


@pytest.fixture(scope="module")
def node(pack):
    return pack.nodes.lcm_lora.TurboStreamLCMLoRAFuse


@pytest.fixture(scope="module")
def core(pack):
    """The core module as the pack imported it (its registry is the one the node uses)."""
    return pack.nodes.lcm_lora.core


def _fuse(node, model, lora=LCM_SD15, fuse=True, sampling="lcm", strength=1.0, clip=None, strength_clip=1.0):
    return node.execute(model, lora, strength, strength_clip, fuse, sampling, clip=clip).result


def _host_chain(model, links: list[tuple[str, float]], clip=None, lcm=True):
    """The host's own recipe: load_lora_for_models per link, then ModelSamplingDiscrete lcm."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    for name, strength in links:
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name), safe_load=True)
        model, clip = comfy.sd.load_lora_for_models(model, clip, sd, strength, strength if clip is not None else 0)
    if lcm:
        model = ModelSamplingDiscrete().patch(model, "lcm", False)[0]
    return model, clip


def _sample(model, seed=SEED) -> torch.Tensor:
    import comfy.sample

    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5)), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, STEPS, 1.0, "lcm", "sgm_uniform", cond, cond, latent, seed=seed, disable_pbar=True
    )


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_input_model_weights_stay_bit_identical_and_only_patched_tensors_are_duplicated(node, sd15):
    import comfy.model_management
    import comfy.utils

    model, _ = sd15
    originals = dict(model.model.state_dict(keep_vars=True))  # the parameter objects themselves
    digest = _digest(originals)
    bare = _sample(model)
    fused, _ = _fuse(node, model, fuse=True)
    unfused, _ = _fuse(node, model, fuse=False)
    ref, _ = _host_chain(model, [(LCM_SD15, 1.0)])
    out_ref = _sample(ref)
    torch.testing.assert_close(_sample(fused), out_ref, **TOL)
    torch.testing.assert_close(_sample(unfused), out_ref, **TOL)

    # fused: every patched weight is an object patch, nothing is left for the host to patch at load
    patched = set(unfused.patches)
    assert {k for k in fused.object_patches if k != "model_sampling"} == patched and not fused.patches
    comfy.model_management.load_models_gpu([fused])
    for key, param in originals.items():  # while the fused clone is loaded
        if key.startswith("model_sampling."):
            continue  # LCM sampling: replaced on purpose
        current = comfy.utils.get_attr(model.model, key)
        if key in patched:
            assert current is not param and current.data_ptr() != param.data_ptr(), key
        else:
            assert current is param, f"{key} was duplicated although the LoRA does not patch it"

    # the input model: same tensors, same bytes, same output
    comfy.model_management.load_models_gpu([model])
    assert _digest(dict(model.model.state_dict())) == digest
    assert _digest(originals) == digest
    torch.testing.assert_close(_sample(model), bare, rtol=0, atol=0)
    lcm_only, _ = _host_chain(model, [])
    assert not torch.allclose(_sample(lcm_only), out_ref, **TOL)  # the LoRA shows in the latent


def test_the_node_does_not_fuse_the_same_weights_twice(node, core, sd15):
    model, _ = sd15
    start = core.FUSED_WEIGHTS.computations
    first, _ = _fuse(node, model, strength=0.8)
    second, _ = _fuse(node, model, strength=0.8, sampling="keep")
    assert core.FUSED_WEIGHTS.computations == start + 1
    key = next(k for k in first.object_patches if k != "model_sampling")
    assert first.object_patches[key] is second.object_patches[key]
    assert first.patches_uuid == second.patches_uuid  # same weights, same patch id for the host
    _fuse(node, model, strength=0.7)  # another strength: another fuse
    _fuse(node, model, strength=0.8, fuse=False)  # plain patches: no fuse
    assert core.FUSED_WEIGHTS.computations == start + 2


def test_lcm_sampling_is_the_hosts_and_keep_keeps_it(node, sd15):
    from comfy_extras.nodes_model_advanced import LCM, ModelSamplingDiscreteDistilled

    model, _ = sd15
    lcm, _ = _fuse(node, model, fuse=False, sampling="lcm")
    keep, _ = _fuse(node, model, fuse=False, sampling="keep")
    sampling = lcm.get_model_object("model_sampling")
    assert isinstance(sampling, LCM) and isinstance(sampling, ModelSamplingDiscreteDistilled)
    assert sampling.original_timesteps == 50
    assert keep.get_model_object("model_sampling") is model.get_model_object("model_sampling")


def test_chained_links_match_the_host_chain(node, sd15, caplog):
    """Style LoRA (sampling keep) then LCM-LoRA, fused or not per link, == the host's chain."""
    model, _ = sd15
    ref, _ = _host_chain(model, [(STYLE_SD15, 0.6), (LCM_SD15, 1.0)])
    expected = _sample(ref)
    lcm_only, _ = _host_chain(model, [(LCM_SD15, 1.0)])
    assert not torch.allclose(_sample(lcm_only), expected, **TOL)  # the style link shows
    for style_fuse, lcm_fuse in ((True, True), (False, True), (True, False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="turbostream"):
            styled, _ = _fuse(node, model, STYLE_SD15, fuse=style_fuse, sampling="keep", strength=0.6)
            both, _ = _fuse(node, styled, LCM_SD15, fuse=lcm_fuse)
        torch.testing.assert_close(_sample(both), expected, **TOL, msg=f"fuse {style_fuse}, {lcm_fuse}")
        messages = [r.getMessage() for r in caplog.records if "LoRA keys" in r.getMessage()]
        assert [m.split(": ")[1] for m in messages] == [STYLE_SD15, LCM_SD15]
        assert all("applied 118 of 118 LoRA keys" in m for m in messages)


@pytest.mark.parametrize("fuse", [True, False])
def test_clip_gets_the_text_encoder_part_like_the_host_lora_loader(node, sd15, fuse):
    import comfy.sd
    import comfy.utils
    import folder_paths

    model, clip = sd15
    tokens = clip.tokenize("a red fox")
    before = clip.encode_from_tokens(tokens)
    _, ours = _fuse(node, model, fuse=fuse, clip=clip, strength_clip=0.8)
    sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", LCM_SD15), safe_load=True)
    _, ref = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 0.8)
    torch.testing.assert_close(ours.encode_from_tokens(tokens), ref.encode_from_tokens(tokens), **TOL)
    assert not torch.allclose(ours.encode_from_tokens(tokens), before, **TOL)
    torch.testing.assert_close(clip.encode_from_tokens(tokens), before, rtol=0, atol=0)  # the input clip


def _lycoris(kohya: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The UNet part of a kohya LoRA rewritten as LyCORIS LoHa or LoKr with the same weight deltas."""
    out = {}
    for key in kohya:
        if not (key.startswith("lora_unet_") and key.endswith(".lora_up.weight")):
            continue
        module = key[: -len(".lora_up.weight")]
        up, down = kohya[key].float().flatten(1), kohya[f"{module}.lora_down.weight"].float()
        if fmt == "loha":  # (w1a @ w1b) * (w2a @ w2b) with the second factor all ones; alpha / rank = 1
            out[f"{module}.hada_w1_a"], out[f"{module}.hada_w1_b"] = up, down.flatten(1)
            out[f"{module}.hada_w2_a"], out[f"{module}.hada_w2_b"] = (
                torch.ones(up.shape[0], 1),
                torch.ones(1, down[0].numel()),
            )
            out[f"{module}.alpha"] = torch.tensor(float(up.shape[1]))
        else:  # kron(w1, w2) with w1 = [[1]] and w2 the whole delta
            out[f"{module}.lokr_w1"] = torch.ones(1, 1)
            out[f"{module}.lokr_w2"] = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return out


@pytest.mark.parametrize("fmt", ["loha", "lokr"])
def test_lycoris_formats_the_host_reads_fuse_like_the_host_applies_them(node, sd15, loras_dir, fmt):
    model, _ = sd15
    name = _write(loras_dir, f"tiny-{fmt}.safetensors", _lycoris(_kohya_sd15(loras_dir), fmt))
    ref, _ = _host_chain(model, [(name, 1.0)])
    expected = _sample(ref)
    lcm_only, _ = _host_chain(model, [])
    assert not torch.allclose(_sample(lcm_only), expected, **TOL)
    for fuse in (True, False):
        ours, _ = _fuse(node, model, name, fuse=fuse)
        torch.testing.assert_close(_sample(ours), expected, **TOL, msg=f"fuse {fuse}")


# -- bad files, in process -------------------------------------------------------------------------
def _kohya_sd15(loras_dir) -> dict[str, torch.Tensor]:
    return load_file(str(loras_dir / tiny_models.LORA_FILES[("sd15", "kohya")].name))


def _write(loras_dir, name: str, sd: dict[str, torch.Tensor]) -> str:
    save_file(sd, str(loras_dir / name))
    return name


def _rename_modules(sd: dict, count: int) -> dict:
    """Rename ``count`` UNet modules (never a cross-attention one, so the base stays readable) to names
    that match no layer: ``lora_unet_gone_<i>``."""
    modules = sorted({k.split(".", 1)[0] for k in sd if k.startswith("lora_unet_") and "attn2" not in k})
    new_names = {m: f"lora_unet_gone_{i}" for i, m in enumerate(modules[:count])}
    out = {}
    for key, value in sd.items():
        module, rest = key.split(".", 1)
        out[f"{new_names.get(module, module)}.{rest}"] = value
    return out


def test_unreadable_files_are_refused(node, sd15, loras_dir):
    model, _ = sd15
    data = (loras_dir / LCM_SD15).read_bytes()
    (loras_dir / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    (loras_dir / "garbage.safetensors").write_bytes(bytes(range(256)) * 64)
    for name in ("truncated.safetensors", "garbage.safetensors"):
        with pytest.raises(ValueError, match=f"lora_name: cannot read {name} .*truncated or corrupt"):
            _fuse(node, model, name)


def test_a_file_that_is_not_a_lora(node, sd15, loras_dir):
    model, _ = sd15
    name = _write(loras_dir, "checkpoint.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(4, 320)})
    with pytest.raises(ValueError, match="checkpoint.safetensors is not a LoRA: none of its 1 tensors"):
        _fuse(node, model, name)


def test_a_lora_whose_keys_match_nothing(node, sd15, loras_dir):
    model, _ = sd15
    sd = {}
    for i in range(3):
        sd[f"lora_transformer_single_blocks_{i}_linear1.lora_down.weight"] = torch.zeros(4, 3072)
        sd[f"lora_transformer_single_blocks_{i}_linear1.lora_up.weight"] = torch.zeros(3072, 4)
    name = _write(loras_dir, "flux-like.safetensors", sd)
    with pytest.raises(
        ValueError, match="none of the 3 LoRA keys of flux-like.safetensors match a layer of this SD1.x"
    ):
        _fuse(node, model, name)


def test_a_text_encoder_only_lora_needs_the_clip(node, sd15, loras_dir):
    model, clip = sd15
    sd = {k: v for k, v in _kohya_sd15(loras_dir).items() if k.startswith("lora_te_")}
    name = _write(loras_dir, "te-only.safetensors", sd)
    with pytest.raises(ValueError, match="only patches the text encoder \\(72 LoRA keys\\)"):
        _fuse(node, model, name)
    new_model, new_clip = _fuse(node, model, name, fuse=False, sampling="keep", clip=clip)
    assert new_clip is not clip and len(new_clip.patcher.patches) == 72 and not new_model.patches


def test_partial_matches_above_the_tolerance_are_refused_with_the_count(node, sd15, loras_dir):
    model, _ = sd15
    name = _write(loras_dir, "partial.safetensors", _rename_modules(_kohya_sd15(loras_dir), 30))
    with pytest.raises(ValueError, match="only 88 of the 118 LoRA keys of partial.safetensors fit") as err:
        _fuse(node, model, name)
    assert "30 match no layer and 0 have another shape" in str(err.value)
    assert "lora_unet_gone_0" in str(err.value)


def test_wrong_shapes_count_as_leftovers(node, sd15, loras_dir):
    model, _ = sd15
    sd = _kohya_sd15(loras_dir)
    downs = sorted(k for k in sd if k.startswith("lora_unet_") and "attn1_to_q.lora_down" in k)
    assert len(downs) >= 3
    for k in downs[:3]:
        sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] + 8, dtype=sd[k].dtype)
    name = _write(loras_dir, "misfit.safetensors", sd)
    with pytest.raises(ValueError, match="0 match no layer and 3 have another shape"):
        _fuse(node, model, name)


def test_a_leftover_within_the_tolerance_is_skipped_with_a_warning(node, sd15, loras_dir, caplog):
    model, _ = sd15
    name = _write(loras_dir, "nearly.safetensors", _rename_modules(_kohya_sd15(loras_dir), 2))  # 2 of 118 <= 2 %
    with caplog.at_level(logging.INFO, logger="turbostream"):
        new_model, _ = _fuse(node, model, name, fuse=False)
    assert len(new_model.patches) == 116
    [record] = [r for r in caplog.records if "LoRA keys" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "applied 116 of 118 LoRA keys" in record.getMessage()
    assert "skipped 2 that do not fit: lora_unet_gone_0, lora_unet_gone_1" in record.getMessage()


def test_tensors_that_are_not_lora_weights_are_ignored_with_a_warning(node, sd15, loras_dir, caplog):
    model, _ = sd15
    sd = {**_kohya_sd15(loras_dir), "emb_params": torch.zeros(2, 768)}  # e.g. a bundled embedding
    name = _write(loras_dir, "with-embedding.safetensors", sd)
    with caplog.at_level(logging.INFO, logger="turbostream"):
        new_model, _ = _fuse(node, model, name, fuse=False)
    assert len(new_model.patches) == 118
    assert any("ignored 1 tensors that are not LoRA weights: ['emb_params']" in r.getMessage() for r in caplog.records)
