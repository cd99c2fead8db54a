"""``make demo``: a headless host with the pack, every bundled API workflow queued over HTTP.

Models: each catalog file (``turbostream.hub.CATALOG``) is the real download when it is in the
host's ``models/`` folder, else the tiny random-weight stand-in with the same layout (the images
are then noise, but every node really runs). Writes the images, ``timings.md`` and
``timings.json`` to the output folder. Each workflow runs twice: cold (models load) and warm.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from . import client
from .host import ensure_host, host_dir
from .server import HeadlessHost, demo_model_links, has_cuda

logger = logging.getLogger("turbostream")


def missing_models(workflow: dict[str, Any], object_info: dict[str, Any]) -> list[str]:
    """Combo values (model files, tiny VAEs...) a workflow names that this host does not offer."""
    missing = []
    for node in workflow.values():
        info = object_info.get(node["class_type"], {}).get("input", {})
        specs = {**info.get("required", {}), **info.get("optional", {})}
        for name, value in node.get("inputs", {}).items():
            spec = specs.get(name)
            if not spec or not isinstance(value, str):
                continue
            options = (
                spec[0] if isinstance(spec[0], list) else (spec[1] or {}).get("options") if len(spec) > 1 else None
            )
            if isinstance(options, list) and value not in options:
                missing.append(f"{node['class_type']}.{name}={value}")
    return missing


def _bump_seeds(workflow: dict[str, Any]) -> dict[str, Any]:
    wf = json.loads(json.dumps(workflow))
    for node in wf.values():
        for key in ("seed", "noise_seed"):
            if isinstance(node.get("inputs", {}).get(key), int):
                node["inputs"][key] += 1
    return wf


def run(out_dir: Path, workflows_dir: Path) -> int:
    from .cli import TINY_MODELS_DIR

    out_dir.mkdir(parents=True, exist_ok=True)
    real_models = host_dir() / "models"
    links = demo_model_links(TINY_MODELS_DIR, real_models)
    rows = []
    with HeadlessHost(ensure_host(), model_links=links) as server:
        object_info = server.get_json("/object_info", timeout=120)
        for path in sorted(workflows_dir.glob("*.json")):
            workflow = client.load_workflow(path)
            missing = missing_models(workflow, object_info)
            if missing:
                logger.warning("skipping %s: missing %s", path.name, ", ".join(missing))
                rows.append({"workflow": path.name, "status": "skipped: missing " + ", ".join(missing)})
                continue
            row: dict[str, Any] = {"workflow": path.name, "status": "ok", "images": []}
            for label, wf in (("cold_s", workflow), ("warm_s", _bump_seeds(workflow))):
                t0 = time.perf_counter()
                try:
                    [result] = client.run_jobs([wf], [server.address], out_dir / path.stem, progress=False)
                except client.ClientError as exc:
                    row["status"] = f"failed: {exc}"
                    break
                row[label] = round(time.perf_counter() - t0, 3)
                row["images"] += [str(p) for p in result.images]
            rows.append(row)
            logger.info("%s: %s", path.name, row["status"])
    machine = f"{platform.machine()}, {'CUDA GPU' if has_cuda() else 'CPU only'}, {os.cpu_count()} cores"
    summary = {"machine": machine, "python": platform.python_version(), "models": str(TINY_MODELS_DIR), "runs": rows}
    (out_dir / "timings.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# TurboStream demo ({machine})",
        "",
        "| workflow | status | cold (s) | warm (s) | images |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workflow']} | {r['status']} | {r.get('cold_s', '')} | {r.get('warm_s', '')} | "
            f"{len(r.get('images', []))} |"
        )
    (out_dir / "timings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nimages and timings in {out_dir}/")
    return 0 if all(not r["status"].startswith("failed") for r in rows) else 1
