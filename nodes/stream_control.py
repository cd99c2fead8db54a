"""ControlNet / T2I-Adapter inside the stream nodes: each slot gets its own frame's hint.

The user wires the host's nodes as for a still image (ControlNetLoader, ControlNetApplyAdvanced, a
preprocessor such as Canny): the conditioning then carries a chain of host control objects whose hint
batch has one image per frame (or one for all). The stream nodes turn each frame's hints into the
frame's slot payload (``turbostream.stream_control.FrameHints``) and, for every model call, hand the
host's sampling path copies of the chain whose hint batch is laid out slot by slot and whose strength
is per slot (0 where that slot's sigma is outside the link's start/end range or its frame has no hint
for the link). Everything else is the host's own ControlNet code: hint scaling, the control model's
loading and offloading with the UNet (it is in the conditioning the host samples with), strength types.
"""

from __future__ import annotations

import comfy.model_management
import torch

from ..turbostream import stream_control as core
from ._common import NodeInputError, model_family

ROLES = ("positive", "negative")


def _chain(control) -> list:
    """The control links of one conditioning entry, top first (``previous_controlnet`` order)."""
    links = []
    while control is not None:
        links.append(control)
        control = getattr(control, "previous_controlnet", None)
    return links


def _text_width(module) -> int | None:
    for name, param in module.named_parameters():
        if name.endswith("attn2.to_k.weight"):
            return int(param.shape[1])
    return None


def _check_base(node: str, role: str, link, model) -> None:
    """A ControlNet made for another base model (e.g. SDXL's on SD1.5) fails deep inside the UNet; say so here."""
    control_model = getattr(link, "control_model", None)
    want = model.model.model_config.unet_config.get("context_dim")
    have = None if control_model is None else _text_width(control_model)
    if want and have and want != have:
        raise NodeInputError(
            node,
            role,
            f"its ControlNet reads {have}-wide text features but this {model_family(model)} model's are {want}-wide: "
            f"the ControlNet is made for another base model. Load a ControlNet made for {model_family(model)}",
        )


def frame_payloads(node: str, frames: int, height: int, width: int, model, positive, negative):
    """The hints each of ``frames`` frames brings, from every control link in ``positive`` / ``negative``:
    a list of :class:`FrameHints` (None when the conditioning has no control at all)."""
    per_frame: list[dict] = [{} for _ in range(frames)]
    found = False
    for role, cond in zip(ROLES, (positive, negative), strict=True):
        for entry, (_, extras) in enumerate(cond or []):
            links = _chain(extras.get("control"))
            for index, link in enumerate(links):
                hint = getattr(link, "cond_hint_original", None)
                if hint is None:
                    continue
                what = f"the hint of its control (link {index + 1} of {len(links)})"
                _check_base(node, role, link, model)
                try:
                    core.check_hint_size(hint, height, width, what)
                    hints = core.frame_hints(hint, frames, what)
                except core.HintError as exc:
                    raise NodeInputError(node, role, str(exc)) from None
                for i, h in enumerate(hints):
                    per_frame[i][(role, entry, index)] = h
                found = True
    return [core.FrameHints(h, frame=i) for i, h in enumerate(per_frame)] if found else None


def _sigma_range(link, sampling) -> tuple[float, float]:
    start, end = link.timestep_percent_range
    return float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))


def slot_conditioning(cond, role: str, slots, sigmas: torch.Tensor, sampling) -> list:
    """``cond`` for one model call over ``slots``: each control chain replaced by per-call copies whose hint
    batch is slot by slot and whose strength is per slot (links no slot has a hint for are left out)."""
    device = comfy.model_management.get_torch_device()
    out = []
    for entry, (tensor, extras) in enumerate(cond):
        links = _chain(extras.get("control"))
        if not links:
            out.append([tensor, extras])
            continue
        copies = []
        for index, link in enumerate(links):
            batch = core.link_batch(slots, (role, entry, index), sigmas, _sigma_range(link, sampling), 1.0)
            if batch is None:
                continue
            hints, gains = batch
            c = link.copy()
            c.cond_hint_original = hints
            c.timestep_percent_range = (0.0, 1.0)  # judged per slot by the strengths instead
            c.strength = (gains * link.strength).view(-1, 1, 1, 1).to(device)
            copies.append(c)
        for upper, lower in zip(copies, copies[1:], strict=False):
            upper.set_previous_controlnet(lower)
        if copies:
            copies[-1].set_previous_controlnet(None)
        extras = {k: v for k, v in extras.items() if k != "control"}
        if copies:
            extras["control"] = copies[0]
        out.append([tensor, extras])
    return out
