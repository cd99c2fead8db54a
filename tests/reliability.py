"""Figures for ``docs/reliability.md``: tests call ``record`` and ``bench/reliability.py`` collects them.

Recording is off unless ``TURBOSTREAM_RELIABILITY_DIR`` is set (``make reliability`` sets it), so the
tests behave the same in ``make test``; the figures are whatever the run measured, never constants.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "TURBOSTREAM_RELIABILITY_DIR"


def record(section: str, case: str, **figures) -> None:
    """Append one result (``case`` plus any JSON-able ``figures``) to ``<dir>/<section>.jsonl``."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    entry = {"case": case, "time": time.time(), **figures}
    with open(Path(folder) / f"{section}.jsonl", "a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")


def rss_mib(pid: int | str = "self") -> float:
    """Current resident memory (VmRSS) of a process, in MiB; 0 where /proc is unavailable."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def slope_per_1000(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``, scaled to a change per 1,000 units of x."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
