"""Prompt blending for live streams: ``TurboStreamConditioningBlend`` (lerp = the host's ConditioningAverage)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..turbostream import conditioning as core
from ._common import NodeInputError, check_numbers, check_option, schema

NODE = "TurboStreamConditioningBlend"
METHODS = ("lerp", "slerp")


def _host_average(conditioning_to, conditioning_from, strength: float):
    """The host's own ConditioningAverage (a V1 node on the hosts this pack supports)."""
    import nodes as host_nodes

    node = host_nodes.ConditioningAverage
    if hasattr(node, "addWeighted"):
        return node().addWeighted(conditioning_to, conditioning_from, strength)[0]
    return node.execute(conditioning_to, conditioning_from, strength).result[0]  # a V3 node on a newer host


def _slerp(conditioning_a, conditioning_b, weight: float) -> list:
    """Like ConditioningAverage (b's first entry, cut or zero-padded to each entry's token count, pooled
    outputs too), with spherical instead of linear interpolation."""
    cond_b = conditioning_b[0][0]
    pooled_b = conditioning_b[0][1].get("pooled_output")
    out = []
    for tokens_a, extras_a in conditioning_a:
        tokens_b = cond_b[:, : tokens_a.shape[1]]
        if tokens_b.shape[1] < tokens_a.shape[1]:
            pad = torch.zeros((1, tokens_a.shape[1] - tokens_b.shape[1], tokens_a.shape[2]), dtype=tokens_b.dtype)
            tokens_b = torch.cat([tokens_b, pad.to(tokens_b.device)], dim=1)
        extras = extras_a.copy()
        pooled_a = extras_a.get("pooled_output", pooled_b)
        if pooled_a is not None and pooled_b is not None:
            extras["pooled_output"] = core.slerp(pooled_a, pooled_b.to(pooled_a), weight)
        out.append([core.slerp(tokens_a, tokens_b.to(tokens_a), weight), extras])
    return out


class TurboStreamConditioningBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id=NODE,
            display_name="Conditioning Blend (lerp / slerp)",
            category="TurboStream/conditioning",
            description=(
                "Blend two prompts: weight 0 gives a, 1 gives b. lerp is exactly the host's ConditioningAverage; "
                "slerp moves along the great circle between the token embeddings (and pooled outputs), keeping "
                "their norm, so half-way blends stay as strong as the prompts. Move the weight from frame to frame "
                "on a live stream: the stream never restarts."
            ),
            inputs=[
                io.Conditioning.Input("conditioning_a", tooltip="The prompt at weight 0."),
                io.Conditioning.Input("conditioning_b", tooltip="The prompt at weight 1 (its first entry is used)."),
                io.Float.Input(
                    "weight", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="Share of conditioning_b (0 to 1)."
                ),
                io.Combo.Input(
                    "method",
                    options=list(METHODS),
                    default="lerp",
                    tooltip="lerp: linear, = ConditioningAverage(to=a, from=b, strength 1 - weight). slerp: "
                    "spherical per token vector, norms blended linearly.",
                ),
            ],
            outputs=[io.Conditioning.Output(tooltip="The blended conditioning, with a's other entries' extras.")],
        )

    @classmethod
    def execute(cls, conditioning_a, conditioning_b, weight, method="lerp") -> io.NodeOutput:
        check_numbers(cls, weight=weight)
        check_option(NODE, "method", method, METHODS)
        for name, cond in (("conditioning_a", conditioning_a), ("conditioning_b", conditioning_b)):
            if not cond:
                raise NodeInputError(NODE, name, "is empty; connect a CLIPTextEncode (or another conditioning)")
        width_a, width_b = conditioning_a[0][0].shape[-1], conditioning_b[0][0].shape[-1]
        if width_a != width_b:
            raise NodeInputError(
                NODE,
                "conditioning_b",
                f"its embeddings are {width_b}-wide but conditioning_a's are {width_a}-wide: both prompts must come "
                "from the same model's CLIP",
            )
        if method == "lerp":
            return io.NodeOutput(_host_average(conditioning_a, conditioning_b, 1.0 - weight))
        return io.NodeOutput(_slerp(conditioning_a, conditioning_b, weight))


NODES = [TurboStreamConditioningBlend]
