"""The toy ADD reproduction (bench/add_toy.py) runs end to end in --quick mode and writes its report.

It checks the pipeline, not the result: which variant wins is what the full run reports in
docs/add_toy.md, never asserted here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO_ROOT
from PIL import Image

ROWS = [
    ("held-out real images", "0"),
    ("teacher", "50"),
    ("teacher", "4"),
    ("teacher", "1"),
    ("ADD student", "1"),
    ("ADD student", "4"),
    ("distillation-only student", "1"),
    ("distillation-only student", "4"),
]


def test_quick_toy_run_writes_the_table_and_the_grid(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "add_toy.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "add_toy.md").read_text()
    assert "--quick mode (smoke test: numbers mean nothing)" in report
    table = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [tuple(cell.strip() for cell in line.strip("|").split("|")[:2]) for line in table] == ROWS
    for line in table:
        fd = line.strip("|").split("|")[3].strip()
        assert re.fullmatch(r"\d+\.\d{3}", fd), line
    with Image.open(tmp_path / "add_toy_samples.png") as grid:
        assert grid.width > 12 * 64 and grid.height >= 8 * 64
