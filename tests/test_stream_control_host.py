"""ControlNet inside the stream nodes, in the real host, with the tiny random-weight ControlNets.

The graphs are what a user wires: ControlNetLoader -> ControlNetApplyAdvanced (hint: the host's Canny
of the frames) -> Stream Img2Img / Live Img2Img / Stream Txt2Img.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from conftest import queue
from test_stream_batch_host import _clip, _latent, _models, _stream

from turbostream import client, tiny_models

SD15_CN = tiny_models.CONTROLNETS["sd15"].name
SDXL_CN = tiny_models.CONTROLNETS["sdxl"].name
FRAMES = 8


def _controlled(wf: dict, hints: list, *, strength=1.0, start=0.0, end=1.0, cn=SD15_CN, tag="c") -> tuple:
    """Add ControlNetLoader + ControlNetApplyAdvanced on the prompt pair (4, 5); returns (positive, negative)."""
    wf[f"{tag}l"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": cn}}
    wf[f"{tag}a"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["4", 0],
            "negative": ["5", 0],
            "control_net": [f"{tag}l", 0],
            "image": hints,
            "strength": strength,
            "start_percent": start,
            "end_percent": end,
        },
    }
    return [f"{tag}a", 0], [f"{tag}a", 1]


def _base() -> dict:
    wf = {**_models(), **_clip()}
    wf["13"] = {"class_type": "Canny", "inputs": {"image": ["12", 0], "low_threshold": 0.2, "high_threshold": 0.5}}
    return wf


def _save(wf: dict, node: str, run: str, name: str, slot: int = 1) -> None:
    wf[f"save_{name}"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [node, slot], "filename_prefix": f"{run}/{name}"},
    }


@pytest.mark.parametrize("f", [1, 2])
def test_each_frame_is_steered_by_its_own_hint(host, tmp_path, f):
    """Output frame i with hint i == the stream run on frame i alone with hint i (the per-frame LCM denoise
    with the same steps and noise), for f = 1 and 2; RCFG self with a controlled negative."""
    run = f"cn/{uuid.uuid4().hex[:6]}"
    wf = _base()
    pos, neg = _controlled(wf, ["13", 0])
    wf["20"] = _stream(["12", 0], positive=pos, negative=neg, frame_buffer_size=f, cfg_type="self", add_noise=True)
    _save(wf, "20", run, "all")
    starts = (0, 5) if f == 1 else (0, 4)
    for i in starts:
        wf[f"3{i}"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["12", 0], "batch_index": i, "length": f}}
        wf[f"6{i}"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["13", 0], "batch_index": i, "length": f}}
        p, n = _controlled(wf, [f"6{i}", 0], tag=f"c{i}")
        wf[f"4{i}"] = _stream(
            [f"3{i}", 0], positive=p, negative=n, frame_buffer_size=f, cfg_type="self", add_noise=True
        )
        _save(wf, f"4{i}", run, f"one{i}")
    queue(host, wf, tmp_path)
    everything = _latent(host, f"{run}/all")
    assert everything.shape[0] == FRAMES
    for i in starts:
        torch.testing.assert_close(everything[i : i + f], _latent(host, f"{run}/one{i}"), rtol=1e-4, atol=1e-4)


def test_one_hint_equals_the_hint_repeated_and_shuffled_hints_differ(host, tmp_path):
    run = f"cn/{uuid.uuid4().hex[:6]}"
    wf = _base()
    wf["14"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["13", 0], "batch_index": 3, "length": 1}}
    wf["15"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["14", 0], "amount": FRAMES}}
    wf["16"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["13", 0], "batch_index": 4, "length": 4}}
    wf["17"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["13", 0], "batch_index": 0, "length": 4}}
    wf["18"] = {"class_type": "ImageBatch", "inputs": {"image1": ["16", 0], "image2": ["17", 0]}}  # halves swapped
    for name, hints in (("single", ["14", 0]), ("repeated", ["15", 0]), ("own", ["13", 0]), ("shuffled", ["18", 0])):
        p, n = _controlled(wf, hints, tag=f"c{name}")
        wf[f"s{name}"] = _stream(["12", 0], positive=p, negative=n)
        _save(wf, f"s{name}", run, name)
    wf["plain"] = _stream(["12", 0])
    _save(wf, "plain", run, "plain")
    queue(host, wf, tmp_path)
    single, repeated = _latent(host, f"{run}/single"), _latent(host, f"{run}/repeated")
    own, shuffled, plain = (_latent(host, f"{run}/{k}") for k in ("own", "shuffled", "plain"))
    torch.testing.assert_close(single, repeated, rtol=1e-5, atol=1e-5)
    scale = float(own.abs().mean())
    assert float((own - plain).abs().max()) > 0.1 * scale, "the ControlNet steers the picture"
    assert float((own - shuffled).abs().amax(dim=(1, 2, 3)).min()) > 0.02 * scale, "every frame follows its own hint"


def test_start_end_percent_is_judged_per_slot_as_the_host_does(comfy, pack, tiny_models_dir):
    """Per slot, the control residuals of the stream's per-call copies equal the host's own ControlNet
    evaluated on that slot alone (its hint, its sigma, its start/end range; the host returns none when
    the slot's sigma is outside the range)."""
    import comfy.controlnet
    import comfy.sd

    controls = pack.nodes.stream_control
    ckpt = str(tiny_models_dir / "checkpoints" / tiny_models.CHECKPOINTS["sd15"].name)
    model, clip, *_ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=True)
    net = comfy.controlnet.load_controlnet(str(tiny_models_dir / "controlnet" / SD15_CN))
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a fox"))
    gen = torch.Generator().manual_seed(0)
    hints = torch.rand(4, 3, 32, 32, generator=gen)
    link = net.copy().set_cond_hint(hints, 0.8, (0.2, 0.6))
    positive = [[cond[0][0], {**cond[0][1], "control": link}]]
    payloads = controls.frame_payloads("test", 4, 32, 32, model, positive, None)
    sampling = model.get_model_object("model_sampling")
    sigmas = torch.stack([sampling.percent_to_sigma(p) * torch.ones(()) for p in (0.1, 0.3, 0.5, 0.9)]).float()
    x = torch.randn(4, 4, 4, 4, generator=gen)
    c_crossattn = cond[0][0].expand(4, -1, -1)
    ours = controls.slot_conditioning(positive, "positive", payloads, sigmas, sampling)[0][1]["control"]
    ours.pre_run(model.model, lambda p: sampling.percent_to_sigma(p))
    residuals = ours.get_control(x, sigmas, {"c_crossattn": c_crossattn}, 1, {})
    link.pre_run(model.model, lambda p: sampling.percent_to_sigma(p))
    on = []
    for i in range(4):
        link.cond_hint_original, link.cond_hint = hints[i : i + 1], None
        theirs = link.get_control(x[i : i + 1], sigmas[i : i + 1], {"c_crossattn": c_crossattn[:1]}, 1, {})
        on.append(theirs is not None)
        for key in ("input", "middle", "output"):
            for a, b in zip(residuals[key], (theirs or {key: [None] * len(residuals[key])})[key], strict=False):
                if a is None:
                    continue
                expected = torch.zeros_like(a[i : i + 1]) if b is None else b
                torch.testing.assert_close(a[i : i + 1], expected, rtol=1e-4, atol=1e-4)
    assert on == [False, True, True, False], "0.1 and 0.9 lie outside 0.2-0.6: the comparison covers both cases"
    ours.cleanup()
    link.cleanup()


