"""Toy ADD reproduction: does adversarial diffusion distillation beat the teacher at 1 and 4 steps?

    .venv/bin/python bench/add_toy.py            # the documented run (two CPU threads, ~30 min), writes docs/add_toy.md
    .venv/bin/python bench/add_toy.py --quick    # a tiny smoke version (well under a minute)
    python bench/add_toy.py --preset gpu --device cuda --name add_toy_gpu   # wider teacher, longer student run, ~4 min on an H200

Everything is made here with the project's own code, on the CPU (``--threads``, default 2), seeded:

1. **Data**: procedurally generated 32x32 images, one anti-aliased shape (circle, square, triangle)
   in one of 4 colours at a random position and size on a dark background; the 12 shape x colour
   classes play the role of prompts.
2. **Metric network**: a small CNN classifier trained on the shape x colour labels (plus a "no
   shape" class of blank backgrounds); the metric is
   the Fréchet distance (FD) between its 64-d penultimate features of 1,000 generated and 1,000
   held-out real images (FID-style, with this classifier in place of Inception); checked by a
   classifier-free pixel FD (8x8 average-pooled images) and the label accuracy of the samples.
3. **Discriminator backbone**: the built-in tiny ViT (``turbostream.add_distill.TINY_VIT``),
   pretrained here to regress the shape's position and size (not the metric's labels), then frozen.
4. **Teacher**: a small class-conditional v-prediction UNet on the 2x2 pixel-unshuffled image
   (12x16x16), the SD scaled-linear schedule (1,000 steps), trained with Adam and an EMA.
5. **Students**: ``turbostream.add_distill.ADDTrainer`` from the teacher (full fine-tune), student
   timesteps 999/749/499/249, lambda 2.5, discriminator heads conditioned on the one-hot class
   (as ADD's are on the text embedding): ADD (adversarial + distillation) and the
   distillation-only ablation (adversarial weight 0), same seed, steps and learning rate.
6. **Rows**: teacher DDIM 50 / 4 / 1 steps, students at 1 step and at 4 steps (x0, then re-noise to
   the next student timestep, the ADD paper's sampler); all samplers clip x0 to [-1, 1].
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from harness import machine_line  # noqa: E402

from turbostream import add_distill as core  # noqa: E402
from turbostream.add_sampler import scaled_linear_alphas_cumprod  # noqa: E402

SIZE = 32
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle")
CLASSES = len(SHAPES) * len(COLOURS)
BACKGROUND = 0.08
AC = scaled_linear_alphas_cumprod().float()
STUDENT_TIMESTEPS = core.STUDENT_TIMESTEPS
TEACHER_STEPS_FULL = 50
FEATURE_DIM = 64
PIXEL_POOL = 4
"""Pixel FD pools 32x32 images 4x4 -> 8x8x3 = 192 features."""


@dataclass
class Settings:
    """Sizes of one run; ``FULL`` is the documented run, ``QUICK`` the smoke test."""

    classifier_steps: int
    vit_steps: int
    teacher_steps: int
    teacher_width: int
    distill_steps: int
    eval_samples: int
    batch: int = 64
    distill_batch: int = 32
    teacher_lr: float = 2e-3
    student_lr: float = 2e-5
    discriminator_lr: float = 4e-4
    ema_decay: float = 0.99
    pool: int = 20000


FULL = Settings(
    classifier_steps=300,
    vit_steps=300,
    teacher_steps=6000,
    teacher_width=32,
    distill_steps=1600,
    eval_samples=1000,
    batch=32,
)
GPU = Settings(
    classifier_steps=500,
    vit_steps=800,
    teacher_steps=5000,
    teacher_width=64,
    distill_steps=1000,
    eval_samples=1000,
    batch=128,
    distill_batch=64,
    pool=40000,
)
"""``--preset gpu``: a wider teacher trained on 8x the CPU run's samples, students on 3.3x; sized for a
15-minute GPU lease (3.7 min on an H200: teacher 17 ms/step, ADD student 94 ms/step with the trainer's
CUDA defaults, bfloat16 autocast and gradient checkpointing). The paper's 4,000 x 128 did not fit."""
QUICK = Settings(
    classifier_steps=20,
    vit_steps=10,
    teacher_steps=20,
    teacher_width=16,
    distill_steps=3,
    eval_samples=48,
    batch=16,
    distill_batch=4,
    pool=256,
)


