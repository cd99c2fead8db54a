"""Shared fixtures: tiny models (made once, cached in .cache/) and one real ComfyUI host per session."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from turbostream import client, tiny_models  # noqa: E402
from turbostream import host as host_mod  # noqa: E402
from turbostream.cli import TINY_MODELS_DIR  # noqa: E402
from turbostream.server import HeadlessHost, demo_model_links  # noqa: E402


def pytest_collection_modifyitems(items):
    for item in items:
        if "host" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.host)
    # checks of what the whole session left in the host log run after everything else
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)


@pytest.fixture(scope="session")
def host_dir() -> Path:
    return host_mod.ensure_host()


@pytest.fixture(scope="session")
def tiny_models_dir(host_dir) -> Path:
    tiny_models.make_all(TINY_MODELS_DIR, host_dir)
    return TINY_MODELS_DIR


@pytest.fixture(scope="session")
def comfy(host_dir):
    """The host's ``comfy`` package imported in this process (for layout checks, no server)."""
    tiny_models._import_host(host_dir)
    import comfy.lora  # noqa: F401
    import comfy.model_detection  # noqa: F401

    return sys.modules["comfy"]


_PEAKS: dict[str, float] = {}
STREAM_IDLE_S = 20
"""Live streams idle this long are evicted in the test host (short, so eviction can be tested; long
enough that a loaded 2-core machine does not expire a stream between two of its frames)."""
LIVE_MAX_SOURCES = 64
"""Live sources the test host allows at once (above the default 16, so 50 abandoned ids fit)."""


def _peak_rss_gib(pid: int | str = "self") -> float:
    """VmHWM (peak resident set) of a process from /proc, in GiB; 0 where unavailable."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.fixture(scope="session")
def host(host_dir, tiny_models_dir):
    """One headless ComfyUI with the pack and the tiny models (under tiny and standard names)."""
    server = HeadlessHost(
        host_dir,
        model_links=demo_model_links(tiny_models_dir),
        env={"TURBOSTREAM_STREAM_IDLE_S": str(STREAM_IDLE_S), "TURBOSTREAM_LIVE_MAX_SOURCES": str(LIVE_MAX_SOURCES)},
    )
    server.start()
    yield server
    if server.process is not None:
        _PEAKS["host"] = _peak_rss_gib(server.process.pid)
    server.cleanup()


SUMMARY_LINES = pytest.StashKey[list]()
"""Lines tests hand in for the end of the run (e.g. the stream oracle's table of differences)."""


def pytest_configure(config):
    config.stash[SUMMARY_LINES] = []


def pytest_terminal_summary(terminalreporter):
    for line in terminalreporter.config.stash.get(SUMMARY_LINES, []):
        terminalreporter.write_line(line)
    _PEAKS["tests"] = _peak_rss_gib()
    peaks = ", ".join(f"{k} process {v:.2f} GiB" for k, v in _PEAKS.items() if v)
    terminalreporter.write_line(f"peak resident memory: {peaks}")


@pytest.fixture(scope="session")
def object_info(host) -> dict:
    return host.get_json("/object_info", timeout=120)


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


API_WORKFLOWS = REPO_ROOT / "workflows" / "api"


def live_workflow(stream_id: str, size: int = 64, **output) -> dict:
    """The bundled live workflow on ``stream_id`` at ``size``x``size``; ``output`` sets LiveOutput inputs."""
    wf = load_json(API_WORKFLOWS / "live_webcam_img2img.json")
    wf["6"]["inputs"].update(stream_id=stream_id, width=size, height=size)
    wf["8"]["inputs"].update(output)
    return wf


def tiny_txt2img(seed: int, filename_prefix: str) -> dict:
    """A small ADD-sampler txt2img (64x64, 2 steps) on the tiny SD1.5; sampler node "5", saver "7"."""
    wf = load_json(API_WORKFLOWS / "sd_turbo_txt2img.json")
    wf["1"]["inputs"]["ckpt_name"] = "v1-5-pruned-emaonly-fp16.safetensors"
    wf["4"]["inputs"].update(width=64, height=64, batch_size=1)
    wf["5"]["inputs"].update(seed=seed, steps=2)
    wf["7"]["inputs"]["filename_prefix"] = filename_prefix
    return wf


def textured_png(seed: int, size: int, grid: int, mode: str) -> bytes:
    """A seeded ``grid``x``grid`` colour field upsampled (``mode``) to ``size``: a frame the tiny model's
    output depends on (its output barely depends on a flat colour)."""
    import torch
    from PIL import Image

    coarse = torch.rand(3, grid, grid, generator=torch.Generator().manual_seed(seed))
    img = torch.nn.functional.interpolate(coarse[None], size=(size, size), mode=mode)[0].clamp(0, 1)
    buf = io.BytesIO()
    Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def history(server: HeadlessHost, prompt_id: str, timeout: float = 30) -> dict:
    """The prompt's history entry (the host writes it just after it sends execution_success)."""
    deadline = time.monotonic() + timeout
    while True:
        entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry is not None:
            return entry
        assert time.monotonic() < deadline, f"no history for {prompt_id}"
        time.sleep(0.05)


def queue(server: HeadlessHost, workflow: dict, out_dir: Path) -> client.JobResult:
    """Run one API workflow on ``server`` and return its result (raises ClientError on failure)."""
    [result] = client.run_jobs([workflow], [server.address], out_dir, timeout=600, progress=False)
    return result


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack imported in-process the way the host imports it (by path, as a package)."""
    import importlib.util

    name = "comfyui_turbostream_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack_node_ids(pack) -> list[str]:
    import asyncio

    extension = asyncio.run(pack.comfy_entrypoint())
    return [cls.define_schema().node_id for cls in asyncio.run(extension.get_node_list())]


LIVE_GAIN = re.compile(r"(^|\.)(in_layers|out_layers|out)\.0\.weight$")
"""GroupNorm gains the tiny checkpoints leave at 0, so their UNet's output is exactly 0 whatever its
input; set to 1 by :func:`live_tiny_sd15` (a "live" UNet whose output depends on input, text and LoRA)."""


def live_tiny_sd15(tiny_models_dir: Path):
    """The tiny SD1.5 checkpoint loaded in this process with a live UNet: ``(model, clip)`` patchers."""
    import comfy.sd
    import torch

    path = tiny_models_dir / "checkpoints" / tiny_models.CHECKPOINTS["sd15"].name
    model, clip, *_ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False)
    gains = [p for name, p in model.model.diffusion_model.named_parameters() if LIVE_GAIN.search(name)]
    assert gains, "no GroupNorm gains matched: the tiny checkpoint's layout changed"
    with torch.no_grad():
        for p in gains:
            p.fill_(1.0)
    return model, clip


def text_conditioning(clip, text: str) -> list:
    """``text`` encoded the way CLIPTextEncode does (tokens, conditioning and pooled output)."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]
