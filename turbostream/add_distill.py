"""ADD distillation (arXiv 2311.17042): train a 1-4 step student from a diffusion teacher.

Pure torch (PIL only for the loss-curve picture). The host glue (``nodes/add_distill.py``) and the
toy reproduction (``bench/add_toy.py``) hand in their networks through a small interface, so this
module never knows what a ComfyUI model is.

Notation (variance preserving, as in the paper): ``x_t = alpha_t * x0 + sigma_t * eps`` with
``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``. A *denoiser*
``denoise(net, x_t, t, cond) -> x0`` turns a network into an x0 prediction (epsilon, v or x0
parametrisation is the caller's business).

One training iteration (``ADDTrainer.train_step``; paper §3):

1. Draw real samples ``x0``, one student timestep ``s`` per sample from ``student_timesteps``
   (default 999, 749, 499, 249) and noise; ``x_s = alpha_s x0 + sigma_s eps``.
2. Student one-step prediction ``x_theta = denoise(student, x_s, s, cond)``.
3. Distillation target: ``t ~ U{teacher_t_min..teacher_t_max}``, re-noise the student sample
   ``x_theta_t = alpha_t sg(x_theta) + sigma_t eps'`` and ask the frozen teacher
   ``target = sg(denoise(teacher, x_theta_t, t, cond))`` (optionally with classifier-free guidance).
   ``L_distill = mean_b c(t_b) * mean((x_theta - target)^2)`` with the paper's "exponential"
   weighting ``c(t) = alpha_t`` (higher noise contributes less).
4. Student update: ``L_G = adversarial_weight * L_adv + distill_weight * L_distill`` with the hinge
   generator loss ``L_adv = -sum_k mean D_k(F_k(decode(x_theta)))``; distill_weight (lambda) 2.5.
5. Discriminator update: ``L_D = sum_k [mean relu(1 - D_k(real)) + mean relu(1 + D_k(fake))]
   + r1_weight * R1``. ``D_k`` is a trainable head (StyleGAN-T's: spectrally normalised 1-D convs over
   the tokens, each followed by a local batch norm) on layer k of a frozen feature network ``F``
   (a ViT: DINOv2 when its weights are supplied, a tiny built-in one for tests), optionally
   conditioned on a text embedding by projection. R1 is taken on the *head inputs* (the real
   features), as the paper does, so the frozen network needs no double backward:
   ``R1 = mean_b sum_k ||d(sum_n D_k(f)_n) / d f_k||^2``.

The student is a copy of the teacher: with LoRA adapters on every Linear / Conv2d layer (base
weights frozen) or fully trainable. The teacher is never given adapters, hooks or gradients.
Randomness comes from one seeded generator (on the CPU, then moved), so a run is a pure function
of its seed on the CPU, and ``state_dict`` / ``load_state_dict`` (LoRA or student, heads, both
optimisers, step, generator state, log) resume a run on the same loss curve. On CUDA, mixed
precision (bfloat16 autocast where supported) and gradient checkpointing switch on; CUDA kernels
are not bit-deterministic.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .add_sampler import trailing_timesteps

STUDENT_TIMESTEPS = tuple(trailing_timesteps(4))
"""Student timesteps of the paper: 999, 749, 499, 249 (diffusers trailing spacing, 4 steps)."""
DISTILL_WEIGHT = 2.5
"""lambda of the paper: weight of the distillation loss against the adversarial loss."""
R1_WEIGHT = 1e-5
"""Weight of the R1 penalty on the discriminator heads (of the order the paper reports, ~1e-5)."""
TEACHER_T_RANGE = (1, 999)
"""Teacher timesteps for the distillation target, drawn uniformly (inclusive)."""
HEAD_CHANNELS = 64
"""Hidden channels of each discriminator head."""
HEAD_KERNEL = 9
"""Kernel of the heads' residual 1-D convolution over the token sequence (StyleGAN-T uses 9)."""
CMAP_DIM = 64
"""Width of the projection that conditions a head on the text embedding."""
LEAKY_SLOPE = 0.2
BN_VIRTUAL_BATCH = 8
"""Samples per group of the heads' ``BatchNormLocal`` (StyleGAN-T's virtual batch size)."""
STUDENT_BETAS = (0.9, 0.999)
"""Adam betas of the student (the usual fine-tuning choice)."""
DISCRIMINATOR_BETAS = (0.0, 0.99)
"""Adam betas of the discriminator heads (no momentum, the StyleGAN-T / ADD choice)."""
LORA_PREFIX = "lora_unet_"
"""Module-name prefix of saved LoRA tensors: ``lora_unet_<module path with _ for .>`` (kohya)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_HEAD_DIM = 64
"""Attention head width of every DINOv2 / ViT-S/B/L/g model: ``num_heads = dim // 64``."""
DINOV2_INPUT_SIZE = 224
"""Input resolution the discriminator feeds a DINOv2 network (16x16 patches of 14 px)."""

