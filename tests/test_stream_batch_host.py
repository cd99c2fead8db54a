"""Stream nodes in the real host: aligned video frames, live streams across prompts, bad input."""

from __future__ import annotations

import time
import uuid

import pytest
import torch
from conftest import STREAM_IDLE_S, queue
from safetensors.torch import load_file

from turbostream import client, tiny_models

SD15 = tiny_models.CHECKPOINTS["sd15"].name


def _models() -> dict:
    """Tiny SD1.5 + LCM-LoRA (host loader) + LCM sampling, a prompt, the tiny VAE."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "strength_model": 1.0, "lora_name": "lcm-lora-sdv1-5.safetensors"},
        },
        "3": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["2", 0], "sampling": "lcm", "zsnr": False}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "6": {
            "class_type": "TurboStreamTinyVAELoader",
            "inputs": {"vae_name": "vae_approx/taesd", "latent_family": "auto"},
        },
    }


def _clip(size: int = 64) -> dict:
    return {
        "10": {"class_type": "LoadVideo", "inputs": {"file": "turbostream_clip.mp4"}},
        "11": {"class_type": "GetVideoComponents", "inputs": {"video": ["10", 0]}},
        "12": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["11", 0],
                "upscale_method": "bilinear",
                "width": size,
                "height": size,
                "crop": "disabled",
            },
        },
    }


def _stream(images, **overrides) -> dict:
    inputs = {
        "model": ["3", 0],
        "positive": ["4", 0],
        "vae": ["6", 0],
        "images": images,
        "t_index_list": "32,45",
        "cfg_type": "none",
        "guidance": 1.2,
        "delta": 1.0,
        "frame_buffer_size": 1,
        "add_noise": False,
        "seed": 7,
        "index_mode": "lcm_index",
        "similarity_threshold": 0.0,
        "max_skip_frames": 10,
    }
    inputs.update(overrides)
    return {"class_type": "TurboStreamStreamImg2Img", "inputs": inputs}


def _latent(host, prefix):
    [path] = list(host.output_dir.glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"]


@pytest.mark.parametrize("f", [1, 2])
def test_video_frames_are_aligned_and_deterministic(host, tmp_path, f):
    """N frames in, N out; output i == the stream run on frame i alone (no lag, no warm-up frames)."""
    run = f"stream/{uuid.uuid4().hex[:6]}"
    wf = {**_models(), **_clip()}
    wf["20"] = _stream(["12", 0], frame_buffer_size=f)
    wf["21"] = {"class_type": "SaveLatent", "inputs": {"samples": ["20", 1], "filename_prefix": f"{run}/all"}}
    wf["22"] = _stream(["12", 0], frame_buffer_size=f)
    wf["22"]["inputs"]["cfg_type"] = "none"  # identical graph: determinism
    wf["23"] = {"class_type": "SaveLatent", "inputs": {"samples": ["22", 1], "filename_prefix": f"{run}/again"}}
    starts = (0, 5) if f == 1 else (0, 4)  # whole groups: a frame keeps its place in its group
    for i in starts:
        wf[f"3{i}"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["12", 0], "batch_index": i, "length": f}}
        wf[f"4{i}"] = _stream([f"3{i}", 0], frame_buffer_size=f)
        wf[f"5{i}"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [f"4{i}", 1], "filename_prefix": f"{run}/one{i}"},
        }
    wf["60"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": f"{run}/frames"}}
    queue(host, wf, tmp_path)
    everything = _latent(host, f"{run}/all")
    assert everything.shape == (8, 4, 8, 8)
    assert torch.equal(everything, _latent(host, f"{run}/again"))
    for i in starts:
        alone = _latent(host, f"{run}/one{i}")
        torch.testing.assert_close(everything[i : i + f], alone, rtol=1e-4, atol=1e-4)
    norms = everything.flatten(1).norm(dim=1)
    assert (norms > 0.2 * norms.mean()).all(), "no empty (brown) frames"
    assert len(list(host.output_dir.glob(f"{run}/frames_*.png"))) == 8


def test_txt2img_stream_and_rcfg_run(host, tmp_path):
    run = f"stream/{uuid.uuid4().hex[:6]}"
    wf = _models()
    wf["20"] = {
        "class_type": "TurboStreamStreamTxt2Img",
        "inputs": {
            "model": ["3", 0],
            "positive": ["4", 0],
            "negative": ["5", 0],
            "vae": ["6", 0],
            "width": 64,
            "height": 48,
            "frames": 5,
            "t_index_list": "0,16,32,45",
            "cfg_type": "initialize",
            "guidance": 1.4,
            "delta": 1.0,
            "frame_buffer_size": 2,
            "add_noise": True,
            "seed": 3,
            "index_mode": "lcm_index",
        },
    }
    wf["21"] = {"class_type": "SaveLatent", "inputs": {"samples": ["20", 1], "filename_prefix": f"{run}/t2i"}}
    queue(host, wf, tmp_path)
    out = _latent(host, f"{run}/t2i")
    assert out.shape == (5, 4, 6, 8) and torch.isfinite(out).all()
    assert len({round(float(x.sum()), 4) for x in out}) == 5


# -- live -----------------------------------------------------------------------------------------------
def _live_wf(stream_id: str, color: int, prefix: str, size: int = 64, **overrides) -> dict:
    wf = _models()
    wf["20"] = {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": color}}
    inputs = {
        "model": ["3", 0],
        "positive": ["4", 0],
        "vae": ["6", 0],
        "image": ["20", 0],
        "stream_id": stream_id,
        "t_index_list": "20,32,45",
        "cfg_type": "self",
        "guidance": 1.2,
        "delta": 1.0,
        "frame_buffer_size": 1,
        "add_noise": True,
        "seed": 5,
        "index_mode": "lcm_index",
        "similarity_threshold": 0.0,
        "max_skip_frames": 10,
    }
    inputs.update(overrides)
    wf["21"] = {"class_type": "TurboStreamLiveImg2Img", "inputs": inputs}
    wf["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": prefix}}
    return wf


def _streams(host) -> dict:
    return {s["stream_id"]: s for s in host.get_json("/turbostream/streams")["streams"]}


def _png(host, prefix):
    import numpy as np
    from PIL import Image

    [path] = list(host.output_dir.glob(f"{prefix}_*.png"))
    return np.asarray(Image.open(path), dtype=np.int16)


def test_live_stream_keeps_state_over_20_prompts(host, tmp_path):
    sid = f"live-{uuid.uuid4().hex[:6]}"
    colors = [(i * 2654435761) % 0xFFFFFF for i in range(20)]
    jobs = [_live_wf(sid, c, f"live/{sid}_{i:02d}") for i, c in enumerate(colors)]
    client.run_jobs(jobs, [host.address], tmp_path, progress=False)
    state = _streams(host)[sid]
    assert state["frames"] == 20 and state["calls"] == 20
    assert all(list(host.output_dir.glob(f"live/{sid}_{i:02d}_*.png")) for i in range(20))


def test_two_live_streams_do_not_mix(host, tmp_path):
    """Stream B interleaved with stream A (other frames, other seed) gives exactly what B gives alone."""
    a, b, c = (f"{x}-{uuid.uuid4().hex[:6]}" for x in "abc")
    colors_a, colors_b = [0xFF0000, 0x00FF00, 0x0000FF, 0xFFFF00], [0x102030, 0x405060, 0x708090, 0xA0B0C0]
    jobs = []
    for i in range(4):
        jobs += [_live_wf(a, colors_a[i], f"mix/{a}_{i}", seed=6), _live_wf(b, colors_b[i], f"mix/{b}_{i}")]
    jobs += [_live_wf(c, colors_b[i], f"mix/{c}_{i}") for i in range(4)]
    client.run_jobs(jobs, [host.address], tmp_path, progress=False)
    import numpy as np

    for i in range(4):  # equal up to 8-bit rounding of float noise; mixing would differ everywhere
        assert np.abs(_png(host, f"mix/{b}_{i}") - _png(host, f"mix/{c}_{i}")).max() <= 2, i
    assert np.abs(_png(host, f"mix/{a}_3") - _png(host, f"mix/{b}_3")).mean() > 5


def test_live_resolution_change_restarts_and_idle_streams_expire(host, tmp_path):
    sid = f"res-{uuid.uuid4().hex[:6]}"
    queue(host, _live_wf(sid, 0x336699, f"res/{sid}_a"), tmp_path)
    before = len(host.log_text())
    queue(host, _live_wf(sid, 0x336699, f"res/{sid}_b", size=80), tmp_path)
    assert f"stream {sid} restarts: the frame size changed" in host.log_text()[before:]
    assert _streams(host)[sid]["size"] == [80, 80] and _streams(host)[sid]["calls"] == 1
    time.sleep(STREAM_IDLE_S + 1.5)
    assert sid not in _streams(host), "idle streams are evicted"


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,fragment",
    [("45,32", "strictly increasing"), ("", "empty"), ("32,99", "outside 0-49"), ("a,b", "not an integer")],
)
def test_bad_t_index_list_is_rejected(host, text, fragment):
    wf = {**_models(), **_clip()}
    wf["20"] = _stream(["12", 0], t_index_list=text)
    wf["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "stream/bad"}}
    status, body = host.post_json("/prompt", {"prompt": wf})
    assert status == 400 and fragment in str(body["node_errors"]["20"])


@pytest.mark.parametrize(
    "overrides,size,fragment",
    [
        ({"cfg_type": "full"}, 64, "TurboStreamStreamImg2Img: negative: cfg_type full needs a negative"),
        ({}, 60, "TurboStreamStreamImg2Img: images: frames are 60x60; both sides must be multiples of 8"),
    ],
)
def test_bad_stream_inputs_fail_clearly(host, tmp_path, overrides, size, fragment):
    wf = {**_models(), **_clip(size)}
    wf["20"] = _stream(["12", 0], **overrides)
    wf["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "stream/bad"}}
    with pytest.raises(client.ExecutionFailed) as err:
        queue(host, wf, tmp_path)
    assert fragment in str(err.value)


def test_bad_stream_id(host):
    status, body = host.post_json("/prompt", {"prompt": _live_wf("../etc", 0, "live/bad")})
    assert status == 400 and "stream_id" in str(body["node_errors"]["21"])
