"""A small ComfyUI HTTP API client: queue API-format workflows, follow them, fetch their images.

One job is one prompt: connect the websocket (``/ws?clientId=``) first so no message is missed,
``POST /prompt``, follow ``progress`` / ``executing`` / ``execution_error`` messages until the prompt
finishes, then read ``/history/<id>`` and download every output image through ``/view``.
With several servers, one worker per server takes jobs from a shared queue, so a batch spreads
over the hosts; results come back in job order.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .errors import UserError

logger = logging.getLogger("turbostream")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CONNECT_TIMEOUT_S = 10.0
LIVE_FRAME_EVENT = "turbostream.live.frame"
"""Websocket event of an output frame that TurboStreamLiveOutput pushes to its owning client."""
LIVE_TOKEN_HEADER = "X-TurboStream-Token"
"""Header carrying the token a live source's ``open`` returned (frames and ``close`` need it)."""
LIVE_CAPTURED_HEADER = "X-TurboStream-Captured"
"""Optional header: the sender's capture time of a frame in ms (for end-to-end latency)."""


class ClientError(UserError):
    """A failure talking to ComfyUI, with a message meant for the user."""


class ExecutionFailed(ClientError):
    """The host accepted the prompt but a node raised while executing it."""

    def __init__(self, message: str, node_id: str | None = None, node_type: str | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.node_type = node_type


# -- workflows and batches -------------------------------------------------------------------------
def load_workflow(path: str | Path) -> dict[str, Any]:
    """Read an API-format workflow; a clear error for missing files, bad JSON and UI-format files."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClientError(f"workflow file {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(f"workflow file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ClientError(
            f"{path} is a UI-format workflow (for drag-and-drop). Queue the API format instead: "
            "workflows/api/*.json, or in ComfyUI use Workflow > Export (API)."
        )
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a saved /prompt request body
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(v, dict) and "class_type" in v for v in data.values())
    ):
        raise ClientError(
            f"{path} is not an API-format workflow: expected an object of "
            '{"<node id>": {"class_type": ..., "inputs": {...}}}'
        )
    return data


def _resolve_node(workflow: dict[str, Any], ref: str) -> str:
    if ref in workflow:
        return ref
    matches = [
        nid
        for nid, node in workflow.items()
        if node.get("_meta", {}).get("title") == ref or node.get("class_type") == ref
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ClientError(f"--set {ref}: {len(matches)} nodes match ({', '.join(matches)}); use a node id")
    raise ClientError(
        f"--set {ref}: no node with that id, title or class in the workflow "
        f"(ids: {', '.join(sorted(workflow, key=lambda k: (len(k), k)))})"
    )


def _scalar(text: str, like: Any) -> Any:
    if isinstance(like, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ClientError(f"expected true/false, got {text!r}")
    if isinstance(like, int):
        try:
            return int(text)
        except ValueError:
            raise ClientError(f"expected an integer, got {text!r}") from None
    if isinstance(like, float):
        try:
            return float(text)
        except ValueError:
            raise ClientError(f"expected a number, got {text!r}") from None
    if isinstance(like, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _values(text: str, like: Any) -> list[Any]:
    """Expand one ``--set`` value: a folder of images, ``@file`` lines, ``A..B`` ints, numeric lists."""
    path = Path(text)
    if text and path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ClientError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if text.startswith("@"):
        try:
            lines = [ln.strip() for ln in Path(text[1:]).read_text().splitlines()]
        except OSError as exc:
            raise ClientError(f"cannot read {text[1:]}: {exc.strerror}") from None
        return [_scalar(ln, like) for ln in lines if ln]
    if ".." in text:
        start, _, end = text.partition("..")
        if start.lstrip("-").isdigit() and end.lstrip("-").isdigit():
            a, b = int(start), int(end)
            return list(range(a, b + 1) if a <= b else range(a, b - 1, -1))
    parts = text.split(",")
    if len(parts) > 1 and not isinstance(like, str):
        return [_scalar(p.strip(), like) for p in parts]
    return [_scalar(text, like)]


def expand_jobs(workflow: dict[str, Any], sets: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """One workflow per job: ``--set`` values with several entries are zipped; single ones broadcast."""
    columns = []
    for ref, name, text in sets:
        node_id = _resolve_node(workflow, ref)
        like = workflow[node_id].get("inputs", {}).get(name)
        try:
            columns.append((node_id, name, _values(text, like)))
        except ClientError as exc:
            raise ClientError(f"--set {ref}.{name}: {exc}") from None
    lengths = {len(v) for _, _, v in columns if len(v) > 1}
    if len(lengths) > 1:
        raise ClientError(
            f"--set values expand to different lengths {sorted(lengths)}; "
            "multi-valued --set options are zipped and must have the same length"
        )
    count = lengths.pop() if lengths else 1
    jobs = []
    for i in range(count):
        wf = copy.deepcopy(workflow)
        for node_id, name, values in columns:
            wf[node_id].setdefault("inputs", {})[name] = values[i if len(values) > 1 else 0]
        jobs.append(wf)
    return jobs


# -- error formatting ------------------------------------------------------------------------------
def format_prompt_error(body: Any, workflow: dict[str, Any]) -> str:
    """Turn a rejected ``/prompt`` answer (``error`` + ``node_errors``) into readable lines."""
    if not isinstance(body, dict):
        return f"ComfyUI rejected the workflow: {body}"
    err = body.get("error") or {}
    msg = err.get("message", "invalid prompt") if isinstance(err, dict) else str(err)
    details = err.get("details") if isinstance(err, dict) else None
    extra = err.get("extra_info") if isinstance(err, dict) else None
    class_type = extra.get("class_type") if isinstance(extra, dict) else None
    if class_type and class_type not in msg:  # newer hosts name the node's title; say which class is missing
        details = f"{details}, class type {class_type}" if details else f"class type {class_type}"
    lines = [f"ComfyUI rejected the workflow: {msg}" + (f" ({details})" if details else "")]
    for node_id, info in sorted((body.get("node_errors") or {}).items()):
        class_type = info.get("class_type") or workflow.get(node_id, {}).get("class_type", "?")
        for e in info.get("errors", []):
            detail = e.get("details") or ""
            lines.append(f"  node {node_id} ({class_type}): {e.get('message', '')}" + (f": {detail}" if detail else ""))
    return "\n".join(lines)


def format_execution_error(data: dict[str, Any]) -> str:
    return (
        f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
        f"{data.get('exception_type', 'Exception')}: {str(data.get('exception_message', '')).strip()}"
    )


# -- running jobs ----------------------------------------------------------------------------------
@dataclass
class JobResult:
    index: int
    server: str
    prompt_id: str
    images: list[Path] = field(default_factory=list)
    seconds: float = 0.0


class Progress:
    """A tqdm bar over all jobs, showing the current node's step progress; silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="job", dynamic_ncols=True)

    def step(self, server: str, value: int, maximum: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{server} step {value}/{maximum}")

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _base(server: str) -> str:
    return server if server.startswith(("http://", "https://")) else f"http://{server}"


async def _upload(session: aiohttp.ClientSession, base: str, path: Path) -> str:
    form = aiohttp.FormData()
    form.add_field("image", path.read_bytes(), filename=path.name)
    form.add_field("overwrite", "true")
    async with session.post(f"{base}/upload/image", data=form) as resp:
        if resp.status != 200:
            raise ClientError(f"uploading {path} to {base} failed: HTTP {resp.status} {await resp.text()}")
        info = await resp.json()
    return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]


async def run_job(
    session: aiohttp.ClientSession,
    server: str,
    index: int,
    workflow: dict[str, Any],
    out_dir: Path,
    timeout: float,
    progress: Progress,
) -> JobResult:
    base = _base(server)
    workflow = copy.deepcopy(workflow)
    for node in workflow.values():
        for name, value in list(node.get("inputs", {}).items()):
            if isinstance(value, Path):
                node["inputs"][name] = await _upload(session, base, value)
    client_id = uuid.uuid4().hex
    started = time.perf_counter()
    ws_url = base.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    live_frames: list[dict] = []
    async with session.ws_connect(ws_url, heartbeat=30) as ws:
        async with session.post(f"{base}/prompt", json={"prompt": workflow, "client_id": client_id}) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise ClientError(format_prompt_error(body, workflow))
        prompt_id = body["prompt_id"]
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(
                    f"job {index} on {server} did not finish within {timeout:.0f} s "
                    f"(prompt {prompt_id} is still queued or running there)"
                )
            try:
                msg = await ws.receive(timeout=remaining)
            except asyncio.TimeoutError:
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                raise ClientError(f"lost the connection to {server} while job {index} was running")
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue  # binary preview images
            event = json.loads(msg.data)
            data = event.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            kind = event.get("type")
            if kind == LIVE_FRAME_EVENT:  # pushed to this client only (TurboStreamLiveOutput)
                live_frames.append(data)
            elif kind == "progress":
                progress.step(server, data.get("value", 0), data.get("max", 0))
            elif kind == "execution_error":
                raise ExecutionFailed(
                    f"job {index} on {server}: {format_execution_error(data)}",
                    node_id=data.get("node_id"),
                    node_type=data.get("node_type"),
                )
            elif kind == "execution_interrupted":
                raise ClientError(f"job {index} on {server} was interrupted")
            elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
    async with session.get(f"{base}/history/{prompt_id}") as resp:
        history = (await resp.json()).get(prompt_id, {})
    result = JobResult(index, server, prompt_id, seconds=time.perf_counter() - started)
    out_dir.mkdir(parents=True, exist_ok=True)
    for node_id, output in sorted(history.get("outputs", {}).items()):
        for image in output.get("images", []):
            if image.get("type") != "output":
                continue
            params = {k: image.get(k, "") for k in ("filename", "subfolder", "type")}
            async with session.get(f"{base}/view", params=params) as resp:
                if resp.status != 200:
                    raise ClientError(f"downloading {params['filename']} from {server} failed: HTTP {resp.status}")
                dest = out_dir / f"{index:05d}_{node_id}_{Path(params['filename']).name}"
                dest.write_bytes(await resp.read())
                result.images.append(dest)
    for i, frame in enumerate(live_frames):
        header, _, payload = str(frame.get("image", "")).partition(",")
        if header == "data:image/jpeg;base64":
            dest = out_dir / f"{index:05d}_live_{frame.get('stream_id', 'stream')}_{i:04d}.jpg"
            dest.write_bytes(base64.b64decode(payload))
            result.images.append(dest)
    progress.done()
    return result


async def _run_all(
    jobs: list[dict[str, Any]], servers: list[str], out_dir: Path, timeout: float, progress: Progress
) -> list[JobResult]:
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(jobs):
        queue.put_nowait(item)
    results: list[JobResult | None] = [None] * len(jobs)

    async def worker(session: aiohttp.ClientSession, server: str) -> None:
        while not queue.empty():
            index, wf = queue.get_nowait()
            results[index] = await run_job(session, server, index, wf, out_dir, timeout, progress)

    conn_timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=conn_timeout) as session:
        try:
            await asyncio.gather(*(worker(session, s) for s in servers))
        except aiohttp.ClientConnectorError as exc:
            raise ClientError(
                f"cannot reach ComfyUI at {exc.host}:{exc.port} ({exc.os_error.strerror or exc}). "
                "Start it (python -m turbostream serve, or ComfyUI's main.py) or fix --server."
            ) from None
        except aiohttp.ClientError as exc:
            raise ClientError(f"HTTP error talking to ComfyUI: {exc}") from None
    return [r for r in results if r is not None]


def run_jobs(
    jobs: list[dict[str, Any]], servers: list[str], out_dir: Path, timeout: float = 600.0, progress: bool = True
) -> list[JobResult]:
    """Run every job (spread over ``servers``) and return their results in job order."""
    bar = Progress(len(jobs), progress)
    try:
        return asyncio.run(_run_all(jobs, list(dict.fromkeys(servers)), out_dir, timeout, bar))
    finally:
        bar.close()
