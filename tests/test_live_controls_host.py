"""Live controls without a restart, in the real host: a new step list and a new seed keep the stream warm;
a prompt blend moved frame by frame never restarts it; temporal feedback."""

from __future__ import annotations

import uuid

import numpy as np
import torch
from conftest import history, queue
from PIL import Image
from test_stream_batch_host import _clip, _latent, _models, _stream

FRAMES = 20
CHANGE_STEPS, CHANGE_SEED = 8, 14
OLD_T, NEW_T = "32,45", "25,35,45"


def _live_prompt(k: int, sid: str, prefix: str, t_index: str, seed: int, positive=None, extra=None) -> dict:
    wf = {**_models(), **_clip(), **(extra or {})}
    wf["11b"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["12", 0], "amount": 3}}
    wf["30"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["11b", 0], "batch_index": k, "length": 1}}
    inputs = dict(_stream(["30", 0], t_index_list=t_index, seed=seed, cfg_type="self", add_noise=True)["inputs"])
    inputs.pop("images")
    inputs.update(image=["30", 0], stream_id=sid, negative=["5", 0], positive=positive or ["4", 0])
    wf["40"] = {"class_type": "TurboStreamLiveImg2Img", "inputs": inputs}
    wf["41"] = {"class_type": "SaveImage", "inputs": {"images": ["40", 0], "filename_prefix": f"{prefix}{k:02d}"}}
    return wf


def _run(host, tmp_path, frames, sid, prefix, settings) -> list[dict]:
    """Queue one live prompt per frame; returns the node's UI info per frame."""
    infos = []
    for k in frames:
        t_index, seed = settings(k)
        result = queue(host, _live_prompt(k, sid, prefix, t_index, seed), tmp_path / f"{sid}-{k}")
        infos.append(history(host, result.prompt_id)["outputs"]["40"]["turbostream_stream"][0])
    return infos


def _pixels(host, prefix: str, k: int) -> np.ndarray:
    [path] = host.output_dir.glob(f"{prefix}{k:02d}_*.png")
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_new_steps_and_seed_keep_the_stream_warm_and_converge(host, tmp_path):
    """20 frames; t_index_list 32,45 -> 25,35,45 at frame 8, seed 5 -> 11 at frame 14. No restart and no
    warm-up frame after either change; from n - 1 frames after a change on, every frame equals a stream
    started fresh on the same frames with the new settings."""
    run = f"controls/{uuid.uuid4().hex[:6]}"
    sid = f"ctl-{uuid.uuid4().hex[:6]}"
    before = len(host.log_text())

    def main_settings(k):
        return (OLD_T if k < CHANGE_STEPS else NEW_T), (5 if k < CHANGE_SEED else 11)

    infos = _run(host, tmp_path, range(FRAMES), sid, f"{run}/main", main_settings)
    log = host.log_text()[before:]
    assert f"stream {sid} restarts" not in log
    goes_on = [line for line in log.splitlines() if f"stream {sid} goes on with" in line]
    assert len(goes_on) == 2 and "timesteps [359, 99] -> [499, 299, 99]" in goes_on[0] and "seed 5 -> 11" in goes_on[1]
    assert "carried to timesteps" in goes_on[0]
    assert [i["calls"] for i in infos] == list(range(1, FRAMES + 1)), "one stream all along"
    assert not any(i["warming_up"] for i in infos[1:]), "no warm-up frame after the start"

    fresh_steps = _run(host, tmp_path, range(CHANGE_STEPS, CHANGE_SEED), f"{sid}-a", f"{run}/a", lambda k: (NEW_T, 5))
    fresh_seed = _run(host, tmp_path, range(CHANGE_SEED, FRAMES), f"{sid}-b", f"{run}/b", lambda k: (NEW_T, 11))
    assert fresh_steps[0]["warming_up"] and fresh_seed[0]["warming_up"]  # what a restart would have shown
    lag = 2
    for k in range(CHANGE_STEPS + lag, CHANGE_SEED):
        assert np.abs(_pixels(host, f"{run}/main", k) - _pixels(host, f"{run}/a", k)).max() <= 1, k
    for k in range(CHANGE_SEED + lag, FRAMES):
        assert np.abs(_pixels(host, f"{run}/main", k) - _pixels(host, f"{run}/b", k)).max() <= 1, k
    # right after a change the frames are the carried stream's, not a fresh stream's warm-up estimates
    assert np.abs(_pixels(host, f"{run}/main", CHANGE_STEPS) - _pixels(host, f"{run}/a", CHANGE_STEPS)).max() > 2


def test_blend_weight_swept_frame_by_frame_never_restarts(host, tmp_path):
    run = f"controls/{uuid.uuid4().hex[:6]}"
    sid = f"blend-{uuid.uuid4().hex[:6]}"
    before = len(host.log_text())
    infos, outputs = [], []
    for k in range(10):
        extra = {
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "an oil painting of a whale", "clip": ["1", 1]}},
            "8": {
                "class_type": "TurboStreamConditioningBlend",
                "inputs": {"conditioning_a": ["4", 0], "conditioning_b": ["7", 0], "weight": k / 9, "method": "slerp"},
            },
        }
        wf = _live_prompt(k, sid, f"{run}/blend", OLD_T, 5, positive=["8", 0], extra=extra)
        result = queue(host, wf, tmp_path / str(k))
        infos.append(history(host, result.prompt_id)["outputs"]["40"]["turbostream_stream"][0])
        outputs.append(_pixels(host, f"{run}/blend", k))
    log = host.log_text()[before:]
    assert f"stream {sid} restarts" not in log and f"stream {sid} goes on" not in log
    assert [i["calls"] for i in infos] == list(range(1, 11))
    assert not any(i["warming_up"] for i in infos[1:])


def test_feedback_blends_the_previous_output_into_the_video(host, tmp_path):
    """feedback 0 is the plain stream; 0.5 leaves the frames that enter before the first finished output as
    they are and changes every later one. (Whether it steadies a clip is a property of a trained model; the
    tiny random one's x0 is no image latent: bench/bench_live_controls.py measures it.)"""
    run = f"controls/{uuid.uuid4().hex[:6]}"
    wf = {**_models(), **_clip()}
    for name, fb in (("off", 0.0), ("zero", None), ("half", 0.5)):
        extra = {} if fb is None else {"feedback": fb}
        wf[f"v{name}"] = _stream(["12", 0], cfg_type="self", add_noise=True, **extra)
        wf[f"s{name}"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [f"v{name}", 1], "filename_prefix": f"{run}/{name}"},
        }
    queue(host, wf, tmp_path)
    off, zero, half = (_latent(host, f"{run}/{k}") for k in ("off", "zero", "half"))
    assert torch.equal(off, zero), "feedback left out = feedback 0"
    lag = 1
    torch.testing.assert_close(half[: lag + 1], off[: lag + 1])  # nothing to blend before the first output
    assert float((half[lag + 1 :] - off[lag + 1 :]).abs().amax(dim=(1, 2, 3)).min()) > 1e-3
