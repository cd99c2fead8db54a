"""Start and stop a headless ComfyUI host with the pack, for tests, the demo and benchmarks.

Each host gets its own temporary ``--base-directory``: ``custom_nodes/`` holds a link to this
repository, ``models/<folder>/`` holds links to the model files it should see (never the files
themselves, so tests can add or corrupt files without touching the cache), ``input/`` holds
copies of the example image and clip the bundled workflows load (``workflows/inputs/``; copies, not
links: newer hosts refuse input files that resolve outside the input folder), and ``output/``,
``temp/`` and ``user/`` start empty.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from .errors import UserError
from .host import PACK_FOLDER_NAME, REPO_ROOT

logger = logging.getLogger("turbostream")

START_TIMEOUT_S = 180.0
LOG_TAIL_LINES = 60


class HostStartError(UserError):
    """The host did not answer ``/system_stats`` in time; the message carries its log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


ModelLinks = Mapping[str, Mapping[str, Path]]
"""``{host model folder: {file name: file to link}}``."""


class HeadlessHost:
    """A ComfyUI process on a free loopback port; use as a context manager or call start/stop."""

    def __init__(
        self,
        host_dir: str | os.PathLike,
        model_links: ModelLinks | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        python: str = sys.executable,
        base_dir: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.host_dir = Path(host_dir).resolve()
        self.model_links = model_links or {}
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.python = python
        self.env = dict(env or {})
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="turbostream-host-"))
        self.log_path = self.base_dir / "host.log"
        self.process: subprocess.Popen | None = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    def _prepare_base(self) -> None:
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_FOLDER_NAME
        if not link.is_symlink():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        for example in sorted((REPO_ROOT / "workflows" / "inputs").glob("*")):
            target = self.input_dir / example.name  # what the bundled workflows load
            if not target.exists() and not target.is_symlink():
                shutil.copyfile(example, target)
        for folder, files in self.model_links.items():
            dest = self.models_dir / folder
            dest.mkdir(parents=True, exist_ok=True)
            for name, src in files.items():
                target = dest / name
                if not target.exists() and not target.is_symlink():
                    target.symlink_to(Path(src).resolve())

    def command(self) -> list[str]:
        cmd = [
            self.python,
            "main.py",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--disable-auto-launch",
            "--database-url",
            "sqlite:///:memory:",
        ]
        if not has_cuda():
            cmd += ["--cpu", "--use-pytorch-cross-attention"]
        return cmd + list(self.extra_args)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> HeadlessHost:
        self._prepare_base()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.host_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HostStartError(
                    f"ComfyUI exited with code {self.process.returncode} while starting.\n{self.log_tail()}"
                )
            try:
                self.get_json("/system_stats", timeout=2)
                logger.info("ComfyUI is up at %s (pid %d)", self.url, self.process.pid)
                return self
            except (OSError, ValueError):
                time.sleep(0.25)
        self.stop()
        raise HostStartError(
            f"ComfyUI did not answer {self.url}/system_stats within {timeout:.0f} s.\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def wait(self) -> int:
        return self.process.wait() if self.process else 0

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> HeadlessHost:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- helpers -------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- host log (last {len(tail)} lines) ---\n" + "\n".join(tail)

    def get_json(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, payload, timeout: float = 30.0):
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
                return resp.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except ValueError:
                return err.code, body.decode(errors="replace")


def demo_model_links(tiny_dir: Path, real_models_dir: Path | None = None) -> dict[str, dict[str, Path]]:
    """Links for a demo/test host: every tiny model under its own name, and each catalog file
    under its standard name — the real download when present in ``real_models_dir``, else the
    tiny model with the same layout."""
    from .hub import CATALOG

    links: dict[str, dict[str, Path]] = {}
    for path in sorted(Path(tiny_dir).glob("*/*.safetensors")):
        links.setdefault(path.parent.name, {})[path.name] = path
    for entry in CATALOG.values():
        for f in entry.files:
            real = real_models_dir / f.folder / f.name if real_models_dir else None
            src = real if real is not None and real.is_file() else Path(tiny_dir) / f.folder / f.tiny
            if src.is_file():
                links.setdefault(f.folder, {})[f.name] = src
    return links
