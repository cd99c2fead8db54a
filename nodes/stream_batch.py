"""Stream-batch nodes: video img2img and continuous txt2img on the host's own models (live img2img: ``stream_live``)."""

from __future__ import annotations

import logging
import math

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..turbostream import stream_batch as core
from ._common import (
    NodeInputError,
    advanced,
    check_numbers,
    check_option,
    host_oom_policy,
    model_family,
    optional,
    schema,
)
from .host_sampling import with_host_sampling
from .stream_control import frame_payloads
from .tiny_vae import tiny_decode, tiny_encode

logger = logging.getLogger("turbostream")


# -- the host model as a stream denoiser -------------------------------------------------------------
def _is_lcm(sampling) -> bool:
    return any(c.__name__ == "LCM" for c in type(sampling).__mro__)


def host_sigmas(model, timesteps: list[int]) -> list[float]:
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST):
        raise ValueError(
            "stream batch supports epsilon/v-prediction models (SD1.x, SD2.x, SDXL and their turbo/LCM "
            "variants), not flow-matching models"
        )
    return [float(s) for s in sampling.sigma(torch.tensor(timesteps, dtype=torch.float32))]


def host_schedule(model, timesteps: list[int], frame_buffer_size: int) -> core.SlotSchedule:
    sampling = model.get_model_object("model_sampling")
    return core.SlotSchedule.build(
        timesteps,
        host_sigmas(model, timesteps),
        frame_buffer_size,
        boundary="lcm" if _is_lcm(sampling) else "none",
        skip_on="ve",
    )


# -- shared checks ---------------------------------------------------------------------------------------
def _timesteps(node: str, t_index_list: str, index_mode: str) -> list[int]:
    try:
        return core.parse_t_index_list(t_index_list, index_mode)
    except core.StreamError as exc:
        raise NodeInputError(node, exc.input_name, str(exc)) from None


def _validate(t_index_list, index_mode="lcm_index") -> bool | str:
    if t_index_list is None or index_mode is None:
        return True
    try:
        core.parse_t_index_list(t_index_list, index_mode)
    except core.StreamError as exc:
        return str(exc)
    return True


def _check_sizes(node: str, name: str, height: int, width: int) -> None:
    if height % 8 or width % 8:
        raise NodeInputError(
            node,
            name,
            f"frames are {width}x{height}; both sides must be multiples of 8 (the "
            "latent grid). Resize or crop them first (e.g. ImageScale to "
            f"{max(8, width // 8 * 8)}x{max(8, height // 8 * 8)})",
        )


def _check_model(node: str, model) -> None:
    if isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST):
        raise NodeInputError(
            node,
            "model",
            f"this {model_family(model)} model uses flow-matching sampling; stream batch supports "
            "epsilon/v-prediction models (SD1.x, SD2.x, SDXL and their turbo/LCM variants)",
        )


def _check_vae(node: str, model, vae) -> None:
    want = model.get_model_object("latent_format").latent_channels
    have = getattr(vae, "latent_channels", want)
    if have != want:
        raise NodeInputError(
            node,
            "vae",
            f"this VAE makes {have}-channel latents but the {model_family(model)} model "
            f"reads {want}; use the VAE (or tiny VAE family) that belongs to the model",
        )


def _check_negative(node: str, cfg_type: str, guidance: float, negative) -> None:
    if cfg_type in ("full", "initialize") and guidance != 1.0 and negative is None:
        raise NodeInputError(
            node,
            "negative",
            f"cfg_type {cfg_type} needs a negative conditioning; connect one (an "
            "empty CLIPTextEncode works) or use cfg_type self or none",
        )


def _config(timesteps, f, cfg_type, guidance, delta, add_noise, seed) -> core.StreamConfig:
    return core.StreamConfig(
        timesteps=timesteps,
        frame_buffer_size=f,
        cfg_type=cfg_type,
        guidance=guidance,
        delta=delta,
        add_noise=add_noise,
        seed=seed,
    )


