"""ADD sampler core (pure torch): schedules, the diffusers oracle for ancestral, exact renoise steps."""

from __future__ import annotations

import pytest
import torch

from turbostream import add_sampler as core


# -- schedules -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "steps,expected", [(1, [999]), (2, [999, 899]), (3, [999, 899, 799]), (4, [999, 899, 799, 699])]
)
def test_stability_txt2img(steps, expected):
    assert core.stability_timesteps(steps) == expected


def test_stability_img2img_start_follows_the_host_rule():
    # start index = 10 - int(10 * denoise), as ComfyUI's SDTurboScheduler
    assert core.stability_timesteps(2, 0.5) == [499, 399]
    assert core.stability_timesteps(1, 0.1) == [99]
    assert core.stability_timesteps(3, 0.3) == [299, 199, 99]
    assert core.stability_timesteps(1, 0.29) == [199]  # int(2.9) = 2


def test_stability_refuses_to_truncate():
    with pytest.raises(core.ScheduleError, match="allows at most 3 steps") as err:
        core.stability_timesteps(4, 0.3)
    assert "Lower steps to 3" in str(err.value) and "0.4" in str(err.value)
    with pytest.raises(core.ScheduleError, match="below 0.1"):
        core.stability_timesteps(1, 0.05)


@pytest.mark.parametrize(
    "steps,expected", [(1, [999]), (2, [999, 499]), (3, [999, 666, 332]), (4, [999, 749, 499, 249])]
)
def test_trailing_matches_diffusers(steps, expected):
    from diffusers import EulerAncestralDiscreteScheduler

    sched = EulerAncestralDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=core.BETA_START, beta_end=core.BETA_END, timestep_spacing="trailing"
    )
    sched.set_timesteps(steps)
    assert core.trailing_timesteps(steps) == expected == [int(t) for t in sched.timesteps]


def test_trailing_img2img_rule():
    assert core.trailing_timesteps(4, 0.5) == [499, 249]
    assert core.trailing_timesteps(4, 0.3) == [249]  # int(1.2) = 1
    with pytest.raises(core.ScheduleError, match="raise steps to 4"):
        core.trailing_timesteps(2, 0.3)
    with pytest.raises(core.ScheduleError, match="raise denoise"):
        core.trailing_timesteps(8, 0.1)


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty"),
        (" , ", "empty"),
        ("999,abc", "not an integer"),
        ("1000,500", "outside 0-999"),
        ("-1", "outside"),
        ("499,499", "strictly decreasing"),
        ("200,400", "strictly decreasing"),
        ("900,800,700,600,500,400,300,200,100", "at most 8"),
    ],
)
def test_custom_timesteps_errors(text, message):
    with pytest.raises(core.ScheduleError, match=message):
        core.parse_custom_timesteps(text)


def test_custom_and_dispatch():
    assert core.add_timesteps("custom", 1, 1.0, " 999, 499 ") == [999, 499]
    assert core.add_timesteps("trailing", 2) == [999, 499]
    with pytest.raises(core.ScheduleError, match="unknown schedule"):
        core.add_timesteps("karras", 2)
    with pytest.raises(core.ScheduleError, match="between 1 and 8"):
        core.add_timesteps("stability", 0)
    with pytest.raises(core.ScheduleError, match="between 0.0 and 1.0"):
        core.add_timesteps("stability", 1, 1.5)


def test_sigmas_match_the_vp_schedule():
    abar = core.scaled_linear_alphas_cumprod()
    sig = core.sigmas_for_timesteps([999, 0])
    assert sig.shape == (3,) and sig[-1] == 0
    alpha, beta = core.vp_coefficients(sig[0])
    assert float(alpha) == pytest.approx(abar[999].sqrt().item(), rel=1e-6)
    assert float(beta) == pytest.approx((1 - abar[999]).sqrt().item(), rel=1e-6)
    assert float(sig[0]) == pytest.approx(14.6146, rel=1e-4)  # SD's sigma_max, a well-known constant


