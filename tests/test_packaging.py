"""Packaging rules: the core never imports comfy at module level; one dependency list; pack metadata."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import tomllib
from conftest import REPO_ROOT

import turbostream


def test_core_never_imports_comfy_at_module_level():
    modules = [f"turbostream.{m.name}" for m in pkgutil.iter_modules(turbostream.__path__) if m.name != "__main__"]
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k == 'comfy' or k.startswith(('comfy.', 'comfy_api')))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at module level: {out.stdout}"
    assert len(modules) >= 8


def test_host_provisioning_runs_without_torch():
    """``turbostream.host`` bootstraps the venv, so it must import with the standard library only."""
    code = "import sys; import turbostream.host, turbostream.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_requirements_txt_mirrors_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = [
        ln.strip()
        for ln in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines == project["dependencies"]


def test_comfy_registry_metadata():
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    comfy = data["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy.get(key), key
    assert "ruff" in data["tool"]
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO_ROOT / "LICENSE").read_text()[:200]
    assert "Version 3" in (REPO_ROOT / "LICENSE").read_text()[:300]


def test_pack_entrypoint_outside_comfy():
    """Outside a host the pack's __init__ defines WEB_DIRECTORY and nothing that needs comfy_api."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', r'{REPO_ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{REPO_ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.WEB_DIRECTORY, hasattr(m, 'comfy_entrypoint'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["./js", "False"]


def test_host_requirements_filter(tmp_path):
    from turbostream import host

    (tmp_path / "requirements.txt").write_text("torch\ntorchvision>=0.1\ntorchaudio\nnumpy>=1.25.0\n# c\nav>=14 # x\n")
    assert host.host_requirements(tmp_path) == [host.TORCHAUDIO_PIN, "numpy>=1.25.0", "av>=14"]
    (tmp_path / "requirements.txt").write_text("torch\nnumpy\n")  # 0.3.75 lists no torchaudio: none installed
    assert host.host_requirements(tmp_path) == ["numpy"]


def test_js_extensions_follow_the_house_rules():
    """One extension per file named turbostream.<feature>; overridden node callbacks keep the host's."""
    import re

    names = []
    for path in sorted((REPO_ROOT / "js").glob("*.js")):
        text = path.read_text()
        found = re.findall(r'name:\s*"(turbostream\.[A-Za-z]+)"', text)
        assert len(found) == 1 and text.count("registerExtension(") == 1, path.name
        names += found
        for method in re.findall(r"nodeType\.prototype\.(\w+) = function", text):
            assert re.search(rf"const \w+ = nodeType\.prototype\.{method};", text), (
                f"{path.name}: {method} drops the original"
            )
            assert "?.apply(this, arguments)" in text, path.name
    assert len(names) == len(set(names)) >= 3
