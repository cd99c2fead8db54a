"""Small helpers shared by the node modules: host-version guards and error wording."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from functools import cache

import torch
from comfy_api.latest import io

from ..turbostream.oom import OomPolicy, fault_oom_above_from_env
from ..turbostream.registry import validate_stream_id


@cache
def _accepts_advanced(input_cls: type) -> bool:
    return "advanced" in inspect.signature(input_cls.__init__).parameters


def advanced(input_cls: type, *args, **kwargs):
    """A rare knob: optional (an API prompt may leave it out and gets its default) and marked
    ``advanced=True`` on hosts that know the flag (newer than 0.3.75).

    The front end lays widgets out required first, then optional, and saved UI workflows store widget
    values by position: every widget input after an advanced one must be optional too
    (``tests/test_host.py`` checks that the host's widget order is the schema's order).
    """
    kwargs["optional"] = True
    if _accepts_advanced(input_cls):
        kwargs["advanced"] = True
    return input_cls(*args, **kwargs)


def optional(input_cls: type, *args, **kwargs):
    """A knob with a good default that an API prompt may leave out (shown as a normal widget)."""
    return input_cls(*args, optional=True, **kwargs)


_COMMON = ["turbostream", "realtime", "real-time", "fast"]
_STREAM = ["streamdiffusion", "stream diffusion", "stream batch", "rcfg", "residual cfg", "lcm"]
SEARCH_ALIASES: dict[str, list[str]] = {
    "TurboStreamADDSampler": [
        "turbo",
        "sd turbo",
        "sdxl turbo",
        "add",
        "adversarial diffusion distillation",
        "1 step",
        "few step",
        "sampler",
        "ksampler",
    ],
    "TurboStreamADDScheduler": [
        "turbo",
        "sd turbo",
        "sdxl turbo",
        "sdturboscheduler",
        "scheduler",
        "sigmas",
        "trailing",
    ],
    "TurboStreamRenoiseSampler": ["lcm", "consistency", "renoise", "sampler", "turbo"],
    "TurboStreamLCMLoRAFuse": ["lcm", "lcm-lora", "lcm lora", "lora", "fuse", "merge lora", "latent consistency"],
    "TurboStreamTinyVAELoader": ["taesd", "taesdxl", "tiny vae", "tiny autoencoder", "vae loader", "preview vae"],
    "TurboStreamTinyVAEDecode": ["taesd", "tiny vae", "vae decode", "fast decode"],
    "TurboStreamTinyVAEEncode": ["taesd", "tiny vae", "vae encode", "fast encode"],
    "TurboStreamStreamImg2Img": [*_STREAM, "video", "vid2vid", "video img2img", "img2img"],
    "TurboStreamStreamTxt2Img": [*_STREAM, "txt2img", "animation"],
    "TurboStreamLiveImg2Img": [*_STREAM, "live", "webcam", "camera", "img2img"],
    "TurboStreamLiveInput": ["webcam", "camera", "live", "video input", "stream input", "obs"],
    "TurboStreamLiveOutput": ["webcam", "live", "live view", "preview", "stream output", "obs"],
    "TurboStreamConditioningBlend": [
        "prompt blend",
        "blend prompts",
        "slerp",
        "lerp",
        "interpolate prompts",
        "prompt travel",
        "morph",
        "conditioning average",
    ],
    "TurboStreamADDDistill": [
        "add",
        "adversarial diffusion distillation",
        "distill",
        "train",
        "lora training",
        "turbo",
    ],
}
"""Words users type in the node search (shown by hosts whose V3 ``Schema`` has ``search_aliases``)."""


@cache
def _schema_fields() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(io.Schema))


def schema(**kwargs) -> io.Schema:
    """``io.Schema`` plus the node's :data:`SEARCH_ALIASES` where the host knows them (newer than 0.3.75)."""
    if "search_aliases" in _schema_fields():
        kwargs.setdefault("search_aliases", [*SEARCH_ALIASES.get(kwargs["node_id"], []), *_COMMON])
    return io.Schema(**kwargs)


