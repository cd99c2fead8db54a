"""A Python live client: what ``js/live_input.js`` does in the browser, for tests, benches and scripts.

async with LiveClient("http://127.0.0.1:8188") as cl:
    await cl.open("cam")
    await cl.send_frame(jpeg_bytes)
    prompt_id = await cl.queue(workflow)
    frame = await cl.next_frame(timeout=30)   # the pushed "turbostream.live.frame" message
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aiohttp

from .client import LIVE_CAPTURED_HEADER as CAPTURED_HEADER
from .client import LIVE_FRAME_EVENT
from .client import LIVE_TOKEN_HEADER as TOKEN_HEADER

DONE_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class LiveClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class LiveClient:
    """One websocket client id with (at most) one live source; collects pushed frames and prompt ends."""

    def __init__(self, base: str, client_id: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.stream_id: str | None = None
        self.token: str | None = None
        self.frames: asyncio.Queue[dict] = asyncio.Queue()
        self.finished: dict[str, str] = {}  # prompt_id -> "execution_success" / "_error" / "_interrupted"
        self.errors: dict[str, dict] = {}
        self._events: dict[str, asyncio.Event] = {}
        self.executing: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # (prompt_id, node id) as nodes start
        self.timeline: dict[str, dict[str, float]] | None = None
        """Set to {} to record when each prompt's messages arrived (perf_counter s): "start", "node <id>",
        "done" (its end), "frame" (a frame pushed while it ran); for benches."""
        self._running: str | None = None
        self.in_flight: set[str] = set()
        """Prompts this client queued that have not ended yet."""

    async def __aenter__(self) -> LiveClient:
        self.session = aiohttp.ClientSession()
        ws_url = self.base.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self.ws = await self.session.ws_connect(ws_url, heartbeat=30)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._reader.cancel()
        await self.ws.close()
        await self.session.close()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            kind, data = event.get("type"), event.get("data") or {}
            if self.timeline is not None:
                self._record(kind, data)
            if kind == LIVE_FRAME_EVENT:
                data["received_ms"] = time.time() * 1000
                self.frames.put_nowait(data)
            elif kind == "executing" and data.get("node") is not None:
                self.executing.put_nowait((data.get("prompt_id"), str(data["node"])))
            elif kind in DONE_EVENTS and data.get("prompt_id"):
                self.finished[data["prompt_id"]] = kind
                self.in_flight.discard(data["prompt_id"])
                if kind != "execution_success":
                    self.errors[data["prompt_id"]] = data  # node_id / node_type say where it stopped
                self._events.setdefault(data["prompt_id"], asyncio.Event()).set()

    def _record(self, kind: str, data: dict) -> None:
        now, prompt_id = time.perf_counter(), data.get("prompt_id")
        if kind == "execution_start" and prompt_id:
            self._running = prompt_id
            self.timeline.setdefault(prompt_id, {})["start"] = now
        elif kind == "executing" and prompt_id and data.get("node") is not None:
            self.timeline.setdefault(prompt_id, {}).setdefault(f"node {data['node']}", now)
        elif kind in DONE_EVENTS and prompt_id:
            self.timeline.setdefault(prompt_id, {})["done"] = now
        elif kind == LIVE_FRAME_EVENT and self._running:
            self.timeline.setdefault(self._running, {}).setdefault("frame", now)

    async def _json(self, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        body = await resp.json(content_type=None)
        if resp.status != 200:
            raise LiveClientError(resp.status, (body or {}).get("error", str(body)))
        return body

    async def open(self, stream_id: str, frames_per_prompt: int = 1) -> dict[str, Any]:
        """Claim ``stream_id``; send ``frames_per_prompt`` frames before each prompt when Live Input's
        ``frames_per_prompt`` says so (the source then keeps enough frames for it)."""
        body = {"client_id": self.client_id, "frames_per_prompt": frames_per_prompt}
        async with self.session.post(f"{self.base}/turbostream/live/{stream_id}/open", json=body) as resp:
            body = await self._json(resp)
        self.stream_id, self.token = stream_id, body["token"]
        return body

    async def send_frame(self, data: bytes, content_type: str = "image/jpeg", captured_ms: float | None = None) -> dict:
        headers = {"Content-Type": content_type, TOKEN_HEADER: self.token or ""}
        headers[CAPTURED_HEADER] = str(time.time() * 1000 if captured_ms is None else captured_ms)
        async with self.session.post(
            f"{self.base}/turbostream/live/{self.stream_id}/frame", data=data, headers=headers
        ) as resp:
            return await self._json(resp)

    async def close(self) -> None:
        async with self.session.post(
            f"{self.base}/turbostream/live/{self.stream_id}/close", headers={TOKEN_HEADER: self.token or ""}
        ) as resp:
            await self._json(resp)
        self.token = None

    async def queue(self, workflow: dict[str, Any]) -> str:
        async with self.session.post(
            f"{self.base}/prompt", json={"prompt": workflow, "client_id": self.client_id}
        ) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise LiveClientError(resp.status, json.dumps(body)[:2000])
        self._events.setdefault(body["prompt_id"], asyncio.Event())
        if body["prompt_id"] not in self.finished:
            self.in_flight.add(body["prompt_id"])
        return body["prompt_id"]

    async def wait_for_slot(self, limit: int, poll_s: float = 0.0002) -> None:
        """Until fewer than ``limit`` of this client's prompts are in flight (queued or running)."""
        while len(self.in_flight) >= limit:
            await asyncio.sleep(poll_s)

    async def send_frames(self, frames: list[bytes], content_type: str = "image/jpeg") -> None:
        """Upload ``frames`` in order: one prompt's group when Live Input's frames_per_prompt is ``len(frames)``."""
        for data in frames:
            await self.send_frame(data, content_type=content_type)

    async def wait(self, prompt_id: str, timeout: float = 120) -> str:
        """How the prompt ended (``execution_success``...); raises TimeoutError."""
        await asyncio.wait_for(self._events.setdefault(prompt_id, asyncio.Event()).wait(), timeout)
        return self.finished[prompt_id]

    async def wait_for_node(self, prompt_id: str, node_id: str, timeout: float = 120) -> None:
        """Until the host starts executing ``node_id`` of ``prompt_id`` (its "executing" message)."""
        deadline = time.monotonic() + timeout
        while True:
            pid, node = await asyncio.wait_for(self.executing.get(), max(0.0, deadline - time.monotonic()))
            if (pid, node) == (prompt_id, node_id):
                return

    async def interrupt(self) -> None:
        async with self.session.post(f"{self.base}/interrupt") as resp:
            resp.raise_for_status()

    async def next_frame(self, timeout: float = 60) -> dict[str, Any]:
        return await asyncio.wait_for(self.frames.get(), timeout)