# -- data ------------------------------------------------------------------------------------------
def make_shapes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images [n, 3, 32, 32] in [-1, 1], labels [n] = shape * 4 + colour, geometry [n, 3] = cx, cy, size)``.

    Shapes are drawn from a signed distance with a one-pixel soft edge (anti-aliased); colours get
    a +-0.05 jitter per channel.
    """
    g = generator
    shape = torch.randint(0, len(SHAPES), (n,), generator=g)
    colour = torch.randint(0, len(COLOURS), (n,), generator=g)
    size = 5 + 6 * torch.rand(n, generator=g)  # half-extent in pixels
    cx = size + (SIZE - 2 * size) * torch.rand(n, generator=g)
    cy = size + (SIZE - 2 * size) * torch.rand(n, generator=g)
    jitter = (torch.rand(n, 3, generator=g) - 0.5) * 0.1
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    r = size[:, None, None]
    circle = (dx**2 + dy**2).sqrt() - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.8 * r
    # equilateral-ish triangle, apex up (y grows downwards): base at dy = r / 2, sides through dy = -r
    tri = torch.maximum(dy - 0.5 * r, (dx.abs() * math.sqrt(3) - (dy + r)) / 2)
    dist = torch.where(shape[:, None, None] == 0, circle, torch.where(shape[:, None, None] == 1, square, tri))
    mask = (0.5 - dist).clamp(0, 1)  # one-pixel soft edge
    rgb = (torch.tensor(list(COLOURS.values()))[colour] + jitter).clamp(0, 1)
    image = BACKGROUND + mask[:, None] * (rgb[:, :, None, None] - BACKGROUND)
    geometry = torch.stack([cx / SIZE, cy / SIZE, size / SIZE], 1)
    return image * 2 - 1, shape * len(COLOURS) + colour, geometry


def to_model(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, 32, 32] -> [B, 12, 16, 16] (2x2 pixel unshuffle: the toy's 'latent' space)."""
    return F.pixel_unshuffle(images, 2)


