"""Stream nodes on SDXL (the tiny SDXL checkpoint, the SDXL LCM-LoRA, taesdxl), in the real host.

Output frame i equals the per-frame LCM denoise of frame i: the stream run on frame i alone (the same
steps, the stream's fixed noise and guidance), which on SDXL also checks that the size conditioning and
the pooled output reach every slot of the batch.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from conftest import queue
from PIL import Image
from test_stream_batch_host import _clip, _latent

SDXL = "sd_xl_turbo_1.0_fp16.safetensors"  # the tiny SDXL under its catalog name
FRAMES = 8


def _sdxl_models() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "strength_model": 1.0, "lora_name": "lcm-lora-sdxl.safetensors"},
        },
        "3": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["2", 0], "sampling": "lcm", "zsnr": False}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "6": {"class_type": "TurboStreamTinyVAELoader", "inputs": {"vae_name": "taesdxl"}},
    }


def _video(images, cfg_type: str, **extra) -> dict:
    inputs = {
        "model": ["3", 0],
        "positive": ["4", 0],
        "negative": ["5", 0],
        "vae": ["6", 0],
        "images": images,
        "t_index_list": "32,45",
        "cfg_type": cfg_type,
        "guidance": 1.4,
        "seed": 3,
    }
    inputs.update(extra)
    return {"class_type": "TurboStreamStreamImg2Img", "inputs": inputs}


@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_sdxl_video_frame_i_equals_frame_i_alone(host, tmp_path, cfg_type):
    run = f"sdxl/{uuid.uuid4().hex[:6]}"
    wf = {**_sdxl_models(), **_clip()}
    wf["20"] = _video(["12", 0], cfg_type)
    wf["21"] = {"class_type": "SaveLatent", "inputs": {"samples": ["20", 1], "filename_prefix": f"{run}/all"}}
    for i in (0, 5):
        wf[f"3{i}"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["12", 0], "batch_index": i, "length": 1}}
        wf[f"4{i}"] = _video([f"3{i}", 0], cfg_type)
        wf[f"5{i}"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [f"4{i}", 1], "filename_prefix": f"{run}/one{i}"},
        }
    queue(host, wf, tmp_path)
    everything = _latent(host, f"{run}/all")
    assert everything.shape == (FRAMES, 4, 8, 8)
    for i in (0, 5):
        torch.testing.assert_close(everything[i : i + 1], _latent(host, f"{run}/one{i}"), rtol=1e-4, atol=1e-4)
    norms = everything.flatten(1).norm(dim=1)
    assert (norms > 0.2 * norms.mean()).all(), "no empty frames"


def test_sdxl_txt2img_stream_is_aligned(host, tmp_path):
    """Frames of one SDXL txt2img run equal the same run cut short (frame i does not depend on later ones)."""
    run = f"sdxl/{uuid.uuid4().hex[:6]}"
    wf = _sdxl_models()
    for name, frames in (("long", 4), ("short", 2)):
        wf[f"t{name}"] = {
            "class_type": "TurboStreamStreamTxt2Img",
            "inputs": {
                "model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0], "vae": ["6", 0],
                "width": 64, "height": 64, "frames": frames, "t_index_list": "0,16,32,45",
                "cfg_type": "self", "guidance": 1.3, "seed": 9,
            },
        }  # fmt: skip
        wf[f"s{name}"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [f"t{name}", 1], "filename_prefix": f"{run}/{name}"},
        }
    queue(host, wf, tmp_path)
    long, short = _latent(host, f"{run}/long"), _latent(host, f"{run}/short")
    assert long.shape == (4, 4, 8, 8)
    torch.testing.assert_close(long[:2], short, rtol=1e-4, atol=1e-4)
    assert float((long[0] - long[1]).abs().max()) > 1e-3, "frames differ (fresh noise per frame)"


def test_sdxl_live_stream_matches_the_video_node(host, tmp_path):
    """The live node on SDXL, one frame per prompt: output k is the video node's output k - 1 (lag n - 1)."""
    run = f"sdxl/{uuid.uuid4().hex[:6]}"
    sid = f"sdxl-{uuid.uuid4().hex[:6]}"
    wf = {**_sdxl_models(), **_clip()}
    wf["20"] = _video(["12", 0], "self")
    wf["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": f"{run}/video"}}
    queue(host, wf, tmp_path)
    video = sorted(host.output_dir.glob(f"{run}/video_*.png"))
    assert len(video) == FRAMES
    for k in range(5):
        live = {**_sdxl_models(), **_clip()}
        live["30"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["12", 0], "batch_index": k, "length": 1}}
        inputs = dict(_video(["30", 0], "self")["inputs"])
        inputs.pop("images")
        inputs.update(image=["30", 0], stream_id=sid)
        live["40"] = {"class_type": "TurboStreamLiveImg2Img", "inputs": inputs}
        live["41"] = {"class_type": "SaveImage", "inputs": {"images": ["40", 0], "filename_prefix": f"{run}/live{k}"}}
        queue(host, live, tmp_path / str(k))
        if k >= 1:
            [path] = host.output_dir.glob(f"{run}/live{k}_*.png")
            a = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
            b = np.asarray(Image.open(video[k - 1]).convert("RGB"), dtype=np.int16)
            assert np.abs(a - b).max() <= 1, k
