"""Stream batch core (pure torch): alignment with per-frame LCM denoising, RCFG, filter, schedules."""

from __future__ import annotations

import pytest
import torch

from turbostream import add_sampler
from turbostream import stream_batch as sb

ABAR = add_sampler.scaled_linear_alphas_cumprod()
SHAPE = (4, 6, 5)


def sigma_of(t: int) -> float:
    return float(((1 - ABAR[t]) / ABAR[t]).sqrt())


def make_denoiser(boundary: str = "lcm"):
    """A stand-in LCM denoiser: a fixed nonlinear eps net, conditioned on a scalar ``cond``."""
    calls = []

    def eps_net(x, t, cond):
        return 0.6 * torch.tanh(x) + 0.01 * cond + 0.02 * torch.cos(t.double().view(-1, 1, 1, 1) / 50)

    def denoise(x, t, cond):
        calls.append(x.shape[0])
        x = x.double()
        abar = ABAR[t].view(-1, 1, 1, 1)
        alpha, beta = abar.sqrt(), (1 - abar).sqrt()
        eps = eps_net(x, t, cond)
        c_skip, c_out = sb.lcm_boundary(t) if boundary == "lcm" else (torch.zeros(len(t)), torch.ones(len(t)))
        return c_out.view(-1, 1, 1, 1) * (x - beta * eps) / alpha + c_skip.view(-1, 1, 1, 1) * x

    return denoise, calls


def make_engine(timesteps, f=1, cfg_type="none", add_noise=False, seed=0, **kw):
    config = sb.StreamConfig(
        timesteps=timesteps, frame_buffer_size=f, cfg_type=cfg_type, add_noise=add_noise, seed=seed, **kw
    )
    schedule = sb.SlotSchedule.build(timesteps, [sigma_of(t) for t in timesteps], f, boundary="lcm")
    return sb.StreamEngine(config, schedule, SHAPE, dtype=torch.float64)


def per_frame_reference(z, j, engine, denoise, cond, add_noise):
    """Multi-step LCM denoise of one frame (slot j of its group), with the stream's fixed noise."""
    s, f, noise = engine.schedule, engine.config.frame_buffer_size, engine.init_noise
    steps = engine.config.steps
    x = s.alpha[j] * z + s.beta[j] * noise[j]
    for i in range(steps):
        slot = i * f + j
        x0 = denoise(x[None], s.t[slot : slot + 1], cond)[0]
        if i + 1 < steps:
            nxt = (i + 1) * f + j
            x = s.alpha[nxt] * x0 + (s.beta[nxt] * noise[nxt] if add_noise else 0)
    return x0