def _engine(node, model, timesteps, f, cfg_type, guidance, delta, add_noise, seed, latent_shape) -> core.StreamEngine:
    return core.StreamEngine(
        _config(timesteps, f, cfg_type, guidance, delta, add_noise, seed),
        host_schedule(model, timesteps, f),
        latent_shape,
        device=comfy.model_management.intermediate_device(),
        oom=host_oom_policy(),
        label=node,
    )


def _stream_inputs(default_t: str, default_cfg: str) -> list:
    return [
        io.String.Input(
            "t_index_list",
            default=default_t,
            tooltip="Denoising steps as indices 0-49 of LCM's 50-step grid (timestep 999 - 20 x i), "
            "strictly increasing; one stream slot per entry. 32,45 = timesteps 359,99.",
        ),
        io.Combo.Input(
            "cfg_type",
            options=list(core.CFG_TYPES),
            default=default_cfg,
            tooltip="none: no guidance (n*f evaluations). self: residual CFG from the stream's own noise "
            "(n*f). initialize: RCFG seeded by one real negative pass per new frame (n*f+f). full: "
            "conventional CFG (2*n*f).",
        ),
        io.Float.Input(
            "guidance",
            default=1.2,
            min=0.0,
            max=20.0,
            step=0.05,
            tooltip="Guidance scale; 1.0 = off. Applied whenever it is not 1: below 1 it blends toward the "
            "negative (as the host's cfg does), where upstream StreamDiffusion turns guidance off at 1 or below.",
        ),
        advanced(
            io.Float.Input,
            "delta",
            default=1.0,
            min=0.0,
            max=5.0,
            step=0.05,
            tooltip="RCFG: scale of the virtual negative (stock) noise; the paper's examples use 0.5-1.0.",
        ),
        optional(
            io.Int.Input,
            "frame_buffer_size",
            default=1,
            min=1,
            max=16,
            tooltip="Frames denoised together per call (f); the batch is n*f slots. A frame count that f "
            "does not divide is padded with the last frame (the padding is dropped).",
        ),
        optional(
            io.Boolean.Input,
            "add_noise",
            default=True,
            tooltip="Re-noise partially denoised frames with the stream's fixed noise between steps.",
        ),
        optional(
            io.Int.Input,
            "seed",
            default=0,
            min=0,
            max=0xFFFFFFFFFFFFFFFF,
            control_after_generate=True,
            tooltip="Seeds the stream's fixed noise (drawn once: temporally stable) and the filter.",
        ),
        advanced(
            io.Combo.Input,
            "index_mode",
            options=list(core.INDEX_MODES),
            default="lcm_index",
            tooltip="lcm_index: t_index_list indexes LCM's 50-step grid (LCM-LoRA models). timesteps: raw "
            "timesteps 0-999, strictly decreasing (turbo models, e.g. 999 or 999,499).",
        ),
    ]


def _filter_inputs() -> list:
    return [
        optional(
            io.Float.Input,
            "similarity_threshold",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.005,
            tooltip="0 = off. Above it, near-identical frames are skipped with rising probability "
            "(0.98 typical) and the previous output is repeated.",
        ),
        optional(
            io.Int.Input,
            "max_skip_frames",
            default=10,
            min=0,
            max=1000,
            tooltip="At most this many frames in a row are skipped by the similarity filter.",
        ),
    ]


def _model_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="An LCM (LCM-LoRA + LCM sampling) or turbo model."),
        io.Conditioning.Input(
            "positive",
            tooltip="The prompt; may change between prompts without resetting a stream. With a ControlNet applied "
            "(ControlNetApplyAdvanced), each frame is steered by its own hint (one hint image per frame, or one "
            "for all), also while it moves through the stream batch.",
        ),
        io.Vae.Input("vae", tooltip="A tiny VAE (fast) or any host VAE."),
    ]


def _feedback_input():
    return optional(
        io.Float.Input,
        "feedback",
        default=0.0,
        min=0.0,
        max=1.0,
        step=0.05,
        tooltip="Temporal feedback: blend the latest finished output (its latent) into each new frame's latent "
        "before it enters the stream, z = (1 - feedback) z + feedback x0_prev. 0 = off; 0.2-0.5 steadies "
        "flicker, higher smears motion.",
    )


def _negative_input():
    return io.Conditioning.Input(
        "negative",
        optional=True,
        tooltip="Used by cfg_type full and initialize (its ControlNet hints, if any, follow the frames too).",
    )


