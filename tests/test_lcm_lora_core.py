"""LCM-LoRA core (pure torch): LoRA layouts and base detection, the match policy, the fused-weight cache."""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

from turbostream import lcm_lora as core
from turbostream import tiny_models

RANK = 4


def _kohya(name: str, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{name}.lora_up.weight": (out_dim, RANK),
        f"{name}.lora_down.weight": (RANK, in_dim),
        f"{name}.alpha": (),
    }


ATTN2 = "down_blocks_0_attentions_0_transformer_blocks_0_attn2"


# -- layouts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,expected",
    [
        ("lora_unet_x_attn2_to_k.lora_down.weight", ("lora_unet_x_attn2_to_k", ".lora_down.weight")),
        ("unet.a.attn1.processor.to_q_lora.up.weight", ("unet.a.attn1.processor.to_q", "_lora.up.weight")),
        ("unet.a.proj_in.lora.down.weight", ("unet.a.proj_in", ".lora.down.weight")),
        ("a.to_k.lora_A.weight", ("a.to_k", ".lora_A.weight")),
        ("a.to_k.lora_A.default.weight", ("a.to_k", ".lora_A.default.weight")),
        ("a.to_k.lora_B", ("a.to_k", ".lora_B")),
        ("lycoris_a.hada_w1_b", ("lycoris_a", ".hada_w1_b")),
        ("lora_unet_a.lokr_w2_a", ("lora_unet_a", ".lokr_w2_a")),
        ("x.alpha", ("x", ".alpha")),
        ("diffusion_model.out.2.diff_b", ("diffusion_model.out.2", ".diff_b")),
        ("model.diffusion_model.input_blocks.0.0.weight", None),
        (".alpha", None),
    ],
)
def test_split_lora_key_takes_the_longest_known_suffix(key, expected):
    assert core.split_lora_key(key) == expected


def test_lora_modules_groups_tensors_and_lists_foreign_keys():
    sd = {**_kohya("lora_unet_a", 320, 768), "emb_params": (2, 768)}
    modules, foreign = core.lora_modules(sd)
    assert modules == {"lora_unet_a": {".lora_up.weight": (320, RANK), ".lora_down.weight": (RANK, 768), ".alpha": ()}}
    assert foreign == ["emb_params"]
    # tensors work as well as shapes
    modules_t, _ = core.lora_modules({"m.lora_A.weight": torch.zeros(4, 8), "m.lora_B.weight": torch.zeros(16, 4)})
    assert modules_t == {"m": {".lora_A.weight": (4, 8), ".lora_B.weight": (16, 4)}}


@pytest.mark.parametrize(
    "tensors,expected",
    [
        ({".lora_up.weight": (320, 4), ".lora_down.weight": (4, 768), ".alpha": ()}, (320, 768)),
        ({".lora_up.weight": (320, 4, 1, 1), ".lora_down.weight": (4, 320, 3, 3)}, (320, 320 * 9)),
        ({".lora_B.weight": (640, 8), ".lora_A.weight": (8, 2048)}, (640, 2048)),
        (
            {".hada_w1_a": (320, 4), ".hada_w1_b": (4, 1024), ".hada_w2_a": (320, 4), ".hada_w2_b": (4, 1024)},
            (320, 1024),
        ),
        ({".lokr_w1": (4, 8), ".lokr_w2": (80, 96)}, (320, 768)),
        ({".lokr_w1_a": (4, 2), ".lokr_w1_b": (2, 8), ".lokr_w2_a": (80, 2), ".lokr_w2_b": (2, 256)}, (320, 2048)),
        ({".diff": (320, 768)}, (320, 768)),
        (
            {".lora_up.weight": (320, 4, 1, 1), ".lora_down.weight": (4, 320, 1, 1), ".lora_mid.weight": (4, 4, 3, 3)},
            None,
        ),
        ({".oft_blocks": (4, 80, 80)}, None),
    ],
    ids=["lora", "lora-conv", "peft", "loha", "lokr", "lokr-factored", "diff", "tucker", "oft"],
)
def test_module_delta_shape(tensors, expected):
    assert core.module_delta_shape(tensors) == expected


