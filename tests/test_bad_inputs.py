"""Every TurboStream node against every class of bad value that applies to it, in the real host.

One table of cases (node, input, bad value, expected outcome). Each case is queued with ``POST /prompt``
and must end cleanly: an HTTP 400 whose ``node_errors`` names the node (and the input), or an
``execution_error`` whose ``exception_message`` reads ``<node id>: <input>: ...``. After every case that
reached execution a small known-good prompt must still succeed (nothing stuck, no state poisoned).

Classes of bad value: empty (strings, latent batches), wrong type (a string for a number, a link to
another socket type, a number for a file name), out of range (also NaN, and values arriving over a
link, which the host never range-checks), wrong channels and sizes (a 1-pixel, 60x60 or RGBA image, a
16-channel or 5-D latent), wrong model family (flow-matching sampling, an SDXL UNet, a 16-channel tiny
VAE, LoRAs for SDXL or SD2 on SD1.5, an SD1.5 LoRA on SD2), corrupt files (garbage and truncated
``.safetensors`` written into ``loras/``, ``vae_approx/``, ``vae/`` and ``turbostream_features/``).

Second table: path-like values for every input that names a file (model, LoRA, VAE and feature-network
names, the distiller's LoRA save name, the live output's filename prefix) must never resolve outside the
host's folders: nothing is created outside them, and sentinel model files planted just outside are never
read (each is a valid file of its kind, checked by loading it from inside its folder, so a lookup that
escaped would succeed). The host 0.3.75 does not check V3 combo values at ``/prompt``, so those cases
end at execution (a newer host answers 400; both are accepted where marked ``either``).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from reliability import record
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from turbostream import add_distill as add_distill_core
from turbostream import tiny_models

TOKEN = f"bi{uuid.uuid4().hex[:6]}"
"""In the name of every file this module writes (and of every path-like value), to find them again."""
SD15 = tiny_models.CHECKPOINTS["sd15"].name
BUILTIN_VIT = "tiny-vit (built-in, random weights: tests only)"
LCM_SD15 = "lcm-lora-sdv1-5.safetensors"
SDXL_LORA = tiny_models.LORA_FILES[("sdxl", "kohya")].name
SD15_LORA = tiny_models.LORA_FILES[("sd15", "kohya")].name
UNET_PREFIX = "model.diffusion_model."
HISTORY_TIMEOUT_S = 120.0
GARBAGE = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
"""A safetensors header length followed by something that is not a JSON header."""

# files this module writes (names relative to the host's models / input folders)
TAEF1 = f"taef1_{TOKEN}"  # a 16-channel tiny VAE pair (vae_approx), "taef1" by name
DECODER_ONLY = f"{TOKEN}-dec"  # a lone decoder (vae_approx)
ENCODER_ONLY = f"{TOKEN}-enc"  # a lone encoder (vae_approx)
SD21_UNET = f"{TOKEN}-sd21-unet.safetensors"  # diffusion_models
SDXL_UNET = f"{TOKEN}-sdxl-unet.safetensors"  # diffusion_models
SD2_LORA = f"{TOKEN}-sd2-shaped-lora.safetensors"  # loras: SD1.5 keys with SD2's 1024-wide cross-attention
NOT_A_LORA = f"{TOKEN}-taesd-as-lora.safetensors"  # loras: tiny VAE weights
BROKEN = f"{TOKEN}-broken.safetensors"  # garbage, in loras, vae, turbostream_features; broken_decoder in vae_approx
TRUNCATED = f"{TOKEN}-truncated.safetensors"  # half of a real file, in loras and vae_approx (_decoder)
# single files in vae/: the loader lists only names that say "tiny"/"taesd"/"taef1" (newer hosts refuse an
# unlisted combo value at /prompt, so these names must be listed for the node itself to run)
TINY_BROKEN = f"{TOKEN}-tiny-broken.safetensors"  # garbage
TINY_KL = f"{TOKEN}-tiny-kl.safetensors"  # a full-size KL-VAE key layout under a tiny name
FEATURES = "turbostream_features"
SENTINEL = f"{TOKEN}-sentinel"
"""Model files planted outside the model folders (next to them and in the base directory): never read."""


# -- graphs ------------------------------------------------------------------------------------------
def _base() -> dict:
    """Shared nodes; only those a case's output reaches are validated and run (cached across prompts)."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "png": {"class_type": "LoadImage", "inputs": {"image": "turbostream_example.png"}},
        "img": _scale(64),
        "img60": _scale(60),
        "img32": _scale(32),
        "img1": _scale(1),
        "img2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["img", 0], "amount": 2}},
        "alpha": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "rgba": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["img", 0], "alpha": ["alpha", 0]}},
        "tvae": _tiny_vae("vae_approx/taesd"),
        "tvae16": _tiny_vae(f"vae_approx/{TAEF1}"),
        "tvae_dec": _tiny_vae(f"vae_approx/{DECODER_ONLY}", "taesd"),
        "tvae_enc": _tiny_vae(f"vae_approx/{ENCODER_ONLY}", "taesd"),
        "lat16": {"class_type": "TurboStreamTinyVAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["tvae16", 0]}},
        "lat_empty": {"class_type": "LoadLatent", "inputs": {"latent": f"{TOKEN}-empty.latent"}},
        "lat_5d": {"class_type": "LoadLatent", "inputs": {"latent": f"{TOKEN}-5d.latent"}},
        "flow": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["ckpt", 0], "shift": 3.0}},
        "sd21": {"class_type": "UNETLoader", "inputs": {"unet_name": SD21_UNET, "weight_dtype": "default"}},
        "sdxl": {"class_type": "UNETLoader", "inputs": {"unet_name": SDXL_UNET, "weight_dtype": "default"}},
        "int0": {"class_type": "PrimitiveInt", "inputs": {"value": 0}},
        "int_huge": {"class_type": "PrimitiveInt", "inputs": {"value": 1 << 20}},
        "str_path": {"class_type": "PrimitiveString", "inputs": {"value": f"../{TOKEN}-linked"}},
    }