def _group_payloads(payloads: list | None, groups: int, f: int, pad: int) -> list | None:
    """Per-frame payloads (ControlNet hints) cut into the engine's frame groups; padding repeats the last."""
    if payloads is None:
        return None
    payloads = payloads + payloads[-1:] * pad
    return [payloads[i * f : (i + 1) * f] for i in range(groups)]


def run_stream(model, seed: int, engine: core.StreamEngine, positive, negative, body):
    """``body(denoise)`` inside one host sampling pass sized for the engine's largest call (see
    ``host_sampling``): the host prepares the model and conditioning once for all of the prompt's calls."""
    batch = (engine.config.steps * engine.config.frame_buffer_size, *engine.latent_shape)
    return with_host_sampling(
        model, seed, positive, negative, (engine.schedule.beta / engine.schedule.alpha).tolist(), batch, body
    )


def _to_model_space(model, latents: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_in(latents)


def _to_raw(model, latents: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_out(latents)


# -- video img2img --------------------------------------------------------------------------------------
class TurboStreamStreamImg2Img(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamStreamImg2Img",
            display_name="Stream Img2Img (video, stream batch)",
            category="TurboStream/stream",
            description=(
                "StreamDiffusion-style img2img over a frame batch: several frames at different timesteps in "
                "one model call, residual CFG and the stochastic similarity filter. Returns exactly one "
                "output per input frame, aligned (the pipeline is drained, no warm-up frames)."
            ),
            inputs=[
                *_model_inputs(),
                io.Image.Input("images", tooltip="N frames (e.g. from Load Video + Get Video Components)."),
                *_stream_inputs("32,45", "self"),
                *_filter_inputs(),
                _negative_input(),
                _feedback_input(),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="One decoded frame per input frame, in order."),
                io.Latent.Output(display_name="latent", tooltip="The same frames as raw latents (before decoding)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, t_index_list, index_mode="lcm_index") -> bool | str:
        return _validate(t_index_list, index_mode)

    @classmethod
    @torch.inference_mode()
    def execute(
        cls,
        model,
        positive,
        vae,
        images,
        t_index_list,
        cfg_type,
        guidance,
        frame_buffer_size=1,
        add_noise=True,
        seed=0,
        similarity_threshold=0.0,
        max_skip_frames=10,
        delta=1.0,
        index_mode="lcm_index",
        negative=None,
        feedback=0.0,
    ) -> io.NodeOutput:
        node = "TurboStreamStreamImg2Img"
        check_option(node, "cfg_type", cfg_type, core.CFG_TYPES)
        check_numbers(
            cls, guidance=guidance, delta=delta, frame_buffer_size=frame_buffer_size, seed=seed,
            similarity_threshold=similarity_threshold, max_skip_frames=max_skip_frames, feedback=feedback,
        )  # fmt: skip
        timesteps = _timesteps(node, t_index_list, index_mode)
        if images.ndim != 4 or images.shape[0] == 0:
            raise NodeInputError(node, "images", f"expected a non-empty frame batch, got shape {tuple(images.shape)}")
        _check_sizes(node, "images", images.shape[1], images.shape[2])
        _check_model(node, model)
        _check_vae(node, model, vae)
        _check_negative(node, cfg_type, guidance, negative)
        count, f = images.shape[0], frame_buffer_size
        payloads = frame_payloads(node, count, images.shape[1], images.shape[2], model, positive, negative)
        slices, pad = core.frame_groups(count, f)
        if pad:
            logger.warning(
                "%s: %d frames are not a multiple of frame_buffer_size %d: the last group is padded with "
                "%d copies of the last frame (dropped from the output)",
                node,
                count,
                f,
                pad,
            )
            images = torch.cat([images, images[-1:].expand(pad, *images.shape[1:])])
        latents = _to_model_space(model, tiny_encode(node, vae, images))
        engine = _engine(
            node, model, timesteps, f, cfg_type, guidance, delta, add_noise, seed, tuple(latents.shape[1:])
        )
        flt = core.SimilarityFilter(similarity_threshold, max_skip_frames, seed)
        groups = [latents[i * f : (i + 1) * f] for i in range(len(slices))]
        skip = [flt.should_skip(images[i * f : (i + 1) * f] * 2 - 1) for i in range(len(slices))]
        if any(skip):
            logger.info("%s: similarity filter skipped %d of %d frame groups", node, sum(skip), len(skip))
        pbar = comfy.utils.ProgressBar(len(groups) - sum(skip) + engine.lag)
        outs = run_stream(
            model,
            seed,
            engine,
            positive,
            negative,
            lambda denoise: core.stream_frames(
                engine,
                groups,
                denoise,
                positive,
                negative,
                skip=skip,
                on_call=lambda done, total: pbar.update_absolute(done, total),
                payloads=_group_payloads(payloads, len(groups), f, pad),
                feedback=feedback,
            ),
        )
        x0 = _to_raw(model, torch.cat(outs)[:count])
        return io.NodeOutput(tiny_decode(node, vae, x0), {"samples": x0})


# -- txt2img stream --------------------------------------------------------------------------------------
class TurboStreamStreamTxt2Img(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamStreamTxt2Img",
            display_name="Stream Txt2Img (stream batch)",
            category="TurboStream/stream",
            description=(
                "Continuous txt2img with stream batch (StreamDiffusion's txt2img recipe: t_index_list "
                "0,16,32,45 with cfg none on an LCM model, or one raw timestep 999 on a turbo model with "
                "several frames per call). Returns N frames, aligned."
            ),
            inputs=[
                *_model_inputs(),
                io.Int.Input("width", default=512, min=8, max=4096, step=8, tooltip="Frame width (multiple of 8)."),
                io.Int.Input("height", default=512, min=8, max=4096, step=8, tooltip="Frame height (multiple of 8)."),
                io.Int.Input("frames", default=4, min=1, max=4096, tooltip="How many frames to generate."),
                *_stream_inputs("0,16,32,45", "none"),
                _negative_input(),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The generated frames, decoded, in order."),
                io.Latent.Output(display_name="latent", tooltip="The same frames as raw latents (before decoding)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, t_index_list, index_mode="lcm_index") -> bool | str:
        return _validate(t_index_list, index_mode)

    @classmethod
    @torch.inference_mode()
    def execute(
        cls,
        model,
        positive,
        vae,
        width,
        height,
        frames,
        t_index_list,
        cfg_type,
        guidance,
        frame_buffer_size=1,
        add_noise=True,
        seed=0,
        delta=1.0,
        index_mode="lcm_index",
        negative=None,
    ) -> io.NodeOutput:
        node = "TurboStreamStreamTxt2Img"
        check_option(node, "cfg_type", cfg_type, core.CFG_TYPES)
        check_numbers(
            cls, width=width, height=height, frames=frames, guidance=guidance, delta=delta,
            frame_buffer_size=frame_buffer_size, seed=seed,
        )  # fmt: skip
        timesteps = _timesteps(node, t_index_list, index_mode)
        _check_sizes(node, "width", height, width)
        _check_model(node, model)
        _check_vae(node, model, vae)
        _check_negative(node, cfg_type, guidance, negative)
        f = frame_buffer_size
        channels = model.get_model_object("latent_format").latent_channels
        engine = _engine(
            node, model, timesteps, f, cfg_type, guidance, delta, add_noise, seed, (channels, height // 8, width // 8)
        )
        groups = [None] * math.ceil(frames / f)
        payloads = frame_payloads(node, frames, height, width, model, positive, negative)
        pbar = comfy.utils.ProgressBar(len(groups) + engine.lag)
        outs = run_stream(
            model,
            seed,
            engine,
            positive,
            negative,
            lambda denoise: core.stream_frames(
                engine,
                groups,
                denoise,
                positive,
                negative,
                on_call=lambda done, total: pbar.update_absolute(done, total),
                payloads=_group_payloads(payloads, len(groups), f, len(groups) * f - frames),
            ),
        )
        x0 = _to_raw(model, torch.cat(outs)[:frames])
        return io.NodeOutput(tiny_decode(node, vae, x0), {"samples": x0})


NODES = [TurboStreamStreamImg2Img, TurboStreamStreamTxt2Img]
