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
        for group in ("required", "optional"):
            for name, spec in (info["input"].get(group) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        tips = info.get("output_tooltips") or [None] * len(info["output"])
        assert all(tips), f"{node_id}: an output has no tooltip ({info.get('output_name')})"


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


def _node_classes(pack) -> dict:
    return {cls.define_schema().node_id: cls for cls in pack.nodes.ALL_NODES}


def test_widget_order_on_the_host_is_the_schema_order(object_info, pack):
    """The front end lays widgets out required first, then optional, and saved UI workflows keep widget
    values by position: no required input may follow an optional one in a schema, or old files would
    load with their values shifted."""
    for node_id, cls in _node_classes(pack).items():
        schema_order = [spec.id for spec in cls.define_schema().inputs]
        order = object_info[node_id].get("input_order", {})
        host_order = list(order.get("required", [])) + list(order.get("optional", []))
        assert host_order == schema_order, node_id


def test_optional_inputs_default_to_their_schema_default(pack):
    """An API prompt may leave an optional input out: execute() then runs with its schema default."""
    import inspect

    wrong = []
    for node_id, cls in _node_classes(pack).items():
        params = inspect.signature(cls.execute).parameters
        for spec in cls.define_schema().inputs:
            if not spec.optional:
                continue
            param = params.get(spec.id)
            default = inspect.Parameter.empty if param is None else param.default
            if default is inspect.Parameter.empty or default != getattr(spec, "default", None):
                wrong.append(
                    f"{node_id}.{spec.id}: execute default {default!r}, schema {getattr(spec, 'default', None)!r}"
                )
    assert not wrong, "\n".join(wrong)


def test_advanced_inputs_are_optional(object_info, pack_node_ids):
    """Rare knobs (advanced on hosts that know the flag) never have to be given in an API prompt."""
    for node_id in pack_node_ids:
        required = object_info[node_id]["input"].get("required", {})
        for name, spec in required.items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            assert not opts.get("advanced"), f"{node_id}.{name} is advanced but required"


def test_search_aliases_where_the_host_shows_them(object_info, pack, pack_node_ids):
    """Hosts whose V3 Schema has ``search_aliases`` (0.33) list the words users type; 0.3.75 lists none."""
    common = pack.nodes._common
    assert set(common.SEARCH_ALIASES) == set(pack_node_ids), "every node has its search words"
    supported = "search_aliases" in common._schema_fields()
    seen = set()
    for node_id in pack_node_ids:
        aliases = object_info[node_id].get("search_aliases") or []
        if supported:
            assert set(common.SEARCH_ALIASES[node_id]) | {"turbostream", "realtime"} <= set(aliases), node_id
            seen |= set(aliases)
        else:
            assert aliases == [], node_id
    if supported:
        wanted = {"streamdiffusion", "realtime", "webcam", "turbo", "sdxl turbo", "lcm", "taesd", "tiny vae"}
        assert wanted <= seen, wanted - seen
