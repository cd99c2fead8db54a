"""ADD distillation core (pure torch): losses against hand-computed values, LoRA layout, the ViT
feature network and its loaders, and the trainer (frozen teacher and features, determinism, resume)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from turbostream import add_distill as core
from turbostream.add_sampler import scaled_linear_alphas_cumprod

AC = scaled_linear_alphas_cumprod()


# -- losses: values and gradients from hand calculations --------------------------------------------
def test_hinge_d_loss_value_and_gradient():
    real = [torch.tensor([[0.5, 2.0]], requires_grad=True), torch.tensor([[-1.0]], requires_grad=True)]
    fake = [torch.tensor([[-0.5, -3.0]], requires_grad=True), torch.tensor([[0.25]], requires_grad=True)]
    loss = core.hinge_d_loss(real, fake)
    # head 1: real mean(relu(1-0.5), relu(1-2)) = (0.5 + 0) / 2 = 0.25; fake mean(relu(0.5), relu(-2)) = 0.25
    # head 2: real relu(1+1) = 2; fake relu(1.25) = 1.25  -> total 0.25 + 0.25 + 2 + 1.25
    assert loss.item() == pytest.approx(3.75)
    loss.backward()
    # d/dr relu(1-r)/n = -1/n where 1-r > 0; d/df relu(1+f)/n = 1/n where 1+f > 0
    assert real[0].grad.tolist() == [[-0.5, 0.0]] and real[1].grad.tolist() == [[-1.0]]
    assert fake[0].grad.tolist() == [[0.5, 0.0]] and fake[1].grad.tolist() == [[1.0]]


def test_hinge_g_loss_value_and_gradient():
    fake = [torch.tensor([[1.0, 3.0], [-2.0, 0.0]], requires_grad=True), torch.tensor([[0.5]], requires_grad=True)]
    loss = core.hinge_g_loss(fake)
    assert loss.item() == pytest.approx(-(0.5 + 0.5))  # -(mean 0.5) - (mean 0.5)
    loss.backward()
    assert fake[0].grad.tolist() == [[-0.25, -0.25], [-0.25, -0.25]] and fake[1].grad.tolist() == [[-1.0]]


def test_r1_penalty_value_and_gradient():
    # head D(f) = sum_c a_c f_c^2 per token -> dD/df = 2 a f; R1 = mean_b sum_{n,c} (2 a_c f_bnc)^2
    a = torch.tensor([1.0, -2.0], requires_grad=True)
    f = torch.tensor([[[1.0, 0.5]], [[2.0, -1.0]]], requires_grad=True)  # [B=2, N=1, C=2]
    logits = (a * f.pow(2)).sum(-1)
    r1 = core.r1_penalty([logits], [f])
    # b0: (2*1*1)^2 + (2*-2*0.5)^2 = 4 + 4 = 8; b1: (2*1*2)^2 + (2*-2*-1)^2 = 16 + 16 = 32; mean 20
    assert r1.item() == pytest.approx(20.0)
    r1.backward()
    # dR1/da_c = mean_b sum 8 a_c f^2: a0 -> 8*1*(1 + 4)/2 = 20; a1 -> 8*-2*(0.25 + 1)/2 = -10
    assert a.grad.tolist() == pytest.approx([20.0, -10.0])


def test_r1_penalty_sums_over_heads():
    f1 = torch.ones(3, 2, 4, requires_grad=True)
    f2 = torch.ones(3, 5, 1, requires_grad=True)
    # linear heads: the gradient is the weight, per token: 2 tokens * 4 * 0.5^2 + 5 * 1 * 3^2 = 2 + 45
    r1 = core.r1_penalty([(0.5 * f1).sum(-1), (3.0 * f2).sum(-1)], [f1, f2])
    assert r1.item() == pytest.approx(47.0)


def test_exponential_weight_is_alpha_t():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear by hand
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 249, 999])
    c = core.exponential_weight(AC, t)
    torch.testing.assert_close(c, alphas_cumprod[t].sqrt().to(c.dtype))
    assert c[0].item() == pytest.approx(math.sqrt(1 - 0.00085))
    assert c[2].item() == pytest.approx(0.06826, abs=1e-4)  # sqrt(0.0046600)
    assert (c[:-1] > c[1:]).all()  # higher noise contributes less


def test_distillation_loss_value_and_gradient():
    student = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]], requires_grad=True)  # [2, 1, 1, 2]
    teacher = torch.tensor([[[[0.0, 0.0]]], [[[1.0, -3.0]]]], requires_grad=True)
    w = torch.tensor([0.5, 2.0])
    loss = core.distillation_loss(student, teacher, w)
    # b0: mean(1, 4) = 2.5 * 0.5 = 1.25; b1: mean(1, 9) = 5 * 2 = 10; mean over batch 5.625
    assert loss.item() == pytest.approx(5.625)
    loss.backward()
    # d/ds = w_b * 2 (s - t) / (elements 2) / (batch 2)
    assert student.grad.flatten().tolist() == pytest.approx([0.25, 0.5, -1.0, 3.0])
    assert teacher.grad is None  # the target is a stop-gradient


def test_alphas_cumprod_from_sigmas_inverts_the_host_sigma():
    sigmas = ((1 - AC) / AC).sqrt()
    torch.testing.assert_close(core.alphas_cumprod_from_sigmas(sigmas), AC.double())


# -- LoRA ------------------------------------------------------------------------------------------
class ToyNet(nn.Module):
    """A tiny conditional denoiser: conv in, time + condition embedding, two residual convs, conv out."""

    def __init__(self, channels: int = 3, width: int = 16, cond_dim: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.temb = nn.Linear(1, width)
        self.cemb = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)])
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.out = nn.ConvTranspose2d(width, channels, 2, stride=2)  # not a LoRA target

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.temb(t.float()[:, None] / 1000)[:, :, None, None] + self.cemb(cond)[:, :, None, None]
        for block in self.blocks:
            h = h + F.silu(block(h))
        return self.out(F.silu(self.down(h)))


def eps_denoise(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    ac = AC.to(x_t.device)[t].float().view(-1, 1, 1, 1)
    return (x_t - (1 - ac).sqrt() * net(x_t, t, cond)) / ac.sqrt()


def _net(seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet().eval()


def test_lora_targets_every_linear_and_plain_conv2d():
    names = [n for n, _ in core.lora_targets(_net())]
    assert names == ["inp", "temb", "cemb", "blocks.0", "blocks.1", "down"]
    assert core.lora_module_name("input_blocks.1.1.proj_in") == "lora_unet_input_blocks_1_1_proj_in"


def test_lora_starts_as_the_base_and_matches_the_merged_weight_formula():
    net = _net()
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.randn(2, 8)
    before = net(x, t, c)
    lora = core.LoRANetwork(net, rank=3, alpha=1.5, seed=0)
    torch.testing.assert_close(net(x, t, c), before, rtol=0, atol=0)  # up starts at zero
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.up.normal_()
    adapted = net(x, t, c)
    assert not torch.allclose(adapted, before)
    # the host applies W + alpha / rank * up.flatten(1) @ down.flatten(1) (kohya layout): same outputs
    sd = lora.lora_state_dict()
    lora.remove()
    torch.testing.assert_close(net(x, t, c), before, rtol=0, atol=0)  # hooks gone
    merged = _net()
    with torch.no_grad():
        for path, module in core.lora_targets(merged):
            name = core.lora_module_name(path)
            down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
            assert alpha.item() == 1.5 and down.shape[0] == 3
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            module.weight += alpha / down.shape[0] * delta
    torch.testing.assert_close(merged(x, t, c), adapted, rtol=1e-5, atol=1e-5)
    assert sd["lora_unet_down.lora_down.weight"].shape == (3, 16, 3, 3)
    assert sd["lora_unet_down.lora_up.weight"].shape == (16, 3, 1, 1)
    assert sd["lora_unet_temb.lora_down.weight"].shape == (3, 1)


# -- the discriminator heads -----------------------------------------------------------------------
def _rectangles(n: int, g: torch.Generator) -> torch.Tensor:
    """Sharp random-coloured rectangles on a dark background, ``[n, 3, 32, 32]`` in [-1, 1]."""
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    lo = torch.randint(0, 20, (n, 2, 1, 1), generator=g).float()
    size = torch.randint(6, 12, (n, 2, 1, 1), generator=g).float()
    inside = (xs >= lo[:, 0]) & (xs < lo[:, 0] + size[:, 0]) & (ys >= lo[:, 1]) & (ys < lo[:, 1] + size[:, 1])
    colour = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    return -0.8 + inside[:, None].float() * (colour + 0.8)


def _blurred(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None]) / 256
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.expand(3, 1, 5, 5).contiguous(), groups=3)


def test_batch_norm_local_normalises_each_group_of_samples_over_its_tokens():
    torch.manual_seed(0)
    norm = core.BatchNormLocal(4, virtual_batch=8)
    x = torch.randn(11, 4, 5) * 3 + 2  # groups of 8 and 3
    y = norm(x)
    for group in (y[:8], y[8:]):
        torch.testing.assert_close(group.mean((0, 2)), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(group.var((0, 2), correction=0), torch.ones(4), atol=1e-3, rtol=0)


def test_discriminator_learns_to_tell_sharp_from_blurred_images():
    """The heads must be able to magnify small feature differences: with spectrally normalised convs and no
    normalisation between them (the layout before StyleGAN-T's local batch norm was added) this stayed near
    chance (held-out AUC 0.66, logit gap 0.02 after these 60 steps), and ADD's student got no adversarial signal."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    disc = core.Discriminator(core.tiny_vit(0), [1, 3])
    opt = torch.optim.Adam(disc.heads.parameters(), lr=4e-4, betas=core.DISCRIMINATOR_BETAS)
    for _ in range(60):
        with torch.no_grad():
            real, fake = disc.features(_rectangles(16, g)), disc.features(_blurred(_rectangles(16, g)))
        real = [f.requires_grad_(True) for f in real]
        real_logits, fake_logits = disc.logits(real), disc.logits(fake)
        loss = core.hinge_d_loss(real_logits, fake_logits) + core.R1_WEIGHT * core.r1_penalty(real_logits, real)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = _rectangles(64, torch.Generator().manual_seed(1))
        d_real = torch.stack([lg.mean(1) for lg in disc.logits(disc.features(x))]).mean(0)
        d_fake = torch.stack([lg.mean(1) for lg in disc.logits(disc.features(_blurred(x)))]).mean(0)
    auc = (d_real[:, None] > d_fake[None, :]).float().mean()
    assert auc > 0.95, auc
    assert d_real.mean() - d_fake.mean() > 0.1


# -- the ViT feature network -----------------------------------------------------------------------
def test_default_layers():
    assert core.default_layers(12) == [2, 5, 8, 11]
    assert core.default_layers(4) == [0, 1, 2, 3]
    assert core.default_layers(2) == [0, 1]


def test_vit_small_has_the_dinov2_layout():
    cfg = core.ViTConfig(dim=384, depth=12, heads=6, patch_size=14, grid=37, mlp_dim=1536, image_size=224)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in core.ViT(cfg).state_dict().items()}
    # the tensors of dinov2_vits14_pretrain.pth (torch hub) / timm vit_small_patch14_dinov2
    assert shapes["cls_token"] == (1, 1, 384) and shapes["pos_embed"] == (1, 1 + 37 * 37, 384)
    assert shapes["mask_token"] == (1, 384) and shapes["patch_embed.proj.weight"] == (384, 3, 14, 14)
    assert shapes["blocks.11.attn.qkv.weight"] == (1152, 384) and shapes["blocks.11.ls2.gamma"] == (384,)
    assert shapes["blocks.0.mlp.fc1.weight"] == (1536, 384) and shapes["norm.weight"] == (384,)
    assert len(shapes) == 5 + 12 * 14 + 2  # embeddings, 14 tensors per block, final norm


