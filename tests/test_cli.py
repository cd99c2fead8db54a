"""The command-line tools: queueing over the API (happy and error paths) and model downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, load_json
from fake_hub import FakeHub
from PIL import Image

from turbostream import client, hub
from turbostream.server import free_port

SD_TURBO = REPO_ROOT / "workflows" / "api" / "sd_turbo_txt2img_native.json"  # node ids used below


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "turbostream", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def small(workflow: dict, size: int = 64) -> dict:
    workflow["4"]["inputs"].update(width=size, height=size)
    return workflow


# -- queue: happy paths ------------------------------------------------------------------------------
def test_queue_writes_images(host, tmp_path):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(small(load_json(SD_TURBO))))
    proc = run_cli(
        "queue",
        str(wf),
        "--server",
        host.address,
        "--out",
        str(tmp_path / "out"),
        "-q",
        "--set",
        "7.noise_seed=5",
        "--set",
        "Prompt.text=a red fox",
    )
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    assert len(paths) == 1 and Image.open(paths[0]).size == (64, 64)


def test_batch_spreads_over_servers_in_order(host, tmp_path):
    """Three seeds over two server addresses (the same host spelled twice): results in job order."""
    jobs = client.expand_jobs(small(load_json(SD_TURBO)), [("7", "noise_seed", "1,2,3")])
    assert [j["7"]["inputs"]["noise_seed"] for j in jobs] == [1, 2, 3]
    servers = [host.address, f"localhost:{host.port}"]
    results = client.run_jobs(jobs, servers, tmp_path, progress=False)
    assert [r.index for r in results] == [0, 1, 2]
    assert {r.server for r in results} == set(servers)
    assert all(len(r.images) == 1 and r.images[0].name.startswith(f"{r.index:05d}_") for r in results)


def test_folder_of_frames_is_uploaded_per_job(host, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, color in enumerate(["red", "green"]):
        Image.new("RGB", (64, 64), color).save(frames / f"frame{i}.png")
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tests/frames", "images": ["1", 0]}},
    }
    jobs = client.expand_jobs(wf, [("1", "image", str(frames))])
    results = client.run_jobs(jobs, [host.address], tmp_path / "out", progress=False)
    colors = [Image.open(r.images[0]).convert("RGB").getpixel((0, 0)) for r in results]
    assert colors == [(255, 0, 0), (0, 128, 0)]


def test_set_expansion_rules(tmp_path):
    wf = load_json(SD_TURBO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\na cat, sitting\n")
    jobs = client.expand_jobs(wf, [("7", "noise_seed", "3..4"), ("4", "batch_size", "2"), ("2", "text", f"@{prompts}")])
    assert [
        (j["7"]["inputs"]["noise_seed"], j["4"]["inputs"]["batch_size"], j["2"]["inputs"]["text"]) for j in jobs
    ] == [(3, 2, "a fox"), (4, 2, "a cat, sitting")]
    assert client.expand_jobs(wf, [("Prompt", "text", "x, y")])[0]["2"]["inputs"]["text"] == "x, y"
    with pytest.raises(client.ClientError, match="different lengths"):
        client.expand_jobs(wf, [("7", "noise_seed", "1..3"), ("2", "text", f"@{prompts}")])
    with pytest.raises(client.ClientError, match="expected an integer"):
        client.expand_jobs(wf, [("7", "noise_seed", "abc")])
    with pytest.raises(client.ClientError, match="no node with that id"):
        client.expand_jobs(wf, [("99", "seed", "1")])
    with pytest.raises(client.ClientError, match="2 nodes match"):
        client.expand_jobs(wf, [("CLIPTextEncode", "text", "x")])


# -- queue: error paths ------------------------------------------------------------------------------
def test_missing_workflow_file(tmp_path):
    proc = run_cli("queue", str(tmp_path / "nope.json"), "--server", "127.0.0.1:1")
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = run_cli("queue", str(bad), "--server", "127.0.0.1:1")
    assert proc.returncode == 1 and "not valid JSON" in proc.stderr


def test_ui_format_is_refused_with_a_hint():
    proc = run_cli("queue", str(REPO_ROOT / "example_workflows" / "sd_turbo_txt2img.json"), "--server", "127.0.0.1:1")
    assert proc.returncode == 1 and "UI-format workflow" in proc.stderr and "Export (API)" in proc.stderr


def test_bad_set_syntax():
    proc = run_cli("queue", str(SD_TURBO), "--set", "seed42")
    assert proc.returncode == 1 and "NODE.INPUT=VALUE" in proc.stderr


def test_server_down():
    port = free_port()
    proc = run_cli("queue", str(SD_TURBO), "--server", f"127.0.0.1:{port}", "-q", timeout=60)
    assert proc.returncode == 1
    assert f"cannot reach ComfyUI at 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_node_type(host, tmp_path):
    wf = load_json(SD_TURBO)
    wf["9"]["class_type"] = "NoSuchNodeAnywhere"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    proc = run_cli("queue", str(path), "--server", host.address, "-q", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "ComfyUI rejected the workflow" in proc.stderr and "NoSuchNodeAnywhere" in proc.stderr


def test_invalid_input_names_the_node(host, tmp_path):
    wf = load_json(SD_TURBO)
    wf["1"]["inputs"]["ckpt_name"] = "missing_model.safetensors"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    proc = run_cli("queue", str(path), "--server", host.address, "-q", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "node 1 (CheckpointLoaderSimple)" in proc.stderr and "missing_model.safetensors" in proc.stderr


def test_execution_error_is_reported(host, tmp_path):
    """A prompt that validates but fails while running: the node and the exception are named."""
    (host.input_dir / "corrupt.png").write_bytes(b"\x89PNG not really an image")
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "corrupt.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tests/corrupt", "images": ["1", 0]}},
    }
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    proc = run_cli("queue", str(path), "--server", host.address, "-q", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stdout
    assert "node 1 (LoadImage) failed" in proc.stderr and "Traceback" not in proc.stderr
    # the host keeps serving
    assert host.get_json("/system_stats")["system"]


# -- models download ---------------------------------------------------------------------------------
def test_download_resumes_after_a_dead_link(tmp_path):
    """A download killed halfway continues from its partial file (a Range request), then is placed."""
    import time

    payload = os.urandom(8 * 2**20)
    files = {
        "madebyollin/taesd/taesd_encoder.safetensors": payload,
        "madebyollin/taesd/taesd_decoder.safetensors": b"d" * 4096,
    }
    env = {"HF_HOME": str(tmp_path / "hf")}
    with FakeHub(files, stall=("madebyollin/taesd/taesd_encoder.safetensors",)) as fake:
        env["HF_ENDPOINT"] = fake.endpoint
        proc = subprocess.Popen(
            [sys.executable, "-m", "turbostream", "models", "download", "taesd", "--models-dir", str(tmp_path)],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        partial = []
        while time.monotonic() < deadline and not partial:
            partial = [p for p in (tmp_path / hub.STAGING_DIR).rglob("*.partial") if p.stat().st_size > 0]
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        assert partial, "no partial file appeared"
        done = partial[0].stat().st_size
        result = run_cli("models", "download", "taesd", "--models-dir", str(tmp_path), env=env)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "vae_approx" / "taesd_encoder.safetensors").read_bytes() == payload
    assert (tmp_path / "vae_approx" / "taesd_decoder.safetensors").read_bytes() == b"d" * 4096
    assert ("GET", "/madebyollin/taesd/resolve/main/taesd_encoder.safetensors", f"bytes={done}-") in fake.requests, (
        fake.requests
    )
    with FakeHub(files) as fake2:
        again = run_cli(
            "models", "download", "taesd", "--models-dir", str(tmp_path), env={**env, "HF_ENDPOINT": fake2.endpoint}
        )
        assert again.returncode == 0 and not [r for r in fake2.requests if "resolve" in r[1]], (
            "files already in place must not be fetched again"
        )


def test_download_renames_to_the_workflow_name(tmp_path):
    files = {"latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors": b"x" * 1000}
    with FakeHub(files) as fake:
        proc = run_cli(
            "models",
            "download",
            "lcm-lora-sdv1-5",
            "--models-dir",
            str(tmp_path),
            env={"HF_ENDPOINT": fake.endpoint, "HF_HOME": str(tmp_path / "hf")},
        )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "loras" / "lcm-lora-sdv1-5.safetensors").read_bytes() == b"x" * 1000


def test_download_offline_is_a_clear_error(tmp_path):
    proc = run_cli(
        "models",
        "download",
        "taesd",
        "--models-dir",
        str(tmp_path),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert proc.returncode == 1
    assert "offline" in proc.stderr and "Traceback" not in proc.stderr


def test_download_missing_file_on_hub(tmp_path):
    with FakeHub({}) as fake:
        proc = run_cli(
            "models",
            "download",
            "taesdxl",
            "--models-dir",
            str(tmp_path),
            env={"HF_ENDPOINT": fake.endpoint, "HF_HOME": str(tmp_path / "hf")},
        )
    assert proc.returncode == 1 and "download of madebyollin/taesdxl" in proc.stderr and "Traceback" not in proc.stderr


def test_download_unknown_name(tmp_path):
    proc = run_cli("models", "download", "sd-ultra", "--models-dir", str(tmp_path))
    assert proc.returncode == 1 and "unknown model name" in proc.stderr and "sd-turbo" in proc.stderr


def test_catalog_names_what_the_workflows_use():
    named = {f.name for e in hub.CATALOG.values() for f in e.files}
    for path in (REPO_ROOT / "workflows" / "api").glob("*.json"):
        for node in load_json(path).values():
            for key in ("ckpt_name", "lora_name", "control_net_name"):
                if key in node["inputs"]:
                    assert node["inputs"][key] in named, (path.name, node["inputs"][key])
