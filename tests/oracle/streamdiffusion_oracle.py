"""Run the real upstream StreamDiffusion (PyPI ``streamdiffusion==0.1.1``) and dump what it saw and made.

Runs inside the oracle virtual environment (``tests/oracle/env.py``: streamdiffusion with the diffusers
and transformers it was written for), never in the pack's own one::

    <oracle python> streamdiffusion_oracle.py OUT.pt

Models: tiny seeded random-weight diffusers components (a two-level ``UNet2DConditionModel``, an
``AutoencoderTiny``, a two-layer ``CLIPTextModel`` with a byte-level tokenizer written here), wrapped
in a ``StableDiffusionPipeline`` as upstream expects; nothing is downloaded.

What is patched, only so that upstream runs on a CPU: ``torch.cuda.Event`` and ``torch.cuda.synchronize``
(upstream times every call with CUDA events). No algorithm code is touched: the dump is taken by
wrapping methods (``predict_x0_batch``, the VAE's ``encode``, the filter's ``__call__``,
``encode_prompt``) and recording their arguments and results.

Per configuration the dump holds: the init noise, the prompt embeddings (cond and uncond), the LCM
sub-timesteps, and per call the latent fed to ``predict_x0_batch`` (x_t of the newest slot), the
encoded frame (img2img), the x0 it returned; per input frame whether the similarity filter skipped it.
After the clip, ``n - 1`` drain calls feed the last processed frame again (filter off), so the outputs
of every frame exist despite upstream's lag. The UNet's config and weights and one probe evaluation
go along, so the other side can rebuild the same network and check that it is the same.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)

SIZE = 64
LATENT = (4, SIZE // 8, SIZE // 8)
FRAMES = 6
PROMPT = "a red fox in the snow"
NEGATIVE = "blurry, low quality"
SEED = 2

CONFIGS = [
    {"name": "none 32,45", "t_index_list": [32, 45], "cfg_type": "none", "guidance": 1.2},
    {"name": "self 32,45", "t_index_list": [32, 45], "cfg_type": "self", "guidance": 1.4, "delta": 0.8},
    {"name": "full 32,45", "t_index_list": [32, 45], "cfg_type": "full", "guidance": 1.4},
    {"name": "initialize 32,45", "t_index_list": [32, 45], "cfg_type": "initialize", "guidance": 1.4},
    {"name": "self 20,30,40", "t_index_list": [20, 30, 40], "cfg_type": "self", "guidance": 1.2},
    {"name": "self 32,45 no noise", "t_index_list": [32, 45], "cfg_type": "self", "guidance": 1.3, "add_noise": False},
    {"name": "txt2img 0,16,32,45 none", "t_index_list": [0, 16, 32, 45], "cfg_type": "none", "txt2img": True},
    {
        "name": "filter still",
        "t_index_list": [32, 45],
        "cfg_type": "self",
        "guidance": 1.2,
        "clip": "still",
        "filter": [0.98, 3],
        "frames": 10,
    },
    {
        "name": "filter near-still",
        "t_index_list": [32, 45],
        "cfg_type": "self",
        "guidance": 1.2,
        "clip": "near-still",
        "filter": [0.9975, 10],
        "frames": 12,
    },
]


class _CpuEvent:
    """Stands in for ``torch.cuda.Event``: upstream only times its calls with it."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


