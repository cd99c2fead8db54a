"""Dynamic VRAM (the host's ``ModelPatcherDynamic``, what every NVIDIA user of newer hosts gets).

The checks run in a fresh host process (``tests/dynamic_vram_check.py``): comfy-aimdo is initialised
before the host's modules load, as the host's own ``main.py`` does, and the dynamic patcher is built
explicitly on CPU (the host itself only uses it on NVIDIA).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def dynamic_run(comfy, host_dir, tiny_models_dir) -> dict | None:
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return None
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "dynamic_vram_check.py"), str(tiny_models_dir)],
        cwd=host_dir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_dynamic_vram_patcher_path(comfy, pack, dynamic_run):
    """Where the host has dynamic VRAM: the LCM fuser, the tiny VAE and the stream nodes on it.

    LCM fuser: on a classic patcher it fuses (object-patched weights, equal to the host's LoraLoader); on
    a dynamic one it keeps the patcher dynamic and hands the host ordinary patches (logged), so its result
    is the host's own LoraLoader's on that patcher, fused or not. Tiny VAE (built with the host's patcher
    class, which the host sets to the dynamic one on NVIDIA), video and live stream: equal to classic.
    On a host without dynamic VRAM (0.3.75) the pack sees every patcher as classic.
    """
    import comfy.model_patcher

    classic = comfy.model_patcher.ModelPatcher(comfy.model_patcher.torch.nn.Linear(2, 2), "cpu", "cpu")
    assert pack.nodes.lcm_lora.is_dynamic(classic) is False
    if dynamic_run is None:
        assert not hasattr(classic, "is_dynamic")
        return
    r = dynamic_run
    assert r["aimdo"] and r["dynamic_class"] == "CPUDynamicPatcher" and r["dynamic"] is True
    # LCM fuser
    assert r["classic_fused_weight_patches"] == 0 and r["classic_fused_object_weights"] > 0
    assert r["classic_fused_vs_classic_host"] == 0.0 and r["classic_host_vs_plain"] > 0.1, "the LoRA changes the image"
    assert r["dynamic_fused_is_dynamic"] is True
    assert r["dynamic_fused_object_weights"] == 0 and r["dynamic_fused_weight_patches"] > 0
    assert any("dynamic VRAM" in m and "host patches" in m for m in r["dynamic_messages"]), r["dynamic_messages"]
    assert r["dynamic_fused_vs_dynamic_host"] == 0.0
    assert r["dynamic_unfused_vs_dynamic_host"] == 0.0
    assert r["dynamic_plain_vs_classic_plain"] == 0.0
    # tiny VAE and stream nodes
    assert r["tiny_vae_patcher"] == "CPUDynamicPatcher"
    assert r["tiny_vae_decode_diff"] == 0.0 and r["tiny_vae_encode_diff"] == 0.0
    assert r["video_frames"] == 3 and r["video_diff"] == 0.0
    assert r["live_diff"] == 0.0
