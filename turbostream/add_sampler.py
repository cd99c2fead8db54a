"""Few-step sampling for adversarially distilled (ADD / "turbo") models: schedules and updates.

Pure torch. Sampling happens in the k-diffusion ("variance exploding") space that ComfyUI uses:
``x = x0 + sigma * eps`` for epsilon/v-prediction models, where ``sigma_t = sqrt((1 - abar_t) / abar_t)``.
The VP quantities of the papers follow from sigma: ``alpha_t = 1 / sqrt(1 + sigma^2)``,
``beta_t = sigma / sqrt(1 + sigma^2)``, and a VP sample is ``alpha_t * x``.

Schedules (the two conventions disagree for 2-4 steps; both are offered and named):

* ``stability``: the SD-Turbo demo / ComfyUI ``SDTurboScheduler`` convention, a 10-point grid
  999, 899, ..., 99; img2img starts at index ``10 - int(10 * denoise)``.
* ``trailing``: diffusers ``timestep_spacing="trailing"``: ``round(arange(1000, 0, -1000/steps)) - 1``
  (999 | 999,499 | 999,666,332 | 999,749,499,249); img2img runs the last ``int(steps * denoise)``
  of those timesteps (diffusers' img2img ``get_timesteps`` rule).
* ``custom``: an explicit strictly decreasing list of at most 8 timesteps in [0, 999].

Updates (one model call per step, ``denoised`` = the model's x0 prediction):

* ``ancestral``: Euler ancestral with eta 1 (k-diffusion ``get_ancestral_step``), the reference
  recipe of the SD-Turbo demo and diffusers ``EulerAncestralDiscreteScheduler``.
* ``renoise``: take x0, then forward-noise it to the next timestep with fresh noise
  (consistency-model style, what LCM does): ``x_next = noise_scaling(sigma_next, noise, x0)``,
  i.e. ``x0 + sigma_next * noise`` for epsilon/v models (VP: ``alpha * x0 + beta * noise``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000
"""Training steps of SD1.x / SD2.x / SDXL (Rombach et al. 2022, arXiv 2112.10752)."""
BETA_START = 0.00085
BETA_END = 0.012
"""``scaled_linear`` beta schedule: linear in sqrt(beta) from BETA_START to BETA_END, squared (the
``scaled_linear`` schedule of diffusers' DDPMScheduler and of the SD training configs)."""
STABILITY_GRID_POINTS = 10
"""SD-Turbo demo / SDTurboScheduler grid: timesteps 999, 899, ..., 99 (Stability's SD-Turbo model card)."""
STABILITY_GRID_STRIDE = NUM_TRAIN_TIMESTEPS // STABILITY_GRID_POINTS
MAX_STEPS = 8
"""ADD models are trained for 1-4 steps; beyond 8 a regular sampler is the better tool."""
SCHEDULES = ("stability", "trailing", "custom")
UPDATES = ("ancestral", "renoise")
ANCESTRAL_ETA = 1.0


class ScheduleError(ValueError):
    """A schedule request that cannot be served; the message says what would work.

    ``input_name`` is the input to change: ``steps``, ``denoise`` or ``timesteps``.
    """

    def __init__(self, message: str, input_name: str) -> None:
        super().__init__(message)
        self.input_name = input_name


# -- schedules -------------------------------------------------------------------------------------
def stability_grid() -> list[int]:
    """[999, 899, ..., 99]."""
    return [NUM_TRAIN_TIMESTEPS - 1 - i * STABILITY_GRID_STRIDE for i in range(STABILITY_GRID_POINTS)]


def _check_steps(steps: int) -> None:
    if not 1 <= steps <= MAX_STEPS:
        raise ScheduleError(f"steps must be between 1 and {MAX_STEPS}, got {steps}", "steps")


def _check_denoise(denoise: float) -> None:
    if not 0.0 <= denoise <= 1.0 or math.isnan(denoise):
        raise ScheduleError(f"denoise must be between 0.0 and 1.0, got {denoise}", "denoise")


def stability_timesteps(steps: int, denoise: float = 1.0) -> list[int]:
    """``steps`` timesteps of the 10-point grid starting at index ``10 - int(10 * denoise)``.

    Unlike the host's SDTurboScheduler, a request that would run past the grid's end is an error,
    never a silently shorter schedule.
    """
    _check_steps(steps)
    _check_denoise(denoise)
    start = STABILITY_GRID_POINTS - int(STABILITY_GRID_POINTS * denoise)
    if start >= STABILITY_GRID_POINTS:
        raise ScheduleError(
            f"denoise {denoise:g} is below 0.1: the stability schedule's 10-point grid has no "
            "timestep that low. Use denoise >= 0.1, or schedule 'custom' with a small timestep.",
            "denoise",
        )
    allowed = STABILITY_GRID_POINTS - start
    if steps > allowed:
        raise ScheduleError(
            f"steps {steps} at denoise {denoise:g} runs past the end of the stability schedule's 10-point grid: "
            f"denoise {denoise:g} starts at timestep {stability_grid()[start]} and allows at most {allowed} "
            f"step{'s' if allowed > 1 else ''}. Lower steps to {allowed}, raise denoise to "
            f"{steps / STABILITY_GRID_POINTS:g} or more, or use schedule 'trailing'.",
            "steps",
        )
    return stability_grid()[start : start + steps]


def trailing_timesteps(steps: int, denoise: float = 1.0) -> list[int]:
    """diffusers trailing spacing for ``steps``; img2img keeps the last ``int(steps * denoise)``."""
    _check_steps(steps)
    _check_denoise(denoise)
    ratio = NUM_TRAIN_TIMESTEPS / steps
    full = [round(NUM_TRAIN_TIMESTEPS - i * ratio) - 1 for i in range(steps)]
    run = min(int(steps * denoise), steps)
    if run < 1:
        smallest = next((s for s in range(steps + 1, MAX_STEPS + 1) if int(s * denoise) >= 1), None)
        fix = f"raise steps to {smallest}" if smallest is not None else f"raise denoise to {1 / MAX_STEPS:g} or more"
        raise ScheduleError(
            f"steps {steps} at denoise {denoise:g} runs int({steps} x {denoise:g}) = 0 steps of the "
            f"trailing schedule (diffusers' img2img rule); {fix}.",
            "steps" if smallest is not None else "denoise",
        )
    return full[steps - run :]


def parse_custom_timesteps(text: str) -> list[int]:
    """Parse ``"999,499"``: integers in [0, 999], strictly decreasing, at most ``MAX_STEPS``."""
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise ScheduleError("timesteps is empty: give a comma-separated list such as 999,499", "timesteps")
    values = []
    for p in parts:
        try:
            values.append(int(p))
        except ValueError:
            raise ScheduleError(f"timesteps: {p!r} is not an integer (expected e.g. 999,499)", "timesteps") from None
    bad = [v for v in values if not 0 <= v < NUM_TRAIN_TIMESTEPS]
    if bad:
        raise ScheduleError(f"timesteps: {bad[0]} is outside 0-{NUM_TRAIN_TIMESTEPS - 1}", "timesteps")
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        raise ScheduleError(f"timesteps must be strictly decreasing, got {','.join(map(str, values))}", "timesteps")
    if len(values) > MAX_STEPS:
        raise ScheduleError(f"timesteps has {len(values)} entries; at most {MAX_STEPS} are allowed", "timesteps")
    return values


def add_timesteps(schedule: str, steps: int, denoise: float = 1.0, custom: str = "") -> list[int]:
    """The timesteps one ADD sampling run visits, from the highest down.

    ``custom`` is used (and ``steps`` / ``denoise`` ignored) when ``schedule == "custom"``.
    """
    if schedule == "stability":
        return stability_timesteps(steps, denoise)
    if schedule == "trailing":
        return trailing_timesteps(steps, denoise)
    if schedule == "custom":
        return parse_custom_timesteps(custom)
    raise ScheduleError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}", "schedule")