def _patch_cuda_timing() -> None:
    torch.cuda.Event = _CpuEvent
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _tokenizer(folder: Path):
    """A byte-level CLIP tokenizer with no merges (every character one token), written to ``folder``."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_pipe(folder: Path):
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=LATENT[1],
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    torch.manual_seed(2)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).eval()
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def clip_frames(kind: str, count: int) -> list[torch.Tensor]:
    """Frames ``(1, 3, SIZE, SIZE)`` in [0, 1]: a slowly drifting smooth colour field, a still, or a still
    with a little per-frame noise (what a webcam pointed at a quiet scene gives)."""
    gen = torch.Generator().manual_seed(11)
    coarse = torch.rand(1, 3, 6, 6, generator=gen)
    base = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    frames = []
    for i in range(count):
        if kind == "moving":
            shifted = torch.roll(base, shifts=(i, 2 * i), dims=(2, 3))
            frames.append((0.85 * shifted + 0.15 * torch.rand(1, 3, SIZE, SIZE, generator=gen)).clamp(0, 1))
        elif kind == "still":
            frames.append(base.clone())
        else:
            frames.append((base + 0.01 * torch.randn(1, 3, SIZE, SIZE, generator=gen)).clamp(0, 1))
    return frames


def run_config(pipe, cfg: dict) -> dict:
    from streamdiffusion import StreamDiffusion

    steps = len(cfg["t_index_list"])
    stream = StreamDiffusion(
        pipe,
        t_index_list=cfg["t_index_list"],
        torch_dtype=torch.float32,
        width=SIZE,
        height=SIZE,
        do_add_noise=cfg.get("add_noise", True),
        frame_buffer_size=1,
        cfg_type=cfg["cfg_type"],
    )
    captured: dict = {}
    encode_prompt = pipe.encode_prompt

    def recording_encode_prompt(*args, **kwargs):
        out = encode_prompt(*args, **kwargs)
        captured["cond"], captured["uncond"] = out[0].clone(), None if out[1] is None else out[1].clone()
        return out

    pipe.encode_prompt = recording_encode_prompt
    stream.prepare(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=50,
        guidance_scale=cfg.get("guidance", 1.2),
        delta=cfg.get("delta", 1.0),
        seed=SEED,
    )
    pipe.encode_prompt = encode_prompt
    calls: list[dict] = []
    encoded: list[torch.Tensor] = []
    skips: list[bool] = []

    vae_encode = stream.vae.encode

    def recording_vae_encode(*args, **kwargs):
        out = vae_encode(*args, **kwargs)
        encoded.append(out.latents.clone() * stream.vae.config.scaling_factor)
        return out

    stream.vae.encode = recording_vae_encode
    predict = stream.predict_x0_batch

    def recording_predict(x_t_latent):
        out = predict(x_t_latent)
        calls.append({"x_t": x_t_latent.clone(), "z": encoded[-1] if encoded else None, "out": out.clone()})
        encoded.clear()
        return out

    stream.predict_x0_batch = recording_predict
    if "filter" in cfg:
        threshold, max_skip = cfg["filter"]
        stream.enable_similar_image_filter(threshold, max_skip)
        random.seed(5)  # the filter draws with Python's random
        filt = stream.similar_filter.__class__.__call__

        def recording_filter(x):
            out = filt(stream.similar_filter, x)
            skips.append(out is None)
            return out

        stream.similar_filter = _Recorder(stream.similar_filter, recording_filter)

    count = cfg.get("frames", FRAMES)
    if cfg.get("txt2img"):
        torch.manual_seed(7)  # upstream draws txt2img latents from torch's global generator
        for _ in range(count):
            stream.txt2img()
        drained = 0
    else:
        frames = clip_frames(cfg.get("clip", "moving"), count)
        for frame in frames:
            stream(frame)
        fed = [f for f, s in zip(frames, skips or [False] * count, strict=True) if not s]
        stream.disable_similar_image_filter()
        for _ in range(steps - 1):
            stream(fed[-1])
        drained = steps - 1
    return {
        "config": cfg,
        "sub_timesteps": [int(t) for t in stream.sub_timesteps],
        "init_noise": stream.init_noise.clone(),
        "cond": captured["cond"],
        "uncond": captured["uncond"],
        "calls": calls,
        "skips": skips,
        "drain_calls": drained,
        "guidance_used": float(stream.guidance_scale),
    }


class _Recorder:
    """Stands in for the filter object so that ``stream.similar_filter(x)`` is recorded."""

    def __init__(self, inner, call) -> None:
        self._inner, self._call = inner, call

    def __call__(self, x):
        return self._call(x)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def main(out: Path) -> None:
    _patch_cuda_timing()
    import diffusers
    import streamdiffusion
    import transformers

    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        pipe = build_pipe(Path(folder))
        probe_x = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(3))
        probe_t = torch.tensor([999, 359, 99])
        probe_c = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(4))
        probe = pipe.unet(probe_x, probe_t, encoder_hidden_states=probe_c, return_dict=False)[0]
        runs = [run_config(pipe, cfg) for cfg in CONFIGS]
        versions = {
            "streamdiffusion": getattr(streamdiffusion, "__version__", "0.1.1"),
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        torch.save(
            {
                "versions": versions,
                "unet_config": dict(pipe.unet.config),
                "unet_state": pipe.unet.state_dict(),
                "probe": {"x": probe_x, "t": probe_t, "c": probe_c, "eps": probe},
                "runs": runs,
            },
            out,
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
