"""Per-frame control (ControlNet / T2I-Adapter hints) inside the stream batch. Pure torch.

In a stream call the ``n * f`` slots hold different frames at different timesteps. A control made
for one image broadcasts its hint over the whole batch and decides "on or off" from the batch's
first timestep; here every slot gets the hint of the frame it carries, and each control link is
switched on or off per slot from that slot's own noise level.

A frame's hints travel with it as the engine's slot payload (:class:`FrameHints`, see
``StreamEngine.step``): ``hints[key]`` is the frame's hint image ``(1, C, H, W)`` for the control
link ``key`` (which conditioning, which entry, which link of the chain). For one call,
:func:`link_batch` lays out one link's hints slot by slot and the per-slot strength: the link's
strength where the slot's frame has a hint for it and the slot's sigma lies in the link's range, 0
elsewhere (the host multiplies each control residual by its strength, so 0 switches it off for that
slot only).

The range rule is the host's (``comfy/controlnet.py``): a control with sigma range
``(sigma_start, sigma_end)`` is off at sigma ``s`` when ``s > sigma_start`` or ``s < sigma_end``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

LinkKey = tuple[Hashable, ...]
"""Which control link a hint belongs to, e.g. ``("positive", entry, link)``."""


class HintError(ValueError):
    """A hint batch that does not fit the frames; the message names both counts or sizes."""


@dataclass(frozen=True)
class FrameHints:
    """The hints one frame brought with it, per control link."""

    hints: dict = field(default_factory=dict)
    frame: int | None = None
    """The frame's index in its clip (for messages and tests)."""


def frame_hints(hint: torch.Tensor, frames: int, what: str = "the hint") -> list[torch.Tensor]:
    """One hint ``(1, C, H, W)`` per frame from a hint batch ``(N, C, H, W)``: N equal to the number of
    frames (hint i for frame i) or 1 (the same hint for every frame)."""
    if hint.ndim != 4 or hint.shape[0] == 0:
        raise HintError(f"{what} must be an image batch (N, C, H, W), got shape {tuple(hint.shape)}")
    count = hint.shape[0]
    if count == 1:
        return [hint] * frames
    if count != frames:
        raise HintError(
            f"{what} has {count} images for {frames} frames: give one hint image per frame ({frames}) or a "
            "single image for all of them"
        )
    return [hint[i : i + 1] for i in range(count)]


def slot_active(sigmas: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    """Per slot: is a control with range ``(sigma_start, sigma_end)`` on at that slot's sigma?"""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    return (sigmas <= sigma_start) & (sigmas >= sigma_end)


def link_batch(
    slots: Sequence[FrameHints | None],
    key: LinkKey,
    sigmas: torch.Tensor,
    sigma_range: tuple[float, float],
    strength: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One link's per-slot hints ``(B, C, H, W)`` and strengths ``(B,)`` for one call (None: no slot has
    a hint for this link). A slot whose frame has no hint for the link gets the first present hint as
    a placeholder, at strength 0."""
    hints = [None if s is None else s.hints.get(key) for s in slots]
    present = next((h for h in hints if h is not None), None)
    if present is None:
        return None
    on = slot_active(sigmas, *sigma_range)
    batch = torch.cat([present if h is None else h.to(present.device, present.dtype) for h in hints], dim=0)
    gains = torch.tensor(
        [strength if (h is not None and bool(active)) else 0.0 for h, active in zip(hints, on.tolist(), strict=True)],
        dtype=torch.float32,
    )
    return batch, gains


def check_hint_size(hint: torch.Tensor, height: int, width: int, what: str = "the hint") -> None:
    """The hint must be the frames' size: the host would silently rescale and crop it otherwise."""
    if tuple(hint.shape[-2:]) != (height, width):
        raise HintError(
            f"{what} is {hint.shape[-1]}x{hint.shape[-2]} but the frames are {width}x{height}; make the hint from "
            "the same frames (e.g. Canny on them) or scale it to the frames' size"
        )
