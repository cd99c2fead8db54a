"""LCM-LoRA fuser: apply a LoRA with the host's LoRA machinery, merged into the weights once, plus LCM sampling."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import comfy.float
import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..turbostream import lcm_lora as core
from ._common import NodeInputError, advanced, check_numbers, check_option, model_family, optional, schema

logger = logging.getLogger("turbostream")

NODE = "TurboStreamLCMLoRAFuse"
SAMPLING = ("lcm", "keep")

_string_to_seed = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed
"""The host's per-key rounding seed: ``comfy.utils`` on newer hosts (the old ``comfy.model_patcher``
name warns there on every call), ``comfy.model_patcher`` on 0.3.75."""


def _read_lora(lora_name: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``(path, state dict)`` of a file in the ``loras`` folder, through the host's loader and converter."""
    check_option(NODE, "lora_name", lora_name, folder_paths.get_filename_list("loras"), "a LoRA in the loras folder")
    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise NodeInputError(NODE, "lora_name", f"{lora_name} is not in the loras folder; pick an installed LoRA")
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as exc:  # safetensors / torch raise many types for a damaged file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise NodeInputError(
            NODE,
            "lora_name",
            f"cannot read {lora_name} ({type(exc).__name__}: {first}); the file is truncated or corrupt, or not a "
            "safetensors/PyTorch file: download it again (e.g. python -m turbostream models download lcm-lora-sdv1-5)",
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NodeInputError(NODE, "lora_name", f"{lora_name} does not hold a flat dict of tensors; it is not a LoRA")
    return path, comfy.lora_convert.convert_lora(sd)


def _key(patch_key) -> str:
    return patch_key if isinstance(patch_key, str) else patch_key[0]


@dataclass
class _Plan:
    report: core.MatchReport
    model_patches: dict = field(default_factory=dict)
    clip_patches: dict = field(default_factory=dict)
    parts: dict[str, int] = field(default_factory=dict)
    """Applied LoRA keys per part: ``{"model": n, "clip": m}``."""


def _plan(model, clip, lora_sd: dict, lora_name: str) -> _Plan:
    """Map the LoRA onto the model (and CLIP) with the host's key maps; refuse what does not fit."""
    modules, foreign = core.lora_modules(lora_sd)
    if not modules:
        raise NodeInputError(
            NODE,
            "lora_name",
            f"{lora_name} is not a LoRA: none of its {len(foreign)} tensors (e.g. {', '.join(foreign[:3])}) is a "
            "LoRA/LyCORIS tensor (lora_up/lora_down, lora_A/lora_B, hada_*, lokr_*, ...). Pick a LoRA file; a "
            "checkpoint belongs in the checkpoints folder",
        )
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    model_shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    clip_shapes = {} if clip is None else {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}

    report, misfit, parts = core.MatchReport(), set(), {"model": 0, "clip": 0}
    for name, tensors in modules.items():
        target = key_map.get(name)
        shape = None if target is None else model_shapes.get(_key(target), clip_shapes.get(_key(target)))
        if clip is None and core.is_text_encoder_module(name):
            report.skipped.append(name)
        elif shape is None or target not in patches:
            report.unmatched.append(name)
        elif not core.fits(shape, tensors):
            report.misfit.append(name)
            misfit.add(target)
        else:
            report.applied.append(name)
            parts["model" if _key(target) in model_shapes else "clip"] += 1
    if foreign:
        logger.warning(
            "%s: %s: ignored %d tensors that are not LoRA weights: %s", NODE, lora_name, len(foreign), foreign[:3]
        )

    ctx = model.model.model_config.unet_config.get("context_dim")
    model_base = core.base_for_context_dim(ctx)
    lora_base, evidence = core.describe_lora_base(modules)
    desc = core.describe_model(model_base, model_family(model), ctx)
    problem = core.match_problem(report, lora_name, lora_base, evidence, model_base, desc)
    if problem is not None:
        raise NodeInputError(NODE, "lora_name", problem)
    usable = {k: v for k, v in patches.items() if k not in misfit}
    return _Plan(
        report,
        {k: v for k, v in usable.items() if _key(k) in model_shapes},
        {k: v for k, v in usable.items() if _key(k) in clip_shapes},
        parts,
    )


