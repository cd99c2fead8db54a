"""``make bench-gpu`` (``bench/gpu.py``): a clear message and exit 0 without a GPU; the script itself
runs end to end (``--smoke``: on the CPU, tiny SD2.1 UNet, 64x64, no compile) so it does not rot on
machines that have no GPU to run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

GPU_SCRIPT = REPO_ROOT / "bench" / "gpu.py"


def _run(*args, timeout=600, **env):
    return subprocess.run(
        [sys.executable, str(GPU_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **env},
    )


def test_without_a_gpu_it_says_so_and_exits_0():
    done = _run(CUDA_VISIBLE_DEVICES="", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no NVIDIA GPU here" in done.stdout and "nothing was measured" in done.stdout


def test_make_target_without_a_gpu(tmp_path):
    """The Makefile target checks for nvidia-smi before it sets anything up."""
    if subprocess.run(["sh", "-c", "command -v nvidia-smi && nvidia-smi -L"], capture_output=True).returncode == 0:
        pytest.skip("this machine has an NVIDIA GPU: make bench-gpu would measure")
    done = subprocess.run(["make", "-s", "bench-gpu"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0 and "no NVIDIA GPU here" in done.stdout, done.stdout + done.stderr


@pytest.mark.host
def test_the_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    """Every path (video node, live node, host loop) queues, streams frames back and is reported; nothing
    is written to bench/results in a smoke run."""
    results = sorted((REPO_ROOT / "bench" / "results").glob("*"))
    done = _run("--smoke", "--frames", "4")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1-step img2img")]
    assert len(rows) == 2, done.stdout
    assert "video node" in rows[0] and "live node" in rows[1] and all("host loop" in r for r in rows)
    assert all(" fps" in r and "evaluation-count limit 1.0" in r for r in rows)
    assert sorted((REPO_ROOT / "bench" / "results").glob("*")) == results