def test_vit_from_its_own_state_dict_and_interpolated_grid():
    vit = core.tiny_vit(3)
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    loaded = core.vit_from_state_dict(sd, num_heads=2, image_size=32)
    assert loaded.config == vit.config
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    for a, b in zip(loaded.forward_features(images, [1, 3]), vit.forward_features(images, [1, 3]), strict=True):
        torch.testing.assert_close(a, b)
    assert all(p.requires_grad is False for p in loaded.parameters())
    # another input size: the 8x8 position grid is interpolated to 4x4 (16 tokens)
    small = core.vit_from_state_dict(sd, num_heads=2, image_size=16)
    assert [f.shape for f in small.forward_features(images, [0])] == [(2, 16, 64)]


def test_vit_loads_transformers_dinov2_and_matches_its_hidden_states():
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=3,
        mlp_ratio=2,
        image_size=24,
        patch_size=4,
        layerscale_value=0.5,
    )
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial layer scales, biases, cls token
    sd = {f"dinov2.{k}": v for k, v in hf.state_dict().items()}  # as in Dinov2ForImageClassification
    vit = core.vit_from_state_dict(sd, num_heads=3, image_size=24)
    assert vit.config.grid == 6 and vit.config.depth == 3 and vit.config.layerscale
    # the same weights under the names of transformers 4 / the files on the hub
    legacy = {}
    for k, v in hf.state_dict().items():
        for new, old in (("attention.o_proj", "attention.output.dense"), ("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value")):  # fmt: skip
            k = k.replace(new, old)
        legacy[k] = v.reshape(1, 1, -1) if k == "embeddings.mask_token" else v
    assert "encoder.layer.0.attention.attention.query.weight" in legacy
    vit_legacy = core.vit_from_state_dict(legacy, num_heads=3, image_size=24)
    images = torch.rand(2, 3, 24, 24) * 2 - 1
    pixels = ((images + 1) / 2 - torch.tensor(core.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        core.IMAGENET_STD
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        ours = vit.forward_features(images, [0, 1, 2])
        legacy_feats = vit_legacy.forward_features(images, [0, 1, 2])
    for i, feats in enumerate(ours):
        torch.testing.assert_close(feats, hidden[i + 1][:, 1:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(legacy_feats[i], feats, rtol=0, atol=0)


@pytest.mark.parametrize(
    "sd,match",
    [
        ({"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4)}, "not a ViT in the DINOv2"),
        (
            {**core.tiny_vit().state_dict(), "register_tokens": torch.zeros(1, 4, 64)},
            "register tokens are not supported",
        ),
    ],
    ids=["clip-vision", "registers"],
)
def test_vit_loader_refuses_other_layouts(sd, match):
    with pytest.raises(core.FeatureNetworkError, match=match):
        core.vit_from_state_dict(sd, num_heads=2)


# -- the trainer -----------------------------------------------------------------------------------
def _data(n: int = 6, size: int = 16, seed: int = 7) -> core.TrainingData:
    g = torch.Generator().manual_seed(seed)
    return core.TrainingData(
        x0=torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        cond=torch.randn(n, 8, generator=g),
        disc_cond=torch.randn(n, 5, generator=g),
        uncond=torch.zeros(1, 8),
    )


def _trainer(teacher=None, vit=None, **settings) -> core.ADDTrainer:
    cfg = core.ADDConfig(**{"batch_size": 2, "lora_rank": 4, "student_lr": 1e-3, "discriminator_lr": 1e-3, **settings})
    return core.ADDTrainer(teacher or _net(), eps_denoise, AC, vit or core.tiny_vit(0), _data(), cfg)


def _digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_teacher_and_feature_network_never_change_while_student_and_heads_train():
    teacher, vit = _net(), core.tiny_vit(0)
    teacher_before, vit_before = _digest(teacher), _digest(vit)
    trainer = _trainer(teacher, vit)
    heads_before = _digest(trainer.discriminator.heads)
    lora_before = _digest(trainer.lora)
    log = trainer.train(4)
    assert _digest(teacher) == teacher_before and _digest(vit) == vit_before
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in vit.parameters())
    assert _digest(trainer.discriminator.heads) != heads_before and _digest(trainer.lora) != lora_before
    assert trainer.student is not teacher
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert {"loss_student", "loss_distill", "loss_adv", "loss_disc", "r1", "d_real", "d_fake"} <= set(log[-1])
    assert all(math.isfinite(v) for e in log for v in e.values())


def test_a_step_logs_the_hand_computed_distillation_loss():
    """Replay the trainer's random draws and compute its first distillation loss by hand."""
    trainer = _trainer(adversarial_weight=0.0)
    teacher = _net()
    state = trainer.generator.get_state()
    entry = trainer.train_step()
    g = torch.Generator()
    g.set_state(state)
    idx = torch.randint(0, 6, (2,), generator=g)
    s = torch.tensor(core.STUDENT_TIMESTEPS)[torch.randint(0, 4, (2,), generator=g)]
    t = torch.randint(1, 1000, (2,), generator=g)
    eps, eps2 = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    data = _data()
    x0, cond = data.x0[idx], data.cond[idx]
    a_s, a_t = AC[s].float().view(-1, 1, 1, 1), AC[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        student = eps_denoise(teacher, a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps, s, cond)  # LoRA starts at zero
        target = eps_denoise(teacher, a_t.sqrt() * student + (1 - a_t).sqrt() * eps2, t, cond)
    expected = (AC[t].sqrt().float() * (student - target).pow(2).mean((1, 2, 3))).mean()
    assert entry["loss_distill"] == pytest.approx(expected.item(), rel=1e-5)
    assert entry["loss_student"] == pytest.approx(core.DISTILL_WEIGHT * expected.item(), rel=1e-5)
    assert "loss_disc" not in entry


def test_distillation_only_leaves_the_discriminator_alone():
    trainer = _trainer(adversarial_weight=0.0)
    heads = _digest(trainer.discriminator.heads)
    log = trainer.train(2)
    assert _digest(trainer.discriminator.heads) == heads
    assert all(e["loss_adv"] == 0.0 and "loss_disc" not in e for e in log)


def test_teacher_guidance_mixes_conditional_and_unconditional_predictions():
    trainer = _trainer(teacher_guidance=3.0)
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([100, 900]), torch.randn(2, 8)
    with torch.no_grad():
        cond, uncond = eps_denoise(trainer.teacher, x, t, c), eps_denoise(trainer.teacher, x, t, torch.zeros(2, 8))
    torch.testing.assert_close(trainer.teacher_x0(x, t, c), uncond + 3.0 * (cond - uncond))


def test_tiny_vit_is_a_function_of_its_seed_alone():
    torch.manual_seed(1)
    a = core.tiny_vit(4).state_dict()
    torch.manual_seed(2)
    b = core.tiny_vit(4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.random.get_rng_state()
    core.tiny_vit(4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone


def test_the_global_rng_does_not_change_a_run():
    runs = []
    for global_seed in (10, 20):
        teacher = _net()
        torch.manual_seed(global_seed)  # whatever the caller's RNG state: the trainer uses its own seed
        runs.append(_trainer(teacher, core.tiny_vit(0), seed=5).train(2))
    assert runs[0] == runs[1]


def test_same_seed_same_run_other_seed_other_run():
    a, b, c = _trainer(seed=5).train(3), _trainer(seed=5).train(3), _trainer(seed=6).train(3)
    assert a == b
    assert a != c


@pytest.mark.parametrize("student", ["lora", "full"])
def test_resume_continues_the_same_loss_curve(tmp_path, student):
    straight = _trainer(student=student, ema_decay=0.9)
    expected = straight.train(5)

    first = _trainer(student=student, ema_decay=0.9)
    first.train(2)
    first.save(str(tmp_path / "state.pt"))
    resumed = _trainer(student=student, ema_decay=0.9)  # a fresh process would build it the same way
    resumed.load(str(tmp_path / "state.pt"))
    assert resumed.step == 2
    log = resumed.train(3)
    assert log == expected  # every loss of every step, exactly
    got = resumed.lora.state_dict() if student == "lora" else resumed.student.state_dict()
    want = straight.lora.state_dict() if student == "lora" else straight.student.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    for a, b in zip(resumed.ema, straight.ema, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ema_follows_the_weights_and_is_swapped_in_only_inside_use_ema():
    trainer = _trainer(ema_decay=0.5)
    start = [p.detach().clone() for p in trainer.trained]
    trainer.train(1)
    after_one = [p.detach().clone() for p in trainer.trained]
    for e, s0, s1 in zip(trainer.ema, start, after_one, strict=True):
        torch.testing.assert_close(e, 0.5 * s0 + 0.5 * s1)  # ema = decay * ema + (1 - decay) * weights
    with trainer.use_ema() as student:
        assert student is trainer.student
        assert all(torch.equal(p, e) for p, e in zip(trainer.trained, trainer.ema, strict=True))
        from_ema = trainer.lora_state_dict()
    assert all(torch.equal(p, w) for p, w in zip(trainer.trained, after_one, strict=True))
    assert all(torch.equal(from_ema[k], v) for k, v in trainer.lora_state_dict(ema=True).items())
    with pytest.raises(core.ADDConfigError, match="no EMA was kept"):
        _trainer().lora_state_dict(ema=True)


def test_resume_refuses_a_checkpoint_with_other_settings(tmp_path):
    trainer = _trainer()
    trainer.train(1)
    trainer.save(str(tmp_path / "s.pt"))
    with pytest.raises(core.ADDConfigError, match="other settings: lora_rank"):
        _trainer(lora_rank=8).load(str(tmp_path / "s.pt"))


def test_full_student_trains_every_weight_and_has_no_lora():
    trainer = _trainer(student="full")
    before = _digest(trainer.student)
    trainer.train(2)
    assert _digest(trainer.student) != before
    with pytest.raises(core.ADDConfigError, match="no LoRA"):
        trainer.lora_state_dict()


def test_unconditioned_discriminator_and_data_without_disc_cond():
    data = _data()
    data.disc_cond = None
    trainer = core.ADDTrainer(_net(), eps_denoise, AC, core.tiny_vit(0), data, core.ADDConfig(batch_size=2))
    assert trainer.discriminator.heads[0].cond is None
    trainer.train(1)


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"student_timesteps": (999, 1000)}, "student_timesteps must be"),
        ({"student_timesteps": ()}, "student_timesteps must be"),
        ({"teacher_t_range": (500, 100)}, "teacher_t_range"),
        ({"student": "half"}, "student must be 'lora' or 'full'"),
        ({"distill_weight": -1.0}, "distill_weight must not be negative"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"lora_rank": 0}, "lora_rank must be at least 1"),
        ({"ema_decay": 1.0}, "ema_decay must be in"),
    ],
)
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(core.ADDConfigError, match=match):
        _trainer(**settings)


def test_bad_data_is_refused():
    with pytest.raises(core.ADDConfigError, match="cond has 2 entries for 3 samples"):
        core.TrainingData(x0=torch.zeros(3, 3, 8, 8), cond=torch.zeros(2, 8))
    with pytest.raises(core.ADDConfigError, match="non-empty"):
        core.TrainingData(x0=torch.zeros(0, 3, 8, 8))
    data = _data()
    data.uncond = None
    with pytest.raises(core.ADDConfigError, match="needs TrainingData.uncond"):
        core.ADDTrainer(_net(), eps_denoise, AC, core.tiny_vit(0), data, core.ADDConfig(teacher_guidance=2.0))


def test_loss_curve_image():
    log = _trainer().train(3)
    image = core.loss_curve_image(log)
    assert image.shape == (4 * 130, 640, 3) and 0 <= image.min() and image.max() <= 1
    assert image.std() > 0
    no_disc = core.loss_curve_image([{k: v for k, v in e.items() if k != "loss_disc"} for e in log])
    assert no_disc.shape == (3 * 130, 640, 3)
    assert core.loss_curve_image([]).shape == (130, 640, 3)


# -- the GPU-only paths, exercised on the CPU --------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients():
    """The trainer turns checkpointing on for CUDA only; the recomputation itself is device-independent."""
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.randn(2, 8)
    grads = []
    for checkpointing in (False, True):
        net = _net()
        lora = core.LoRANetwork(net, rank=2, seed=1)
        with torch.no_grad():
            for layer in lora.layers.values():
                layer.up.normal_()
        if checkpointing:
            for block in core.default_checkpoint_blocks(net):
                core._checkpointed(block)
        vit = core.tiny_vit(0)
        vit.gradient_checkpointing = checkpointing
        out = net(x, t, c)
        feats = vit.forward_features(F.interpolate(out, size=32), [0, 3])
        (out.pow(2).mean() + sum(f.pow(2).mean() for f in feats)).backward()
        grads.append([p.grad.clone() for p in lora.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_mixed_precision_path_runs_and_keeps_the_teacher():
    """bfloat16 autocast is switched on for CUDA only; forced here on the CPU to run the same code."""
    teacher = _net()
    before = _digest(teacher)
    trainer = _trainer(teacher)
    trainer.autocast_dtype = torch.bfloat16
    log = trainer.train(2)
    assert all(math.isfinite(v) for e in log for v in e.values())
    assert _digest(teacher) == before
    assert all(p.dtype == torch.float32 for p in trainer.lora.parameters())