Denoise = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""``denoise(net, x_t [B,C,H,W], t [B] int64, cond) -> x0 prediction [B,C,H,W]``."""
Decode = Callable[[torch.Tensor], torch.Tensor]
"""``decode(x0 [B,C,H,W]) -> images [B,3,H',W']`` in [-1, 1], differentiable (pixels: identity)."""


class ADDConfigError(ValueError):
    """A trainer setting or input that cannot work; the message says which and why."""


class FeatureNetworkError(ValueError):
    """A feature-network state dict this module cannot read; the message names the layouts it can."""


# -- losses ----------------------------------------------------------------------------------------
def hinge_d_loss(real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss summed over heads: ``sum_k mean relu(1 - r_k) + mean relu(1 + f_k)``."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits, strict=True))


def hinge_g_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Generator hinge loss summed over heads: ``-sum_k mean f_k``."""
    return sum(-f.mean() for f in fake_logits)


def r1_penalty(real_logits: Sequence[torch.Tensor], real_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean_b sum_k ||d(sum D_k) / d x_k[b]||^2``: squared gradient norm of each head w.r.t. its input.

    ``real_inputs[k]`` must require grad and ``real_logits[k]`` depend on it (``[B, ...]`` each);
    the graph is kept (``create_graph``) so the penalty can be minimised.
    """
    grads = torch.autograd.grad([lg.sum() for lg in real_logits], list(real_inputs), create_graph=True)
    return sum(g.float().pow(2).flatten(1).sum(1) for g in grads).mean()


def exponential_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``c(t) = alpha_t = sqrt(alphas_cumprod[t])``, the paper's "exponential" distillation weighting."""
    return alphas_cumprod.to(t.device)[t].sqrt()


def distillation_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mean_b weight[b] * mean((student_x0[b] - teacher_x0[b])^2)``; the target carries no gradient."""
    per_sample = (student_x0.float() - teacher_x0.detach().float()).pow(2).flatten(1).mean(1)
    return (weight.float() * per_sample).mean()


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """VP ``alphas_cumprod`` from the k-diffusion sigmas of a discrete model: ``1 / (1 + sigma^2)``."""
    return 1.0 / (1.0 + sigmas.double() ** 2)


# -- LoRA ------------------------------------------------------------------------------------------
def lora_targets(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module path, layer)`` of every ``nn.Linear`` and ungrouped zero-padded ``nn.Conv2d`` in ``net``."""
    out = []
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear) and module.weight is not None:
            out.append((name, module))
        elif (
            isinstance(module, nn.Conv2d)
            and module.weight is not None
            and module.groups == 1
            and module.padding_mode == "zeros"
        ):
            out.append((name, module))
    return out


def lora_module_name(path: str, prefix: str = LORA_PREFIX) -> str:
    """``"input_blocks.1.1.proj_in"`` -> ``"lora_unet_input_blocks_1_1_proj_in"`` (the host's kohya key)."""
    return prefix + path.replace(".", "_")