def test_fits_compares_output_and_flattened_input():
    lora = {".lora_up.weight": (320, 4), ".lora_down.weight": (4, 768)}
    assert core.fits((320, 768), lora)
    assert not core.fits((320, 2048), lora)  # SDXL-width cross attention
    assert not core.fits((768, 320), lora)  # same number of elements, transposed: the host would reshape silently
    conv = {".lora_up.weight": (320, 4, 1, 1), ".lora_down.weight": (4, 320, 3, 3)}
    assert core.fits((320, 320, 3, 3), conv) and not core.fits((320, 320, 1, 1), conv)
    assert core.fits((7, 7), {".oft_blocks": (1, 7, 7)})  # unknown format: not refused here


# -- base detection --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sd,expected",
    [
        (_kohya(f"lora_unet_{ATTN2}_to_k", 320, 768), core.BASE_SD1),
        (_kohya("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v", 320, 1024), core.BASE_SD2),
        (
            {
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": (4, 2048),
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": (640, 4),
            },
            core.BASE_SDXL,
        ),
        (
            {
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight": (4, 1280),
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight": (640, 4),
            },
            core.BASE_SDXL_REFINER,
        ),
        ({f"lycoris_{ATTN2}_to_k.hada_w1_a": (320, 4), f"lycoris_{ATTN2}_to_k.hada_w1_b": (4, 768)}, core.BASE_SD1),
        ({f"lora_unet_{ATTN2}_to_k.lokr_w1": (4, 8), f"lora_unet_{ATTN2}_to_k.lokr_w2": (80, 256)}, core.BASE_SDXL),
        (_kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280), core.BASE_SDXL),
        (_kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024), core.BASE_SD2),
        (_kohya("text_encoder.text_model.encoder.layers.0.mlp.fc1", 3072, 768), core.BASE_SD1),
        (_kohya("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320), None),  # nothing to tell it from
        ({"lora_unet_x.lora_up.weight": (320, 4)}, None),
    ],
    ids=[
        "kohya-sd1",
        "ldm-sd2",
        "diffusers-sdxl",
        "peft-refiner",
        "loha",
        "lokr",
        "te2",
        "te-sd2",
        "te-sd1",
        "resnet",
        "half",
    ],
)
def test_detect_lora_base_from_shapes(sd, expected):
    assert core.detect_lora_base(sd) == expected


def test_the_text_encoder_fc2_width_is_not_mistaken_for_the_hidden_width():
    sd = _kohya("lora_te_text_model_encoder_layers_0_mlp_fc2", 768, 3072)
    sd.update(_kohya("lora_te_text_model_encoder_layers_0_self_attn_k_proj", 768, 768))
    assert core.detect_lora_base(sd) == core.BASE_SD1


def test_cross_attention_width_wins_over_the_file_name_and_the_majority_decides():
    """The name says sd15, the tensors say SDXL: tensors win (STYLE rule 7)."""
    sd = {}
    for i in range(3):
        sd.update(_kohya(f"lora_unet_sd15_style_{i}_attn2_to_k", 640, 2048))
    sd.update(_kohya("lora_unet_odd_attn2_to_v", 640, 768))
    base, evidence = core.describe_lora_base(core.lora_modules(sd)[0])
    assert base == core.BASE_SDXL and "2048" in evidence


@pytest.mark.parametrize(
    "family,fmt,expected",
    [
        ("sd15", "kohya", core.BASE_SD1),
        ("sd15", "diffusers", core.BASE_SD1),
        ("sdxl", "kohya", core.BASE_SDXL),
        ("sdxl", "diffusers", core.BASE_SDXL),
    ],
)
def test_detect_lora_base_on_the_tiny_lora_files(tiny_models_dir, family, fmt, expected):
    """Files written with the host's own key maps (kohya and diffusers layouts)."""
    from safetensors import safe_open

    path = tiny_models_dir / "loras" / tiny_models.LORA_FILES[(family, fmt)].name
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert core.detect_lora_base(shapes) == expected


