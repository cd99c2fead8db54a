"""ADD ("turbo") sampling nodes: one-node sampler, SIGMAS scheduler, SAMPLER for the renoise update."""

from __future__ import annotations

import comfy.k_diffusion.sampling
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..turbostream import add_sampler as core
from ._common import NodeInputError, advanced, check_numbers, check_option, model_family, optional, schema

SCHEDULE_TOOLTIP = (
    "stability: SD-Turbo demo / SDTurboScheduler grid 999, 899, 799, ... (img2img starts at 10 - int(10 x denoise)). "
    "trailing: diffusers trailing spacing (4 steps: 999, 749, 499, 249; img2img runs int(steps x denoise) of them). "
    "custom: the timesteps list below."
)


DEFAULT_TIMESTEPS = "999,499"


def _timesteps(node_id: str, schedule: str, steps: int, denoise: float, timesteps: str) -> list[int]:
    try:
        return core.add_timesteps(schedule, steps, denoise, timesteps)
    except core.ScheduleError as exc:
        raise NodeInputError(node_id, exc.input_name, str(exc)) from None


def _validate(steps, schedule, timesteps, denoise) -> bool | str:
    if None in (steps, schedule, denoise) or (schedule == "custom" and timesteps is None):
        return True  # a linked input: checked again in execute
    if not isinstance(steps, int) or not isinstance(denoise, int | float):
        return True  # not a number: the host reports that it cannot convert the value
    try:
        core.add_timesteps(schedule, steps, denoise, timesteps or "")
    except core.ScheduleError as exc:
        return str(exc)
    return True


def _sigmas(model, timesteps: list[int]) -> torch.Tensor:
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigma(torch.tensor(timesteps, dtype=torch.float32))
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _model_sampling(model_k):
    return model_k.inner_model.inner_model.model_sampling


def _check_model_sampling(node: str, sampling) -> None:
    if isinstance(sampling, comfy.model_sampling.CONST):
        raise NodeInputError(
            node,
            "model",
            "TurboStream ADD sampling supports epsilon/v-prediction models (SD1.x, SD2.x, SDXL and their "
            "turbo/LCM variants), not flow-matching models; use the host's samplers for those.",
        )


def _host_noise_sampler(x, extra_args, noise_sampler):
    """The step noise the host's own samplers draw (``default_noise_sampler`` from the prompt's seed),
    whatever seeding that host version uses, unless SamplerCustom passed a noise sampler."""
    if noise_sampler is not None:
        return noise_sampler
    return comfy.k_diffusion.sampling.default_noise_sampler(x, seed=(extra_args or {}).get("seed"))


def sample_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """KSAMPLER function: Euler ancestral (eta 1) from the core, with the host's step noise."""
    _check_model_sampling("TurboStreamADDSampler", _model_sampling(model))
    noise_sampler = _host_noise_sampler(x, extra_args, noise_sampler)
    return core.sample(
        model, x, sigmas, "ancestral", extra_args=extra_args, callback=callback, noise_sampler=noise_sampler
    )


