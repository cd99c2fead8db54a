"""Tiny random-weight models with the real key layouts, for tests and the offline demo.

No weights can be downloaded in CI, so the test suite builds its own models: checkpoints whose
keys and shapes are exactly what the ComfyUI host detects as SD1.5 / SD2.x / SDXL, a TAESD
encoder/decoder pair (``vae_approx``) and LoRA files in the kohya and diffusers key formats.

How the layouts stay honest: the module *names and shapes* come from the host's own model classes,
instantiated on the ``meta`` device (no memory, no weights) and converted with the host's own
"state dict for saving" functions, i.e. the layout the host writes with its CheckpointSave node.
The *values* are ours: every tensor is drawn from a generator seeded by ``(seed, key)``, so a file
is a pure function of its seed, independent of the order in which keys are visited.

What is tiny: the UNet (model_channels 320 and the context dimension are what the host's
detection matches; channel multipliers, res blocks and transformer depths are free, see
``UNET_CONFIGS``). What is not: the text encoders, whose sizes the host fixes (CLIP-L ~123M
parameters, OpenCLIP-H ~354M, CLIP-bigG ~695M). Files are stored in fp16.

The host's modules are imported inside the functions (``turbostream`` never imports ``comfy`` at
module level); ``host_dir`` must point at a ComfyUI tree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("turbostream")

DEFAULT_SEED = 1234
STORAGE_DTYPE = torch.float16
FORMAT_VERSION = 2
"""Bump when the generated layouts or values change, so that cached files are rebuilt."""

EMBEDDING_STD = 0.02
LORA_RANK = 4
LORA_UP_STD = 0.01

# UNet configurations the host's detection maps to each family. Only the keys listed in the host's
# ``supported_models.<Family>.unet_config`` must match; everything else here is chosen small.
_UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
UNET_CONFIGS: dict[str, dict] = {
    # SD1.5: context 768, conv proj_in; one transformer per input level (needed for detection).
    "sd15": {
        **_UNET_COMMON,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 1],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "context_dim": 768,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "num_heads": 8,
        "num_head_channels": -1,
    },
    # SD2.x: context 1024, linear proj_in, 64-channel heads.
    "sd21": {
        **_UNET_COMMON,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 1],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "context_dim": 1024,
        "use_linear_in_transformer": True,
        "adm_in_channels": None,
        "num_heads": -1,
        "num_head_channels": 64,
    },
    # SDXL: the host matches transformer_depth exactly [0, 0, 2, 2, 10, 10] (2 res blocks x 3
    # levels); channel_mult stays 1 everywhere and the output/middle transformers are minimal.
    "sdxl": {
        **_UNET_COMMON,
        "num_classes": "sequential",
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 1, 1],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "context_dim": 2048,
        "use_linear_in_transformer": True,
        "adm_in_channels": 2816,
        "num_heads": -1,
        "num_head_channels": 64,
    },
}

FAMILY_CLASSES = {"sd15": "SD15", "sd21": "SD20", "sdxl": "SDXL"}
"""The host's ``comfy.supported_models`` class each family must be detected as."""

TAESD_SCALE = {"taesd": 0.18215, "taesdxl": 0.13025}
"""Raw-latent scale the host applies before the TAESD decoder (``comfy/latent_formats.py``); the shift is 0 for both."""
FAMILY_TAESD = {"sd15": "taesd", "sd21": "taesd", "sdxl": "taesdxl"}


@dataclass(frozen=True)
class TinyFile:
    """One generated file: the host model folder it belongs in and its file name there."""

    folder: str
    name: str


