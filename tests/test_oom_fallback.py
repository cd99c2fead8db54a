"""Out-of-memory during a batch: smaller chunks with the same result, or a clear error; never a wrong image.

Core (pure torch): the chunk runner and the stream engine with stand-ins that raise out-of-memory
above a batch size. In-process nodes: the tiny VAE decode/encode paths with the host's
``OOM_EXCEPTION`` raised by a stand-in module. Real host: a second host started with the
fault-injection hook ``TURBOSTREAM_FAULT_OOM_ABOVE`` against the session's normal host.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch
from conftest import queue
from PIL import Image
from reliability import record
from safetensors.torch import load_file

from turbostream import add_sampler, client, oom, tiny_models
from turbostream import stream_batch as sb

# -- the chunk runner ---------------------------------------------------------------------------------------


def oom_above(limit: int, fn, sizes: list[int]):
    """``fn`` behind a stand-in device that runs out of memory for chunks of more than ``limit`` items."""

    def run(start: int, stop: int):
        sizes.append(stop - start)
        if stop - start > limit:
            raise torch.OutOfMemoryError(f"stand-in: {stop - start} items do not fit")
        return fn(start, stop)

    return run


def test_a_chunk_that_runs_out_of_memory_is_halved_and_retried():
    data = torch.arange(11.0)
    out = torch.full_like(data, float("nan"))
    sizes, freed = [], []

    def square(start, stop):
        out[start:stop] = data[start:stop] ** 2

    policy = oom.OomPolicy(free=lambda: freed.append(True))
    used = oom.run_in_chunks(oom_above(3, square, sizes), 11, 8, "test", policy)
    assert torch.equal(out, data**2)  # every item computed, in place, once
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 1] and used == 2  # 8 -> 4 -> 2, kept for the rest
    assert len(freed) == 2  # the cache is freed before each retry


def test_one_item_that_does_not_fit_is_a_clear_error():
    sizes = []
    with pytest.raises(oom.ChunkOutOfMemoryError) as err:
        oom.run_in_chunks(oom_above(0, lambda a, b: None, sizes), 4, 4, "MyNode: decoding 4 latents", unit="image")
    msg = str(err.value)
    assert msg.startswith("MyNode: decoding 4 latents: out of memory even with one image per chunk")
    assert "stand-in: 1 items do not fit" in msg and oom.DEFAULT_HINT in msg
    assert sizes == [4, 2, 1]
    assert isinstance(err.value, torch.OutOfMemoryError)  # hosts still clean up after an OOM
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_other_errors_pass_through_without_a_retry():
    calls = []

    class Interrupted(Exception):
        pass

    def interrupted(start, stop):
        calls.append((start, stop))
        raise Interrupted("stop")

    with pytest.raises(Interrupted):
        oom.run_in_chunks(interrupted, 4, 4, "test")
    assert calls == [(0, 4)]
    # a policy decides what counts as out-of-memory (the host's OOM_EXCEPTION)
    policy = oom.OomPolicy(is_oom=lambda exc: isinstance(exc, Interrupted))
    with pytest.raises(oom.ChunkOutOfMemoryError):
        oom.run_in_chunks(interrupted, 2, 2, "test", policy)


def test_fault_injection_hook(monkeypatch):
    monkeypatch.delenv(oom.FAULT_OOM_ABOVE_ENV, raising=False)
    assert oom.fault_oom_above_from_env() is None
    monkeypatch.setenv(oom.FAULT_OOM_ABOVE_ENV, "2")
    assert oom.fault_oom_above_from_env() == 2
    for bad in ("-1", "two"):
        monkeypatch.setenv(oom.FAULT_OOM_ABOVE_ENV, bad)
        with pytest.raises(ValueError, match=oom.FAULT_OOM_ABOVE_ENV):
            oom.fault_oom_above_from_env()
    seen = []
    used = oom.run_in_chunks(lambda a, b: seen.append(b - a), 5, 5, "test", oom.OomPolicy(fault_above=2))
    assert seen == [2, 2, 1] and used == 2  # the injected failures never reach fn


# -- the stream engine --------------------------------------------------------------------------------------
ABAR = add_sampler.scaled_linear_alphas_cumprod()
SHAPE = (4, 4, 6)


def sigma_of(t: int) -> float:
    return float(((1 - ABAR[t]) / ABAR[t]).sqrt())


def lcm_denoiser(limit: int | None = None):
    """A stand-in LCM denoiser whose per-slot math does not depend on the batch (only + - * / sqrt,
    correctly rounded everywhere), so sub-batches must give bit-identical results; above ``limit``
    slots in one call it raises out-of-memory."""
    sizes = []

    def denoise(x, t, cond):
        sizes.append(x.shape[0])
        if limit is not None and x.shape[0] > limit:
            raise torch.OutOfMemoryError(f"stand-in: {x.shape[0]} slots do not fit")
        abar = ABAR[t].view(-1, 1, 1, 1)
        alpha, beta = abar.sqrt(), (1 - abar).sqrt()
        eps = 0.6 * x - 0.05 * x * x * x + 0.01 * cond + t.double().view(-1, 1, 1, 1) / 1000
        c_skip, c_out = sb.lcm_boundary(t)
        return c_out.view(-1, 1, 1, 1) * (x - beta * eps) / alpha + c_skip.view(-1, 1, 1, 1) * x

    return denoise, sizes


def make_engine(timesteps, f, cfg_type, **kw):
    config = sb.StreamConfig(timesteps=timesteps, frame_buffer_size=f, cfg_type=cfg_type, add_noise=True, seed=3)
    schedule = sb.SlotSchedule.build(timesteps, [sigma_of(t) for t in timesteps], f, boundary="lcm")
    return sb.StreamEngine(config, schedule, SHAPE, dtype=torch.float64, **kw)


def frames(count: int, f: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(f, *SHAPE, generator=g, dtype=torch.float64) for _ in range(count)]


@pytest.mark.parametrize("cfg_type", ["none", "self", "initialize", "full"])
@pytest.mark.parametrize("limit", [1, 3])
def test_stream_falls_back_to_sub_batches_with_the_same_result(cfg_type, limit):
    timesteps, f = sb.lcm_timesteps([10, 25, 40]), 2  # 6 slots per call
    ref_engine, engine = make_engine(timesteps, f, cfg_type), make_engine(timesteps, f, cfg_type)
    ref_denoise, _ = lcm_denoiser()
    denoise, sizes = lcm_denoiser(limit)
    for z in frames(4, f):
        expected = ref_engine.img2img(z, ref_denoise, cond=1.0, uncond=-1.0)
        assert torch.equal(engine.img2img(z, denoise, cond=1.0, uncond=-1.0), expected)
    for name in ("buffer", "stock_noise", "last_first_x0"):
        assert torch.equal(getattr(engine, name), getattr(ref_engine, name)), name
    assert engine.evaluations == ref_engine.evaluations == 4 * sb.expected_evaluations(engine.config)
    assert engine.max_eval_batch == {1: 1, 3: 3}[limit]
    assert max(sizes[-3:]) <= limit  # later calls start at the size that fitted


def test_a_stream_that_never_fits_fails_clearly_and_keeps_its_state():
    timesteps, f = sb.lcm_timesteps([32, 45]), 1
    engine = make_engine(timesteps, f, "self", label="TurboStreamLiveImg2Img")
    ref_engine = make_engine(timesteps, f, "self")
    denoise, _ = lcm_denoiser()
    never, sizes = lcm_denoiser(limit=0)
    z = frames(3, f)
    engine.img2img(z[0], denoise, cond=1.0)
    ref_engine.img2img(z[0], denoise, cond=1.0)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(engine).items()}
    generator = engine.generator.get_state()
    with pytest.raises(oom.ChunkOutOfMemoryError) as err:
        with sb.transaction(engine, engine.config):
            engine.img2img(z[1], never, cond=1.0)
    msg = str(err.value)
    assert msg.startswith("TurboStreamLiveImg2Img: denoising 2 stream slot(s): out of memory even with one slot")
    assert "lower the resolution, or free memory" in msg
    assert sizes == [2, 1]
    for k, v in before.items():  # tensors, counters, max_eval_batch: all as before the frame
        assert torch.equal(getattr(engine, k), v) if isinstance(v, torch.Tensor) else getattr(engine, k) == v, k
    assert torch.equal(engine.generator.get_state(), generator)
    # the stream goes on as if the failed frame never came
    assert torch.equal(engine.img2img(z[2], denoise, cond=1.0), ref_engine.img2img(z[2], denoise, cond=1.0))


# -- the tiny VAE nodes in-process (the host's OOM_EXCEPTION from a stand-in module) --------------------------
@pytest.fixture
def tiny_vae(comfy, pack, tiny_models_dir):
    import folder_paths

    folder_paths.add_model_folder_path("vae_approx", str(tiny_models_dir / "vae_approx"))
    return pack.nodes.tiny_vae, pack.nodes.tiny_vae.load_tiny_vae("test", "vae_approx/taesd")


def limit_module(monkeypatch, module, limit: int, sizes: list[int]) -> None:
    """Make the VAE's decode/encode raise the host's OOM_EXCEPTION above ``limit`` items."""
    import comfy.model_management as mm

    for name in ("decode", "encode"):
        real = getattr(module, name)

        def limited(x, real=real):
            sizes.append(x.shape[0])
            if x.shape[0] > limit:
                raise mm.OOM_EXCEPTION(f"stand-in: {x.shape[0]} images do not fit")
            return real(x)

        monkeypatch.setattr(module, name, limited)


def test_tiny_vae_falls_back_to_smaller_chunks(tiny_vae, monkeypatch):
    import comfy.model_management as mm

    nodes, vae = tiny_vae
    latents = torch.randn(5, 4, 8, 6, generator=torch.Generator().manual_seed(0)) * 3
    pixels = torch.rand(5, 40, 56, 3, generator=torch.Generator().manual_seed(1))
    whole = nodes.tiny_decode("test", vae, latents), nodes.tiny_encode("test", vae, pixels)
    monkeypatch.setattr(nodes.core, "chunk_size", lambda *a, **k: 2)  # no OOM, the chunks the fallback ends at
    by_two = nodes.tiny_decode("test", vae, latents), nodes.tiny_encode("test", vae, pixels)
    monkeypatch.undo()
    freed, sizes = [], []
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: freed.append(True))
    limit_module(monkeypatch, vae.first_stage_model, 2, sizes)
    fallback = nodes.tiny_decode("test", vae, latents), nodes.tiny_encode("test", vae, pixels)
    assert sizes == [5, 2, 2, 1] * 2 and len(freed) == 2
    for ours, ref, approx in zip(fallback, by_two, whole, strict=True):
        assert torch.equal(ours, ref)  # bit-exact against a run with the same chunks
        # against one chunk: CPU convolutions round differently per batch size, in the last bits only
        torch.testing.assert_close(ours, approx, rtol=1e-5, atol=1e-5)


def test_tiny_vae_out_of_memory_at_one_image_is_a_clear_error(tiny_vae, monkeypatch):
    nodes, vae = tiny_vae
    pack_oom = sys.modules[nodes.__name__.rsplit(".", 2)[0] + ".turbostream.oom"]  # the pack's own copy
    limit_module(monkeypatch, vae.first_stage_model, 0, [])
    with pytest.raises(pack_oom.ChunkOutOfMemoryError) as err:
        nodes.tiny_decode("TurboStreamTinyVAEDecode", vae, torch.zeros(3, 4, 8, 8))
    msg = str(err.value)
    assert msg.startswith("TurboStreamTinyVAEDecode: decoding 3 latent(s) to 64x64: out of memory even with one image")
    assert "POST /free" in msg
    with pytest.raises(pack_oom.ChunkOutOfMemoryError, match="TurboStreamTinyVAEEncode: encoding 2 image"):
        nodes.tiny_encode("TurboStreamTinyVAEEncode", vae, torch.zeros(2, 64, 64, 3))


# -- the real host with the fault-injection hook -------------------------------------------------------------
SD15 = tiny_models.CHECKPOINTS["sd15"].name


def fault_workflow(run: str) -> dict:
    """Encode + decode a batch of 4 different frames, and a 2-step stream (2 slots per call, f=2: 4)."""
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "strength_model": 1.0, "lora_name": "lcm-lora-sdv1-5.safetensors"},
        },
        "3": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["2", 0], "sampling": "lcm", "zsnr": False}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox", "clip": ["1", 1]}},
        "6": {
            "class_type": "TurboStreamTinyVAELoader",
            "inputs": {"vae_name": "vae_approx/taesd", "latent_family": "auto"},
        },
        "10": {"class_type": "LoadVideo", "inputs": {"file": "turbostream_clip.mp4"}},
        "11": {"class_type": "GetVideoComponents", "inputs": {"video": ["10", 0]}},
        "12": {
            "class_type": "ImageScale",
            "inputs": {"image": ["11", 0], "upscale_method": "bilinear", "width": 64, "height": 48, "crop": "center"},
        },
        "13": {"class_type": "ImageFromBatch", "inputs": {"image": ["12", 0], "batch_index": 0, "length": 4}},
        "20": {"class_type": "TurboStreamTinyVAEEncode", "inputs": {"pixels": ["13", 0], "vae": ["6", 0]}},
        "21": {"class_type": "TurboStreamTinyVAEDecode", "inputs": {"samples": ["20", 0], "vae": ["6", 0]}},
        "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": f"{run}/vae"}},
        "23": {"class_type": "SaveLatent", "inputs": {"samples": ["20", 0], "filename_prefix": f"{run}/enc"}},
        "30": {
            "class_type": "TurboStreamStreamImg2Img",
            "inputs": {
                "model": ["3", 0],
                "positive": ["4", 0],
                "vae": ["6", 0],
                "images": ["13", 0],
                "t_index_list": "32,45",
                "cfg_type": "self",
                "guidance": 1.2,
                "delta": 1.0,
                "frame_buffer_size": 2,
                "add_noise": True,
                "seed": 7,
                "index_mode": "lcm_index",
                "similarity_threshold": 0.0,
                "max_skip_frames": 10,
            },
        },
        "31": {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": f"{run}/stream"}},
        "32": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 1], "filename_prefix": f"{run}/stream"}},
    }
    return wf


def outputs(server, run: str) -> dict:
    def images(prefix):
        paths = sorted(server.output_dir.glob(f"{run}/{prefix}_*.png"))
        return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths])

    def latent(prefix):
        [path] = list(server.output_dir.glob(f"{run}/{prefix}_*.latent"))
        return load_file(str(path))["latent_tensor"]

    return {"vae": images("vae"), "stream": images("stream"), "enc": latent("enc"), "latent": latent("stream")}


def test_real_host_falls_back_or_fails_clearly(host, tmp_path):
    from turbostream.server import HeadlessHost

    queue(host, fault_workflow("faults/normal"), tmp_path)
    normal = outputs(host, "faults/normal")
    assert normal["vae"].shape == (4, 48, 64, 3) and normal["stream"].shape == (4, 48, 64, 3)
    # different frames (the tiny test decoder's images are dark; the latents carry the detail)
    assert normal["enc"].shape == (4, 4, 6, 8) and normal["enc"].std(dim=0).mean() > 0.05

    # every batch of more than one item "runs out of memory": the tiny VAE (4 images) and the
    # stream engine (2 steps x 2 frames = 4 slots) halve down to one item per call
    faulty = HeadlessHost(host.host_dir, model_links=host.model_links, env={oom.FAULT_OOM_ABOVE_ENV: "1"})
    try:
        faulty.start()
        started = time.monotonic()
        queue(faulty, fault_workflow("faults/oom1"), tmp_path)
        seconds = time.monotonic() - started
        fallback = outputs(faulty, "faults/oom1")
        log = faulty.log_text()
    finally:
        faulty.cleanup()
    assert "TurboStreamTinyVAEEncode: encoding 4 image(s) of 64x48: out of memory with 4 images per chunk" in log
    assert "TurboStreamTinyVAEDecode: decoding 4 latent(s) to 64x48: out of memory with 2 images per chunk" in log
    assert "TurboStreamStreamImg2Img: evaluating the stream in sub-batches of 1 slots from now on" in log
    vae_diff = int(np.abs(fallback["vae"] - normal["vae"]).max())
    stream_diff = int(np.abs(fallback["stream"] - normal["stream"]).max())
    latent_diff = float((fallback["latent"] - normal["latent"]).abs().max())
    enc_diff = float((fallback["enc"] - normal["enc"]).abs().max())
    record(
        "faults",
        case="out of memory above 1 item (injected): tiny VAE batch 4 + stream 4 slots fall back",
        vae_max_diff_8bit=vae_diff,
        encode_latent_max_diff=enc_diff,
        stream_max_diff_8bit=stream_diff,
        stream_latent_max_diff=latent_diff,
        seconds=round(seconds, 2),
    )
    # the same images: CPU convolutions round differently per batch size in the last bits, so an
    # 8-bit pixel may land one level apart
    assert vae_diff <= 1 and stream_diff <= 1 and enc_diff < 1e-3 and latent_diff < 1e-3

    # not even one item fits: a clear execution error naming the node, and the host keeps serving
    wf = fault_workflow("faults/oom0")
    wf = {k: wf[k] for k in ("6", "10", "11", "12", "13", "20", "21", "22", "23")}
    faulty = HeadlessHost(host.host_dir, model_links=host.model_links, env={oom.FAULT_OOM_ABOVE_ENV: "0"})
    try:
        faulty.start()
        with pytest.raises(client.ExecutionFailed) as err:
            queue(faulty, wf, tmp_path)
        frames_only = {k: wf[k] for k in ("10", "11", "12", "13")}
        frames_only["14"] = {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "faults/ok"}}
        queue(faulty, frames_only, tmp_path)  # the host keeps serving
    finally:
        faulty.cleanup()
    msg = str(err.value)
    record("faults", case="out of memory at 1 item (injected): clear error", message=msg[:500])
    assert err.value.node_type == "TurboStreamTinyVAEEncode"
    assert "TurboStreamTinyVAEEncode: encoding 4 image(s) of 64x48: out of memory even with one image per chunk" in msg
    assert "lower the resolution, or free memory" in msg