def test_live_stream_keeps_each_frames_hint_and_matches_the_video_node(host, tmp_path):
    """12 frames with 12 different hints over 12 prompts: the live stream's output k is the video node's
    output k - lag (the live node lags n - 1 frames), every hint staying with its frame."""
    count, sid = 12, f"cn-live-{uuid.uuid4().hex[:6]}"
    run = f"cn/{uuid.uuid4().hex[:6]}"
    wf = _base()
    wf["10"]["inputs"]["file"] = "turbostream_clip.mp4"
    wf["11b"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["12", 0], "amount": 2}}
    wf["12b"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["11b", 0], "batch_index": 0, "length": count}}
    wf["13"]["inputs"]["image"] = ["12b", 0]
    pos, neg = _controlled(wf, ["13", 0])
    wf["20"] = _stream(["12b", 0], positive=pos, negative=neg)
    wf["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": f"{run}/video"}}
    queue(host, wf, tmp_path)
    video = sorted(host.output_dir.glob(f"{run}/video_*.png"))
    assert len(video) == count
    for k in range(count):
        live = _base()
        live["12b"] = wf["12b"]
        live["11b"] = wf["11b"]
        live["13"]["inputs"]["image"] = ["12b", 0]
        live["30"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["12b", 0], "batch_index": k, "length": 1}}
        live["31"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["13", 0], "batch_index": k, "length": 1}}
        p, n = _controlled(live, ["31", 0], strength=1.0)
        inputs = dict(_stream(["30", 0], positive=p, negative=n)["inputs"])
        inputs.pop("images")
        inputs.update(image=["30", 0], stream_id=sid)
        live["40"] = {"class_type": "TurboStreamLiveImg2Img", "inputs": inputs}
        live["41"] = {
            "class_type": "SaveImage",
            "inputs": {"images": ["40", 0], "filename_prefix": f"{run}/live{k:02d}"},
        }
        queue(host, live, tmp_path / str(k))
    import numpy as np
    from PIL import Image

    def pixels(path):
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

    lag = 1
    for k in range(lag, count):
        [path] = sorted(host.output_dir.glob(f"{run}/live{k:02d}_*.png"))
        assert np.abs(pixels(path) - pixels(video[k - lag])).max() <= 1, k


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("count", "has 3 images for 8 frames"),
        ("size", "is 32x32 but the frames are 64x64"),
        ("sdxl", "made for another base model"),
    ],
)
def test_bad_hints_are_clear_errors_and_the_next_prompt_runs(host, tmp_path, case, fragment):
    wf = _base()
    hints = ["13", 0]
    if case == "count":
        wf["14"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["13", 0], "batch_index": 0, "length": 3}}
        hints = ["14", 0]
    elif case == "size":
        wf["14"] = {
            "class_type": "ImageScale",
            "inputs": {"image": ["13", 0], "upscale_method": "bilinear", "width": 32, "height": 32, "crop": "disabled"},
        }
        hints = ["14", 0]
    pos, neg = _controlled(wf, hints, cn=SDXL_CN if case == "sdxl" else SD15_CN)
    wf["20"] = _stream(["12", 0], positive=pos, negative=neg)
    wf["21"] = {"class_type": "SaveLatent", "inputs": {"samples": ["20", 1], "filename_prefix": "cn/bad"}}
    with pytest.raises(client.ExecutionFailed) as err:
        queue(host, wf, tmp_path)
    assert err.value.node_type == "TurboStreamStreamImg2Img"
    assert "TurboStreamStreamImg2Img: positive: " in str(err.value) and fragment in str(err.value)
    ok = _base()
    ok["20"] = _stream(["12", 0])
    ok["21"] = {"class_type": "SaveLatent", "inputs": {"samples": ["20", 1], "filename_prefix": "cn/ok"}}
    queue(host, ok, tmp_path / "ok")