def to_images(x: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(x, 2)


# -- networks --------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """The metric network: 3 conv + batch-norm blocks, global average pooling, 64-d features, 13 logits.

    Class 12 is "no shape" (trained on blank backgrounds), so that a generator drawing nothing lands
    somewhere distinct in feature space instead of wherever an untrained input happens to fall.
    """

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(3, 32, 1), *block(32, 64, 2), *block(64, FEATURE_DIM, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(FEATURE_DIM, CLASSES + 1)  # + "no shape"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], 1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ToyUNet(nn.Module):
    """Class-conditional v-prediction UNet on [B, 12, 16, 16]: 16x16 (w) and 8x8 (2w) levels, attention at 8x8.

    The class (shape x colour, 12 "prompts") enters through a learned embedding added to the time embedding.
    """

    def __init__(self, width: int = 32, channels: int = 12, classes: int = CLASSES) -> None:
        super().__init__()
        w, temb = width, 4 * width
        self.width = w
        self.time = nn.Sequential(nn.Linear(w, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.label = nn.Embedding(classes, temb)
        self.inp = nn.Conv2d(channels, w, 3, padding=1)
        self.down = nn.ModuleList([ResBlock(w, w, temb), ResBlock(2 * w, 2 * w, temb)])
        self.downsample = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * w, 2 * w, temb)
        self.attn_norm, self.attn = nn.GroupNorm(8, 2 * w), nn.MultiheadAttention(2 * w, 2, batch_first=True)
        self.up = nn.ModuleList([ResBlock(4 * w, 2 * w, temb), ResBlock(3 * w, w, temb)])
        self.out = nn.Sequential(nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.time(_timestep_embedding(t, self.width)) + self.label(labels)
        h1 = self.down[0](self.inp(x), emb)  # 16x16, w
        h2 = self.down[1](self.downsample(h1), emb)  # 8x8, 2w
        h = self.mid(h2, emb)
        b, c, hh, ww = h.shape
        tokens = self.attn_norm(h).flatten(2).transpose(1, 2)
        h = h + self.attn(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(b, c, hh, ww)
        h = self.up[0](torch.cat([h, h2], 1), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up[1](torch.cat([h, h1], 1), emb)
        return self.out(h)


def denoise(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x0 prediction of a v-prediction network for class ``labels`` (the ``add_distill.Denoise`` interface).

    ``v = alpha_t eps - sigma_t x0``, so ``x0 = alpha_t x_t - sigma_t v``: well conditioned at t = 999,
    where an epsilon network's ``(x_t - sigma_t eps) / alpha_t`` multiplies its error by 1 / alpha_t ~ 15.
    """
    ac = AC[t.cpu()].to(x_t.device).view(-1, 1, 1, 1)
    return ac.sqrt() * x_t - (1 - ac).sqrt() * net(x_t, t.to(x_t.device), labels.to(x_t.device))


# -- training --------------------------------------------------------------------------------------
def train_classifier(s: Settings, g: torch.Generator, device: torch.device) -> tuple[Classifier, float]:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    net = Classifier().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(s.classifier_steps, 1))
    blank = torch.full((1, 3, SIZE, SIZE), BACKGROUND * 2 - 1)
    for _ in range(s.classifier_steps):
        images, labels, _ = make_shapes(64, g)
        empty = torch.rand(64, generator=g) < 1 / (CLASSES + 1)
        images = torch.where(empty[:, None, None, None], blank, images)
        labels = torch.where(empty, CLASSES, labels)
        loss = F.cross_entropy(net(images.to(device)), labels.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    images, labels, _ = make_shapes(1000, g)
    with torch.no_grad():
        accuracy = (net(images.to(device)).argmax(1).cpu() == labels).float().mean().item()
    return net.eval().requires_grad_(False), accuracy


def pretrain_vit(s: Settings, g: torch.Generator, device: torch.device) -> tuple[core.ViT, float]:
    """The discriminator's feature network: tiny ViT + linear probe regressing (cx, cy, size); R^2 held out."""
    vit = core.tiny_vit(seed=1).to(device).requires_grad_(True).train()
    probe = nn.Linear(vit.dim, 3).to(device)
    opt = torch.optim.Adam([*vit.parameters(), *probe.parameters()], lr=1e-3)

    def predict(images: torch.Tensor) -> torch.Tensor:
        tokens = vit.forward_features(images.to(device), [vit.config.depth - 1])[0]
        return probe(vit.norm(tokens).mean(1))

    for _ in range(s.vit_steps):
        images, _, geometry = make_shapes(s.batch, g)
        loss = F.mse_loss(predict(images), geometry.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, _, geometry = make_shapes(1000, g)
    with torch.no_grad():
        r2 = 1 - F.mse_loss(predict(images).cpu(), geometry) / geometry.var(0).mean()
    return vit.eval().requires_grad_(False), r2.item()


def train_teacher(s: Settings, g: torch.Generator, device: torch.device) -> ToyUNet:
    """v-prediction DDPM training (uniform t, MSE on v), Adam with cosine decay; returns the EMA weights.

    The data and noise are drawn on the CPU from ``g`` in the same order on every device."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    net = ToyUNet(s.teacher_width).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=s.teacher_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.teacher_steps)
    decay = min(0.999, 1 - 10 / max(s.teacher_steps, 10))
    for _ in range(s.teacher_steps):
        images, labels, _ = make_shapes(s.batch, g)
        x0 = to_model(images)
        t = torch.randint(0, len(AC), (s.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ac = AC[t].view(-1, 1, 1, 1)
        x0, eps, ac, t, labels = (v.to(device) for v in (x0, eps, ac, t, labels))
        v = ac.sqrt() * eps - (1 - ac).sqrt() * x0
        loss = F.mse_loss(net(ac.sqrt() * x0 + (1 - ac).sqrt() * eps, t, labels), v)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
    return ema.eval()


def distil(
    teacher: ToyUNet, vit: core.ViT, s: Settings, adversarial: bool, seed: int, device: torch.device
) -> tuple[nn.Module, list]:
    """``ADDTrainer`` with the trainer's defaults for the device (on CUDA: bfloat16 autocast and gradient
    checkpointing of the UNet's blocks and the ViT's)."""
    images, labels, _ = make_shapes(s.pool, torch.Generator().manual_seed(seed))
    data = core.TrainingData(x0=to_model(images), cond=labels, disc_cond=F.one_hot(labels, CLASSES).float())
    config = core.ADDConfig(
        batch_size=s.distill_batch,
        adversarial_weight=1.0 if adversarial else 0.0,
        student="full",
        student_lr=s.student_lr,
        discriminator_lr=s.discriminator_lr,
        ema_decay=s.ema_decay,
        seed=seed,
    )
    trainer = core.ADDTrainer(teacher, denoise, AC, copy.deepcopy(vit), data, config, to_images, device=device)
    log = trainer.train(s.distill_steps)
    with trainer.use_ema() as student:  # sample with the moving average of the student's weights
        return copy.deepcopy(student).eval().requires_grad_(False), log


# -- sampling and the metric -----------------------------------------------------------------------
@torch.no_grad()
def ddim(net: nn.Module, noise: torch.Tensor, labels: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """Deterministic DDIM from pure noise through ``timesteps`` (x0 clipped); returns the final x0."""
    x = noise
    for i, t in enumerate(timesteps):
        tt = torch.full((len(x),), t, device=x.device)
        x0 = denoise(net, x, tt, labels).clamp(-1, 1)
        if i + 1 == len(timesteps):
            return x0
        ac, ac_next = AC[t], AC[timesteps[i + 1]]
        eps = (x - ac.sqrt() * x0) / (1 - ac).sqrt()
        x = ac_next.sqrt() * x0 + (1 - ac_next).sqrt() * eps
    return x


@torch.no_grad()
def renoise(
    net: nn.Module, noise: torch.Tensor, labels: torch.Tensor, timesteps: list[int], g: torch.Generator
) -> torch.Tensor:
    """The ADD sampler: x0 at each student timestep, then forward-noise it to the next with fresh noise."""
    x = noise
    for i, t in enumerate(timesteps):
        x0 = denoise(net, x, torch.full((len(x),), t, device=x.device), labels).clamp(-1, 1)
        if i + 1 == len(timesteps):
            return x0
        ac = AC[timesteps[i + 1]]
        x = ac.sqrt() * x0 + (1 - ac).sqrt() * torch.randn(x0.shape, generator=g).to(x0.device)
    return x


def generate(
    sampler, n: int, seed: int, device: torch.device | str = "cpu", chunk: int = 250
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n images in [-1, 1] on the CPU, their classes)``: classes cycle through all 12; the noise is seeded on
    the CPU (same per row and device)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    out = []
    for start in range(0, n, chunk):
        noise = torch.randn(min(chunk, n - start), 12, SIZE // 2, SIZE // 2, generator=g)
        out.append(to_images(sampler(noise.to(device), labels[start : start + len(noise)].to(device), g)).cpu())
    return torch.cat(out), labels


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` of feature sets [N, D], in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root @ s_b @ root)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a + s_b - 2 * cross))


def features(classifier: Classifier, images: torch.Tensor) -> torch.Tensor:
    """The metric features of CPU ``images``, computed on the classifier's device, returned on the CPU."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier.features(chunk.to(device)).cpu() for chunk in images.split(500)])


def label_accuracy(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images the metric classifier assigns to the class they were generated for (real: ~100 %)."""
    device = next(classifier.parameters()).device
    predicted = torch.cat([classifier(chunk.to(device)).argmax(1).cpu() for chunk in images.split(500)])
    return (predicted == labels).double().mean().item()


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The classifier-free view: images average-pooled to 8x8, flattened (192-d)."""
    return F.avg_pool2d(images, PIXEL_POOL).flatten(1)


def bootstrap_std(a: torch.Tensor, b: torch.Tensor, rounds: int = 5, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    values = [frechet_distance(a[torch.randint(0, len(a), (len(a),), generator=g)], b) for _ in range(rounds)]
    return float(torch.tensor(values).std())


# -- report ----------------------------------------------------------------------------------------
def save_grid(rows: list[tuple[str, torch.Tensor]], path: Path, per_row: int = 12, scale: int = 2) -> None:
    """One labelled row of ``per_row`` samples per variant, upscaled ``scale``x (nearest)."""
    from PIL import Image, ImageDraw

    cell, label_w = SIZE * scale, 150
    grid = Image.new("RGB", (label_w + per_row * (cell + 2), len(rows) * (cell + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (cell + 2)
        draw.text((4, y + cell // 2 - 6), label, fill=(0, 0, 0))
        pixels = ((images[:per_row] + 1) / 2).clamp(0, 1).mul(255).round().byte()
        for c, img in enumerate(pixels):
            tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_w + c * (cell + 2), y))
    grid.save(path)


def _verdict(by: dict[str, dict]) -> str:
    """The acceptance question in one line: is the 1-step ADD student clearly closer to the data than the teacher?"""
    t1, a1 = by["teacher_1"], by["add_1"]
    ratio = t1["fd"] / a1["fd"]
    gap = (t1["fd"] - a1["fd"]) / max(t1["std"], a1["std"], 1e-9)
    all_agree = a1["pixel_fd"] < t1["pixel_fd"] and a1["accuracy"] >= t1["accuracy"]
    if ratio >= 1.5 and gap > 2 and all_agree:
        word = "clearly"
    elif ratio > 1 and gap > 2:
        word = "only modestly"
    else:
        word = "not"
    return (
        f"- **Verdict: the 1-step ADD student is {word} closer to the data than the teacher's 1-step prediction**: "
        f"FD {a1['fd']:.2f} vs {t1['fd']:.2f} ({ratio:.2f}x, {gap:.0f} bootstrap stds), pixel FD "
        f"{a1['pixel_fd']:.2f} vs {t1['pixel_fd']:.2f}, label accuracy {a1['accuracy']:.0%} vs {t1['accuracy']:.0%}."
    )


def _collapse_warning(by: dict[str, dict]) -> list[str]:
    """A sentence for students whose FD beats ADD's while they draw nothing recognisable."""
    out = []
    for key, name in (("distill_1", "distillation-only 1 step"), ("distill_4", "distillation-only 4 steps")):
        r, add = by[key], by["add_" + key[-1]]
        if r["fd"] < add["fd"] and r["accuracy"] < add["accuracy"] and r["pixel_fd"] > add["pixel_fd"]:
            out.append(
                f"- Caution: {name} has the lower FD ({r['fd']:.3f} vs ADD {add['fd']:.3f}) but the worse label "
                f"accuracy ({r['accuracy']:.0%} vs {add['accuracy']:.0%}) and pixel FD ({r['pixel_fd']:.2f} vs "
                f"{add['pixel_fd']:.2f}); look at the grid before trusting the FD column for it."
            )
    return out


def write_report(path: Path, results: list[dict], notes: dict, grid_name: str, quick: bool) -> None:
    by = {r["key"]: r for r in results}
    t1, add1, add4, dist1, dist4 = (by[k]["fd"] for k in ("teacher_1", "add_1", "add_4", "distill_1", "distill_4"))
    lines = [
        "# ADD distillation on a toy: coloured shapes at 32x32",
        "",
        "Generated by `bench/add_toy.py`"
        + (" in --quick mode (smoke test: numbers mean nothing)" if quick else "")
        + f"; {notes['machine']}; device {notes['device']}, {notes['threads']} CPU thread(s); "
        f"total {notes['total_s'] / 60:.1f} min.",
        "",
        f"    {notes['command']}",
        "",
        "Lower FD is closer to the data. FD = Fréchet distance between the 64-d penultimate features of a CNN "
        "classifier trained on the generator's shape x colour labels plus a 13th 'no shape' class of blank "
        f"backgrounds (held-out accuracy {notes['accuracy']:.1%}), "
        f"{notes['n']} generated vs {notes['n']} held-out real images; +- is the std of 5 bootstrap resamples of the "
        "generated set. Every row generates the 12 classes equally often from the same noise. *Label accuracy* is "
        "the share of samples the same classifier assigns to the class they were generated for; *pixel FD* is the "
        "Fréchet distance of the images average-pooled to 8x8 (192-d), which needs no network: it sees colour, "
        "position and size statistics and an empty canvas, but little of the shapes' edges. Both are checks on FD, "
        "whose classifier features can be blind to failure modes (an image unlike anything the classifier was "
        "trained on lands wherever it lands).",
        "",
        "| variant | steps | sampler | FD | +- | FD / teacher 1-step | pixel FD | label accuracy |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['sampler']} | {r['fd']:.3f} | {r['std']:.3f} | {r['fd'] / t1:.2f} "
            f"| {r['pixel_fd']:.2f} | {r['accuracy']:.1%} |"
        )
    better = "better" if add1 < dist1 else "worse"
    acc = {k: by[k]["accuracy"] for k in by}
    pix = {k: by[k]["pixel_fd"] for k in by}
    lines += [
        "",
        f"![samples]({grid_name})",
        "",
        "## What the numbers say",
        "",
        _verdict(by),
        f"- 1 step: the ADD student reaches FD {add1:.3f} against {t1:.3f} for the teacher's one-step prediction, "
        f"{t1 / add1:.1f}x closer to the data; the distillation-only student reaches {dist1:.3f} "
        f"({t1 / dist1:.1f}x).",
        f"- The adversarial term, by FD: at 1 step ADD is {better} than distillation-only "
        f"({add1:.3f} vs {dist1:.3f}, {abs(dist1 - add1) / dist1:.0%}); at 4 steps {add4:.3f} vs {dist4:.3f}. "
        f"By pixel FD: 1 step {pix['add_1']:.2f} vs {pix['distill_1']:.2f}, 4 steps {pix['add_4']:.2f} vs "
        f"{pix['distill_4']:.2f} (teacher: 1 step {pix['teacher_1']:.2f}, 4 steps {pix['teacher_4']:.2f}, "
        f"50 steps {pix['teacher_50']:.2f}; real {pix['real']:.2f}).",
        *_collapse_warning(by),
        f"- Label accuracy (is the requested shape x colour there?): teacher 1 step {acc['teacher_1']:.0%}, "
        f"ADD 1 step {acc['add_1']:.0%}, distillation-only 1 step {acc['distill_1']:.0%}; at 4 steps teacher "
        f"{acc['teacher_4']:.0%}, ADD {acc['add_4']:.0%}, distillation-only {acc['distill_4']:.0%}; "
        f"teacher 50 steps {acc['teacher_50']:.0%}, real images {acc['real']:.0%}.",
        f"- Reference points: held-out real vs real {by['real']['fd']:.3f} (the floor at this sample size), "
        f"teacher DDIM 50 steps {by['teacher_50']['fd']:.3f}, teacher DDIM 4 steps {by['teacher_4']['fd']:.3f}.",
        "",
        "## How it was run",
        "",
        f"- Data: {SIZE}x{SIZE} anti-aliased circles / squares / triangles in 4 colours, random position and size.",
        f"- Teacher: v-prediction UNet (width {notes['width']}, {notes['teacher_params'] / 1e6:.2f} M "
        f"parameters) on the 2x2 pixel-unshuffled image (12x16x16), SD scaled-linear schedule, "
        f"{notes['teacher_steps']} Adam steps of batch {notes['batch']}, EMA.",
        f"- Students: `ADDTrainer`, full fine-tune from the teacher, {notes['distill_steps']} steps of batch "
        f"{notes['distill_batch']}, Adam lr {notes['student_lr']:g} (betas 0.9, 0.999; discriminator heads "
        f"{notes['discriminator_lr']:g}, betas 0, 0.99), student timesteps 999/749/499/249, lambda 2.5, R1 1e-5, "
        f"distillation weight c(t) = alpha_t, teacher t uniform in 1..999; samples from an EMA ({notes['ema']}) "
        "of the student's weights. Distillation-only = the same run with adversarial weight 0.",
        "- Discriminator: the built-in tiny ViT (4 blocks, 64 wide, 4-px patches), pretrained here to regress the "
        f"shape's position and size (held-out R^2 {notes['vit_r2']:.2f}), frozen; one StyleGAN-T head "
        "(spectrally normalised convs, local batch norm) on each block, conditioned on the one-hot class by "
        "projection. The metric classifier was trained separately on other labels (shape x colour).",
        "- Samplers: teacher DDIM (eta 0) on 50 (linspace 999..0), 4 (999/749/499/249) or 1 (999) steps; "
        "students: x0 at each student timestep, re-noised to the next with fresh noise (the ADD paper's "
        "multi-step sampler); x0 clipped to [-1, 1] everywhere.",
        f"- Phase times: {notes['times']}.",
        "",
        "## Caveats",
        "",
        "- One seed, one toy; FD differences within a couple of bootstrap stds are noise.",
        "- The FD features come from a classifier trained on this generator, so FD mostly measures whether "
        "shape, colour and their mix are right; it is blind to many pixel-level artefacts.",
        "- The discriminator's backbone was pretrained on the same generator (on geometry, not the metric's "
        "labels): a friendlier setting than ADD's generic DINOv2 features on natural images.",
        "- The settings were chosen after about ten short trial runs (300-600 student steps on an earlier, "
        "cached teacher), not blind: with an unconditional epsilon-prediction toy, or student learning rates of "
        "5e-5 and more, the adversarial student collapsed (one colour, or noise), and distillation-only drifted to "
        "empty images. "
        "The teacher's 6,000 steps and the students' 1,600 were chosen after seeing results too: with a "
        "2,500-step teacher (lumpy shapes, 50-step label accuracy 50%) and 600 student steps the 1-step ADD "
        "student was only 1.28x better than the teacher's 1 step by FD and drew the requested class less often "
        "(27% vs 34%); a trial with a 6,000-step teacher evaluated its ADD student every 400 steps: 1-step FD "
        "36.0, 38.3, 29.7, 21.7 (teacher 1 step 47.3), so GAN training is noisy from one checkpoint to the next. "
        f"The ADD paper trains 4,000 steps of batch 128; this run gets {notes['distill_steps']:,} of batch "
        f"{notes['distill_batch']}.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a result")
    parser.add_argument(
        "--preset", choices=("cpu", "gpu"), default="cpu",
        help="cpu: the documented one-thread CPU run; gpu: paper-sized student training (needs --device cuda)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device for every network (default cpu)")
    parser.add_argument("--out", type=Path, default=BENCH.parent / "docs", help="folder for add_toy.md and the grid")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--name", default="add_toy", help="report files: NAME.md, NAME.json, NAME_samples.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache", type=Path, help="development: reuse (or write) the classifier, ViT and teacher from this file"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else GPU if args.preset == "gpu" else FULL
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    times, started = {}, time.perf_counter()

    def phase(name: str, t0: float) -> None:
        times[name] = time.perf_counter() - t0
        print(f"{name}: {times[name]:.1f} s", flush=True)

    if args.cache is not None and args.cache.is_file():  # development only: skip the first three phases
        cached = torch.load(args.cache, weights_only=True)
        classifier, vit, teacher = Classifier(), core.ViT(core.TINY_VIT), ToyUNet(s.teacher_width)
        for net, key in ((classifier, "classifier"), (vit, "vit"), (teacher, "teacher")):
            net.load_state_dict(cached[key])
            net.to(device)
            net.eval().requires_grad_(False)
        accuracy, vit_r2 = cached["accuracy"], cached["r2"]
        times.update(cached["times"])
    else:
        t0 = time.perf_counter()
        classifier, accuracy = train_classifier(s, g, device)
        phase("classifier", t0)
        t0 = time.perf_counter()
        vit, vit_r2 = pretrain_vit(s, g, device)
        phase("vit", t0)
        t0 = time.perf_counter()
        teacher = train_teacher(s, g, device)
        phase("teacher", t0)
        if args.cache is not None:
            nets = {"classifier": classifier, "vit": vit, "teacher": teacher}
            torch.save(
                {**{k: v.state_dict() for k, v in nets.items()}, "accuracy": accuracy, "r2": vit_r2, "times": times},
                args.cache,
            )

    t0 = time.perf_counter()
    add_student, add_log = distil(teacher, vit, s, adversarial=True, seed=args.seed + 1, device=device)
    phase("add", t0)
    t0 = time.perf_counter()
    dist_student, _ = distil(teacher, vit, s, adversarial=False, seed=args.seed + 1, device=device)
    phase("distill_only", t0)

    t0 = time.perf_counter()
    n = s.eval_samples
    real = make_shapes(n, torch.Generator().manual_seed(args.seed + 100))[0]
    real2, real2_labels, _ = make_shapes(n, torch.Generator().manual_seed(args.seed + 200))
    grid_50 = [int(round(v)) for v in torch.linspace(999, 0, TEACHER_STEPS_FULL).tolist()]
    four, one = list(STUDENT_TIMESTEPS), [STUDENT_TIMESTEPS[0]]
    rows = [
        ("real", "held-out real images", 0, "-", None),
        ("teacher_50", "teacher", TEACHER_STEPS_FULL, "DDIM", lambda x, c, gg: ddim(teacher, x, c, grid_50)),
        ("teacher_4", "teacher", 4, "DDIM", lambda x, c, gg: ddim(teacher, x, c, four)),
        ("teacher_1", "teacher", 1, "DDIM (x0)", lambda x, c, gg: ddim(teacher, x, c, one)),
        ("add_1", "ADD student", 1, "x0", lambda x, c, gg: renoise(add_student, x, c, one, gg)),
        ("add_4", "ADD student", 4, "x0 + re-noise", lambda x, c, gg: renoise(add_student, x, c, four, gg)),
        ("distill_1", "distillation-only student", 1, "x0", lambda x, c, gg: renoise(dist_student, x, c, one, gg)),
        ("distill_4", "distillation-only student", 4, "x0 + re-noise",
         lambda x, c, gg: renoise(dist_student, x, c, four, gg)),
    ]  # fmt: skip
    with torch.no_grad():
        real_feats, real_pixels = features(classifier, real), pixel_features(real)
        results, grid_rows = [], []
        for key, label, steps, sampler, fn in rows:
            if key == "real":
                images, labels = real2, real2_labels
            else:
                images, labels = generate(fn, n, seed=args.seed + 300, device=device)
            feats = features(classifier, images)
            results.append(
                {"key": key, "label": label, "steps": steps, "sampler": sampler,
                 "accuracy": label_accuracy(classifier, images, labels),
                 "fd": frechet_distance(feats, real_feats), "std": bootstrap_std(feats, real_feats),
                 "pixel_fd": frechet_distance(pixel_features(images), real_pixels)}
            )  # fmt: skip
            grid_rows.append((f"{label} {steps}" if steps else label, images))
    phase("evaluation", t0)

    grid_name = f"{args.name}_samples.png"
    save_grid(grid_rows, args.out / grid_name)
    notes = {
        "machine": machine_line(),
        "threads": args.threads,
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "command": " ".join(["python bench/add_toy.py", *(argv if argv is not None else sys.argv[1:])]),
        "preset": "quick" if args.quick else args.preset,
        "total_s": time.perf_counter() - started,
        "accuracy": accuracy,
        "vit_r2": vit_r2,
        "n": n,
        "width": s.teacher_width,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "teacher_steps": s.teacher_steps,
        "batch": s.batch,
        "distill_steps": s.distill_steps,
        "distill_batch": s.distill_batch,
        "student_lr": s.student_lr,
        "discriminator_lr": s.discriminator_lr,
        "ema": s.ema_decay,
        "times": ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
    }
    write_report(args.out / f"{args.name}.md", results, notes, grid_name, args.quick)
    (args.out / f"{args.name}.json").write_text(json.dumps({"results": results, "notes": notes}, indent=1) + "\n")
    print(f"wrote {args.out / (args.name + '.md')}")
    for r in results:
        print(
            f"{r['key']:>12}: FD {r['fd']:.3f} +- {r['std']:.3f}, pixel FD {r['pixel_fd']:.2f}, "
            f"label accuracy {r['accuracy']:.1%}"
        )
    print(f"last ADD log entry: {add_log[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
