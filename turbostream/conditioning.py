"""Prompt blending for live streams: spherical interpolation of text embeddings. Pure torch.

``slerp(a, b, w)`` interpolates each vector along the last dimension (one token embedding, or a pooled
output) along the great circle between the two, with the norm interpolated linearly: for embeddings,
whose meaning lives mostly in their direction, a half-way blend keeps a typical norm where ``lerp``
shrinks it (two directions at angle theta: lerp's midpoint has norm cos(theta / 2) of theirs). Where
the two vectors are (almost) parallel it falls back to ``lerp``.
"""

from __future__ import annotations

import torch

PARALLEL_EPS = 1e-6
"""Below this sin(theta), the vectors are treated as parallel and blended linearly."""


def lerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """``a`` at weight 0, ``b`` at weight 1."""
    return a * (1.0 - weight) + b * weight


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation of the vectors along the last dimension of ``a`` and ``b`` (same shape):
    direction along the great circle, norm linear; ``a`` at weight 0, ``b`` at weight 1."""
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    ua, ub = a64 / na.clamp_min(1e-12), b64 / nb.clamp_min(1e-12)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    parallel = sin.abs() < PARALLEL_EPS
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    direction = (torch.sin((1.0 - weight) * theta) * ua + torch.sin(weight * theta) * ub) / safe
    direction = torch.where(parallel, lerp(ua, ub, weight), direction)
    out = direction * lerp(na, nb, weight)
    return out.to(a.dtype)
