"""ADD distillation node: train a 1-4 step "turbo" LoRA from the host's model, save it to ``loras``."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from dataclasses import asdict

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.utils
import folder_paths
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io, ui
from safetensors.torch import save_file

from ..turbostream import add_distill as core
from ..turbostream import add_sampler
from ._common import NodeInputError, advanced, check_numbers, check_option, model_family, schema

logger = logging.getLogger("turbostream")

NODE = "TurboStreamADDDistill"
FEATURES_FOLDER = "turbostream_features"
"""Model folder (``models/turbostream_features``) for discriminator feature networks (DINOv2 weights)."""
BUILTIN_VIT = "tiny-vit (built-in, random weights: tests only)"
MIN_IMAGE_SIDE = 64
SAVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")
SAVE_SUFFIX = ".safetensors"


def register_features_folder() -> None:
    """Add ``turbostream_features`` to the host's model folders (idempotent; extra_model_paths may add more)."""
    if FEATURES_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FEATURES_FOLDER] = (
            [os.path.join(folder_paths.models_dir, FEATURES_FOLDER)],
            set(folder_paths.supported_pt_extensions),
        )


register_features_folder()


def feature_network_options() -> list[str]:
    return [BUILTIN_VIT, *folder_paths.get_filename_list(FEATURES_FOLDER)]


# -- input checks ----------------------------------------------------------------------------------
def save_name_problem(save_name: str) -> str | None:
    """Why ``save_name`` cannot name a file in the loras folder, or None."""
    name = save_name.strip()
    if name.endswith(SAVE_SUFFIX):
        name = name[: -len(SAVE_SUFFIX)]
    if not SAVE_NAME.match(name) or ".." in name:
        return (
            f"{save_name!r} is not a plain file name: use 1-100 letters, digits, '.', '_', '-' or spaces, starting "
            "with a letter or digit, without folders ('/' or '\\') or '..'; the LoRA is saved in the loras folder"
        )
    return None


def _free_path(save_name: str) -> tuple[str, str]:
    """``(file name, full path)`` in the first loras folder; an existing file is never overwritten: _00001..."""
    stem = save_name.strip()
    stem = stem[: -len(SAVE_SUFFIX)] if stem.endswith(SAVE_SUFFIX) else stem
    folder = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    name = stem + SAVE_SUFFIX
    counter = 0
    while os.path.exists(os.path.join(folder, name)):
        counter += 1
        name = f"{stem}_{counter:05d}{SAVE_SUFFIX}"
    return name, os.path.join(folder, name)


def _save_atomically(tensors: dict, path: str, metadata: dict[str, str]) -> None:
    """Write beside ``path`` under a name the host does not list, then rename: an interrupted or failed
    write never leaves a truncated LoRA in the loras folder."""
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _prompts(prompts: str, count: int) -> list[str]:
    lines = [line.strip() for line in prompts.splitlines() if line.strip()]
    if not lines:
        raise NodeInputError(NODE, "prompts", "is empty; give one prompt for all images, or one per line per image")
    if len(lines) not in (1, count):
        raise NodeInputError(
            NODE,
            "prompts",
            f"has {len(lines)} prompts (non-empty lines) for {count} images; give one per image in image order, "
            "or a single line for all of them",
        )
    return lines * count if len(lines) == 1 else lines


def _student_timesteps(text: str) -> list[int]:
    try:
        return add_sampler.parse_custom_timesteps(text)
    except add_sampler.ScheduleError as exc:
        raise NodeInputError(NODE, "student_timesteps", str(exc)) from None


def _check_model(model, vae) -> None:
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST) or getattr(sampling, "sigmas", None) is None:
        raise NodeInputError(
            NODE,
            "model",
            f"this {model_family(model)} model is not a discrete epsilon/v-prediction model; ADD distillation "
            "supports SD1.x and SD2.x checkpoints",
        )
    net = model.model.diffusion_model
    if not isinstance(net, UNetModel) or net.num_classes is not None or getattr(model.model, "concat_keys", ()):
        raise NodeInputError(
            NODE,
            "model",
            f"this {model_family(model)} model is not a plain text-conditioned UNet (SDXL size/pooled embeddings, "
            "inpainting channels or another architecture), which the trainer does not feed yet; use an SD1.x or "
            "SD2.x checkpoint",
        )
    channels = model.get_model_object("latent_format").latent_channels
    if getattr(vae, "latent_channels", channels) != channels:
        raise NodeInputError(
            NODE,
            "vae",
            f"makes {vae.latent_channels}-channel latents but the model reads {channels}; connect the VAE of the "
            "same checkpoint",
        )


