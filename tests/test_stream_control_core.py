"""Per-frame control in the stream (pure torch): each slot gets its own frame's hint, ranges per slot."""

from __future__ import annotations

import pytest
import torch

from turbostream import add_sampler
from turbostream import stream_batch as sb
from turbostream import stream_control as sc

ABAR = add_sampler.scaled_linear_alphas_cumprod()
SHAPE = (4, 2, 2)
KEY = ("positive", 0, 0)


def _sigma(t: int) -> float:
    return float(((1 - ABAR[t]) / ABAR[t]).sqrt())


def _engine(indices: list[int], f: int) -> sb.StreamEngine:
    timesteps = sb.lcm_timesteps(indices)
    schedule = sb.SlotSchedule.build(timesteps, [_sigma(t) for t in timesteps], f, boundary="lcm")
    return sb.StreamEngine(sb.StreamConfig(timesteps, f, cfg_type="none"), schedule, SHAPE, dtype=torch.float64)


def _recording_denoiser(calls: list):
    def denoise(x, t, cond, slots=None):
        calls.append("no slots" if slots is None else [None if s is None else s.frame for s in slots])
        return x * 0.5

    return denoise


@pytest.mark.parametrize("f", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_slot_of_every_call_carries_its_own_frames_hint(f, n):
    """Slot (step i, position j) of call k holds the frame fed at call k - i (none before the start); the
    drain calls feed the last group again, with its hints."""
    engine = _engine([0, 16, 32, 45][:n], f)
    groups_count = 5
    frames = [[g * f + j for j in range(f)] for g in range(groups_count)]
    payloads = [[sc.FrameHints({KEY: torch.full((1, 3, 8, 8), float(i))}, frame=i) for i in g] for g in frames]
    groups = [torch.zeros(f, *SHAPE, dtype=torch.float64) for _ in frames]
    calls: list[list] = []
    sb.stream_frames(engine, groups, _recording_denoiser(calls), cond=None, payloads=payloads)
    fed = list(range(groups_count)) + [groups_count - 1] * (n - 1)
    assert len(calls) == len(fed)
    for k, seen in enumerate(calls):
        expected = []
        for i in range(n):
            source = fed[k - i] if k - i >= 0 else None
            expected += [None] * f if source is None else frames[source]
        assert seen == expected, (k, seen, expected)


def test_a_frame_without_hints_and_a_stream_without_any():
    engine = _engine([32, 45], 1)
    calls: list = []
    denoise = _recording_denoiser(calls)
    z = torch.zeros(1, *SHAPE, dtype=torch.float64)
    engine.img2img(z, denoise, None, payload=[sc.FrameHints({KEY: torch.zeros(1, 3, 8, 8)}, frame=0)])
    engine.img2img(z, denoise, None, payload=[None])  # the control was removed: the old frame keeps its hint
    engine.img2img(z, denoise, None, payload=[None])  # no frame has one any more: plain denoiser call
    assert calls == [[0, None], [None, 0], "no slots"]
    assert engine.calls == 3


def test_link_batch_switches_exactly_the_slots_outside_the_range():
    """Per-slot strength: the link's strength where the slot's sigma is in the range and its frame has a
    hint for the link, 0 elsewhere (the host's rule: off where sigma > start or sigma < end)."""
    timesteps = [999, 759, 499, 259, 99]
    sigmas = torch.tensor([_sigma(t) for t in timesteps], dtype=torch.float64)
    start, end = _sigma(800), _sigma(200)  # on for 759, 499, 259
    hints = [torch.full((1, 3, 4, 4), float(i)) for i in range(5)]
    slots = [sc.FrameHints({KEY: h}, frame=i) for i, h in enumerate(hints)]
    slots[2] = sc.FrameHints({("positive", 0, 1): hints[2]}, frame=2)  # frame 2 has no hint for this link
    batch, gains = sc.link_batch(slots, KEY, sigmas, (start, end), 0.7)
    assert gains.tolist() == pytest.approx([0.0, 0.7, 0.0, 0.7, 0.0])
    assert [float(b.mean()) for b in batch] == [0.0, 1.0, 0.0, 3.0, 4.0]  # own hints; a placeholder for frame 2
    assert sc.slot_active(sigmas, start, end).tolist() == [False, True, True, True, False]
    assert sc.link_batch([None, None], KEY, sigmas[:2], (start, end), 1.0) is None


def test_hint_counts_and_sizes():
    one = torch.zeros(1, 3, 8, 8)
    assert len(sc.frame_hints(one, 4)) == 4
    many = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 8, 8)
    assert [float(h.mean()) for h in sc.frame_hints(many, 3)] == [0.0, 1.0, 2.0]
    with pytest.raises(sc.HintError, match="has 3 images for 4 frames"):
        sc.frame_hints(many, 4)
    with pytest.raises(sc.HintError, match="is 8x8 but the frames are 16x8"):
        sc.check_hint_size(one, 8, 16)