@pytest.mark.parametrize("f", [1, 2])
@pytest.mark.parametrize("indices", [[45], [32, 45], [20, 32, 45], [0, 16, 32, 45]])
@pytest.mark.parametrize("add_noise", [False, True])
def test_stream_equals_per_frame_lcm_denoise(f, indices, add_noise):
    timesteps = sb.lcm_timesteps(indices)
    engine = make_engine(timesteps, f=f, add_noise=add_noise)
    denoise, calls = make_denoiser()
    frames = torch.randn(3 * f, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    groups = [frames[i : i + f] for i in range(0, len(frames), f)]
    outputs = sb.stream_frames(engine, groups, denoise, cond=1.0)
    assert len(outputs) == len(groups) and engine.calls == len(groups) + len(indices) - 1
    ref_denoise, _ = make_denoiser()
    for g, out in enumerate(outputs):
        for j in range(f):
            ref = per_frame_reference(groups[g][j], j, engine, ref_denoise, 1.0, add_noise)
            torch.testing.assert_close(out[j], ref, rtol=1e-10, atol=1e-10)
    assert all(c == len(indices) * f for c in calls), "one batched call of n*f slots per step"


@pytest.mark.parametrize(
    "cfg_type,expected",
    [
        ("none", lambda n, f: n * f),
        ("self", lambda n, f: n * f),
        ("initialize", lambda n, f: n * f + f),
        ("full", lambda n, f: 2 * n * f),
    ],
)
@pytest.mark.parametrize("n,f", [(1, 1), (2, 1), (2, 3), (4, 2)])
def test_evaluations_per_call(cfg_type, expected, n, f):
    engine = make_engine(sb.lcm_timesteps(list(range(0, 4 * n, 4))), f=f, cfg_type=cfg_type, guidance=1.5)
    denoise, calls = make_denoiser()
    for _ in range(3):
        engine.img2img(torch.zeros(f, *SHAPE, dtype=torch.float64), denoise, cond=1.0, uncond=0.0)
    assert engine.evaluations == 3 * expected(n, f) == 3 * sb.expected_evaluations(engine.config)
    assert sum(calls) == engine.evaluations


def test_full_cfg_is_conventional_cfg():
    engine = make_engine(sb.lcm_timesteps([45]), cfg_type="full", guidance=2.0)
    denoise, _ = make_denoiser()
    z = torch.randn(1, *SHAPE, dtype=torch.float64)
    out = engine.img2img(z, denoise, cond=1.0, uncond=-1.0)
    x = engine.first_slot_img2img(z)
    t = engine.schedule.t
    c, u = denoise(x, t, 1.0), denoise(x, t, -1.0)
    torch.testing.assert_close(out, u + 2.0 * (c - u))  # x0 is affine in eps, so CFG carries over


def test_rcfg_stock_noise_matches_the_spec_formula_by_hand():
    """n=2, f=1, cfg self: the first call uses stock [init_0, 0] (upstream shifts its zeros before call 0);
    after it, stock = [init_0, s'_0] with s'_0 = init_1 + delta_0 (StreamDiffusion RCFG)."""
    timesteps = sb.lcm_timesteps([32, 45])
    engine = make_engine(timesteps, cfg_type="self", guidance=1.2, delta=0.7, add_noise=True)
    denoise, _ = make_denoiser()
    z = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.cat([engine.first_slot_img2img(z), engine.buffer])
    engine.img2img(z, denoise, cond=1.0)
    s = engine.schedule
    noise = engine.init_noise
    x0_c = denoise(x, s.t, 1.0)
    a = s.c_out / s.alpha + s.c_skip
    b = -s.c_out * s.beta / s.alpha
    eps_c = (x0_c - a.view(-1, 1, 1, 1) * x) / b.view(-1, 1, 1, 1)
    stock0 = torch.cat([noise[:1], torch.zeros_like(noise[1:])])  # the newest slot's own noise, then nothing yet
    eps = 0.7 * stock0 + 1.2 * (eps_c - 0.7 * stock0)
    # slot 0 by hand: delta_0 = [c_out*(beta*s - beta*eps)/alpha + c_skip*beta*s] * alpha_1/beta_1
    i = 0
    s0 = stock0[i]
    delta_0 = s.c_out[i] * (s.beta[i] * s0 - s.beta[i] * eps[i]) / s.alpha[i] + s.c_skip[i] * s.beta[i] * s0
    delta_0 = delta_0 * s.alpha[1] / s.beta[1]
    torch.testing.assert_close(engine.stock_noise[0], noise[0])
    torch.testing.assert_close(engine.stock_noise[1], noise[1] + delta_0)


def test_initialize_uses_the_real_uncond_for_all_f_newest_slots():
    engine = make_engine(sb.lcm_timesteps([32, 45]), f=2, cfg_type="initialize", guidance=1.5, delta=1.0)
    denoise, calls = make_denoiser()
    engine.img2img(torch.zeros(2, *SHAPE, dtype=torch.float64), denoise, cond=1.0, uncond=0.0)
    assert calls == [4, 2]


def test_guidance_needs_a_negative_for_full_and_initialize():
    for cfg_type in ("full", "initialize"):
        engine = make_engine(sb.lcm_timesteps([45]), cfg_type=cfg_type, guidance=1.5)
        with pytest.raises(sb.StreamError, match="needs a negative") as err:
            engine.img2img(torch.zeros(1, *SHAPE, dtype=torch.float64), make_denoiser()[0], cond=1.0)
        assert err.value.input_name == "negative"


def test_conditioning_change_keeps_the_buffer():
    engine = make_engine(sb.lcm_timesteps([20, 45]), add_noise=True)
    denoise, _ = make_denoiser()
    z = torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    engine.img2img(z[0], denoise, cond=1.0)
    buffer = engine.buffer.clone()
    assert buffer.abs().sum() > 0
    out = engine.img2img(z[1], denoise, cond=-3.0)  # new prompt: no reset
    x = torch.cat([engine.first_slot_img2img(z[1]), buffer])
    torch.testing.assert_close(out, denoise(x, engine.schedule.t, -3.0)[-1:])


def test_similarity_filter_on_a_static_clip():
    frame = torch.rand(3, 16, 16) * 2 - 1
    flt = sb.SimilarityFilter(threshold=0.98, max_skip_frames=4, seed=0)
    skips = [flt.should_skip(frame) for _ in range(21)]
    # identical frames: cos = 1, skip probability 1 -> process, then exactly 4 skips, repeat
    assert skips == [False] + ([True] * 4 + [False]) * 4


def test_similarity_filter_rate_matches_its_probability():
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(3, 32, 32, generator=gen) * 2 - 1
    frames = [base + 0.08 * torch.randn(base.shape, generator=gen) for _ in range(400)]
    flt = sb.SimilarityFilter(threshold=0.95, max_skip_frames=1000, seed=7)
    probs, skipped = [], 0
    for fr in frames:
        if flt.reference is not None:
            cos = sb.cosine_similarity(flt.reference, fr)
            probs.append(max(0.0, (cos - 0.95) / 0.05))
        skipped += flt.should_skip(fr)
    expected = sum(probs)
    assert 0.1 < expected / len(frames) < 0.9, "the clip must make the filter's choice non-trivial"
    assert abs(skipped - expected) < 4 * expected**0.5 + 5
    again = sb.SimilarityFilter(threshold=0.95, max_skip_frames=1000, seed=7)
    assert sum(again.should_skip(fr) for fr in frames) == skipped  # seeded: reproducible


def test_filter_off():
    frame = torch.ones(3, 4, 4)
    for threshold in (0.0, 1.0):
        flt = sb.SimilarityFilter(threshold, 10, 0)
        assert not any(flt.should_skip(frame) for _ in range(5))


def test_skipped_groups_reuse_the_previous_output():
    engine = make_engine(sb.lcm_timesteps([32, 45]))
    denoise, _ = make_denoiser()
    groups = [torch.randn(1, *SHAPE, dtype=torch.float64) for _ in range(4)]
    outs = sb.stream_frames(engine, groups, denoise, 1.0, skip=[False, True, False, True])
    assert outs[1] is outs[0] and outs[3] is outs[2] and not torch.equal(outs[0], outs[2])
    assert engine.calls == 2 + 1


def test_txt2img_stream_is_deterministic_and_aligned():
    outs = []
    for _ in range(2):
        engine = make_engine(sb.lcm_timesteps([0, 16, 32, 45]), f=2, seed=11)
        outs.append(sb.stream_frames(engine, [None] * 3, make_denoiser()[0], 1.0))
        assert engine.calls == 3 + 3
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    assert len({o.sum().item() for o in outs[0]}) == 3, "each group is a different frame"


@pytest.mark.parametrize(
    "text,mode,fragment",
    [
        ("", "lcm_index", "empty"),
        ("32,x", "lcm_index", "not an integer"),
        ("45,32", "lcm_index", "strictly increasing"),
        ("32,32", "lcm_index", "strictly increasing"),
        ("50", "lcm_index", "outside 0-49"),
        ("499,999", "timesteps", "strictly decreasing"),
        ("1000", "timesteps", "outside 0-999"),
    ],
)
def test_t_index_list_errors(text, mode, fragment):
    with pytest.raises(sb.StreamError, match=fragment):
        sb.parse_t_index_list(text, mode)


def test_t_index_list():
    assert sb.parse_t_index_list("32, 45") == [359, 99]
    assert sb.parse_t_index_list("0,16,32,45") == [999, 679, 359, 99]
    assert sb.parse_t_index_list("999,499", "timesteps") == [999, 499]


def test_frame_groups_pad_the_last_group():
    groups, pad = sb.frame_groups(5, 2)
    assert [(g.start, g.stop) for g in groups] == [(0, 2), (2, 4), (4, 5)] and pad == 1
    assert sb.frame_groups(4, 2)[1] == 0


def test_a_failed_frame_leaves_the_stream_untouched():
    """transaction(): a call that raises midway (e.g. the host's interrupt inside the UNet, after the
    filter already looked at the frame) leaves engine, filter and bookkeeping exactly as before."""
    denoise, _ = make_denoiser()
    frames = [torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(4)]

    def run(fail_at: int | None):
        engine = make_engine([359, 99], cfg_type="self", guidance=1.2, add_noise=True)
        flt = sb.SimilarityFilter(0.5, 3, seed=1)
        meta, outs = {"frames": 0}, []
        for k, z in enumerate(frames):
            boom = k == fail_at

            def failing(x, t, cond):
                raise KeyboardInterrupt("interrupted")  # what the host's interrupt raises, in spirit

            try:
                with sb.transaction(engine, engine.config, flt, meta):
                    engine.config.guidance = 3.0 if boom else 1.2
                    meta["frames"] += 1
                    flt.should_skip(z.float())
                    outs.append(engine.img2img(z, failing if boom else denoise, 0.5))
            except KeyboardInterrupt:
                assert boom
        return engine, flt, meta, outs

    ref_engine, ref_flt, ref_meta, ref = run(None)
    engine, flt, meta, outs = run(2)
    assert meta["frames"] == 3 and engine.config.guidance == 1.2 and engine.calls == 3
    # Frame 3 after the failed frame 2 equals frame 3 of a stream that never saw frame 2.
    skip2 = [frames[0], frames[1], frames[3]]
    engine2 = make_engine([359, 99], cfg_type="self", guidance=1.2, add_noise=True)
    flt2 = sb.SimilarityFilter(0.5, 3, seed=1)
    expected = []
    for z in skip2:
        flt2.should_skip(z.float())
        expected.append(engine2.img2img(z, denoise, 0.5))
    assert all(torch.equal(a, b) for a, b in zip(outs, expected, strict=True))
    assert torch.equal(flt.generator.get_state(), flt2.generator.get_state())
    assert torch.equal(flt.reference, flt2.reference)
    assert not torch.equal(outs[-1], ref[-1])  # the failed frame really was left out


def _retarget_run(old, new, k_change=4, more=5, cfg_type="self", seed_new=None, f=1):
    """Engine A: frames 0..k-1 with ``old`` t_index list, then retargeted to ``new`` (and seed) for the rest;
    engine B: fresh with the new settings, fed frames k.. only. Returns (A outputs after the change, B outputs)."""
    frames = torch.randn(k_change + more, f, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    denoise, _ = make_denoiser()
    a = make_engine(sb.lcm_timesteps(old), f=f, cfg_type=cfg_type, guidance=1.3, add_noise=True, seed=1)
    for z in frames[:k_change]:
        a.img2img(z, denoise, cond=1.0)
    seed = 1 if seed_new is None else seed_new
    b = make_engine(sb.lcm_timesteps(new), f=f, cfg_type=cfg_type, guidance=1.3, add_noise=True, seed=seed)
    message = a.retarget(b.config, b.schedule)
    outs_a = [a.img2img(z, denoise, cond=1.0) for z in frames[k_change:]]
    outs_b = [b.img2img(z, denoise, cond=1.0) for z in frames[k_change:]]
    return outs_a, outs_b, message, a


@pytest.mark.parametrize("f", [1, 2])
@pytest.mark.parametrize(
    "old,new,seed",
    [
        ([32, 45], [20, 45], None),
        ([20, 45], [25, 35, 45], None),
        ([25, 35, 45], [32, 45], None),
        ([32, 45], [32, 45], 9),
    ],
)
def test_retarget_keeps_the_stream_and_converges_to_a_fresh_one(old, new, seed, f):
    """A new step list (or seed) mid-stream: no restart; from len(new) - 1 calls after the change on, every
    output equals a stream started fresh on the same frames with the new settings (RCFG self)."""
    outs_a, outs_b, message, engine = _retarget_run(old, new, seed_new=seed, f=f)
    lag = len(new) - 1
    for i in range(lag, len(outs_a)):
        torch.testing.assert_close(outs_a[i], outs_b[i], rtol=1e-10, atol=1e-10)
    assert engine.calls == 4 + len(outs_a) and engine.lag == lag
    assert "carried to timesteps" in message and f"seed {1 if seed is None else seed}" in message
    # the first outputs after the change come from real buffered frames, not from an empty buffer
    fresh = make_engine(sb.lcm_timesteps(new), f=f, cfg_type="self", guidance=1.3, add_noise=True, seed=1)
    empty_out = fresh.img2img(torch.zeros(f, *SHAPE, dtype=torch.float64), make_denoiser()[0], cond=1.0)
    for i in range(lag):
        assert not torch.allclose(outs_a[i], empty_out), i


def test_retarget_refuses_a_new_frame_group_size():
    a = make_engine(sb.lcm_timesteps([32, 45]), f=1)
    b = make_engine(sb.lcm_timesteps([32, 45]), f=2)
    with pytest.raises(ValueError, match="keeps frame_buffer_size"):
        a.retarget(b.config, b.schedule)


def test_feedback_blends_the_last_finished_output_into_the_next_input():
    engine = make_engine(sb.lcm_timesteps([32, 45]), add_noise=True)
    seen = []

    def denoise(x, t, cond):
        seen.append(x[:1].clone())
        return x * 0.5

    z = torch.randn(3, 1, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    engine.img2img(z[0], denoise, cond=None, feedback=0.4)  # nothing has left the stream yet
    engine.img2img(z[1], denoise, cond=None, feedback=0.4)  # call 0 gave out the empty buffer: not a frame
    for i in (0, 1):
        torch.testing.assert_close(seen[i], engine.first_slot_img2img(z[i]))
    previous = engine.last_finished.clone()  # frame 0, finished in call 1
    engine.img2img(z[2], denoise, cond=None, feedback=0.4)
    torch.testing.assert_close(seen[2], engine.first_slot_img2img(0.6 * z[2] + 0.4 * previous))
