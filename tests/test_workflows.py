"""Bundled workflows: every API file runs on the tiny models; every UI file is consistent."""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT, load_json, queue
from PIL import Image

from turbostream import tiny_models, workflow
from turbostream.workflow import native_txt2img

API_FILES = sorted((REPO_ROOT / "workflows" / "api").glob("*.json"))
UI_FILES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))


def test_every_api_workflow_has_a_ui_twin():
    assert API_FILES, "no bundled API workflows"
    assert [p.name for p in API_FILES] == [p.name for p in UI_FILES]


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_executes(host, tmp_path, path):
    result = queue(host, load_json(path), tmp_path)
    assert result.images, f"{path.name} produced no output image"
    for image in result.images:
        with Image.open(image) as im:
            assert im.width >= 64 and im.height >= 64


@pytest.mark.parametrize("name", ["stream_video_img2img", "lcm_lora_sd15_txt2img", "sd_turbo_img2img"])
def test_api_prompt_with_only_the_inputs_a_user_sets(host, object_info, tmp_path, name):
    """Leaving out every optional pack input that is at its default gives the same images (API ergonomics:
    rare knobs such as delta, index_mode or latent_family need not be spelled out)."""
    full = load_json(REPO_ROOT / "workflows" / "api" / f"{name}.json")
    minimal = json.loads(json.dumps(full))
    dropped = []
    for node in minimal.values():
        if not node["class_type"].startswith("TurboStream"):
            continue
        optional = object_info[node["class_type"]]["input"].get("optional", {})
        for key in list(node["inputs"]):
            spec = optional.get(key)
            opts = spec[1] if spec and len(spec) > 1 and isinstance(spec[1], dict) else {}
            if spec and "default" in opts and node["inputs"][key] == opts["default"]:
                del node["inputs"][key]
                dropped.append(f"{node['class_type']}.{key}")
    assert dropped, "nothing optional to leave out"
    a = queue(host, full, tmp_path / "full")
    b = queue(host, minimal, tmp_path / "minimal")
    assert len(a.images) == len(b.images) > 0
    for x, y in zip(a.images, b.images, strict=True):  # pixels: the files' metadata embeds the prompt
        with Image.open(x) as im_x, Image.open(y) as im_y:
            assert im_x.tobytes() == im_y.tobytes(), (name, dropped)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_consistent(object_info, path):
    assert workflow.check_ui(load_json(path), object_info) == []


def _without_unlinked_outputs(ui: dict) -> dict:
    """``ui`` with the output slots nothing is linked to left out of each node.

    Which unused outputs a core node shows is the host's business (0.33's SaveImage gained an IMAGE
    output that 0.3.75's lacks); the graph, its links and every widget value must still match.
    """
    ui = json.loads(json.dumps(ui))
    for node in ui["nodes"]:
        node["outputs"] = [out for out in node["outputs"] if out.get("links")]
    return ui


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_matches_its_api_twin(object_info, path):
    """UI files are built from the API files (python -m turbostream workflows build-ui, on the oldest
    supported host): no drift, on every supported host."""
    rebuilt = workflow.api_to_ui(load_json(REPO_ROOT / "workflows" / "api" / path.name), object_info)
    assert _without_unlinked_outputs(rebuilt) == _without_unlinked_outputs(load_json(path))


def test_ui_drift_check_still_sees_a_changed_widget_value(object_info):
    """Sensitivity: leaving unlinked outputs out of the comparison does not hide a changed value."""
    path = UI_FILES[0]
    api = load_json(REPO_ROOT / "workflows" / "api" / path.name)
    node = next(n for n in api.values() if any(isinstance(v, (int, float, str)) for v in n["inputs"].values()))
    name = next(k for k, v in node["inputs"].items() if isinstance(v, (int, float, str)) and not isinstance(v, bool))
    node["inputs"][name] = node["inputs"][name] + (1 if isinstance(node["inputs"][name], (int, float)) else "x")
    rebuilt = workflow.api_to_ui(api, object_info)
    assert _without_unlinked_outputs(rebuilt) != _without_unlinked_outputs(load_json(path))


def test_workflow_templates_list_every_bundled_ui_workflow(host):
    """Workflow -> Browse Templates: the host lists example_workflows/*.json under the pack's folder name
    and serves each file as it is in the repository."""
    import urllib.request

    from turbostream.host import PACK_FOLDER_NAME

    listed = host.get_json("/workflow_templates")
    assert sorted(listed.get(PACK_FOLDER_NAME, [])) == sorted(p.stem for p in UI_FILES)
    for path in UI_FILES:
        with urllib.request.urlopen(f"{host.url}/api/workflow_templates/{PACK_FOLDER_NAME}/{path.name}") as resp:
            assert json.loads(resp.read()) == load_json(path), path.name


def test_check_ui_catches_broken_links(object_info):
    ui = load_json(UI_FILES[0])
    ui["links"][0][3] = 999  # point a link at a node that does not exist
    ui["nodes"][0]["type"] = "NoSuchNode"
    problems = workflow.check_ui(ui, object_info)
    assert any("missing node 999" in p for p in problems)
    assert any("NoSuchNode" in p for p in problems)


@pytest.mark.parametrize("family,fmt", sorted(tiny_models.LORA_FILES))
def test_host_lora_loader_maps_every_key(host, tmp_path, family, fmt):
    """The host's own LoraLoader applies the tiny LoRA files without a single unmatched key."""
    ckpt = tiny_models.CHECKPOINTS[family].name
    lora = tiny_models.LORA_FILES[(family, fmt)].name
    before = len(host.log_text())
    queue(host, native_txt2img(ckpt, lora=lora, seed=1), tmp_path)
    new_log = host.log_text()[before:]
    assert "lora key not loaded" not in new_log, new_log[-2000:]


def test_lora_check_detects_unmatched_keys(host, tmp_path):
    """The check above can fail: an SDXL LoRA on an SD1.5 model leaves keys unmatched in the log."""
    before = len(host.log_text())
    queue(
        host,
        native_txt2img(
            tiny_models.CHECKPOINTS["sd15"].name, lora=tiny_models.LORA_FILES[("sdxl", "diffusers")].name, seed=2
        ),
        tmp_path,
    )
    assert "lora key not loaded" in host.log_text()[before:]


def test_demo_skips_workflows_whose_models_are_missing(object_info):
    from turbostream.demo import missing_models

    wf = load_json(REPO_ROOT / "workflows" / "api" / "sd_turbo_txt2img.json")
    assert missing_models(wf, object_info) == []
    wf["1"]["inputs"]["ckpt_name"] = "nope.safetensors"
    wf["8"]["inputs"]["vae_name"] = "vae_approx/taesd9"
    assert sorted(missing_models(wf, object_info)) == [
        "CheckpointLoaderSimple.ckpt_name=nope.safetensors",
        "TurboStreamTinyVAELoader.vae_name=vae_approx/taesd9",
    ]


def test_ui_files_fill_left_out_widgets_with_their_defaults(object_info):
    """An API file may leave optional inputs out; its UI twin then carries their defaults (a null would be
    sent back by the front end and refused)."""
    for path in UI_FILES:
        for node in load_json(path)["nodes"]:
            linked = {i["widget"]["name"] for i in node["inputs"] if i.get("widget") and i.get("link") is not None}
            values = [v for v in node["widgets_values"] if v is not None]
            assert len(values) + len(linked) == len(node["widgets_values"]), (path.name, node["type"])