def test_base_for_context_dim():
    assert [core.base_for_context_dim(d) for d in (768, 1024, 2048, 1280, 4096, None)] == [
        core.BASE_SD1,
        core.BASE_SD2,
        core.BASE_SDXL,
        core.BASE_SDXL_REFINER,
        None,
        None,
    ]


def test_is_text_encoder_module():
    assert core.is_text_encoder_module("lora_te1_text_model_encoder_layers_0_mlp_fc1")
    assert core.is_text_encoder_module("text_encoder_2.text_model.encoder.layers.0.mlp.fc1")
    assert not core.is_text_encoder_module("lora_unet_down_blocks_0_attentions_0_proj_in")
    assert not core.is_text_encoder_module("unet.text_encoder_like")


# -- match policy ----------------------------------------------------------------------------------
SD1_DESC = core.describe_model(core.BASE_SD1, "SD15", 768)


def _report(applied: int, unmatched: int = 0, misfit: int = 0, skipped: int = 0) -> core.MatchReport:
    return core.MatchReport(
        applied=[f"lora_unet_a{i}" for i in range(applied)],
        unmatched=[f"lora_unet_u{i}" for i in range(unmatched)],
        misfit=[f"lora_unet_m{i}" for i in range(misfit)],
        skipped=[f"lora_te_t{i}" for i in range(skipped)],
    )


def test_a_full_match_is_accepted():
    assert core.match_problem(_report(64), "x.safetensors", core.BASE_SD1, "e", core.BASE_SD1, SD1_DESC) is None
    assert core.match_problem(_report(64), "x.safetensors", None, "e", core.BASE_SD1, SD1_DESC) is None


def test_another_base_is_refused_naming_both_sides_and_the_fix():
    msg = core.match_problem(_report(20, 80), "xl.safetensors", core.BASE_SDXL, "width 2048", core.BASE_SD1, SD1_DESC)
    assert msg.startswith("xl.safetensors is an SDXL LoRA (width 2048), but the model is an SD1.x model (SD15")
    assert "20 of its 100 LoRA keys would land on it" in msg
    assert "Pick a LoRA made for SD1.x (for LCM: lcm-lora-sdv1-5.safetensors), or load an SDXL checkpoint." in msg
    # even a LoRA whose names all happen to match is refused when its base differs
    assert core.match_problem(_report(50), "xl.safetensors", core.BASE_SDXL, "w", core.BASE_SD1, SD1_DESC) is not None
    reverse = core.match_problem(
        _report(10, 50), "sd.safetensors", core.BASE_SD1, "w", core.BASE_SDXL, core.describe_model("SDXL", "SDXL", 2048)
    )
    assert "for LCM: lcm-lora-sdxl.safetensors" in reverse and "load an SD1.x checkpoint" in reverse


def test_nothing_matching_is_refused():
    msg = core.match_problem(_report(0, 12), "flux.safetensors", None, "no layers", core.BASE_SD1, SD1_DESC)
    assert "none of the 12 LoRA keys of flux.safetensors match a layer of this SD1.x model" in msg
    assert "a LoRA of unknown base (no layers)" in msg and "lora_unet_u0" in msg


def test_text_encoder_only_lora_without_clip_is_refused():
    msg = core.match_problem(_report(0, skipped=5), "te.safetensors", core.BASE_SD1, "e", core.BASE_SD1, SD1_DESC)
    assert "only patches the text encoder (5 LoRA keys)" in msg and "connect the CLIP" in msg


def test_partial_match_tolerance_boundary():
    # 2 % of 100 = 2 leftovers allowed, 3 refused; the count is in the message
    assert core.match_problem(_report(98, 1, 1), "p.safetensors", core.BASE_SD1, "e", core.BASE_SD1, SD1_DESC) is None
    msg = core.match_problem(_report(97, 2, 1), "p.safetensors", core.BASE_SD1, "e", core.BASE_SD1, SD1_DESC)
    assert "only 97 of the 100 LoRA keys of p.safetensors fit this SD1.x model" in msg
    assert "2 match no layer and 1 have another shape" in msg and "(2 of 100)" in msg
    # small LoRAs get no leftovers at all
    assert core.match_problem(_report(40, 1), "s.safetensors", None, "e", core.BASE_SD1, SD1_DESC) is not None
    assert _report(49, 1).allowed_rejects() == 1 and _report(48, 1).allowed_rejects() == 0


