"""Node docs pages (``js/docs/<NodeId>.md``, shown in the host's node docs panel) match the schema."""

from __future__ import annotations

import urllib.request

import pytest
from conftest import REPO_ROOT

from turbostream import node_docs
from turbostream.host import PACK_FOLDER_NAME

DOCS = REPO_ROOT / "js" / "docs"


def test_every_node_has_a_page_and_no_stray_pages(pack_node_ids):
    assert sorted(p.stem for p in DOCS.glob("*.md")) == sorted(pack_node_ids)


@pytest.mark.parametrize("node_id", sorted(p.stem for p in DOCS.glob("*.md")))
def test_page_lists_exactly_the_schema(object_info, node_id):
    """The generated tables are current (``python -m turbostream docs build`` would change nothing) and name
    exactly the node's inputs, in widget order, and its outputs; the hand-written parts are filled in."""
    text = (DOCS / f"{node_id}.md").read_text()
    info = object_info[node_id]
    assert node_docs.update_page(text, info) == text, f"{node_id}.md is stale: run python -m turbostream docs build"
    order = info.get("input_order", {})
    assert node_docs.documented_names(text, "inputs") == [*order.get("required", []), *order.get("optional", [])]
    assert node_docs.documented_names(text, "outputs") == list(info.get("output_name") or info["output"])
    assert "TODO" not in text
    assert text.startswith(f"# {info['display_name']}\n")
    assert info["description"] in text, f"{node_id}.md does not carry the node's current description"
    for heading in ("## When to use it", "## Inputs", "## Outputs", "## Common mistakes", "## Example"):
        assert heading in text, (node_id, heading)


def test_drift_is_caught(object_info):
    """Sensitivity: a page whose table misses an input, or names one that does not exist, is stale."""
    node_id = "TurboStreamStreamImg2Img"
    text = (DOCS / f"{node_id}.md").read_text()
    dropped = "\n".join(line for line in text.splitlines() if not line.startswith("| `delta` |")) + "\n"
    assert node_docs.update_page(dropped, object_info[node_id]) != dropped
    renamed = text.replace("| `delta` |", "| `delta_old` |")
    assert node_docs.update_page(renamed, object_info[node_id]) != renamed


def test_the_host_serves_the_pages(host):
    url = f"{host.url}/extensions/{PACK_FOLDER_NAME}/docs/TurboStreamLiveImg2Img.md"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
    assert body == (DOCS / "TurboStreamLiveImg2Img.md").read_text()