class NodeInputError(ValueError):
    """Bad input to a node: names the node and the input, says what was wrong and how to fix it."""

    def __init__(self, node_id: str, input_name: str, message: str) -> None:
        super().__init__(f"{node_id}: {input_name}: {message}")
        self.node_id = node_id
        self.input_name = input_name


def check_option(node_id: str, input_name: str, value, options: Sequence[str], what: str = "") -> None:
    """Raise :class:`NodeInputError` unless ``value`` is one of ``options`` (a combo's choices).

    Hosts up to 0.3.75 do not check V3 combo values at ``/prompt``, so a node checks them itself.
    ``what`` names long option lists (file names) instead of spelling them out.
    """
    if isinstance(value, str) and value in options:
        return
    listed = what or "one of " + ", ".join(options)
    raise NodeInputError(node_id, input_name, f"{value!r} is not {listed}; pick one from the list")


def number_problem(cls, values: dict) -> tuple[str, str] | None:
    """``(input, message)`` for the first of ``values`` outside its schema min/max, not a number, or NaN/inf.

    The host range-checks widget values only, and skips the inputs a ``validate_inputs`` names (all
    of them when it takes ``**kwargs``); a value that arrives over a link is never checked.
    """
    for spec in cls.define_schema().inputs:
        value = values.get(spec.id)
        if not isinstance(spec, io.Int.Input | io.Float.Input) or value is None or isinstance(value, bool):
            continue
        if not isinstance(value, int | float):
            return spec.id, f"{value!r} is not a number"
        if not math.isfinite(value):
            return spec.id, f"{value!r} is not a finite number"
        if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            return spec.id, f"{value!r} is outside the allowed range {spec.min} to {spec.max}"
    return None


def check_numbers(cls, **values) -> None:
    """Raise :class:`NodeInputError` for the first of ``values`` that :func:`number_problem` refuses."""
    problem = number_problem(cls, values)
    if problem is not None:
        raise NodeInputError(cls.define_schema().node_id, *problem)


def model_family(model) -> str:
    """A human name for a MODEL's base ("SD15", "SDXL"...), from the host's detected config."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else "unknown"


def check_stream_id(node_id: str, stream_id: str) -> None:
    """Raise :class:`NodeInputError` on ``stream_id`` unless it is a valid stream id (never a path)."""
    try:
        validate_stream_id(stream_id)
    except ValueError as exc:
        raise NodeInputError(node_id, "stream_id", str(exc)) from None


OOM_HINT = (
    "lower the resolution, or free memory: close other programs that use the GPU, or unload models "
    "(the host's Unload Models button, or POST /free)"
)
"""What to do when one image or stream slot alone runs out of memory."""


def host_oom_policy() -> OomPolicy:
    """The OOM policy for the pack's chunk runners inside the host: the host's ``OOM_EXCEPTION`` is
    out-of-memory, ``soft_empty_cache`` frees between retries, and ``TURBOSTREAM_FAULT_OOM_ABOVE``
    (a fault-injection hook for tests) raises that exception for chunks above the limit."""
    import comfy.model_management as mm

    host_type = getattr(mm, "OOM_EXCEPTION", torch.OutOfMemoryError)
    # hosts without torch.cuda fall back to OOM_EXCEPTION = Exception: that would match any error
    specific = isinstance(host_type, type) and host_type not in (Exception, BaseException)

    def is_oom(exc: BaseException) -> bool:
        return isinstance(exc, torch.OutOfMemoryError) or (specific and isinstance(exc, host_type))

    return OomPolicy(
        is_oom=is_oom,
        free=mm.soft_empty_cache,
        fault_above=fault_oom_above_from_env(),
        fault_type=host_type if specific else torch.OutOfMemoryError,
        hint=OOM_HINT,
    )