def _source_weight(patcher, key: str) -> torch.Tensor:
    """The weight ``patcher`` starts from before its own patches (never a sibling clone's patched one)."""
    if key in patcher.object_patches:
        return patcher.object_patches[key]
    if key in patcher.object_patches_backup:  # a sibling's object patch is applied right now
        return patcher.object_patches_backup[key]
    backup = patcher.backup.get(key)  # a sibling's LoRA patches are applied right now
    return backup.weight if backup is not None else comfy.utils.get_attr(patcher.model, key)


def _fuse(clone, source, keys: list[str]) -> core.FusedWeights:
    """Each patched weight merged once with the host's weight math, on the load device, stored offloaded."""
    device = clone.load_device
    sources = {}
    for key in keys:
        _, set_func, convert_func = comfy.model_patcher.get_key_weight(source.model, key)
        if set_func is not None or convert_func is not None:
            raise NodeInputError(
                NODE, "fuse", f"{key} is stored in a quantized format that cannot be fused; set fuse to false"
            )
        sources[key] = _source_weight(source, key)
    if not comfy.model_management.is_device_cpu(device):
        comfy.model_management.free_memory(core.fuse_workspace_bytes([w.numel() for w in sources.values()]), device)
    fused = {}
    with torch.no_grad():
        for key, weight in sources.items():
            comfy.model_management.throw_exception_if_processing_interrupted()
            # 1. the same steps as ModelPatcher.patch_weight_to_device, done once instead of at every load
            work = comfy.model_management.cast_to_device(weight, device, torch.float32, copy=True)
            out = comfy.lora.calculate_weight(clone.patches[key], work, key)
            out = comfy.float.stochastic_rounding(out, weight.dtype, seed=_string_to_seed(key))
            # 2. at rest next to the other weights; the host moves it with its module on load
            fused[key] = torch.nn.Parameter(out.to(clone.offload_device), requires_grad=False)
    return fused


def is_dynamic(patcher) -> bool:
    """Whether the host streams this patcher's weights with dynamic VRAM (``ModelPatcherDynamic``,
    newer hosts on NVIDIA); 0.3.75's patchers have no ``is_dynamic``."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def _apply(clone, source, patches: dict, strength: float, fuse: bool, identity: tuple, part: str, lora_name: str):
    """Add ``patches`` to ``clone`` (a fresh clone of ``source``); with ``fuse`` merge them into weights.

    A dynamic-VRAM patcher gets the host's own patches even with ``fuse``: that host applies LoRA
    patches itself as each weight streams into VRAM and keeps the patched copy resident, and a merged
    weight swapped in by object patch would sit beside the host's pinned copies of the originals.
    """
    if not patches or strength == 0:
        return
    keys = sorted({_key(k) for k in clone.add_patches(patches, strength)})
    if fuse and is_dynamic(clone):
        logger.info(
            "%s: %s: the host loads this %s with dynamic VRAM and patches its weights as they stream in; "
            "the %d LoRA keys are applied as host patches instead of fused weights",
            NODE, lora_name, part, len(keys),
        )  # fmt: skip
        return
    if not fuse:
        return
    cache_key = (
        str(source.patches_uuid),
        tuple((k, id(source.object_patches[k])) for k in keys if k in source.object_patches),
        identity,
        float(strength),
        len(keys),
    )
    t0 = time.perf_counter()
    weights, computed = core.FUSED_WEIGHTS.get_or_compute(cache_key, source.model, lambda: _fuse(clone, source, keys))
    for key in keys:
        clone.patches.pop(key)
        clone.add_object_patch(key, weights[key])
    clone.patches_uuid = core.stable_uuid((id(source.model), cache_key))  # new weights: the host reloads them
    if computed:
        mib = sum(w.numel() * w.element_size() for w in weights.values()) / 2**20
        logger.info(
            "%s: fused %d %s weights of %s (%.1f MiB) in %.3f s on %s (fuse computation #%d)",
            NODE, len(keys), part, lora_name, mib, time.perf_counter() - t0, clone.load_device,
            core.FUSED_WEIGHTS.computations,
        )  # fmt: skip
    else:
        logger.info(
            "%s: reused %d cached fused %s weights of %s (no fuse computation)", NODE, len(keys), part, lora_name
        )


def _lcm_sampling(model):
    """The host's own ModelSamplingDiscrete "lcm" (LCM c_skip/c_out, 50 original steps) on a clone."""
    from comfy_extras import nodes_model_advanced  # imported here: needs the host's top-level ``nodes``

    node = nodes_model_advanced.ModelSamplingDiscrete
    if hasattr(node, "patch"):  # V1 node (0.3.75)
        return node().patch(model, "lcm", False)[0]
    return node.execute(model, "lcm", False).result[0]  # V3 node (newer hosts)