def _images(images: torch.Tensor) -> torch.Tensor:
    if images.shape[0] == 0:
        raise NodeInputError(NODE, "images", "the image batch is empty; load at least one training image")
    height, width = images.shape[1:3]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise NodeInputError(
            NODE, "images", f"are {width}x{height}; the trainer needs at least {MIN_IMAGE_SIDE} pixels per side"
        )
    return images[..., :3]


def _feature_network(name: str) -> core.ViT:
    listed = f"{BUILTIN_VIT!r} or a file in models/{FEATURES_FOLDER}"
    check_option(NODE, "feature_network", name, feature_network_options(), listed)
    if name == BUILTIN_VIT:
        return core.tiny_vit(seed=0)
    path = folder_paths.get_full_path(FEATURES_FOLDER, name)
    if path is None:
        raise NodeInputError(NODE, "feature_network", f"{name} is not in the {FEATURES_FOLDER} folder")
    try:
        state_dict = comfy.utils.load_torch_file(path, safe_load=True)
        return core.vit_from_state_dict(state_dict)
    except core.FeatureNetworkError as exc:
        raise NodeInputError(NODE, "feature_network", f"{name}: {exc}") from None
    except Exception as exc:  # safetensors / torch raise many types for a damaged file
        raise NodeInputError(
            NODE, "feature_network", f"cannot read {name} ({type(exc).__name__}: {exc}); the file is damaged"
        ) from None


