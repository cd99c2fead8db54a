"""The stream engine's denoiser, through the host's own sampling path, prepared once per prompt.

``with_host_sampling(model, seed, positive, negative, sigmas, latent_shape, body)`` runs ``body(denoise)``
inside one host sampling pass (``comfy.samplers.CFGGuider.sample`` with a ``KSAMPLER`` whose sampler
function is the body): the host loads the model and its ControlNets (``prepare_sampling`` /
``load_models_gpu``), applies LoRA and model patches, runs its hooks and wrappers, and processes the
conditioning (SDXL pooled output and size conditioning included) once; every ``denoise(x_vp, t, cond)``
call of the body is then one evaluation of the host's model wrapper (``sampling_function`` with cfg 1,
the stream combines its own guidance). Afterwards the host cleans up as after any sampler. The host's
``/free`` acts between prompts and interrupts arrive through the progress hook, as for its own samplers.

``host_denoiser(model, seed)`` is the same path with one sampling pass per call (what a custom sampler
node would cost per step; the benches compare the two).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.sampler_helpers
import comfy.samplers
import torch

from .stream_control import slot_conditioning


class StreamGuider(comfy.samplers.CFGGuider):
    """The host's guider evaluating one conditioning per call at cfg 1 (``role`` picks which; ``call``
    is a per-call conditioning, e.g. ControlNet copies with slot-by-slot hints)."""

    role = "positive"

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (the host's signature)
        return comfy.samplers.sampling_function(
            self.inner_model, x, timestep, None, self.conds[self.role], 1.0, model_options=model_options, seed=seed
        )


def _role(cond, positive, negative) -> str:
    return "negative" if (cond is negative and cond is not positive) else "positive"


def with_host_sampling(
    model,
    seed: int,
    positive,
    negative,
    sigmas: list[float],
    batch_shape: tuple[int, ...],
    body: Callable[[Callable[..., torch.Tensor]], Any],
) -> Any:
    """``body(denoise)`` inside one host sampling pass; returns what ``body`` returns.

    ``denoise(x_vp, t, cond, slots=None) -> x0``: ``x_vp`` variance-preserving latents in model space,
    ``t`` integer timesteps per sample, ``cond`` ``positive`` or ``negative`` (by identity); ``slots``
    (the frames' ControlNet hints per slot) gives that call per-slot control copies of ``cond``.
    ``sigmas``: the stream's schedule (the host's ``sample_sigmas`` for patches that read them).
    ``batch_shape``: ``(B, C, H, W)`` of the largest call (what the host sizes its model loading for).
    """
    sampling = model.get_model_object("model_sampling")
    guider = StreamGuider(model)
    conds = {"positive": positive}
    if negative is not None:
        conds["negative"] = negative
    guider.inner_set_conds(conds)
    result: dict[str, Any] = {}

    def sampler_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        device, dtype = x.device, x.dtype
        inner = guider.inner_model

        @torch.inference_mode()
        def denoise(x_vp: torch.Tensor, t: torch.Tensor, cond, slots=None) -> torch.Tensor:
            sigma = sampling.sigma(t.float().cpu())
            alpha = (1 + sigma.double() ** 2).rsqrt().float().view(-1, 1, 1, 1)
            x_ve = (x_vp.float().cpu() / alpha).to(device, dtype)
            role = _role(cond, positive, negative)
            if slots is not None and cond:
                per_call = slot_conditioning(cond, role, slots, sigma, sampling)
                converted = {"call": comfy.sampler_helpers.convert_cond(per_call)}
                guider.conds.update(
                    comfy.samplers.process_conds(
                        inner, x_ve, converted, device, torch.zeros_like(x_ve), None, extra_args.get("seed")
                    )
                )
                role = "call"
            guider.role = role
            try:
                x0 = model_k(x_ve, sigma.to(device, dtype), **extra_args)
            finally:
                guider.role = "positive"
                for c in guider.conds.pop("call", []):
                    control = c.get("control")
                    if control is not None:
                        control.cleanup()
            return x0.to(x_vp.device, x_vp.dtype)

        result["value"] = body(denoise)
        return x

    empty = torch.zeros(batch_shape)
    schedule = sorted({float(s) for s in sigmas}, reverse=True) + [0.0]
    guider.sample(
        empty,
        empty,
        comfy.samplers.KSAMPLER(sampler_fn),
        torch.tensor(schedule),
        disable_pbar=True,
        seed=seed,
    )
    return result["value"]


def host_denoiser(model, seed: int, positive=None, negative=None):
    """``denoise(x_vp, t, cond, slots=None) -> x0`` with one host sampling pass per call."""

    def denoise(x_vp: torch.Tensor, t: torch.Tensor, cond, slots=None) -> torch.Tensor:
        sigma = [float(s) for s in model.get_model_object("model_sampling").sigma(t.float().cpu())]
        pos, neg = (cond, None) if positive is None else (positive, negative)
        return with_host_sampling(
            model, seed, pos, neg, sigma, tuple(x_vp.shape), lambda d: d(x_vp, t, cond, slots=slots)
        )

    return denoise