CHECKPOINTS = {family: TinyFile("checkpoints", f"tiny-{family}.safetensors") for family in UNET_CONFIGS}
TAESD_FILES = {
    f"{variant}_{part}": TinyFile("vae_approx", f"{variant}_{part}.safetensors")
    for variant in TAESD_SCALE
    for part in ("encoder", "decoder")
}
CONTROLNETS = {family: TinyFile("controlnet", f"tiny-{family}-controlnet.safetensors") for family in ("sd15", "sdxl")}
CONTROLNET_HINT_GAIN = 30.0
"""The last conv of the tiny ControlNets' hint encoder (``input_hint_block``, zero at the start of real
training) is scaled by this much beyond N(0, 1/fan_in): with plain random weights the residuals answer
mostly to the noisy latent and a different hint changed the tiny SD1.5's output by ~0.4% only; with
the gain by ~30% (a sensitivity test must see a different hint change the picture)."""
LORA_FILES = {
    (family, fmt): TinyFile("loras", f"tiny-{family}-{fmt}.safetensors")
    for family in ("sd15", "sdxl")
    for fmt in ("kohya", "diffusers")
}


def _import_host(host_dir: str | os.PathLike) -> None:
    """Put the host on ``sys.path`` for in-process use (model layouts only, no server)."""
    host = str(Path(host_dir).resolve())
    if host not in sys.path:
        sys.path.insert(0, host)
    import comfy.cli_args

    if not torch.cuda.is_available():
        # Without this the host's model_management asks CUDA for a device at import time.
        comfy.cli_args.args.cpu = True


def _key_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()) + (seed << 32))