def test_applied_message():
    msg = core.applied_message("l.safetensors", _report(63, 1, skipped=12), {"model": 63, "clip": 0})
    assert msg.startswith("l.safetensors: applied 63 of 64 LoRA keys (model 63, clip 0)")
    assert "skipped 1 that do not fit: lora_unet_u0" in msg and "12 text-encoder keys unused" in msg
    assert core.applied_message("l", _report(3), {"model": 3}) == "l: applied 3 of 3 LoRA keys (model 3)"


# -- fused-weight cache ----------------------------------------------------------------------------
class Owner:
    """Stands in for the host's BaseModel: any weak-referenceable object."""


def _weights(value: float) -> core.FusedWeights:
    return {"w": torch.nn.Parameter(torch.full((2,), value), requires_grad=False)}


def test_cache_computes_once_per_owner_and_key():
    cache, owner, calls = core.FusedWeightCache(max_entries=4), Owner(), []

    def compute():
        calls.append(1)
        return _weights(len(calls))

    first, computed = cache.get_or_compute(("k", 1.0), owner, compute)
    again, computed_again = cache.get_or_compute(("k", 1.0), owner, compute)
    assert computed and not computed_again and again is first
    assert (cache.computations, cache.hits, len(calls)) == (1, 1, 1)
    other, computed_other = cache.get_or_compute(("k", 0.5), owner, compute)  # another strength
    assert computed_other and other["w"][0] == 2
    _, computed_new_owner = cache.get_or_compute(("k", 1.0), Owner(), compute)  # same key, another model
    assert computed_new_owner and cache.computations == 3


def test_cache_evicts_the_least_recently_used():
    cache, owner = core.FusedWeightCache(max_entries=2), Owner()
    cache.get_or_compute("a", owner, lambda: _weights(1))
    cache.get_or_compute("b", owner, lambda: _weights(2))
    cache.get_or_compute("a", owner, lambda: _weights(9))  # touch a: b is now the oldest
    cache.get_or_compute("c", owner, lambda: _weights(3))
    assert len(cache) == 2
    assert cache.get_or_compute("a", owner, lambda: _weights(9))[1] is False
    assert cache.get_or_compute("b", owner, lambda: _weights(2))[1] is True  # evicted, computed again


def test_cache_drops_entries_when_their_owner_is_collected():
    cache, owner = core.FusedWeightCache(max_entries=4), Owner()
    cache.get_or_compute("a", owner, lambda: _weights(1))
    cache.get_or_compute("b", owner, lambda: _weights(2))
    keep = Owner()
    cache.get_or_compute("a", keep, lambda: _weights(3))
    assert len(cache) == 3
    del owner
    gc.collect()
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0 and cache.computations == 3


def test_cache_rejects_a_zero_size():
    with pytest.raises(ValueError, match="at least 1"):
        core.FusedWeightCache(max_entries=0)


def test_stable_uuid_is_a_function_of_the_key():
    assert core.stable_uuid(("a", 1.0)) == core.stable_uuid(("a", 1.0))
    assert core.stable_uuid(("a", 1.0)) != core.stable_uuid(("a", 0.5))


def test_file_identity_changes_when_the_file_does(tmp_path):
    path = tmp_path / "l.safetensors"
    path.write_bytes(b"1234")
    first = core.file_identity(path)
    assert first == core.file_identity(path) and first[1] == 4
    path.write_bytes(b"12345")
    os.utime(path, ns=(time.time_ns(), first[2] + 1_000_000))
    assert core.file_identity(path) != first


def test_fuse_workspace_bytes():
    assert core.fuse_workspace_bytes([10, 1000, 7]) == core.FUSE_WORKSPACE_FACTOR * 4 * 1000
    assert core.fuse_workspace_bytes([]) == 0