# -- noise levels ----------------------------------------------------------------------------------
def scaled_linear_alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` for t = 0..num_train_timesteps-1 (float64)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_for_timesteps(timesteps: Sequence[int], alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """k-diffusion sigmas for integer timesteps, with a final 0 appended: shape ``(len(timesteps) + 1,)``."""
    abar = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    t = torch.as_tensor(list(timesteps), dtype=torch.long)
    sig = ((1 - abar[t]) / abar[t]).sqrt()
    return torch.cat([sig, sig.new_zeros(1)]).float()


def vp_coefficients(sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, beta_t) of the VP formulation for a k-diffusion sigma."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    scale = (1 + sigma**2).rsqrt()
    return scale, sigma * scale


# -- updates ---------------------------------------------------------------------------------------
def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = ANCESTRAL_ETA) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion ``get_ancestral_step``)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""k-diffusion's convention: ``noise_sampler(sigma, sigma_next)`` returns one fresh noise tensor shaped
like the latent (the host's ``comfy.k_diffusion.sampling.default_noise_sampler`` and its Brownian ones)."""


def ancestral_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise_sampler: NoiseSampler,
    eta: float = ANCESTRAL_ETA,
) -> torch.Tensor:
    """One Euler-ancestral step from ``sigma`` to ``sigma_next``; noise is drawn only if needed."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    if sigma_down == 0:
        return denoised
    d = (x - denoised) / sigma
    x = x + d * (sigma_down - sigma)
    # drawn even when sigma_up is 0 (eta 0), as the host does
    return x + noise_sampler(sigma, sigma_next) * sigma_up


def ve_noise_scaling(sigma: torch.Tensor | float, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Forward-noise ``latent`` to ``sigma`` for epsilon/v models: ``latent + sigma * noise``."""
    return latent + noise * sigma


def renoise_step(
    denoised: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_sampler: NoiseSampler,
    noise_scaling: Callable = ve_noise_scaling,
) -> torch.Tensor:
    """x0, then forward noise to ``sigma_next`` with fresh noise (nothing added at sigma 0)."""
    if float(sigma_next) <= 0:
        return denoised
    return noise_scaling(sigma_next, noise_sampler(sigma, sigma_next), denoised)


def seeded_noise(like: torch.Tensor, seed: int | None) -> NoiseSampler:
    """Fresh Gaussian noise per call from one generator seeded by ``seed`` (a host-free default).

    Inside ComfyUI the nodes pass the host's own ``default_noise_sampler`` instead, whatever seed
    offset that host version applies, so a run equals the host's ``euler_ancestral`` on every host.
    """
    gen = None
    if seed is not None:
        gen = torch.Generator(device=like.device)
        gen.manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(
        like.size(), dtype=like.dtype, layout=like.layout, device=like.device, generator=gen
    )


Denoiser = Callable[..., torch.Tensor]
"""``model(x, sigma_per_sample, **extra_args) -> x0`` (the host's k-diffusion model wrapper)."""


@torch.no_grad()
def sample(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    update: str,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    noise_sampler: NoiseSampler | None = None,
    noise_scaling: Callable = ve_noise_scaling,
) -> torch.Tensor:
    """Run ``len(sigmas) - 1`` ADD steps.

    Args:
        model: the denoiser, called once per step with a per-sample sigma vector.
        x: the noised starting latent ``(B, C, H, W)`` at ``sigmas[0]`` (k-diffusion space).
        sigmas: decreasing noise levels ending in 0, shape ``(steps + 1,)``.
        update: ``"ancestral"`` or ``"renoise"``.
        extra_args: passed to ``model``; ``extra_args["seed"]`` seeds the default noise.
        callback: called after each model call with ``{"x", "i", "sigma", "sigma_hat", "denoised"}``
            (the host's progress bar and previews).
        noise_sampler: ``noise_sampler(sigma, sigma_next)`` gives each step's fresh noise (k-diffusion
            convention; the nodes pass the host's ``default_noise_sampler``); default
            ``seeded_noise(x, extra_args["seed"])``.
        noise_scaling: forward-noising for ``renoise`` (the host passes ``model_sampling.noise_scaling``).
    Returns:
        The final latent (x0 after the last step).
    """
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; expected one of {', '.join(UPDATES)}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = noise_sampler or seeded_noise(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if update == "ancestral":
            x = ancestral_step(x, denoised, float(sigma), float(sigma_next), noise_sampler)
        else:
            x = renoise_step(denoised, sigma, sigma_next, noise_sampler, noise_scaling)
    return x