def _fill(key: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic value for one tensor, chosen so activations stay in a sane range.

    Norm gains (every 1-D weight) are 1, biases 0, embeddings N(0, 0.02), other weights N(0, 1/fan_in).
    """
    shape = tuple(like.shape)
    if not like.dtype.is_floating_point:
        # e.g. CLIP's position_ids: keep the host's own integer buffer values.
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).clone() if shape else torch.zeros(())
    name = key.rsplit(".", 1)[-1]
    lowered = key.lower()
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0))
    if len(shape) <= 1:
        if name == "weight":
            # Every 1-D weight in these layouts is a norm gain (GroupNorm/LayerNorm), whatever its
            # key says: the UNet's ``in_layers.0``/``out_layers.0``/``out.0`` are GroupNorms too, and
            # a zero gain there makes the whole UNet output exactly zero.
            return torch.ones(shape)
        return torch.zeros(shape)
    gen = _key_generator(seed, key)
    if "embedding" in lowered or "positional_embedding" in lowered:
        return torch.randn(shape, generator=gen) * EMBEDDING_STD
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def _materialize(meta_sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for key in sorted(meta_sd):
        value = _fill(key, meta_sd[key], seed)
        out[key] = value.to(STORAGE_DTYPE) if value.dtype.is_floating_point else value
    return out


def _meta_model(family: str):
    """The host's BaseModel and text-encoder model for ``family``, on the meta device."""
    import comfy.supported_models as supported_models

    unet_config = dict(UNET_CONFIGS[family])
    model_config = getattr(supported_models, FAMILY_CLASSES[family])(unet_config)
    with torch.device("meta"):
        model = model_config.get_model({})
        clip_model = model_config.clip_target({}).clip(device="meta", dtype=torch.float32)
    return model_config, model, clip_model


def _state_dict_for_saving(model, clip_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint layout the host's ``comfy.sd.save_checkpoint`` writes for ``model`` + ``clip_sd``.

    Follows the host's own call: newer hosts save through the patcher
    (``ModelPatcher.state_dict_for_saving(clip, vae, clip_vision)``, which hands the UNet's state dict
    to ``BaseModel.state_dict_for_saving`` first), 0.3.75 through the model itself
    (``BaseModel.state_dict_for_saving(clip, vae, clip_vision)``). Only keys and shapes are used.
    """
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("meta"), offload_device=torch.device("meta")
    )
    saver = getattr(patcher, "state_dict_for_saving", None) or model.state_dict_for_saving
    return saver(clip_sd, None, None)


def _taesd_state_dict(variant: str, seed: int) -> dict[str, torch.Tensor]:
    """Encoder/decoder weights with the host's TAESD layout (keys ``taesd_encoder.*`` etc.)."""
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        meta = TAESD().state_dict()
    sd = _materialize(meta, seed)
    sd["vae_scale"] = torch.tensor(TAESD_SCALE[variant], dtype=STORAGE_DTYPE)
    sd["vae_shift"] = torch.tensor(0.0, dtype=STORAGE_DTYPE)
    return sd


def checkpoint_state_dict(family: str, seed: int = DEFAULT_SEED) -> dict[str, torch.Tensor]:
    """A full single-file checkpoint (UNet + text encoders + embedded TAESD) for ``family``."""
    model_config, model, clip_model = _meta_model(family)
    clip_sd = clip_model.state_dict()
    vae_sd = _taesd_state_dict(FAMILY_TAESD[family], seed)
    meta_sd = _state_dict_for_saving(model, clip_sd)
    sd = _materialize(meta_sd, seed)
    sd.update(model_config.process_vae_state_dict_for_saving(vae_sd))
    return sd


def controlnet_state_dict(
    family: str, seed: int = DEFAULT_SEED, unet_config: dict | None = None
) -> dict[str, torch.Tensor]:
    """A ControlNet for ``family`` in the original (``control_model.*``) key layout that real SD1.5 / SDXL
    ControlNet files use, built from the host's own ``comfy.cldm.cldm.ControlNet`` with the tiny UNet's
    configuration (or ``unet_config``), which the host detects from the weights, as for the checkpoints."""
    import comfy.cldm.cldm
    import comfy.ops

    config = unet_config if unet_config is not None else UNET_CONFIGS[family]
    config = {k: v for k, v in config.items() if k not in ("out_channels", "transformer_depth_output")}
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **config)
    meta = {f"control_model.{k}": v for k, v in net.state_dict().items()}
    sd = _materialize(meta, seed)
    last = max(
        (k for k in sd if ".input_hint_block." in k and k.endswith(".weight")), key=lambda k: int(k.split(".")[2])
    )
    sd[last] = (sd[last].float() * CONTROLNET_HINT_GAIN).to(STORAGE_DTYPE)
    return sd


def _lora_targets(family: str, fmt: str) -> dict[str, tuple[int, ...]]:
    """``{lora module name: target weight shape}``, one name per target weight.

    Names come from the host's own key maps (``comfy.lora.model_lora_keys_unet`` / ``_clip``),
    in the spelling real files use: kohya ``lora_unet_<diffusers path>`` (+ ``lora_te_`` or
    ``lora_te1_``/``lora_te2_`` for the text encoders), diffusers ``unet.<diffusers path>``.
    """
    import comfy.lora
    import comfy.utils

    _, model, clip_model = _meta_model(family)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update({k: tuple(v.shape) for k, v in clip_model.state_dict().items()})
    unet_map = comfy.lora.model_lora_keys_unet(model, {})
    if fmt == "kohya":
        # kohya spells UNet modules by their diffusers path with "_" for ".".
        diffusers_paths = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
        names = {
            "lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in diffusers_paths if k.endswith(".weight")
        }
        candidates = {k: v for k, v in unet_map.items() if k in names}
        te_prefixes = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
        te_map = comfy.lora.model_lora_keys_clip(clip_model, {})
        candidates.update({k: v for k, v in te_map.items() if k.startswith(te_prefixes)})
    else:
        candidates = {k: v for k, v in unet_map.items() if k.startswith("unet.")}
    targets, seen = {}, set()
    for name in sorted(candidates):
        target = candidates[name]
        shape = shapes.get(target)
        if target in seen or shape is None or len(shape) not in (2, 4):
            continue
        seen.add(target)
        targets[name] = shape
    return targets


def lora_state_dict(family: str, fmt: str, seed: int = DEFAULT_SEED, rank: int = LORA_RANK) -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA on every linear/conv weight of the UNet (and, for kohya, the text encoders).

    ``fmt`` is ``kohya`` (``<name>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``) or
    ``diffusers`` (attention processors as ``<name>_lora.up.weight``, other layers as
    ``<name>.lora.up.weight``, both as diffusers wrote them).
    """
    if fmt not in ("kohya", "diffusers"):
        raise ValueError(f"unknown LoRA format {fmt!r}; expected 'kohya' or 'diffusers'")
    out = {}
    for name, shape in _lora_targets(family, fmt).items():
        out_dim, in_dim, spatial = shape[0], shape[1], shape[2:]
        gen = _key_generator(seed, name)
        down = torch.randn((rank, in_dim, *spatial), generator=gen) / math.sqrt(in_dim * math.prod(spatial))
        up = torch.randn((out_dim, rank, *([1] * len(spatial))), generator=gen) * LORA_UP_STD
        if fmt == "kohya":
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(float(rank))
        else:
            sep = "_lora" if ".processor." in name else ".lora"
            out[f"{name}{sep}.down.weight"] = down
            out[f"{name}{sep}.up.weight"] = up
    return {k: v.to(STORAGE_DTYPE) for k, v in out.items()}


FULL_VAE = TinyFile("vae", "sd-vae-random.safetensors")
"""A full-size SD1.x/SD2.x KL VAE (~84M parameters) with random weights: only for benchmarks."""


def full_vae_state_dict(seed: int = DEFAULT_SEED) -> dict[str, torch.Tensor]:
    """The host's SD KL autoencoder layout (ch_mult 1,2,4,4) with seeded values."""
    import comfy.sd

    # the host picks the SD layout from these two keys (z_channels from conv_in, ch_mult from down.2)
    stub = {
        "decoder.conv_in.weight": torch.empty(512, 4, 3, 3),
        "encoder.down.2.downsample.conv.weight": torch.empty(512, 512, 3, 3),
    }
    with torch.device("meta"):
        meta = comfy.sd.VAE(sd=stub).first_stage_model.state_dict()
    return _materialize(meta, seed)


def make_full_vae(out_dir: str | os.PathLike, host_dir: str | os.PathLike, seed: int = DEFAULT_SEED) -> Path:
    """Write ``FULL_VAE`` once (benchmarks compare the tiny VAE with it)."""
    from safetensors.torch import save_file

    path = Path(out_dir) / FULL_VAE.folder / FULL_VAE.name
    if not path.is_file():
        _import_host(host_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(full_vae_state_dict(seed), str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
    return path


REAL_SD15_UNET = TinyFile("diffusion_models", "sd15-unet-random.safetensors")
"""A real-size SD1.5 UNet (~860M parameters) with random weights: only for benchmarks, so that
ratios are measured on the architecture people actually run."""
REAL_SD15_UNET_CONFIG = {
    **_UNET_COMMON,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "num_heads": 8,
    "num_head_channels": -1,
}


REAL_SD21_UNET = TinyFile("diffusion_models", "sd21-unet-random.safetensors")
"""A real-size SD2.1-layout UNet (SD-Turbo's architecture, ~866M parameters) with random weights: only
for the GPU benchmark (``make bench-gpu``)."""
REAL_SD21_UNET_CONFIG = {
    **REAL_SD15_UNET_CONFIG,
    # SD2.x: OpenCLIP ViT-H context (1024), linear proj_in/out, 64-channel heads
    "context_dim": 1024,
    "use_linear_in_transformer": True,
    "num_heads": -1,
    "num_head_channels": 64,
}
REAL_UNETS = {"sd15": (REAL_SD15_UNET, REAL_SD15_UNET_CONFIG), "sd21": (REAL_SD21_UNET, REAL_SD21_UNET_CONFIG)}


def make_real_unet(
    family: str, out_dir: str | os.PathLike, host_dir: str | os.PathLike, seed: int = DEFAULT_SEED
) -> Path:
    """Write the real-size random UNet of ``family`` (``REAL_UNETS``) once (UNet keys only, loadable
    with the host's UNETLoader)."""
    from safetensors.torch import save_file

    file, unet_config = REAL_UNETS[family]
    path = Path(out_dir) / file.folder / file.name
    if not path.is_file():
        _import_host(host_dir)
        import comfy.supported_models as supported_models

        config = getattr(supported_models, FAMILY_CLASSES[family])(dict(unet_config))
        with torch.device("meta"):
            meta = config.get_model({}).diffusion_model.state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(_materialize(meta, seed), str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
    return path


def make_real_sd15_unet(out_dir: str | os.PathLike, host_dir: str | os.PathLike, seed: int = DEFAULT_SEED) -> Path:
    """Write ``REAL_SD15_UNET`` once (UNet keys only, loadable with the host's UNETLoader)."""
    return make_real_unet("sd15", out_dir, host_dir, seed)


REAL_SD15_CONTROLNET = TinyFile("controlnet", "sd15-controlnet-random.safetensors")
"""A real-size SD1.5 ControlNet (~361M parameters) with random weights: only for benchmarks."""


def make_real_sd15_controlnet(
    out_dir: str | os.PathLike, host_dir: str | os.PathLike, seed: int = DEFAULT_SEED
) -> Path:
    """Write ``REAL_SD15_CONTROLNET`` once (loadable with the host's ControlNetLoader)."""
    from safetensors.torch import save_file

    path = Path(out_dir) / REAL_SD15_CONTROLNET.folder / REAL_SD15_CONTROLNET.name
    if not path.is_file():
        _import_host(host_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(controlnet_state_dict("sd15", seed, REAL_SD15_UNET_CONFIG), str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
    return path


def _fingerprint(seed: int) -> str:
    payload = json.dumps(
        {
            "v": FORMAT_VERSION,
            "seed": seed,
            "unet": UNET_CONFIGS,
            "lora_rank": LORA_RANK,
            "controlnet_hint_gain": CONTROLNET_HINT_GAIN,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_all(
    out_dir: str | os.PathLike,
    host_dir: str | os.PathLike,
    seed: int = DEFAULT_SEED,
    families: tuple[str, ...] = tuple(UNET_CONFIGS),
) -> dict[str, Path]:
    """Write every tiny model under ``out_dir/<host folder>/``; cached by a fingerprint file.

    Returns ``{"<folder>/<name>": path}`` for everything written or already present.
    """
    from safetensors.torch import save_file

    _import_host(host_dir)
    out_dir = Path(out_dir)
    stamp = out_dir / ".fingerprint"
    fingerprint = _fingerprint(seed)
    fresh = stamp.is_file() and stamp.read_text().strip() == fingerprint
    jobs: list[tuple[TinyFile, callable]] = []
    for family in families:
        jobs.append((CHECKPOINTS[family], lambda f=family: checkpoint_state_dict(f, seed)))
    for key, tf in TAESD_FILES.items():
        variant, part = key.rsplit("_", 1)
        jobs.append(
            (
                tf,
                lambda v=variant, p=part: {
                    k.split(".", 1)[1]: t for k, t in _taesd_state_dict(v, seed).items() if k.startswith(f"taesd_{p}.")
                },
            )
        )
    for (family, fmt), tf in LORA_FILES.items():
        if family in families:
            jobs.append((tf, lambda f=family, m=fmt: lora_state_dict(f, m, seed)))
    for family, tf in CONTROLNETS.items():
        if family in families:
            jobs.append((tf, lambda f=family: controlnet_state_dict(f, seed)))

    written = {}
    for tf, build in jobs:
        path = out_dir / tf.folder / tf.name
        written[f"{tf.folder}/{tf.name}"] = path
        if fresh and path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("making %s", path)
        tmp = path.with_suffix(".tmp")
        save_file(build(), str(tmp), metadata={"turbostream_tiny": fingerprint})
        os.replace(tmp, path)
    stamp.write_text(fingerprint + "\n")
    return written