def _scale(size: int) -> dict:
    return {
        "class_type": "ImageScale",
        "inputs": {"image": ["png", 0], "upscale_method": "bilinear", "width": size, "height": size, "crop": "center"},
    }


def _tiny_vae(name: str, family: str = "auto") -> dict:
    return {"class_type": "TurboStreamTinyVAELoader", "inputs": {"vae_name": name, "latent_family": family}}


def _stream_inputs(**extra) -> dict:
    return {
        "model": ["ckpt", 0],
        "positive": ["pos", 0],
        "vae": ["tvae", 0],
        "t_index_list": "32,45",
        "cfg_type": "none",
        "guidance": 1.2,
        "delta": 1.0,
        "frame_buffer_size": 1,
        "add_noise": False,
        "seed": 7,
        "index_mode": "lcm_index",
        **extra,
    }


FILTER = {"similarity_threshold": 0.0, "max_skip_frames": 10}
GOOD_INPUTS: dict[str, dict] = {
    "TurboStreamADDSampler": {
        "model": ["ckpt", 0],
        "positive": ["pos", 0],
        "latent_image": ["lat", 0],
        "seed": 0,
        "steps": 1,
        "schedule": "stability",
        "timesteps": "999,499",
        "denoise": 1.0,
        "update": "ancestral",
        "cfg": 1.0,
    },
    "TurboStreamADDScheduler": {
        "model": ["ckpt", 0],
        "steps": 1,
        "schedule": "stability",
        "timesteps": "999",
        "denoise": 1.0,
    },
    "TurboStreamRenoiseSampler": {},
    "TurboStreamTinyVAELoader": {"vae_name": "vae_approx/taesd", "latent_family": "auto"},
    "TurboStreamTinyVAEDecode": {"samples": ["lat", 0], "vae": ["tvae", 0]},
    "TurboStreamTinyVAEEncode": {"pixels": ["img", 0], "vae": ["tvae", 0]},
    "TurboStreamLCMLoRAFuse": {
        "model": ["ckpt", 0],
        "lora_name": LCM_SD15,
        "strength_model": 1.0,
        "strength_clip": 1.0,
        "fuse": False,
        "sampling": "lcm",
    },
    "TurboStreamStreamImg2Img": _stream_inputs(images=["img", 0], **FILTER),
    "TurboStreamStreamTxt2Img": _stream_inputs(width=64, height=64, frames=1),
    "TurboStreamLiveImg2Img": _stream_inputs(image=["img", 0], stream_id=f"{TOKEN}-live", **FILTER),
    "TurboStreamConditioningBlend": {
        "conditioning_a": ["pos", 0],
        "conditioning_b": ["neg", 0],
        "weight": 0.5,
        "method": "slerp",
    },
    "TurboStreamLiveInput": {"stream_id": f"{TOKEN}-in", "width": 64, "height": 64, "fps": 10, "max_in_flight": 2},
    "TurboStreamLiveOutput": {
        "images": ["img", 0],
        "stream_id": f"{TOKEN}-out",
        "save_every": 0,
        "filename_prefix": f"{TOKEN}/live",
        "quality": 85,
    },
    "TurboStreamADDDistill": {
        "model": ["ckpt", 0],
        "clip": ["ckpt", 1],
        "vae": ["ckpt", 2],
        "images": ["img", 0],
        "prompts": "a red fox",
        "steps": 1,
        "learning_rate": 1e-3,
        "lora_rank": 2,
        "distill_weight": 2.5,
        "feature_network": BUILTIN_VIT,
        "seed": 0,
        "save_name": f"{TOKEN}-never",
        "batch_size": 1,
        "discriminator_lr": 1e-3,
        "adversarial_weight": 1.0,
        "r1_weight": 1e-5,
        "student_timesteps": "999,749,499,249",
        "teacher_cfg": 1.0,
    },
}
OUTPUT_NODES = {"TurboStreamLiveOutput", "TurboStreamADDDistill"}


