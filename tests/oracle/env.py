"""The oracle's own small virtual environment: upstream StreamDiffusion with the libraries it was written for.

``streamdiffusion==0.1.1`` (PyPI) needs diffusers 0.24, transformers 4.36, huggingface_hub < 0.26,
numpy < 2 and accelerate < 1; the pack's environment has newer ones. They are installed ``--no-deps``
into ``.cache/oracle-venvs/<pack venv name>/``; everything else (torch 2.14.1 above all, safetensors,
Pillow...) is reused from the pack's environment through a ``.pth`` file that puts its site-packages
after the oracle's own. Cached: a stamp holds the pins, so a second run costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ORACLE_PINS = (
    "streamdiffusion==0.1.1",
    "diffusers==0.24.0",
    "transformers==4.36.2",
    "tokenizers==0.15.2",
    "huggingface_hub==0.25.2",
    "numpy==1.26.4",
    "accelerate==0.34.2",
)
"""Exact pins (the ranges upstream needs, resolved once); ``--no-deps``: nothing else is pulled in."""
STAMP = ".turbostream-oracle.json"


def _site_packages(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def ensure_oracle_python() -> Path:
    """The oracle venv's Python (created on first use) for the environment running this process."""
    main_site = sysconfig.get_paths()["purelib"]
    venv = REPO_ROOT / ".cache" / "oracle-venvs" / Path(sys.prefix).name
    py = venv / "bin" / "python"
    want = {"pins": list(ORACLE_PINS), "reuses": main_site}
    digest = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()
    stamp = venv / STAMP
    try:
        if py.is_file() and json.loads(stamp.read_text()).get("sha256") == digest:
            return py
    except (OSError, ValueError):
        pass
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", *ORACLE_PINS],
        check=True,
    )
    # after the oracle's own site-packages: its pins win, the rest (torch...) comes from the pack's venv
    (Path(_site_packages(str(py))) / "zz_turbostream_main_venv.pth").write_text(main_site + "\n")
    stamp.write_text(json.dumps({"sha256": digest, **want}, indent=1))
    return py