class LoRALayer(nn.Module):
    """``delta(x) = scale * up(down(x))`` for one Linear or Conv2d layer; ``scale = alpha / rank``.

    Linear: ``down [rank, in]``, ``up [out, rank]``. Conv2d: ``down [rank, in, kh, kw]`` with the
    layer's stride / padding / dilation, ``up [out, rank, 1, 1]``, the kohya layout the host reads.
    ``up`` starts at zero, so the adapted layer starts equal to the base layer.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        weight = base.weight
        fan_in = math.prod(weight.shape[1:])
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank, *([1] * (weight.dim() - 2)))
        self.down = nn.Parameter(torch.randn(down_shape, generator=generator) / math.sqrt(fan_in))
        self.up = nn.Parameter(torch.zeros(up_shape))
        self.scale = alpha / rank
        self.alpha = float(alpha)
        self.conv = None
        if isinstance(base, nn.Conv2d):
            self.conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.dtype) if not torch.is_autocast_enabled() else x
        if self.conv is None:
            return F.linear(F.linear(x, self.down), self.up) * self.scale
        return F.conv2d(F.conv2d(x, self.down, None, **self.conv), self.up) * self.scale


class LoRANetwork(nn.Module):
    """LoRA adapters attached (forward hooks) to every target layer of ``net``; ``remove()`` detaches them."""

    def __init__(self, net: nn.Module, rank: int, alpha: float | None = None, seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ADDConfigError(f"lora_rank must be at least 1, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        self.paths: list[str] = []
        self.layers = nn.ModuleDict()
        self._handles = []
        for path, module in lora_targets(net):
            layer = LoRALayer(module, rank, float(alpha if alpha is not None else rank), generator)
            layer.to(module.weight.device)
            key = lora_module_name(path, "")
            if key in self.layers:
                raise ADDConfigError(f"two layers map to the same LoRA name {key!r}")
            self.layers[key] = layer
            self.paths.append(path)
            self._handles.append(module.register_forward_hook(_lora_hook(layer)))
        if not self.paths:
            raise ADDConfigError("the network has no Linear or Conv2d layer to put a LoRA on")

    def remove(self) -> None:
        """Detach every hook (the adapters stay, e.g. for saving)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def lora_state_dict(self, prefix: str = LORA_PREFIX, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The kohya-format tensors ``<prefix><name>.lora_down.weight / .lora_up.weight / .alpha`` (on the CPU)."""
        out = {}
        for key, layer in self.layers.items():
            name = prefix + key
            out[f"{name}.lora_down.weight"] = layer.down.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = layer.up.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
        return out


def _lora_hook(layer: LoRALayer):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + layer(args[0]).to(output.dtype)

    return hook


# -- feature network: a DINOv2-layout ViT ----------------------------------------------------------
@dataclass(frozen=True)
class ViTConfig:
    """A plain ViT with the DINOv2 layout (pre-norm blocks, optional LayerScale, CLS token).

    ``grid`` is the side of the stored position-embedding grid (DINOv2: 37 = 518 / 14);
    ``image_size`` the side the input is resized to (the grid is interpolated when they differ).
    """

    dim: int
    depth: int
    heads: int
    patch_size: int
    grid: int
    mlp_dim: int
    image_size: int
    layerscale: bool = True
    eps: float = 1e-6


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = _Attention(cfg.dim, cfg.heads)
        self.ls1 = _LayerScale(cfg.dim) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = _Mlp(cfg.dim, cfg.mlp_dim)
        self.ls2 = _LayerScale(cfg.dim) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """Frozen feature network of the discriminator, DINOv2 key layout (``patch_embed.proj``, ``blocks.N``...).

    ``forward_features(images, layers)`` takes images ``[B, 3, H, W]`` in [-1, 1], resizes them to
    ``image_size``, normalises with the ImageNet statistics and returns the patch tokens
    ``[B, N, dim]`` (CLS dropped, before the final norm) after each block in ``layers``.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid * cfg.grid, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim))  # DINOv2 layout; unused for features
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.gradient_checkpointing = False

    @property
    def dim(self) -> int:
        return self.config.dim

    def _pos_embed(self, grid: int) -> torch.Tensor:
        if grid == self.config.grid:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = self.config.grid
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.to(cls.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embedded tokens ``[B, 1 + N, dim]`` of normalised pixels ``[B, 3, S, S]``."""
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        return x + self._pos_embed(pixels.shape[-1] // self.config.patch_size).to(x.dtype)

    def forward_features(self, images: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Patch tokens after each block in ``layers`` (0-based), for images in [-1, 1]."""
        size = self.config.image_size
        x = (images + 1) / 2
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = self.tokens((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        wanted, out = set(layers), []
        for i, block in enumerate(self.blocks[: max(layers) + 1]):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in wanted:
                out.append(x[:, 1:])
        return out


def default_layers(depth: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced block indices ending at the last block: depth 12 -> [2, 5, 8, 11]."""
    count = min(count, depth)
    return [round((i + 1) * depth / count) - 1 for i in range(count)]


TINY_VIT = ViTConfig(dim=64, depth=4, heads=2, patch_size=4, grid=8, mlp_dim=128, image_size=32)
"""The built-in feature network for tests and the toy: 32x32 input, 8x8 patches of 4 px."""


def _built(cfg: ViTConfig) -> ViT:
    """``ViT(cfg)`` without touching the global RNG (its default init draws from it; weights are set after)."""
    with torch.random.fork_rng(devices=[]):
        return ViT(cfg)


def tiny_vit(seed: int = 0, config: ViTConfig = TINY_VIT) -> ViT:
    """A small ViT with seeded random weights: N(0, 0.02) matrices and tokens, zero biases, unit gains."""
    vit = _built(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if p.dim() >= 2 or name in ("cls_token", "mask_token"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            elif name.endswith("bias"):
                p.zero_()
            else:  # LayerNorm and LayerScale gains
                p.fill_(1.0)
    return vit.requires_grad_(False).eval()


_HF_PREFIXES = ("dinov2.", "backbone.", "module.", "model.")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "attention.output.dense": "attn.proj",  # transformers 4 and the files on the hub
    "attention.o_proj": "attn.proj",  # transformers 5
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_QKV = re.compile(r"^attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_QKV_NAMES = {"q": "query", "k": "key", "v": "value"}


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _HF_PREFIXES:
        if any(k.startswith(prefix) for k in sd) and not any(k.startswith(("patch_embed.", "embeddings.")) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def _from_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF transformers ``Dinov2Model`` keys (4.x / hub files and 5.x names) -> the DINOv2 / timm layout.

    q, k and v are fused into ``qkv`` in that order, as the original checkpoints store them.
    """
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
    }
    if "embeddings.mask_token" in sd:
        out["mask_token"] = sd["embeddings.mask_token"].reshape(1, -1)
    for key in ("weight", "bias"):
        if f"layernorm.{key}" in sd:
            out[f"norm.{key}"] = sd[f"layernorm.{key}"]
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _HF_LAYER.match(key)
        if m is None:
            continue
        i, rest = m.group(1), m.group(2)
        attn = _HF_QKV.match(rest)
        if attn:
            part = attn.group(1) or _QKV_NAMES[attn.group(2)]
            qkv.setdefault((int(i), attn.group(3)), {})[part] = value
            continue
        for old, new in _HF_RENAMES.items():
            if rest.startswith(old + "."):
                out[f"blocks.{i}.{new}{rest[len(old) :]}"] = value
                break
            if rest == old:
                out[f"blocks.{i}.{new}"] = value
                break
        else:
            raise FeatureNetworkError(f"unknown transformers Dinov2 tensor {key!r} (SwiGLU / ViT-g is not supported)")
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


_IGNORED_KEYS = re.compile(r"^(mask_token|head\..*|fc_norm\..*)$")


def vit_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    image_size: int = DINOV2_INPUT_SIZE,
) -> ViT:
    """A frozen ``ViT`` from a DINOv2 state dict; the architecture is read from the tensor shapes.

    Accepted layouts: the original DINOv2 / torch-hub checkpoints and timm's ``vit_*_dinov2``
    (``patch_embed.proj.weight``, ``blocks.N.attn.qkv.weight``, ``blocks.N.ls1.gamma``...), and HF
    transformers ``Dinov2Model`` (``embeddings.*``, ``encoder.layer.N.attention.attention.query...``
    as on the hub and in ComfyUI's clip_vision DINOv2, or transformers 5's ``attention.q_proj``),
    with or without a ``dinov2.`` prefix. Not accepted: register-token variants, SwiGLU MLPs
    (ViT-g), CLIP vision towers. ``num_heads`` defaults to ``dim // 64`` (all DINOv2 sizes).
    """
    sd = _strip_prefix(state_dict)
    if "embeddings.patch_embeddings.projection.weight" in sd:
        sd = _from_transformers(sd)
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        sample = ", ".join(sorted(sd)[:4])
        raise FeatureNetworkError(
            "not a ViT in the DINOv2 / timm (patch_embed.proj.weight, blocks.N...) or transformers Dinov2Model "
            f"(embeddings.patch_embeddings...) layout; its keys start {sample}. Use DINOv2 weights, e.g. "
            "dinov2_vits14_pretrain.pth or facebook/dinov2-small model.safetensors"
        )
    if any(k in sd for k in ("register_tokens", "reg_token")):
        raise FeatureNetworkError("DINOv2 variants with register tokens are not supported; use the plain model")
    if any(".mlp.w12." in k or ".mlp.weights_in." in k for k in sd):
        raise FeatureNetworkError("SwiGLU MLPs (DINOv2 ViT-g) are not supported; use ViT-S/B/L")
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks or "blocks.0.mlp.fc1.weight" not in sd:
        raise FeatureNetworkError("the ViT state dict has no transformer blocks (blocks.N.mlp.fc1.weight)")
    depth = 1 + max(blocks)
    tokens = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise FeatureNetworkError(f"pos_embed holds {tokens} patch positions, not a square grid")
    heads = num_heads or dim // VIT_HEAD_DIM
    if heads < 1 or dim % heads:
        raise FeatureNetworkError(f"cannot split width {dim} into {heads} attention heads; pass num_heads")
    cfg = ViTConfig(
        dim=dim,
        depth=depth,
        heads=heads,
        patch_size=patch,
        grid=grid,
        mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
        image_size=image_size,
        layerscale="blocks.0.ls1.gamma" in sd,
    )
    vit = _built(cfg)
    own = vit.state_dict()
    sd = {k: v for k, v in sd.items() if not _IGNORED_KEYS.match(k)}
    sd["mask_token"] = own["mask_token"]  # only used for masked-image training
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise FeatureNetworkError(f"ViT layout mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    vit.load_state_dict({k: v.float() for k, v in sd.items()})
    return vit.requires_grad_(False).eval()


# -- discriminator ---------------------------------------------------------------------------------
class FeatureNetwork(Protocol):
    """What the discriminator needs from its frozen network (``ViT`` has it)."""

    dim: int

    def forward_features(self, images: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]: ...


class BatchNormLocal(nn.Module):
    """StyleGAN-T's "local" batch norm of the heads: per channel, over groups of ``virtual_batch`` samples
    and all their tokens (batch statistics always, no running averages), then a learned scale and shift.

    Without it a spectrally normalised head is close to 1-Lipschitz in its input tokens and cannot
    magnify the small part of the frozen features in which real and generated images differ (in the
    toy, real vs blurred tokens differ by ~6 % of their norm): the hinge loss then stays near chance.
    """

    def __init__(self, channels: int, virtual_batch: int = BN_VIRTUAL_BATCH, eps: float = 1e-5) -> None:
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for group in x.float().split(self.virtual_batch):  # [G, C, N]; the last group may be smaller
            var, mean = torch.var_mean(group, dim=(0, 2), keepdim=True, correction=0)
            out.append(((group - mean) * torch.rsqrt(var + self.eps)).to(x.dtype))
        return torch.cat(out) * self.weight[:, None].to(x.dtype) + self.bias[:, None].to(x.dtype)


class DiscriminatorHead(nn.Module):
    """Trainable head on one feature layer: tokens ``[B, N, C]`` -> logits ``[B, N]`` (StyleGAN-T's head).

    A 1x1 conv, a residual ``HEAD_KERNEL`` conv over the token sequence (each conv followed by
    ``BatchNormLocal`` and LeakyReLU 0.2, the residual sum scaled by 1/sqrt 2), then either a 1x1
    conv to one logit per token or, conditioned, the projection ``logit_n = <h_n, W c> / sqrt(CMAP_DIM)``
    with the condition ``c [B, cond_dim]``. The convs are spectrally normalised (one power iteration
    per call in training mode). Batch statistics couple the samples of a call: the trainer calls the
    heads on real and on generated batches separately, as StyleGAN-T does.
    """

    def __init__(self, channels: int, cond_dim: int | None = None, hidden: int = HEAD_CHANNELS) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.inp = sn(nn.Conv1d(channels, hidden, 1))
        self.inp_norm = BatchNormLocal(hidden)
        self.res = sn(nn.Conv1d(hidden, hidden, HEAD_KERNEL, padding=HEAD_KERNEL // 2))
        self.res_norm = BatchNormLocal(hidden)
        self.out = sn(nn.Conv1d(hidden, CMAP_DIM if cond_dim else 1, 1))
        self.cond = nn.Linear(cond_dim, CMAP_DIM) if cond_dim else None

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = F.leaky_relu(self.inp_norm(self.inp(tokens.transpose(1, 2))), LEAKY_SLOPE)
        h = (h + F.leaky_relu(self.res_norm(self.res(h)), LEAKY_SLOPE)) / math.sqrt(2)
        h = self.out(h)
        if self.cond is None:
            return h[:, 0]
        if cond is None:
            raise ADDConfigError("this discriminator head is conditioned: pass the condition embedding")
        c = self.cond(cond.to(h.dtype))
        return (h * c[:, :, None]).sum(1) / math.sqrt(CMAP_DIM)


class Discriminator(nn.Module):
    """Frozen ``feature_network`` + one trainable ``DiscriminatorHead`` per layer in ``layers``."""

    def __init__(self, feature_network: nn.Module, layers: Sequence[int], cond_dim: int | None = None) -> None:
        super().__init__()
        self.feature_network = feature_network.requires_grad_(False).eval()
        self.layers = list(layers)
        self.heads = nn.ModuleList(DiscriminatorHead(feature_network.dim, cond_dim) for _ in self.layers)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen-network features ``[B, N, C]`` per head (differentiable w.r.t. the images)."""
        return self.feature_network.forward_features(images, self.layers)

    def logits(self, features: Sequence[torch.Tensor], cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One ``[B, N]`` logit map per head."""
        return [head(f, cond) for head, f in zip(self.heads, features, strict=True)]


# -- trainer ---------------------------------------------------------------------------------------
@dataclass
class ADDConfig:
    """Trainer settings; defaults follow the paper where it gives them (see the module docstring)."""

    batch_size: int = 4
    student_timesteps: tuple[int, ...] = STUDENT_TIMESTEPS
    distill_weight: float = DISTILL_WEIGHT
    """lambda; the student loss is ``adversarial_weight * L_adv + distill_weight * L_distill``."""
    adversarial_weight: float = 1.0
    """0 gives the distillation-only ablation (the discriminator is then not trained)."""
    r1_weight: float = R1_WEIGHT
    student_lr: float = 1e-4
    discriminator_lr: float = 1e-4
    student_betas: tuple[float, float] = STUDENT_BETAS
    discriminator_betas: tuple[float, float] = DISCRIMINATOR_BETAS
    student: str = "lora"
    """``lora`` (adapters on every Linear/Conv2d, base frozen) or ``full`` (every parameter trains)."""
    lora_rank: int = 16
    lora_alpha: float | None = None
    """LoRA scale is ``lora_alpha / lora_rank``; None means alpha = rank (scale 1)."""
    teacher_t_range: tuple[int, int] = TEACHER_T_RANGE
    teacher_guidance: float = 1.0
    """Classifier-free guidance of the teacher target (needs ``TrainingData.uncond``); 1 = none."""
    feature_layers: tuple[int, ...] | None = None
    """Feature-network blocks with a head; None = ``default_layers(depth)``."""
    conditioned_discriminator: bool = True
    """Condition the heads on ``TrainingData.disc_cond`` when the data has it."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights (e.g. 0.99); 0 = none. ``use_ema()``
    swaps it in for sampling, ``lora_state_dict(ema=True)`` saves it."""
    seed: int = 0
    mixed_precision: bool = True
    """bfloat16 autocast, on CUDA devices that support it only."""
    gradient_checkpointing: bool = True
    """Recompute student blocks and ViT blocks in the backward pass, on CUDA only."""

    def check(self, num_train_timesteps: int) -> None:
        """Raise ``ADDConfigError`` for settings that cannot work."""
        if self.batch_size < 1:
            raise ADDConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.student_timesteps or any(not 0 <= s < num_train_timesteps for s in self.student_timesteps):
            raise ADDConfigError(
                f"student_timesteps must be a non-empty list in 0..{num_train_timesteps - 1}, "
                f"got {list(self.student_timesteps)}"
            )
        lo, hi = self.teacher_t_range
        if not 0 <= lo <= hi < num_train_timesteps:
            raise ADDConfigError(f"teacher_t_range must satisfy 0 <= lo <= hi < {num_train_timesteps}, got {lo}, {hi}")
        if self.student not in ("lora", "full"):
            raise ADDConfigError(f"student must be 'lora' or 'full', got {self.student!r}")
        for name in ("distill_weight", "adversarial_weight", "r1_weight", "student_lr", "discriminator_lr"):
            if getattr(self, name) < 0:
                raise ADDConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ADDConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainingData:
    """Real samples and their conditioning, on any device (batches move to the trainer's device).

    ``x0 [N, C, H, W]`` in the denoiser's space (latents for SD). ``cond`` is handed to the
    denoiser per sample (``[N, ...]`` or ``[1, ...]`` for all; e.g. ``[N, 77, 768]`` text
    embeddings), ``disc_cond [N, D]`` / ``[1, D]`` conditions the discriminator heads (a pooled text
    embedding) and ``uncond [1, ...]`` is the teacher's unconditional input for guidance.
    """

    x0: torch.Tensor
    cond: torch.Tensor | None = None
    disc_cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x0.dim() != 4 or self.x0.shape[0] < 1:
            raise ADDConfigError(f"x0 must be a non-empty [N, C, H, W] batch, got shape {tuple(self.x0.shape)}")
        n = self.x0.shape[0]
        for name in ("cond", "disc_cond"):
            value = getattr(self, name)
            if value is not None and value.shape[0] not in (1, n):
                raise ADDConfigError(f"{name} has {value.shape[0]} entries for {n} samples; give 1 or {n}")

    def pick(self, name: str, index: torch.Tensor) -> torch.Tensor | None:
        value = getattr(self, name)
        if value is None:
            return None
        return value[index] if value.shape[0] > 1 else value.expand(len(index), *value.shape[1:])


def _checkpointed(module: nn.Module) -> None:
    """Make ``module`` recompute its forward in the backward pass (the trainer owns the module)."""
    forward = module.forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = run


def default_checkpoint_blocks(net: nn.Module) -> list[nn.Module]:
    """The items of every top-level ``nn.ModuleList`` (a UNet's input/output blocks)."""
    return [m for child in net.children() if isinstance(child, nn.ModuleList) for m in child]


def _scalar(value: torch.Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class ADDTrainer:
    """Adversarial diffusion distillation of ``teacher`` into a student copy (LoRA or full).

    Args:
        teacher: the frozen teacher network; only ever called under ``torch.no_grad``.
        denoise: ``denoise(net, x_t, t, cond) -> x0`` for the teacher and the student.
        alphas_cumprod: ``[T]`` VP schedule of the teacher (SD: ``add_sampler.scaled_linear_alphas_cumprod()``).
        feature_network: the frozen discriminator backbone (``ViT`` or anything with
            ``dim`` and ``forward_features(images, layers)``); never trained.
        data: real samples and conditioning.
        config: settings.
        decode: samples -> images in [-1, 1] for the discriminator (None: samples are images).
        student_base: the network the student starts from (default ``copy.deepcopy(teacher)``;
            the node passes its own copy because the host's weights are inference tensors).
        checkpoint_blocks: the student modules to recompute in backward on CUDA
            (default ``default_checkpoint_blocks``).
        device: where to train (default: the teacher's device).
    """

    def __init__(
        self,
        teacher: nn.Module,
        denoise: Denoise,
        alphas_cumprod: torch.Tensor,
        feature_network: nn.Module,
        data: TrainingData,
        config: ADDConfig | None = None,
        decode: Decode | None = None,
        student_base: nn.Module | None = None,
        checkpoint_blocks: Callable[[nn.Module], Iterable[nn.Module]] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config = config or ADDConfig()
        config.check(len(alphas_cumprod))
        self.device = torch.device(device) if device is not None else next(teacher.parameters()).device
        self.teacher = teacher
        self.denoise = denoise
        self.decode = decode or (lambda x: x)
        self.alphas_cumprod = alphas_cumprod.double().to(self.device)
        self.data = data
        if config.teacher_guidance != 1.0 and data.uncond is None:
            raise ADDConfigError("teacher_guidance != 1 needs TrainingData.uncond (the empty-prompt conditioning)")
        init = torch.Generator().manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed + 1)

        # 1. student: a copy of the teacher, with LoRA adapters or fully trainable
        self.student = student_base if student_base is not None else copy.deepcopy(teacher)
        self.lora: LoRANetwork | None = None
        if config.student == "lora":
            self.student.requires_grad_(False)
            self.lora = LoRANetwork(self.student, config.lora_rank, config.lora_alpha, seed=config.seed)
            student_params = list(self.lora.parameters())
        else:
            student_params = [p for p in self.student.parameters() if p.is_floating_point()]
            for p in student_params:
                p.requires_grad_(True)

        # 2. discriminator: frozen features + seeded heads
        depth = len(getattr(feature_network, "blocks", [])) or 4
        layers = config.feature_layers or tuple(default_layers(depth))
        cond_dim = data.disc_cond.shape[-1] if data.disc_cond is not None and config.conditioned_discriminator else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=init)))
            self.discriminator = Discriminator(feature_network, layers, cond_dim).to(self.device)
        self.use_disc_cond = cond_dim is not None

        # 3. optimisers (and the optional EMA of the trained weights)
        self.trained = student_params
        self.ema = [p.detach().clone() for p in student_params] if config.ema_decay > 0 else None
        self.opt_student = torch.optim.Adam(student_params, lr=config.student_lr, betas=_floats(config.student_betas))
        self.opt_disc = torch.optim.Adam(
            self.discriminator.heads.parameters(), lr=config.discriminator_lr, betas=_floats(config.discriminator_betas)
        )
        self.step = 0
        self.log: list[dict[str, float]] = []

        # 4. GPU-only memory and speed settings
        cuda = self.device.type == "cuda"
        self.autocast_dtype = None
        if cuda and config.mixed_precision and torch.cuda.is_bf16_supported():
            self.autocast_dtype = torch.bfloat16
        if cuda and config.gradient_checkpointing:
            for block in (checkpoint_blocks or default_checkpoint_blocks)(self.student):
                _checkpointed(block)
            if isinstance(feature_network, ViT):
                feature_network.gradient_checkpointing = True

    # -- pieces ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ac = self.alphas_cumprod[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return ac.sqrt() * x0 + (1 - ac).sqrt() * noise

    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The teacher's x0 prediction (no gradient), with classifier-free guidance when configured."""
        with torch.no_grad(), self._autocast():
            x0 = self.denoise(self.teacher, x_t, t, cond).float()
            w = self.config.teacher_guidance
            if w != 1.0:
                uncond = self.data.uncond.to(self.device).expand(len(t), *self.data.uncond.shape[1:])
                x0_u = self.denoise(self.teacher, x_t, t, uncond).float()
                x0 = x0_u + w * (x0 - x0_u)
        return x0

    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The student's x0 prediction (with gradient when enabled)."""
        with self._autocast():
            return self.denoise(self.student, x_t, t, cond).float()

    def _draw(self) -> dict[str, torch.Tensor]:
        """Every random number of one iteration, from the trainer's generator, in a fixed order."""
        cfg, g = self.config, self.generator
        n, b = self.data.x0.shape[0], cfg.batch_size
        shape = (b, *self.data.x0.shape[1:])
        idx = torch.randint(0, n, (b,), generator=g)
        s = torch.tensor(cfg.student_timesteps)[torch.randint(0, len(cfg.student_timesteps), (b,), generator=g)]
        lo, hi = cfg.teacher_t_range
        t = torch.randint(lo, hi + 1, (b,), generator=g)
        return {
            "idx": idx,
            "s": s,
            "t": t,
            "eps": torch.randn(shape, generator=g),
            "eps2": torch.randn(shape, generator=g),
        }

    # -- one iteration -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One student update and one discriminator update; returns (and logs) the losses."""
        cfg, dev = self.config, self.device
        r = self._draw()
        idx = r["idx"]
        x0 = self.data.x0[idx].to(dev).float()
        cond = self.data.pick("cond", idx)
        cond = cond.to(dev) if cond is not None else None
        dcond = self.data.pick("disc_cond", idx) if self.use_disc_cond else None
        dcond = dcond.to(dev).float() if dcond is not None else None
        s, t = r["s"].to(dev), r["t"].to(dev)
        adversarial = cfg.adversarial_weight > 0

        # 1. student one-step prediction from a noised real sample
        x_s = self._noised(x0, s, r["eps"].to(dev))
        x_theta = self.student_x0(x_s, s, cond)

        # 2. distillation: the teacher denoises the re-noised student sample
        target = self.teacher_x0(self._noised(x_theta.detach(), t, r["eps2"].to(dev)), t, cond)
        l_distill = distillation_loss(x_theta, target, exponential_weight(self.alphas_cumprod, t))

        # 3. adversarial generator term (the heads take no gradient here)
        l_adv = torch.zeros((), device=dev)
        fake_images = None
        if adversarial:
            self.discriminator.heads.requires_grad_(False)
            with self._autocast():
                fake_images = self.decode(x_theta)
                l_adv = hinge_g_loss(
                    [lg.float() for lg in self.discriminator.logits(self.discriminator.features(fake_images), dcond)]
                )
            self.discriminator.heads.requires_grad_(True)
        loss = cfg.adversarial_weight * l_adv + cfg.distill_weight * l_distill
        self.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_student.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.trained, strict=True):
                    e.lerp_(p.detach(), 1 - cfg.ema_decay)

        # 4. discriminator: hinge on real vs. fake features, R1 at the head inputs
        entry = {"step": self.step + 1, "loss_student": _scalar(loss), "loss_distill": _scalar(l_distill),
                 "loss_adv": _scalar(l_adv)}  # fmt: skip
        if adversarial:
            with torch.no_grad(), self._autocast():
                real_feats = self.discriminator.features(self.decode(x0))
                fake_feats = self.discriminator.features(fake_images.detach())
            real_feats = [f.detach().float().requires_grad_(True) for f in real_feats]
            real_logits = [lg.float() for lg in self.discriminator.logits(real_feats, dcond)]
            fake_logits = [lg.float() for lg in self.discriminator.logits([f.float() for f in fake_feats], dcond)]
            l_d = hinge_d_loss(real_logits, fake_logits)
            r1 = r1_penalty(real_logits, real_feats) if cfg.r1_weight > 0 else torch.zeros((), device=dev)
            self.opt_disc.zero_grad(set_to_none=True)
            (l_d + cfg.r1_weight * r1).backward()
            self.opt_disc.step()
            entry.update(
                loss_disc=_scalar(l_d),
                r1=_scalar(r1),
                d_real=_scalar(sum(lg.mean() for lg in real_logits) / len(real_logits)),
                d_fake=_scalar(sum(lg.mean() for lg in fake_logits) / len(fake_logits)),
            )
        self.step += 1
        self.log.append(entry)
        return entry

    def train(self, steps: int, callback: Callable[[int, dict[str, float]], None] | None = None) -> list[dict]:
        """Run ``steps`` iterations; ``callback(step, entry)`` after each (progress, interrupts)."""
        for _ in range(steps):
            entry = self.train_step()
            if callback is not None:
                callback(self.step, entry)
        return self.log

    # -- results and checkpoints -------------------------------------------------------------------
    def lora_state_dict(self, prefix: str = LORA_PREFIX, ema: bool = False) -> dict[str, torch.Tensor]:
        """The trained LoRA in the kohya layout the host's LoRA loader reads (LoRA students only).

        ``ema``: the moving average instead of the last weights (needs ``ema_decay`` > 0).
        """
        if self.lora is None:
            raise ADDConfigError("a full student has no LoRA; train with student='lora'")
        with self.use_ema() if ema else contextlib.nullcontext():
            return self.lora.lora_state_dict(prefix)

    @contextlib.contextmanager
    def use_ema(self):
        """Within the block the student holds the EMA weights (for sampling or saving); restored after."""
        if self.ema is None:
            raise ADDConfigError("no EMA was kept; set ema_decay > 0")
        with torch.no_grad():
            current = [p.detach().clone() for p in self.trained]
            for p, e in zip(self.trained, self.ema, strict=True):
                p.copy_(e)
        try:
            yield self.student
        finally:
            with torch.no_grad():
                for p, c in zip(self.trained, current, strict=True):
                    p.copy_(c)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same run (the teacher, data and feature network excluded):
        trained weights, heads, both optimisers, the EMA, the generator state, step and log."""
        trained = self.lora.state_dict() if self.lora is not None else self.student.state_dict()
        return {
            "step": self.step,
            "config": asdict(self.config),
            "student": {k: v.detach().cpu().clone() for k, v in trained.items()},
            "heads": {k: v.detach().cpu().clone() for k, v in self.discriminator.heads.state_dict().items()},
            "opt_student": self.opt_student.state_dict(),
            "opt_disc": self.opt_disc.state_dict(),
            "generator": self.generator.get_state(),
            "log": [dict(e) for e in self.log],
            "ema": [e.detach().cpu().clone() for e in self.ema] if self.ema is not None else [],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a run saved by ``state_dict`` (same teacher, data, feature network and settings)."""
        saved = dict(state["config"])
        mine = asdict(self.config)
        differ = [k for k in mine if k in saved and _normal(saved[k]) != _normal(mine[k])]
        if differ:
            raise ADDConfigError(f"the checkpoint was trained with other settings: {', '.join(differ)}")
        target = self.lora if self.lora is not None else self.student
        target.load_state_dict(state["student"])
        self.discriminator.heads.load_state_dict(state["heads"])
        self.opt_student.load_state_dict(state["opt_student"])
        self.opt_disc.load_state_dict(state["opt_disc"])
        self.generator.set_state(state["generator"])
        if self.ema is not None:
            for e, saved_ema in zip(self.ema, state["ema"], strict=True):
                e.copy_(saved_ema)
        self.step = int(state["step"])
        self.log = [dict(e) for e in state["log"]]

    def save(self, path: str) -> None:
        """Write ``state_dict()`` with ``torch.save`` (read back with ``load``)."""
        torch.save(self.state_dict(), path)

    def load(self, path: str) -> None:
        """Resume from a file written by ``save`` (``torch.load(weights_only=True)``)."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def close(self) -> None:
        """Detach the LoRA hooks from the student (the teacher was never touched)."""
        if self.lora is not None:
            self.lora.remove()


def _floats(pair: Sequence[float]) -> tuple[float, float]:
    return float(pair[0]), float(pair[1])


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# -- loss curve ------------------------------------------------------------------------------------
CURVE_SERIES = (
    ("loss_student", "student total"),
    ("loss_distill", "distillation (weighted MSE)"),
    ("loss_adv", "adversarial (generator hinge)"),
    ("loss_disc", "discriminator hinge"),
)
CURVE_COLORS = ((220, 80, 60), (60, 120, 220), (230, 160, 30), (60, 170, 90))


def loss_curve_image(log: Sequence[Mapping[str, float]], width: int = 640, panel_height: int = 130) -> torch.Tensor:
    """A picture of the training losses: one panel per logged series, ``[H, W, 3]`` float in 0..1.

    Each panel is scaled to its own min..max (both printed), step on the x axis; series that were
    not logged (e.g. the discriminator in the distillation-only ablation) are left out.
    """
    from PIL import Image, ImageDraw

    series = [
        (k, label, c) for (k, label), c in zip(CURVE_SERIES, CURVE_COLORS, strict=True) if any(k in e for e in log)
    ]
    height = max(1, len(series)) * panel_height
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, 12, 18, 16
    for p, (key, label, color) in enumerate(series):
        y0 = p * panel_height
        points = [(e["step"], e[key]) for e in log if key in e and math.isfinite(e[key])]
        draw.rectangle([left, y0 + top, width - right, y0 + panel_height - bottom], outline=(180, 180, 180))
        draw.text((left, y0 + 3), f"{label}", fill=(0, 0, 0))
        if not points:
            continue
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        span = hi - lo or 1.0
        first, last = points[0][0], points[-1][0]
        steps = max(last - first, 1)
        h = panel_height - top - bottom
        xy = [
            (left + (s - first) / steps * (width - left - right), y0 + top + (1 - (v - lo) / span) * h)
            for s, v in points
        ]
        draw.line(xy if len(xy) > 1 else xy * 2, fill=color, width=2)
        draw.text((4, y0 + top - 2), f"{hi:.4g}", fill=(80, 80, 80))
        draw.text((4, y0 + panel_height - bottom - 10), f"{lo:.4g}", fill=(80, 80, 80))
        draw.text((left, y0 + panel_height - bottom + 2), f"step {first}", fill=(80, 80, 80))
        draw.text((width - right - 80, y0 + panel_height - bottom + 2), f"step {last}", fill=(80, 80, 80))
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3).float() / 255.0