def case_graph(node: str, change: dict) -> dict:
    """The base nodes, node ``T`` (``node`` with good inputs updated by ``change``) and a sink."""
    wf = _base()
    wf["T"] = {"class_type": node, "inputs": {**GOOD_INPUTS[node], **change}}
    if node == "TurboStreamRenoiseSampler":  # a SAMPLER runs inside SamplerCustom
        wf["sigmas"] = {
            "class_type": "BasicScheduler",
            "inputs": {"model": ["flow", 0], "scheduler": "simple", "steps": 1, "denoise": 1.0},
        }
        wf["sc"] = {
            "class_type": "SamplerCustom",
            "inputs": {
                "model": change.get("_model", ["ckpt", 0]),
                "add_noise": True,
                "noise_seed": 0,
                "cfg": 1.0,
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "sampler": ["T", 0],
                "sigmas": ["sigmas", 0],
                "latent_image": ["lat", 0],
            },
        }
        wf["T"]["inputs"].pop("_model", None)
        wf["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sc", 0]}}
    elif node not in OUTPUT_NODES:
        wf["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["T", 0]}}
    return wf


def good_graph(seed: int) -> dict:
    """64x64, one ADD step on the tiny SD1.5 model, tiny VAE decode: a new seed is a new computation."""
    wf = case_graph("TurboStreamADDSampler", {"seed": seed})
    wf["dec"] = {"class_type": "TurboStreamTinyVAEDecode", "inputs": {"samples": ["T", 0], "vae": ["tvae", 0]}}
    wf["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["dec", 0]}}
    return wf


# -- the table -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    node: str
    input: str
    change: dict
    expect: str
    """``400``, ``error`` (execution_error) or ``either`` (a V3 combo value: newer hosts answer 400)."""
    fragment: str = ""
    """Also in the error text, where the exact wording matters."""
    raised_by: str | None = None
    """The node whose execution fails, when not ``node`` (a SAMPLER fails inside SamplerCustom)."""
    extra: dict = field(default_factory=dict)


def _cases(node: str, rows: list[tuple]) -> list[Case]:
    short = node.removeprefix("TurboStream")
    out = []
    for row in rows:
        what, name, change, expect, *rest = row
        fragment = rest[0] if rest else ""
        out.append(Case(f"{short}-{name}-{what}", node, name, change, expect, fragment))
    return out


LINK_INT0, LINK_HUGE, LINK_PATH = ["int0", 0], ["int_huge", 0], ["str_path", 0]
STREAM_ROWS = [
    ("empty", "t_index_list", {"t_index_list": ""}, "400", "empty"),
    ("not-increasing", "t_index_list", {"t_index_list": "45,32"}, "400", "strictly increasing"),
    ("not-a-number", "t_index_list", {"t_index_list": "a,b"}, "400", "not an integer"),
    ("out-of-grid", "t_index_list", {"t_index_list": "32,99"}, "400", "outside 0-49"),
    ("unknown", "index_mode", {"index_mode": "raw"}, "400"),
    ("unknown", "cfg_type", {"cfg_type": "cfg++"}, "either"),
    ("over-max", "guidance", {"guidance": 100.0}, "400"),
    ("nan", "guidance", {"guidance": "nan"}, "error"),
    ("over-max", "delta", {"delta": 10.0}, "400"),
    ("zero", "frame_buffer_size", {"frame_buffer_size": 0}, "400"),
    ("string", "frame_buffer_size", {"frame_buffer_size": "two"}, "400"),
    ("linked-zero", "frame_buffer_size", {"frame_buffer_size": LINK_INT0}, "error"),
    ("negative", "seed", {"seed": -1}, "400"),
    ("wrong-link", "positive", {"positive": ["lat", 0]}, "400"),
    ("wrong-link", "vae", {"vae": ["ckpt", 0]}, "400"),
    ("16-channel-tiny-vae", "vae", {"vae": ["tvae16", 0]}, "error", "16-channel latents"),
    ("flow-matching", "model", {"model": ["flow", 0]}, "error", "flow-matching"),
    ("cfg-full-without", "negative", {"cfg_type": "full"}, "error", "needs a negative"),
]
FILTER_ROWS = [
    ("over-max", "similarity_threshold", {"similarity_threshold": 2.0}, "400"),
    ("negative", "max_skip_frames", {"max_skip_frames": -1}, "400"),
]
FEEDBACK_ROWS = [
    ("over-max", "feedback", {"feedback": 2.0}, "400"),
    ("nan", "feedback", {"feedback": "nan"}, "error"),
]

CASES: list[Case] = [
    *_cases(
        "TurboStreamADDSampler",
        [
            ("string", "steps", {"steps": "many"}, "400"),
            ("negative", "steps", {"steps": -1}, "400", "steps must be between 1 and 8"),
            ("over-max", "steps", {"steps": 100}, "400", "steps must be between 1 and 8"),
            ("linked-zero", "steps", {"steps": LINK_INT0}, "error", "steps must be between 1 and 8"),
            ("over-max", "denoise", {"denoise": 5.0}, "400", "denoise must be between"),
            ("string", "denoise", {"denoise": "lots"}, "400"),
            ("nan", "denoise", {"denoise": "nan"}, "400", "denoise must be between"),
            ("negative", "seed", {"seed": -1}, "400"),
            ("over-max", "cfg", {"cfg": 1000.0}, "400"),
            ("nan", "cfg", {"cfg": "nan", "negative": ["neg", 0]}, "error"),
            ("unknown", "schedule", {"schedule": "karras"}, "400", "unknown schedule"),
            ("number", "schedule", {"schedule": 3}, "400", "unknown schedule"),
            ("empty", "timesteps", {"schedule": "custom", "timesteps": ""}, "400"),
            ("not-a-number", "timesteps", {"schedule": "custom", "timesteps": "999,abc"}, "400"),
            ("unknown", "update", {"update": "euler"}, "either"),
            ("wrong-link", "model", {"model": ["ckpt", 1]}, "400"),
            ("wrong-link", "positive", {"positive": ["ckpt", 1]}, "400"),
            ("wrong-link", "latent_image", {"latent_image": ["pos", 0]}, "400"),
            ("empty-batch", "latent_image", {"latent_image": ["lat_empty", 0]}, "error", "empty"),
            ("16-channels", "latent_image", {"latent_image": ["lat16", 0]}, "error", "has 16 channels"),
            ("5d", "latent_image", {"latent_image": ["lat_5d", 0]}, "error"),
            ("flow-matching", "model", {"model": ["flow", 0]}, "error", "flow-matching"),
            ("cfg-without", "negative", {"cfg": 2.0}, "error", "needs a negative"),
        ],
    ),
    *_cases(
        "TurboStreamADDScheduler",
        [
            ("zero", "steps", {"steps": 0}, "400"),
            ("string", "steps", {"steps": "one"}, "400"),
            ("negative", "denoise", {"denoise": -0.5}, "400"),
            ("unknown", "schedule", {"schedule": "karras"}, "400"),
            ("increasing", "timesteps", {"schedule": "custom", "timesteps": "500,999"}, "400"),
            ("wrong-link", "model", {"model": ["tvae", 0]}, "400"),
            ("flow-matching", "model", {"model": ["flow", 0]}, "error", "flow-matching"),
        ],
    ),
    Case(
        "RenoiseSampler-model-flow-matching",
        "TurboStreamRenoiseSampler",
        "model",
        {"_model": ["flow", 0]},
        "error",
        "flow-matching",
        raised_by="SamplerCustom",
    ),
    *_cases(
        "TurboStreamTinyVAELoader",
        [
            ("empty", "vae_name", {"vae_name": ""}, "either"),
            ("number", "vae_name", {"vae_name": 7}, "either"),
            ("missing", "vae_name", {"vae_name": "vae_approx/missing"}, "either"),
            ("unknown", "latent_family", {"latent_family": "taesd9"}, "either"),
            ("wrong-family", "vae_name", {"latent_family": "taef1"}, "error", "16"),
            ("corrupt", "vae_name", {"vae_name": f"vae_approx/{TOKEN}-broken"}, "error", "corrupt or truncated"),
            ("truncated", "vae_name", {"vae_name": f"vae_approx/{TOKEN}-truncated"}, "error", "corrupt or truncated"),
            ("corrupt-single-file", "vae_name", {"vae_name": f"vae/{TINY_BROKEN}"}, "error", "corrupt or truncated"),
            ("full-size-vae", "vae_name", {"vae_name": f"vae/{TINY_KL}"}, "error", "not a TAESD"),
            ("unlisted-vae", "vae_name", {"vae_name": "vae/sd-vae-random.safetensors"}, "either"),
        ],
    ),
    *_cases(
        "TurboStreamTinyVAEDecode",
        [
            ("wrong-link", "samples", {"samples": ["img", 0]}, "400"),
            ("wrong-link", "vae", {"vae": ["ckpt", 0]}, "400"),
            ("empty-batch", "samples", {"samples": ["lat_empty", 0]}, "error", "empty"),
            ("16-channels", "samples", {"samples": ["lat16", 0]}, "error", "has 16 channels"),
            ("5d", "samples", {"samples": ["lat_5d", 0]}, "error", "expected image latents"),
            ("16-channel-vae", "samples", {"vae": ["tvae16", 0]}, "error", "takes 16"),
            ("no-decoder", "vae", {"vae": ["tvae_enc", 0]}, "error", "has no decoder"),
        ],
    ),
    *_cases(
        "TurboStreamTinyVAEEncode",
        [
            ("wrong-link", "pixels", {"pixels": ["lat", 0]}, "400"),
            ("wrong-link", "vae", {"vae": ["ckpt", 1]}, "400"),
            ("1-pixel", "pixels", {"pixels": ["img1", 0]}, "error", "at least 8"),
            ("no-encoder", "vae", {"vae": ["tvae_dec", 0]}, "error", "has no encoder"),
        ],
    ),
    *_cases(
        "TurboStreamLCMLoRAFuse",
        [
            ("empty", "lora_name", {"lora_name": ""}, "either"),
            ("number", "lora_name", {"lora_name": 5}, "either"),
            ("missing", "lora_name", {"lora_name": "missing.safetensors"}, "either"),
            ("corrupt", "lora_name", {"lora_name": BROKEN}, "error", "truncated or corrupt"),
            ("truncated", "lora_name", {"lora_name": TRUNCATED}, "error", "truncated or corrupt"),
            ("not-a-lora", "lora_name", {"lora_name": NOT_A_LORA}, "error", "is not a LoRA"),
            ("sdxl-lora-on-sd15", "lora_name", {"lora_name": SDXL_LORA}, "error"),
            ("sd2-lora-on-sd15", "lora_name", {"lora_name": SD2_LORA}, "error"),
            ("sd15-lora-on-sd2", "lora_name", {"model": ["sd21", 0], "lora_name": SD15_LORA}, "error"),
            ("over-max", "strength_model", {"strength_model": 1000.0}, "400"),
            ("string", "strength_model", {"strength_model": "strong"}, "400"),
            ("nan", "strength_model", {"strength_model": "nan"}, "error"),
            ("under-min", "strength_clip", {"strength_clip": -1000.0}, "400"),
            ("unknown", "sampling", {"sampling": "turbo"}, "either"),
            ("wrong-link", "model", {"model": ["ckpt", 2]}, "400"),
            ("wrong-link", "clip", {"clip": ["ckpt", 0]}, "400"),
        ],
    ),
    *_cases(
        "TurboStreamStreamImg2Img",
        [
            *STREAM_ROWS,
            *FILTER_ROWS,
            *FEEDBACK_ROWS,
            ("60x60", "images", {"images": ["img60", 0]}, "error", "multiples of 8"),
            ("1-pixel", "images", {"images": ["img1", 0]}, "error", "multiples of 8"),
            ("wrong-link", "images", {"images": ["lat", 0]}, "400"),
        ],
    ),
    *_cases(
        "TurboStreamStreamTxt2Img",
        [
            *STREAM_ROWS,
            ("not-multiple-of-8", "width", {"width": 60}, "error", "multiples of 8"),
            ("zero", "width", {"width": 0}, "400"),
            ("over-max", "width", {"width": 100000}, "400"),
            ("linked-huge", "width", {"width": LINK_HUGE}, "error"),
            ("string", "height", {"height": "tall"}, "400"),
            ("zero", "frames", {"frames": 0}, "400"),
            ("linked-zero", "frames", {"frames": LINK_INT0}, "error"),
        ],
    ),
    *_cases(
        "TurboStreamLiveImg2Img",
        [
            *STREAM_ROWS,
            *FILTER_ROWS,
            *FEEDBACK_ROWS,
            ("path", "stream_id", {"stream_id": "../etc"}, "400"),
            ("empty", "stream_id", {"stream_id": ""}, "400"),
            ("nul", "stream_id", {"stream_id": "cam\x00"}, "400"),
            ("linked-path", "stream_id", {"stream_id": LINK_PATH}, "error"),
            ("60x60", "image", {"image": ["img60", 0]}, "error", "multiples of 8"),
            ("2-frames-for-1", "image", {"image": ["img2", 0]}, "error", "frame_buffer_size"),
        ],
    ),
    *_cases(
        "TurboStreamConditioningBlend",
        [
            ("over-max", "weight", {"weight": 2.0}, "400"),
            ("nan", "weight", {"weight": "nan"}, "error"),
            ("unknown", "method", {"method": "cubic"}, "either"),
            ("wrong-link", "conditioning_a", {"conditioning_a": ["lat", 0]}, "400"),
            ("wrong-link", "conditioning_b", {"conditioning_b": ["ckpt", 0]}, "400"),
        ],
    ),
    *_cases(
        "TurboStreamLiveInput",
        [
            ("path", "stream_id", {"stream_id": "a/b"}, "400"),
            ("empty", "stream_id", {"stream_id": ""}, "400"),
            ("linked-path", "stream_id", {"stream_id": LINK_PATH}, "error"),
            ("not-multiple-of-8", "width", {"width": 60}, "400"),
            ("zero", "width", {"width": 0}, "400"),
            ("string", "width", {"width": "wide"}, "400"),
            ("over-max", "height", {"height": 100000}, "400"),
            ("linked-huge", "width", {"width": LINK_HUGE}, "error"),
            ("zero", "fps", {"fps": 0}, "400"),
            ("over-max", "max_in_flight", {"max_in_flight": 99}, "400"),
            ("zero", "frames_per_prompt", {"frames_per_prompt": 0}, "400"),
            ("over-max", "frames_per_prompt", {"frames_per_prompt": 9}, "400"),
            ("linked-huge", "frames_per_prompt", {"frames_per_prompt": LINK_HUGE}, "error"),
            ("wrong-link", "fallback", {"fallback": ["lat", 0]}, "400"),
        ],
    ),
    *_cases(
        "TurboStreamLiveOutput",
        [
            ("path", "stream_id", {"stream_id": "../x"}, "400"),
            ("linked-path", "stream_id", {"stream_id": LINK_PATH}, "error"),
            ("wrong-link", "images", {"images": ["lat", 0]}, "400"),
            ("rgba", "images", {"images": ["rgba", 0]}, "error", "(B, H, W, 3)"),
            ("negative", "save_every", {"save_every": -1}, "400"),
            ("over-max", "quality", {"quality": 1000}, "400"),
        ],
    ),
    *_cases(
        "TurboStreamADDDistill",
        [
            ("empty", "prompts", {"prompts": " \n "}, "error", "is empty"),
            ("too-many", "prompts", {"prompts": "one\ntwo"}, "error", "has 2 prompts"),
            ("32x32", "images", {"images": ["img32", 0]}, "error", "at least 64"),
            ("wrong-link", "images", {"images": ["lat", 0]}, "400"),
            ("zero", "steps", {"steps": 0}, "400"),
            ("zero", "lora_rank", {"lora_rank": 0}, "400"),
            ("string", "learning_rate", {"learning_rate": "fast"}, "400"),
            ("nan", "learning_rate", {"learning_rate": "nan"}, "error"),
            ("linked-zero", "batch_size", {"batch_size": LINK_INT0}, "error"),
            ("negative", "seed", {"seed": -1}, "400"),
            ("over-max", "distill_weight", {"distill_weight": 1000.0}, "400"),
            ("negative", "discriminator_lr", {"discriminator_lr": -0.1}, "400"),
            ("nan", "adversarial_weight", {"adversarial_weight": "nan"}, "error"),
            ("over-max", "r1_weight", {"r1_weight": 100.0}, "400"),
            ("under-min", "teacher_cfg", {"teacher_cfg": 0.5}, "400"),
            ("wrong-link", "clip", {"clip": ["ckpt", 2]}, "400"),
            ("decreasing", "student_timesteps", {"student_timesteps": "249,999"}, "400"),
            ("empty", "save_name", {"save_name": ""}, "400"),
            ("linked-path", "save_name", {"save_name": LINK_PATH}, "error", "not a plain file name"),
            ("empty", "feature_network", {"feature_network": ""}, "either"),
            ("number", "feature_network", {"feature_network": 3}, "either"),
            ("corrupt", "feature_network", {"feature_network": BROKEN}, "error", "damaged"),
            ("sdxl-unet", "model", {"model": ["sdxl", 0]}, "error", "SDXL"),
            ("flow-matching", "model", {"model": ["flow", 0]}, "error"),
            ("16-channel-vae", "vae", {"vae": ["tvae16", 0]}, "error", "16-channel latents"),
        ],
    ),
]

# -- path-like names -----------------------------------------------------------------------------------
PATH_VALUES = {
    "parent": "../{s}",
    "grandparent": "../../{s}",
    "backslash": "..\\{s}",
    "absolute": "/etc/passwd",
    "absolute-sentinel": "/tmp/{s}",
    "through-folder": "loras/../../{s}",
    "nul": "{s}\x00.txt",
    "unicode": "ünïcødé-😀-{s}",
}
SAVED = f"{TOKEN}-saved"
NAME_INPUTS = [
    # node, input, value prefix, the sentinel a lookup that escaped would find, expected outcome
    ("TurboStreamTinyVAELoader", "vae_name", "vae/", f"taesd-{SENTINEL}.safetensors", "either"),
    ("TurboStreamTinyVAELoader", "vae_name", "vae_approx/", f"taesd-{SENTINEL}", "either"),
    ("TurboStreamLCMLoRAFuse", "lora_name", "", f"{SENTINEL}.safetensors", "either"),
    ("TurboStreamADDDistill", "feature_network", "", f"{SENTINEL}-vit.safetensors", "either"),
    ("TurboStreamADDDistill", "save_name", "", SAVED, "400"),
    ("TurboStreamLiveOutput", "filename_prefix", "", SAVED, "400"),
]
INSIDE_OUTPUT = {"backslash", "unicode"}
"""File names (on POSIX) that stay inside the output folder: the live output may save under them."""


def _path_case(node: str, name: str, prefix: str, sentinel: str, expect: str, what: str, template: str) -> Case:
    change = {name: prefix + template.format(s=sentinel)}
    if name == "filename_prefix":
        change["save_every"] = 1  # save every frame
        expect = "400|success" if what in INSIDE_OUTPUT else expect
    short = node.removeprefix("TurboStream") + ("-approx" if prefix == "vae_approx/" else "")
    return Case(f"{short}-{name}-{what}", node, name, change, expect)


PATH_CASES = [_path_case(*row, what, template) for row in NAME_INPUTS for what, template in PATH_VALUES.items()] + [
    Case("ADDDistill-save_name-subfolder", "TurboStreamADDDistill", "save_name", {"save_name": f"sub/{SAVED}"}, "400"),
    Case(
        "LiveOutput-filename_prefix-linked",
        "TurboStreamLiveOutput",
        "filename_prefix",
        {"filename_prefix": ["str_saved", 0], "save_every": 1},
        "error",
        extra={"str_saved": {"class_type": "PrimitiveString", "inputs": {"value": f"../../{SAVED}/live"}}},
    ),
]


# -- fixtures ------------------------------------------------------------------------------------------
def _first_half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def files(host, tiny_models_dir):
    """Write every file the cases need (test-unique names), plant the sentinels; remove them all after."""
    models, written = host.models_dir, []

    def put(path: Path, data: bytes | dict | Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif isinstance(data, Path):
            shutil.copyfile(data, path)
        else:
            save_file(data, str(path))
        written.append(path)

    approx = tiny_models_dir / "vae_approx"
    dec = load_file(str(approx / "taesd_decoder.safetensors"))
    enc = load_file(str(approx / "taesd_encoder.safetensors"))
    gen = torch.Generator().manual_seed(0)
    dec16 = {**dec, "1.weight": torch.randn(64, 16, 3, 3, generator=gen).half() * 0.05}
    enc16 = {
        **enc,
        "14.weight": torch.randn(16, 64, 3, 3, generator=gen).half() * 0.05,
        "14.bias": torch.zeros(16).half(),
    }
    put(models / "vae_approx" / f"{TAEF1}_decoder.safetensors", dec16)
    put(models / "vae_approx" / f"{TAEF1}_encoder.safetensors", enc16)
    put(models / "vae_approx" / f"{DECODER_ONLY}_decoder.safetensors", approx / "taesd_decoder.safetensors")
    put(models / "vae_approx" / f"{ENCODER_ONLY}_encoder.safetensors", approx / "taesd_encoder.safetensors")
    put(models / "vae_approx" / f"{TOKEN}-broken_decoder.safetensors", GARBAGE)
    put(
        models / "vae_approx" / f"{TOKEN}-truncated_decoder.safetensors",
        _first_half(approx / "taesd_decoder.safetensors"),
    )
    put(models / "vae" / BROKEN, GARBAGE)
    put(models / "vae" / TINY_BROKEN, GARBAGE)
    put(
        models / "vae" / TINY_KL,
        {
            "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
            "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
            "quant_conv.weight": torch.zeros(8, 8, 1, 1),
        },
    )

    loras = tiny_models_dir / "loras"
    put(models / "loras" / BROKEN, GARBAGE)
    put(models / "loras" / TRUNCATED, _first_half(loras / SD15_LORA))
    put(models / "loras" / NOT_A_LORA, approx / "taesd_decoder.safetensors")
    sd2 = load_file(str(loras / SD15_LORA))  # SD2's cross-attention reads 1024-wide text features
    for key in [k for k in sd2 if ("attn2_to_k" in k or "attn2_to_v" in k) and "lora_down" in k]:
        sd2[key] = torch.randn(sd2[key].shape[0], 1024, generator=gen).half() * 0.01
    put(models / "loras" / SD2_LORA, sd2)
    put(models / FEATURES / BROKEN, GARBAGE)

    for family, name in (("sd21", SD21_UNET), ("sdxl", SDXL_UNET)):
        with safe_open(str(tiny_models_dir / "checkpoints" / tiny_models.CHECKPOINTS[family].name), "pt") as f:
            unet = {k: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
        put(models / "diffusion_models" / name, unet)
        del unet

    put(
        host.input_dir / f"{TOKEN}-empty.latent",
        {"latent_tensor": torch.zeros(0, 4, 8, 8), "latent_format_version_0": torch.tensor([])},
    )
    put(
        host.input_dir / f"{TOKEN}-5d.latent",
        {"latent_tensor": torch.randn(1, 4, 2, 8, 8, generator=gen), "latent_format_version_0": torch.tensor([])},
    )

    # sentinels just outside the folders, each a valid file of its kind (test_the_sentinels_load): a
    # lookup that escaped would load one and succeed instead of failing
    single = {f"encoder.layers.{k}": v for k, v in enc.items()}
    single.update({f"decoder.layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in dec.items()})
    vit = add_distill_core.tiny_vit(9).state_dict()
    for folder in (models, host.base_dir, Path("/tmp")):
        put(folder / f"{SENTINEL}.safetensors", loras / SD15_LORA)
        put(folder / f"taesd-{SENTINEL}.safetensors", single)
        put(folder / f"{SENTINEL}-vit.safetensors", vit)
        for half in ("encoder", "decoder"):
            put(folder / f"taesd-{SENTINEL}_{half}.safetensors", approx / f"taesd_{half}.safetensors")
    yield
    for path in written:
        path.unlink(missing_ok=True)
    shutil.rmtree(host.output_dir / TOKEN, ignore_errors=True)


# -- running a case ------------------------------------------------------------------------------------
def submit(host, wf: dict) -> tuple[str, dict]:
    """``("400", body)``, ``("error", execution_error data)`` or ``("success", history entry)``."""
    status, body = host.post_json("/prompt", {"prompt": wf, "client_id": TOKEN})
    if status == 400:
        return "400", body
    assert status == 200, (status, body)
    prompt_id = body["prompt_id"]
    deadline = time.monotonic() + HISTORY_TIMEOUT_S
    while (entry := host.get_json(f"/history/{prompt_id}").get(prompt_id)) is None:
        assert time.monotonic() < deadline, f"prompt {prompt_id} did not finish in {HISTORY_TIMEOUT_S:.0f} s"
        time.sleep(0.02)
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return "error", data
    assert entry["status"]["status_str"] == "success", entry["status"]
    return "success", entry


_good_seed = iter(range(1, 10**6))


def assert_still_serving(host) -> None:
    kind, data = submit(host, good_graph(next(_good_seed)))
    assert kind == "success", f"the known-good prompt failed after the case: {data}"


def run_case(host, case: Case) -> tuple[str, str]:
    """Queue the case and check that its outcome names the node and input: ``(outcome, error text)``."""
    wf = case_graph(case.node, case.change)
    wf.update(case.extra)
    start = time.perf_counter()
    kind, data = submit(host, wf)
    seconds = time.perf_counter() - start
    errors = data.get("node_errors", {}).get("T") or {} if kind == "400" else {}
    if kind == "400":
        text = " | ".join(f"{e.get('type')}: {e.get('message')}: {e.get('details')}" for e in errors.get("errors", []))
    else:
        text = str(data.get("exception_message", "")).strip() if kind == "error" else ""
    record(
        "bad_inputs", case=case.id, node=case.node, input=case.input, expected=case.expect, outcome=kind,
        message=text[:500], seconds=round(seconds, 3),
    )  # fmt: skip
    allowed = {"either": {"400", "error"}}.get(case.expect, set(case.expect.split("|")))
    assert kind in allowed, f"{case.id}: expected {case.expect}, got {kind}: {str(data)[:3000]}"
    if kind == "400":  # the node's own reasons name the input; a validation that crashed is no reason
        assert errors.get("class_type") == case.node, data
        assert case.input in text and "exception_during" not in text, text
    elif kind == "error":
        assert data.get("node_type") == (case.raised_by or case.node), data
        assert f"{case.node}: {case.input}:" in text, f"{data.get('exception_type')}: {text}"
    assert case.fragment in text, text
    return kind, text


def test_the_table_covers_every_node_and_input(object_info):
    """A new node, or a new input (booleans aside: the host accepts anything as one), needs a case here."""
    nodes = {name for name in object_info if name.startswith("TurboStream")}
    assert nodes == {c.node for c in CASES}, nodes ^ {c.node for c in CASES}
    covered = {(c.node, c.input) for c in CASES + PATH_CASES}
    missing = [
        (node, name)
        for node in sorted(nodes)
        for group in ("required", "optional")
        for name, spec in object_info[node]["input"].get(group, {}).items()
        if spec[0] != "BOOLEAN" and (node, name) not in covered
    ]
    assert not missing, missing


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_value_fails_cleanly_naming_node_and_input(host, files, case):
    kind, _ = run_case(host, case)
    if kind != "400":
        assert_still_serving(host)


SENTINEL_CONTROLS = [
    # node, inputs naming the sentinel, its folder, its files
    ("TurboStreamTinyVAELoader", {"vae_name": f"vae/taesd-{SENTINEL}.safetensors"}, "vae", ["taesd-{s}.safetensors"]),
    (
        "TurboStreamTinyVAELoader",
        {"vae_name": f"vae_approx/taesd-{SENTINEL}"},
        "vae_approx",
        ["taesd-{s}_encoder.safetensors", "taesd-{s}_decoder.safetensors"],
    ),
    ("TurboStreamLCMLoRAFuse", {"lora_name": f"{SENTINEL}.safetensors"}, "loras", ["{s}.safetensors"]),
    (
        "TurboStreamADDDistill",
        {"feature_network": f"{SENTINEL}-vit.safetensors", "save_name": f"{TOKEN}-control"},
        FEATURES,
        ["{s}-vit.safetensors"],
    ),
]


@pytest.mark.parametrize("node,change,folder,names", SENTINEL_CONTROLS, ids=["vae", "vae_approx", "lora", "vit"])
def test_the_sentinels_load(host, files, node, change, folder, names):
    """Control: each sentinel copied into its folder loads and the node succeeds, so a lookup that
    escaped to one (below) could not fail by accident."""
    copies = [host.models_dir / folder / name.format(s=SENTINEL) for name in names]
    try:
        for copy in copies:
            shutil.copyfile(host.base_dir / copy.name, copy)
        kind, data = submit(host, case_graph(node, change))
        assert kind == "success", str(data)[:3000]
    finally:
        for path in [*copies, *(host.models_dir / "loras").glob(f"{TOKEN}-control*")]:
            path.unlink(missing_ok=True)


def _snapshot(host) -> set[str]:
    """Every path under the host's base directory and the host's own folders, top-level names in /etc,
    and what in /tmp carries this module's token."""
    found: set[str] = set()
    for root in (host.base_dir, host.host_dir / "output", host.host_dir / "models"):
        for dirpath, dirnames, filenames in os.walk(root):
            found.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    for root in (Path("/etc"), host.host_dir):
        found.update(str(p) for p in root.iterdir())
    found.update(str(p) for p in Path("/tmp").iterdir() if TOKEN in p.name)
    return found


@pytest.mark.parametrize("case", PATH_CASES, ids=[c.id for c in PATH_CASES])
def test_path_like_names_stay_inside_the_host_folders(host, files, case):
    """Nothing is written outside the folders, and the valid sentinel files just outside are never read."""
    before = _snapshot(host)
    kind, text = run_case(host, case)
    new = _snapshot(host) - before
    inside = [host.models_dir / "loras", host.output_dir]
    outside = [p for p in new if not any(Path(p).is_relative_to(folder) for folder in inside)]
    assert not outside, outside
    assert "cannot read" not in text, text  # nothing outside was opened
    if kind != "400":
        assert_still_serving(host)
