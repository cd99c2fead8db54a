"""Small helpers shared by the node modules: host-version guards and error wording."""

from __future__ import annotations

import inspect
from functools import cache

from ..turbostream.registry import validate_stream_id


@cache
def _accepts_advanced(input_cls: type) -> bool:
    return "advanced" in inspect.signature(input_cls.__init__).parameters


def advanced(input_cls: type, *args, **kwargs):
    """Build an input marked ``advanced=True`` on hosts that know the flag (newer than 0.3.75)."""
    if _accepts_advanced(input_cls):
        kwargs["advanced"] = True
    return input_cls(*args, **kwargs)


class NodeInputError(ValueError):
    """Bad input to a node: names the node and the input, says what was wrong and how to fix it."""

    def __init__(self, node_id: str, input_name: str, message: str) -> None:
        super().__init__(f"{node_id}: {input_name}: {message}")
        self.node_id = node_id
        self.input_name = input_name


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