# -- the host model as a denoiser ------------------------------------------------------------------
def _denoiser(sampling, dtype: torch.dtype) -> core.Denoise:
    """``denoise(net, x_t, t, context)`` for the host's UNets: VP sample -> the host's x0 prediction.

    The VP sample ``x_t = alpha_t x0 + sigma_t eps`` is ``x / sqrt(1 + sigma^2)`` for the host's
    VE sample ``x = x0 + sigma eps``; ``calculate_input`` / ``calculate_denoised`` of the model's
    own ``model_sampling`` handle epsilon and v-prediction exactly as ``BaseModel.apply_model``.
    """

    def denoise(net, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sigma = sampling.sigma(t.float()).to(x_t.device)
        x = x_t * (sigma**2 + 1).sqrt().view(-1, *([1] * (x_t.dim() - 1)))
        xc = sampling.calculate_input(sigma, x).to(dtype)
        out = net(xc, sampling.timestep(sigma).float(), context=context.to(dtype), transformer_options={})
        return sampling.calculate_denoised(sigma, out.float(), x)

    return denoise


def _unet_blocks(net) -> list:
    """The blocks of a host UNet to recompute in backward (gradient checkpointing on GPU)."""
    blocks = [*getattr(net, "input_blocks", []), *getattr(net, "output_blocks", [])]
    middle = getattr(net, "middle_block", None)
    return blocks + ([middle] if middle is not None else [])


def _encode_prompts(clip, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context [N, 77k, dim], pooled [N, D])``; each distinct prompt is encoded once."""
    cache = {}
    for text in dict.fromkeys(prompts):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        cache[text] = (cond, pooled if pooled is not None else cond.mean(1))
    lengths = {cache[p][0].shape[1] for p in prompts}
    if len(lengths) > 1:  # prompts longer than 77 tokens: pad with the last token's embedding
        longest = max(lengths)
        for text, (cond, pooled) in cache.items():
            pad = cond[:, -1:].expand(-1, longest - cond.shape[1], -1)
            cache[text] = (torch.cat([cond, pad], 1), pooled)
    return torch.cat([cache[p][0] for p in prompts]), torch.cat([cache[p][1] for p in prompts])


def _apply_lora(model, lora_sd: dict[str, torch.Tensor], name: str):
    """A clone of ``model`` with the LoRA as host patches, mapped exactly like LoraLoaderModelOnly."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    modules = {k.rsplit(".", 2)[0] for k in lora_sd if k.endswith(".lora_up.weight")}
    if len(patches) != len(modules):
        raise RuntimeError(f"{NODE}: only {len(patches)} of the {len(modules)} LoRA modules of {name} map to the model")
    clone = model.clone()
    clone.add_patches(patches, 1.0)
    return clone


class TurboStreamADDDistill(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id=NODE,
            display_name="ADD Distill (train turbo LoRA)",
            category="TurboStream/training",
            description=(
                "Adversarial diffusion distillation (ADD): train a LoRA that makes the model sample in 1-4 steps, "
                "from training images and their prompts. The student (model + LoRA) learns from a frozen copy of "
                "the model (distillation, weight lambda) and from a discriminator on a frozen ViT's features "
                "(hinge + R1). Saves the LoRA to the loras folder (LoraLoaderModelOnly and LCM-LoRA Fuse read it) "
                "and returns the model with it applied, for the ADD Sampler. SD1.x / SD2.x models."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The teacher: an SD1.x / SD2.x model. It is never modified."),
                io.Clip.Input("clip", tooltip="The model's CLIP, to encode the prompts."),
                io.Vae.Input(
                    "vae",
                    tooltip="The model's VAE: encodes the training images to latents and decodes student samples "
                    "for the discriminator.",
                ),
                io.Image.Input("images", tooltip="Training images (one batch, at least 64x64)."),
                io.String.Input(
                    "prompts",
                    multiline=True,
                    default="a photo",
                    tooltip="One prompt per line, one line per image in batch order, or a single line for all.",
                ),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Training iterations."),
                io.Float.Input(
                    "learning_rate",
                    default=1e-4,
                    min=0.0,
                    max=1.0,
                    step=1e-5,
                    round=1e-7,
                    tooltip="Adam learning rate of the LoRA.",
                ),
                io.Int.Input("lora_rank", default=16, min=1, max=256, tooltip="LoRA rank (alpha = rank)."),
                io.Float.Input(
                    "distill_weight",
                    default=core.DISTILL_WEIGHT,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="lambda: weight of the distillation loss (the paper uses 2.5).",
                ),
                io.Combo.Input(
                    "feature_network",
                    options=feature_network_options(),
                    default=BUILTIN_VIT,
                    tooltip=f"Discriminator backbone: DINOv2 weights (ViT-S/B/L; original, timm or transformers "
                    f"layout) in models/{FEATURES_FOLDER}, or the built-in random tiny ViT (for tests only).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    tooltip="Seed of every random draw of the run.",
                ),
                io.String.Input(
                    "save_name",
                    default="turbostream_add_lora",
                    tooltip="File name in the loras folder (no folders); an existing file is never overwritten: "
                    "_00001, _00002... is appended.",
                ),
                advanced(io.Int.Input, "batch_size", default=2, min=1, max=256, tooltip="Images per iteration."),
                advanced(
                    io.Float.Input,
                    "discriminator_lr",
                    default=1e-4,
                    min=0.0,
                    max=1.0,
                    step=1e-5,
                    round=1e-7,
                    tooltip="Adam learning rate of the discriminator heads.",
                ),
                advanced(
                    io.Float.Input,
                    "adversarial_weight",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Weight of the adversarial loss; 0 trains with distillation only.",
                ),
                advanced(
                    io.Float.Input,
                    "r1_weight",
                    default=core.R1_WEIGHT,
                    min=0.0,
                    max=10.0,
                    step=1e-6,
                    round=1e-8,
                    tooltip="R1 penalty on the discriminator heads.",
                ),
                advanced(
                    io.String.Input,
                    "student_timesteps",
                    default=",".join(map(str, core.STUDENT_TIMESTEPS)),
                    tooltip="Timesteps the student learns to denoise from (strictly decreasing, 0-999); sample "
                    "with the ADD Sampler's trailing schedule for 999,749,499,249.",
                ),
                advanced(
                    io.Float.Input,
                    "teacher_cfg",
                    default=1.0,
                    min=1.0,
                    max=30.0,
                    step=0.1,
                    tooltip="Classifier-free guidance of the teacher's targets (an empty prompt is the negative).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model",
                    tooltip="The model with the trained LoRA applied (sample with the ADD Sampler).",
                ),
                io.String.Output(display_name="lora_name", tooltip="File name of the saved LoRA in the loras folder."),
                io.Image.Output(display_name="loss_curve", tooltip="Loss curves of the run."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, save_name=None, student_timesteps=None) -> bool | str:
        if save_name is not None and (problem := save_name_problem(save_name)):
            return problem
        if student_timesteps is not None:
            try:
                add_sampler.parse_custom_timesteps(student_timesteps)
            except add_sampler.ScheduleError as exc:
                return f"student_timesteps: {exc}"
        return True

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        images,
        prompts,
        steps,
        learning_rate,
        lora_rank,
        distill_weight,
        feature_network,
        seed,
        save_name,
        batch_size=2,
        discriminator_lr=1e-4,
        adversarial_weight=1.0,
        r1_weight=core.R1_WEIGHT,
        student_timesteps="999,749,499,249",
        teacher_cfg=1.0,
    ) -> io.NodeOutput:
        # 1. inputs
        if problem := save_name_problem(save_name):
            raise NodeInputError(NODE, "save_name", problem)
        check_numbers(
            cls, steps=steps, learning_rate=learning_rate, lora_rank=lora_rank, distill_weight=distill_weight,
            seed=seed, batch_size=batch_size, discriminator_lr=discriminator_lr,
            adversarial_weight=adversarial_weight, r1_weight=r1_weight, teacher_cfg=teacher_cfg,
        )  # fmt: skip
        pixels = _images(images)
        texts = _prompts(prompts, pixels.shape[0])
        config = core.ADDConfig(
            batch_size=batch_size,
            student_timesteps=tuple(_student_timesteps(student_timesteps)),
            distill_weight=distill_weight,
            adversarial_weight=adversarial_weight,
            r1_weight=r1_weight,
            student_lr=learning_rate,
            discriminator_lr=discriminator_lr,
            lora_rank=lora_rank,
            teacher_guidance=teacher_cfg,
            seed=seed % 2**62,
        )
        _check_model(model, vae)
        with torch.inference_mode(False):  # trainable-graph tensors must not be inference tensors
            vit = _feature_network(feature_network)

        # 2. conditioning and latents with the host's own encoders
        context, pooled = _encode_prompts(clip, texts)
        uncond = _encode_prompts(clip, [""])[0] if teacher_cfg != 1.0 else None
        latent_format = model.get_model_object("latent_format")
        x0 = latent_format.process_in(vae.encode(pixels))

        # 3. train a student copy; the host's modules are only read (teacher under no_grad)
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            log, lora_sd = _train(model, vae, vit, x0, context, pooled, uncond, config, steps)
        name, path = _free_path(save_name)
        run = {"steps": steps, "images": len(texts), "prompts": len(set(texts)), "seed": seed, **asdict(config)}
        metadata = {
            "turbostream_add": json.dumps(run),
            "ss_network_dim": str(lora_rank),
            "ss_network_alpha": str(float(lora_rank)),
        }
        _save_atomically(lora_sd, path, metadata)
        logger.info(
            "%s: %d steps on %d images in %.1f s; saved %s (%d LoRA modules, rank %d)",
            NODE, steps, len(texts), time.perf_counter() - t0, name, len(lora_sd) // 3, lora_rank,
        )  # fmt: skip

        # 4. outputs: the model with the LoRA as the host's loader applies it, the loss curves
        curve = core.loss_curve_image(log)[None]
        return io.NodeOutput(_apply_lora(model, lora_sd, name), name, curve, ui=ui.PreviewImage(curve, cls=cls))


def _train(model, vae, vit, x0, context, pooled, uncond, config, steps) -> tuple[list[dict], dict]:
    """Build the trainer on the model's device, run it with progress and interrupts, return (log, LoRA)."""
    management = comfy.model_management
    management.load_models_gpu([model, vae.patcher], force_full_load=True)
    device = model.load_device
    teacher = model.model.diffusion_model
    sampling = model.get_model_object("model_sampling")
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    # inference tensors (the host loads weights under inference mode) cannot join autograd: copies
    student_base = copy.deepcopy(teacher)
    decoder = copy.deepcopy(vae.first_stage_model).to(device).requires_grad_(False)
    latent_format = model.get_model_object("latent_format")

    def decode(latent: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images in [-1, 1] through the VAE's decoder network (differentiable)."""
        return decoder.decode(latent_format.process_out(latent).to(vae.vae_dtype)).float()

    data = core.TrainingData(
        x0=x0.clone().float(),
        cond=context.clone(),
        disc_cond=pooled.clone().float(),
        uncond=uncond.clone() if uncond is not None else None,
    )
    trainer = None
    try:
        trainer = core.ADDTrainer(
            teacher,
            _denoiser(sampling, dtype),
            core.alphas_cumprod_from_sigmas(sampling.sigmas.detach().cpu()),
            vit,
            data,
            config,
            decode=decode,
            student_base=student_base,
            checkpoint_blocks=_unet_blocks,
            device=device,
        )
        pbar = comfy.utils.ProgressBar(steps)

        def progress(step: int, entry: dict) -> None:
            management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(step, steps)

        management.throw_exception_if_processing_interrupted()
        log = trainer.train(steps, progress)
        return log, trainer.lora_state_dict()
    except core.ADDConfigError as exc:
        raise NodeInputError(NODE, "settings", str(exc)) from None
    finally:
        if trainer is not None:
            trainer.close()
        trainer = student_base = None  # the student copy goes before the cache is emptied
        management.soft_empty_cache()


NODES = [TurboStreamADDDistill]