def sample_renoise(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """KSAMPLER function: predict x0, then forward-noise it to the next sigma with the host's step noise."""
    sampling = _model_sampling(model)
    _check_model_sampling("TurboStreamRenoiseSampler", sampling)  # ADD Sampler checks before sampling
    return core.sample(
        model,
        x,
        sigmas,
        "renoise",
        extra_args=extra_args,
        callback=callback,
        noise_sampler=_host_noise_sampler(x, extra_args, noise_sampler),
        noise_scaling=sampling.noise_scaling,
    )


UPDATE_FUNCTIONS = {"ancestral": sample_ancestral, "renoise": sample_renoise}


def _schedule_inputs() -> list:
    return [
        io.Int.Input(
            "steps",
            default=1,
            min=1,
            max=core.MAX_STEPS,
            tooltip="Sampling steps (1-4 for ADD models; each step is one model call). Ignored for custom.",
        ),
        io.Combo.Input("schedule", options=list(core.SCHEDULES), default="stability", tooltip=SCHEDULE_TOOLTIP),
        advanced(
            io.String.Input,
            "timesteps",
            default=DEFAULT_TIMESTEPS,
            tooltip="Used when schedule is custom: strictly decreasing integers in 0-999, at most 8, e.g. 999,499.",
        ),
        optional(
            io.Float.Input,
            "denoise",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="1.0 for txt2img; below 1.0 for img2img (how far the input latent is re-noised).",
        ),
    ]


class TurboStreamADDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamADDSampler",
            display_name="ADD Sampler (turbo, 1-4 steps)",
            category="TurboStream/sampling",
            description=(
                "Few-step sampling for adversarially distilled models (SD-Turbo, SDXL-Turbo) and LCM-sampling "
                "models, on the host's MODEL. No CFG needed: leave cfg at 1.0."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An ADD/turbo model (or an LCM-LoRA model with LCM sampling)."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Latent.Input(
                    "latent_image", tooltip="EmptyLatentImage for txt2img, a VAE-encoded image for img2img."
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed for the initial noise and the noise of later steps.",
                ),
                *_schedule_inputs(),
                advanced(
                    io.Combo.Input,
                    "update",
                    options=list(core.UPDATES),
                    default="ancestral",
                    tooltip="ancestral: Euler ancestral, eta 1 (the reference recipe). renoise: predict x0 and "
                    "forward-noise it to the next timestep with fresh noise (LCM-style).",
                ),
                advanced(
                    io.Float.Input,
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance; ADD models are sampled at 1.0 (negative unused).",
                ),
                io.Conditioning.Input("negative", optional=True, tooltip="Only used when cfg is not 1.0."),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent (raw, like KSampler's); decode it with a VAE.")],
        )

    @classmethod
    def validate_inputs(cls, steps, schedule, timesteps=DEFAULT_TIMESTEPS, denoise=1.0) -> bool | str:
        return _validate(steps, schedule, timesteps, denoise)

    @classmethod
    def execute(
        cls,
        model,
        positive,
        latent_image,
        seed,
        steps,
        schedule,
        timesteps=DEFAULT_TIMESTEPS,
        denoise=1.0,
        update="ancestral",
        cfg=1.0,
        negative=None,
    ) -> io.NodeOutput:
        node = "TurboStreamADDSampler"
        check_numbers(cls, seed=seed, cfg=cfg)  # steps and denoise: the schedule checks them
        check_option(node, "update", update, core.UPDATES)
        ts = _timesteps(node, schedule, steps, denoise, timesteps)
        _check_model_sampling(node, model.get_model_object("model_sampling"))
        latent = latent_image.copy()
        samples = latent["samples"]
        if samples.ndim != 4:
            raise NodeInputError(
                node, "latent_image", f"expected image latents (B, C, H, W), got shape {tuple(samples.shape)}"
            )
        if samples.shape[0] == 0:
            raise NodeInputError(node, "latent_image", "the latent batch is empty; give it at least one latent")
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
        expected = model.get_model_object("latent_format").latent_channels
        if samples.shape[1] != expected:
            raise NodeInputError(
                node,
                "latent_image",
                f"has {samples.shape[1]} channels but this {model_family(model)} "
                f"model expects {expected}; encode the image with this model's VAE or use an "
                "EmptyLatentImage",
            )
        if negative is None and cfg != 1.0:
            raise NodeInputError(
                node,
                "negative",
                f"cfg {cfg:g} needs a negative conditioning; connect one (an empty "
                "CLIPTextEncode works) or set cfg to 1.0",
            )
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        sigmas = _sigmas(model, ts)
        callback = latent_preview.prepare_callback(model, len(ts), {})
        out = comfy.sample.sample_custom(
            model,
            noise,
            cfg,
            comfy.samplers.KSAMPLER(UPDATE_FUNCTIONS[update]),
            sigmas,
            positive,
            negative if negative is not None else [],
            samples,
            noise_mask=latent.get("noise_mask"),
            callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )
        latent["samples"] = out
        return io.NodeOutput(latent)


class TurboStreamADDScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamADDScheduler",
            display_name="ADD Scheduler (turbo sigmas)",
            category="TurboStream/sampling",
            description=(
                "SIGMAS for ADD/turbo models with either timestep convention (stability or trailing) or a "
                "custom list, for SamplerCustom / SamplerCustomAdvanced. Never silently truncates."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model whose noise schedule converts timesteps to sigmas."),
                *_schedule_inputs(),
            ],
            outputs=[io.Sigmas.Output(tooltip="Noise levels of the chosen timesteps, ending in 0, for SamplerCustom.")],
        )

    @classmethod
    def validate_inputs(cls, steps, schedule, timesteps=DEFAULT_TIMESTEPS, denoise=1.0) -> bool | str:
        return _validate(steps, schedule, timesteps, denoise)

    @classmethod
    def execute(cls, model, steps, schedule, timesteps=DEFAULT_TIMESTEPS, denoise=1.0) -> io.NodeOutput:
        node = "TurboStreamADDScheduler"
        ts = _timesteps(node, schedule, steps, denoise, timesteps)
        _check_model_sampling(node, model.get_model_object("model_sampling"))
        return io.NodeOutput(_sigmas(model, ts))


class TurboStreamRenoiseSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamRenoiseSampler",
            display_name="ADD Renoise Sampler",
            category="TurboStream/sampling",
            description=(
                "SAMPLER for SamplerCustom: at each step predict x0, then forward-noise it to the next sigma "
                "with fresh noise (consistency/LCM-style update). Pair with ADD Scheduler."
            ),
            inputs=[],
            outputs=[io.Sampler.Output(tooltip="The renoise update, for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_renoise))


NODES = [TurboStreamADDSampler, TurboStreamADDScheduler, TurboStreamRenoiseSampler]