class TurboStreamLCMLoRAFuse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id=NODE,
            display_name="LCM-LoRA Fuse (2-8 steps)",
            category="TurboStream/models",
            description=(
                "Apply a LoRA (an LCM-LoRA, or a style LoRA before it) with the host's LoRA loader and, with fuse, "
                "merge it into a copy of the patched weights once, so loads and low-VRAM streaming cost nothing "
                "extra. sampling lcm switches the model to LCM sampling (use 2-8 steps, cfg 1-2, sampler lcm or "
                "the ADD Sampler with update renoise). A LoRA for another base or one that only partly fits is an "
                "error."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="An SD1.x / SD2.x / SDXL model (from a checkpoint or a previous link)."
                ),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="The LoRA file (models/loras): lcm-lora-sdv1-5 for SD1.5 models, lcm-lora-sdxl for SDXL.",
                ),
                io.Float.Input(
                    "strength_model",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    tooltip="LoRA strength on the diffusion model; LCM-LoRA is made for 1.0.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Optional: the CLIP, for LoRAs that also patch the text encoder (many style LoRAs do).",
                ),
                advanced(
                    io.Float.Input,
                    "strength_clip",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    tooltip="LoRA strength on the text encoder; used only when clip is connected.",
                ),
                optional(
                    io.Boolean.Input,
                    "fuse",
                    default=True,
                    tooltip="true: merge the LoRA into a copy of the patched weights once (cached across runs; "
                    "costs RAM for those weights). false: ordinary host patches, applied at every model load.",
                ),
                optional(
                    io.Combo.Input,
                    "sampling",
                    options=list(SAMPLING),
                    default="lcm",
                    tooltip="lcm: LCM sampling exactly as ModelSamplingDiscrete lcm (for the LCM-LoRA link). "
                    "keep: leave the model's sampling as it is (for a style LoRA link).",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the LoRA applied (and LCM sampling if chosen)."),
                io.Clip.Output(tooltip="The CLIP with the LoRA's text-encoder part applied; the input clip if none."),
            ],
        )

    @classmethod
    def execute(
        cls, model, lora_name, strength_model, strength_clip=1.0, fuse=True, sampling="lcm", clip=None
    ) -> io.NodeOutput:
        check_numbers(cls, strength_model=strength_model, strength_clip=strength_clip)
        check_option(NODE, "sampling", sampling, SAMPLING)
        path, lora_sd = _read_lora(lora_name)
        plan = _plan(model, clip, lora_sd, lora_name)
        identity = core.file_identity(path)
        new_model = model.clone()
        _apply(new_model, model, plan.model_patches, strength_model, fuse, identity, "model", lora_name)
        new_clip = clip
        if clip is not None and plan.clip_patches and strength_clip != 0:
            new_clip = clip.clone()
            _apply(new_clip.patcher, clip.patcher, plan.clip_patches, strength_clip, fuse, identity, "clip", lora_name)
        if sampling == "lcm":
            new_model = _lcm_sampling(new_model)
        level = logging.WARNING if plan.report.rejected else logging.INFO
        logger.log(level, "%s: %s", NODE, core.applied_message(lora_name, plan.report, plan.parts))
        return io.NodeOutput(new_model, new_clip)


NODES = [TurboStreamLCMLoRAFuse]
