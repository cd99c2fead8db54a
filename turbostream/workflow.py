"""Workflow files: build the UI (drag-and-drop) format from the API format, and check UI files.

The bundled ``workflows/api/*.json`` are the source of truth; ``example_workflows/*.json`` are built
from them with the host's ``/object_info`` (which says which inputs are widgets, in which order, and
which outputs a node has), so the two formats never drift apart:

    python -m turbostream workflows build-ui --server 127.0.0.1:8188
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH = 380
ROW_HEIGHT = 260
NODE_WIDTH = 320


def _spec_type(spec: list | tuple) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else str(kind)


def _ordered_inputs(info: dict[str, Any]) -> list[tuple[str, list]]:
    """(name, spec) for required then optional inputs, in the host's declared order."""
    out = []
    order = info.get("input_order", {})
    for group in ("required", "optional"):
        specs = info.get("input", {}).get(group, {}) or {}
        for name in order.get(group, list(specs)):
            out.append((name, specs[name]))
    return out


def _is_widget(spec: list) -> bool:
    return _spec_type(spec) in WIDGET_TYPES


def _has_control_widget(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate"))


def _depths(api: dict[str, Any]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str, seen: tuple[str, ...] = ()) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in seen:
            raise ValueError(f"workflow has a cycle through node {node_id}")
        parents = [v[0] for v in api[node_id].get("inputs", {}).values() if isinstance(v, list) and len(v) == 2]
        depth[node_id] = 1 + max((visit(str(p), seen + (node_id,)) for p in parents), default=-1)
        return depth[node_id]

    for nid in api:
        visit(nid)
    return depth


def api_to_ui(api: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """A LiteGraph UI workflow equivalent to an API-format workflow."""
    missing = sorted({n["class_type"] for n in api.values() if n["class_type"] not in object_info})
    if missing:
        raise ValueError(f"node types unknown to the host: {', '.join(missing)}")
    depth = _depths(api)
    rows: dict[int, int] = defaultdict(int)
    ids = sorted(api, key=lambda k: (depth[k], int(k)))
    nodes: dict[str, dict[str, Any]] = {}
    for order, nid in enumerate(ids):
        node = api[nid]
        info = object_info[node["class_type"]]
        col = depth[nid]
        nodes[nid] = {
            "id": int(nid),
            "type": node["class_type"],
            "pos": [40 + col * COLUMN_WIDTH, 40 + rows[col] * ROW_HEIGHT],
            "size": [NODE_WIDTH, 120],
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": [],
            "outputs": [
                {"name": name, "type": typ, "links": [], "slot_index": i}
                for i, (typ, name) in enumerate(
                    zip(info["output"], info.get("output_name", info["output"]), strict=True)
                )
            ],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": [],
        }
        # The API file's title is kept whenever it says more than the class name, even where it equals
        # this host's display name: display names change between host versions, the file must not.
        if "_meta" in node and node["_meta"].get("title") not in (None, node["class_type"]):
            nodes[nid]["title"] = node["_meta"]["title"]
        rows[col] += 1

    links = []
    for nid in ids:
        node, ui = api[nid], nodes[nid]
        info = object_info[node["class_type"]]
        values = node.get("inputs", {})
        for name, spec in _ordered_inputs(info):
            value = values.get(name)
            linked = isinstance(value, list) and len(value) == 2 and str(value[0]) in nodes
            widget = _is_widget(spec)
            if linked:
                src, slot = nodes[str(value[0])], int(value[1])
                link_id = len(links) + 1
                typ = src["outputs"][slot]["type"]
                links.append([link_id, src["id"], slot, ui["id"], len(ui["inputs"]), typ])
                src["outputs"][slot]["links"].append(link_id)
                entry = {"name": name, "type": typ, "link": link_id}
                if widget:
                    entry["widget"] = {"name": name}
                ui["inputs"].append(entry)
            elif not widget:
                if name in info.get("input", {}).get("required", {}):
                    raise ValueError(f"node {nid} ({node['class_type']}): required input {name!r} is not connected")
                ui["inputs"].append({"name": name, "type": _spec_type(spec), "link": None})
            if widget:
                if value is None and not linked:  # left out of the API file: the input's default
                    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    value = opts.get("default")
                ui["widgets_values"].append(None if linked else value)
                if _has_control_widget(spec):
                    ui["widgets_values"].append("fixed")
    for ui in nodes.values():
        for out in ui["outputs"]:
            if not out["links"]:
                out["links"] = None
    return {
        "last_node_id": max(n["id"] for n in nodes.values()),
        "last_link_id": len(links),
        "nodes": [nodes[nid] for nid in ids],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def check_ui(ui: dict[str, Any], object_info: dict[str, Any]) -> list[str]:
    """Problems in a UI workflow: unknown node types and inconsistent links (empty list: fine)."""
    problems = []
    nodes = {n["id"]: n for n in ui.get("nodes", [])}
    for n in nodes.values():
        if n["type"] not in object_info:
            problems.append(f"node {n['id']}: type {n['type']!r} is unknown to the host")
    link_ids = set()
    for link in ui.get("links", []):
        link_id, src_id, src_slot, dst_id, dst_slot, typ = link[:6]
        link_ids.add(link_id)
        src, dst = nodes.get(src_id), nodes.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {link_id}: references missing node {src_id if src is None else dst_id}")
            continue
        outs, ins = src.get("outputs", []), dst.get("inputs", [])
        if src_slot >= len(outs) or link_id not in (outs[src_slot].get("links") or []):
            problems.append(f"link {link_id}: node {src_id} output {src_slot} does not list it")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: node {dst_id} input {dst_slot} does not point back to it")
        elif ins[dst_slot].get("type") not in (typ, "*") and typ != "*":
            problems.append(
                f"link {link_id}: carries {typ} into {dst['type']}.{ins[dst_slot]['name']} "
                f"of type {ins[dst_slot].get('type')}"
            )
        if src["type"] in object_info and src_slot < len(object_info[src["type"]]["output"]):
            declared = object_info[src["type"]]["output"][src_slot]
            if declared != typ:
                problems.append(f"link {link_id}: type {typ} but {src['type']} output {src_slot} is {declared}")
    for n in nodes.values():
        for i, inp in enumerate(n.get("inputs", [])):
            if inp.get("link") is not None and inp["link"] not in link_ids:
                problems.append(f"node {n['id']} input {i} ({inp['name']}): link {inp['link']} does not exist")
        for slot, out in enumerate(n.get("outputs", [])):
            for lid in out.get("links") or []:
                if lid not in link_ids:
                    problems.append(f"node {n['id']} output {slot}: link {lid} does not exist")
    return problems


def native_txt2img(
    ckpt: str, lora: str | None = None, size: int = 64, seed: int = 0, prefix: str = "turbostream/txt2img"
) -> dict:
    """A host-native one-step workflow (optionally through LoraLoader) for checks on the tiny models."""
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": seed,
                "steps": 1,
                "cfg": 1.0,
                "sampler_name": "euler_ancestral",
                "scheduler": "sgm_uniform",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["6", 0]}},
    }
    if lora:
        wf["8"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": lora,
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        }
        wf["2"]["inputs"]["clip"] = wf["3"]["inputs"]["clip"] = ["8", 1]
        wf["5"]["inputs"]["model"] = ["8", 0]
    return wf
