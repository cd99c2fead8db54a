"""Shared benchmark helpers: interleaved timing, medians, the machine line.

This CPU's speed drifts by 15-25 % over minutes, so compared configurations are run interleaved
(A, B, A, B, ...) and summarised by their medians; only ratios measured in the same run are
reported side by side. Nothing here asserts a time.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Comparison:
    benchmark: str
    a: str
    b: str
    median_a_s: float
    median_b_s: float
    n: int
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.median_a_s / self.median_b_s if self.median_b_s else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio_a_over_b": round(self.ratio, 3)}


def interleaved(a: Callable[[int], None], b: Callable[[int], None], n: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``a(i)`` and ``b(i)`` called alternately ``n`` times each after ``warmup`` rounds."""
    for i in range(warmup):
        a(-1 - i)
        b(-1 - i)
    ta, tb = [], []
    for i in range(n):
        for fn, acc in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn(i)
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "CPU only"
    try:
        import torch

        if torch.cuda.is_available():
            device = f"GPU {torch.cuda.get_device_name(0)}"
        device += f", torch {torch.__version__}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {device}, Python {platform.python_version()}"


def import_pack():
    """The pack imported in this process the way the host imports it (the host must be on sys.path)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "comfyui_turbostream_bench"
    if name in sys.modules:
        return sys.modules[name]
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM) in GiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0