def _live_prompt(k: int, sid: str, prefix: str) -> dict:
    """One live frame k of the (repeated) clip with its own Canny hint, on stream ``sid``."""
    wf = _base()
    wf["30"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["12", 0], "batch_index": k, "length": 1}}
    wf["31"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["13", 0], "batch_index": k, "length": 1}}
    p, n = _controlled(wf, ["31", 0])
    inputs = dict(_stream(["30", 0], positive=p, negative=n)["inputs"])
    inputs.pop("images")
    inputs.update(image=["30", 0], stream_id=sid)
    wf["40"] = {"class_type": "TurboStreamLiveImg2Img", "inputs": inputs}
    wf["41"] = {"class_type": "SaveImage", "inputs": {"images": ["40", 0], "filename_prefix": f"{prefix}{k:02d}"}}
    return wf


def test_free_mid_stream_unloads_the_controlnet_and_the_stream_goes_on(host, tmp_path):
    """POST /free (unload_models) between two frames: the host unloads the UNet and the ControlNet and loads
    both again for the next frame; the live stream and its frames' hints survive, so every frame equals the
    undisturbed stream's."""
    import numpy as np
    from PIL import Image

    run = f"cn/{uuid.uuid4().hex[:6]}"
    for tag in ("ref", "free"):
        sid = f"cn-{tag}-{uuid.uuid4().hex[:6]}"
        for k in range(6):
            if tag == "free" and k == 3:
                before = len(host.log_text())
                status, _ = host.post_json("/free", {"unload_models": True})
                assert status == 200
            queue(host, _live_prompt(k, sid, f"{run}/{tag}"), tmp_path / f"{tag}{k}")
    # the host handles /free between prompts (newer hosts may run the next prompt first): after it, both
    # models are loaded again
    reloaded = host.log_text()[before:]
    assert "Requested to load ControlNet" in reloaded and "Requested to load BaseModel" in reloaded, reloaded[-2000:]
    for k in range(6):
        [a] = host.output_dir.glob(f"{run}/ref{k:02d}_*.png")
        [b] = host.output_dir.glob(f"{run}/free{k:02d}_*.png")
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), k