# -- updates ---------------------------------------------------------------------------------------
def _eps_model(x_scaled: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, nonlinear stand-in epsilon predictor."""
    return 0.7 * torch.tanh(x_scaled) + 0.05 * torch.sin(t.float().view(-1, 1, 1, 1) / 37.0)


def test_trailing_ancestral_reproduces_diffusers_euler_ancestral():
    """Our ancestral update on trailing sigmas == diffusers EulerAncestralDiscreteScheduler, step by step."""
    from diffusers import EulerAncestralDiscreteScheduler

    steps, shape, seed = 4, (2, 4, 8, 8), 1234
    sched = EulerAncestralDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=core.BETA_START, beta_end=core.BETA_END, timestep_spacing="trailing"
    )
    sched.set_timesteps(steps)
    timesteps = core.trailing_timesteps(steps)
    sigmas = core.sigmas_for_timesteps(timesteps)
    torch.testing.assert_close(sigmas, sched.sigmas.float(), rtol=1e-5, atol=1e-5)

    x_init = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    # diffusers: sample = noise * init_noise_sigma, then step() with its own generator draws
    gen_ref = torch.Generator().manual_seed(seed)
    sample = x_init * sched.init_noise_sigma
    ref_trajectory = []
    for t in sched.timesteps:
        eps = _eps_model(sched.scale_model_input(sample, t), t.expand(shape[0]))
        sample = sched.step(eps, t, sample, generator=gen_ref).prev_sample
        ref_trajectory.append(sample)

    # ours: k-diffusion space, denoiser returns x0 = x - sigma * eps(x / sqrt(1 + sigma^2))
    sigma_to_t = dict(zip([round(float(s), 4) for s in sigmas[:-1]], timesteps, strict=True))

    def denoiser(x, sigma_vec):
        s = sigma_vec[0]
        t = torch.full((x.shape[0],), sigma_to_t[round(float(s), 4)])
        return x - s * _eps_model(x / (1 + s**2) ** 0.5, t)

    trajectory = []
    x = x_init * sched.init_noise_sigma  # the same start for both (diffusers scales by its init_noise_sigma)
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = core.sample(
            denoiser, x, sigmas[i : i + 2], "ancestral", noise_sampler=lambda s, sn: torch.randn(shape, generator=gen)
        )
        trajectory.append(x)
    for ours, ref in zip(trajectory, ref_trajectory, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_renoise_steps_are_exactly_vp_forward_noising():
    """With a denoiser that returns a known x0, step i outputs alpha_{t+1} x0 + beta_{t+1} noise_i (VP)."""
    timesteps = [999, 749, 499, 249]
    sigmas = core.sigmas_for_timesteps(timesteps).double()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noises = [
        torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64)
        for i in range(len(timesteps))
    ]
    seen = []

    def denoiser(x, sigma_vec):
        seen.append(x)
        return x0

    draws = iter(noises)
    out = core.sample(denoiser, torch.zeros_like(x0), sigmas, "renoise", noise_sampler=lambda s, sn: next(draws))
    assert torch.equal(out, x0), "the last step ends at x0 with no noise"
    for i, x in enumerate(seen[1:]):  # the input of step i+1 is the output of step i
        alpha, beta = core.vp_coefficients(sigmas[i + 1])
        torch.testing.assert_close(alpha * x, alpha * x0 + beta * noises[i], rtol=0, atol=1e-12)


def test_ancestral_last_step_returns_x0_and_seeded_noise_is_reproducible():
    x = torch.randn(1, 4, 4, 4)
    assert torch.equal(core.ancestral_step(x, x * 0.5, 1.0, 0.0, noise_sampler=lambda s, sn: 1 / 0), x * 0.5)
    a, b = core.seeded_noise(x, 7), core.seeded_noise(x, 7)
    first = a(1.0, 0.5)
    assert torch.equal(first, b(1.0, 0.5)) and not torch.equal(first, a(0.5, 0.0))


def test_ancestral_sigmas_follow_k_diffusion():
    down, up = core.ancestral_sigmas(2.0, 1.0)
    assert up == pytest.approx((1.0 * (4 - 1) / 4) ** 0.5)
    assert down == pytest.approx((1 - up**2) ** 0.5)
    assert core.ancestral_sigmas(2.0, 1.0, eta=0) == (1.0, 0.0)


def test_unknown_update():
    with pytest.raises(ValueError, match="unknown update"):
        core.sample(lambda x, s: x, torch.zeros(1, 4, 2, 2), torch.tensor([1.0, 0.0]), "heun")
