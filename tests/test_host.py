"""The pack inside a real ComfyUI host: it imports, registers its nodes and serves its js."""

from __future__ import annotations

from conftest import REPO_ROOT

from turbostream.host import PACK_FOLDER_NAME


def test_pack_imports_without_failure(host):
    log = host.log_text()
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if PACK_FOLDER_NAME in line), log
    assert f"Cannot import {host.base_dir / 'custom_nodes' / PACK_FOLDER_NAME}" not in log
    assert "TurboStream loaded" in log


def test_object_info_lists_every_pack_node(object_info, pack_node_ids):
    ours = {name for name, info in object_info.items() if PACK_FOLDER_NAME in str(info.get("python_module", ""))}
    assert ours == set(pack_node_ids)
    for node_id in pack_node_ids:
        info = object_info[node_id]
        assert node_id.startswith("TurboStream"), node_id
        assert info["category"].startswith("TurboStream/"), (node_id, info["category"])
        assert info.get("description"), f"{node_id} has no description"


def test_extensions_lists_the_pack_js(host):
    served = set(host.get_json("/extensions"))
    ours = {
        f"/extensions/{PACK_FOLDER_NAME}/{p.relative_to(REPO_ROOT / 'js')}" for p in (REPO_ROOT / "js").rglob("*.js")
    }
    assert ours, "the pack ships no js"
    assert ours <= served, ours - served


def test_pack_js_is_served(host):
    import urllib.request

    with urllib.request.urlopen(f"{host.url}/extensions/{PACK_FOLDER_NAME}/about.js", timeout=10) as resp:
        body = resp.read().decode()
    assert 'name: "turbostream.about"' in body


def test_pack_import_is_idempotent(pack):
    """Newer hosts call on_load() and get_node_list(); setup must run once and keep the node list."""
    import asyncio

    ext = asyncio.run(pack.comfy_entrypoint())
    asyncio.run(ext.on_load())
    first = asyncio.run(ext.get_node_list())
    asyncio.run(ext.on_load())
    assert asyncio.run(ext.get_node_list()) == first
