"""Live nodes and routes: frames from the browser in, stream output frames back to the owning client.

``TurboStreamLiveInput`` takes the newest frame a client uploaded for its ``stream_id``;
``TurboStreamLiveOutput`` pushes output frames over the websocket to that client only. The
front-end half is ``js/live_input.js`` (capture, upload, queue with a bounded number in flight),
``js/live_channel.js`` (the websocket client id the browser's live prompts run under, so the tab is
spared their execution events) and ``js/live_output.js`` (the live view). Rules and limits:
``turbostream/live.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..turbostream import live as core
from ..turbostream.client import LIVE_CAPTURED_HEADER as CAPTURED_HEADER
from ..turbostream.client import LIVE_TOKEN_HEADER as TOKEN_HEADER
from ._common import NodeInputError, advanced, check_numbers, check_stream_id, number_problem, optional, schema

logger = logging.getLogger("turbostream")

SOURCES = core.LiveSources.from_env()
"""Live sources by stream id, shared by the routes and the nodes (outlives prompts)."""

PLACEHOLDER_GRAY = 0.5
OPEN_BODY_LIMIT = 4096
VIEW_WAIT_S = 10.0
"""A view's request for the next frame waits this long before answering 204 (it then asks again)."""
VIEW_POLL_S = 0.02


def _prompt_server():
    """The running host's PromptServer, or None (the pack imported in-process by tests and tools)."""
    server_module = sys.modules.get("server")
    return getattr(getattr(server_module, "PromptServer", None), "instance", None)


def _stream_id_problem(node: str, stream_id: str | None) -> str | None:
    """The validate_inputs message for a bad widget value (None: linked, checked at execution)."""
    if stream_id is None:
        return None
    try:
        core.validate_stream_id(stream_id)
    except ValueError as exc:
        return f"{node}: stream_id: {exc}"
    return None


def _prefix_problem(prefix: str | None) -> str | None:
    """Why ``prefix`` cannot name images in the output folder (the host refuses to save outside it)."""
    if prefix is None:
        return None
    if "\x00" in prefix:
        return f"{prefix!r} contains a NUL character, which no file name can hold"
    output_dir = os.path.abspath(folder_paths.get_output_directory())
    target = os.path.abspath(os.path.join(output_dir, os.path.normpath(prefix)))
    if os.path.commonpath((output_dir, target)) != output_dir:
        return (
            f"{prefix!r} leaves the output folder; use a name inside it, with subfolders if you like "
            "(e.g. turbostream/live)"
        )
    return None


class TurboStreamLiveInput(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamLiveInput",
            display_name="Live Input (webcam / video)",
            category="TurboStream/live",
            description=(
                "The newest frame a browser (or any client) sent for stream_id, scaled and centre-cropped "
                "to width x height. Press Start on the node to stream your webcam or a video file: each "
                "frame is uploaded and the workflow queued (once per frames_per_prompt frames), with at "
                "most max_in_flight prompts queued. "
                "Before any frame arrives it outputs the fallback image (or mid-gray) and logs why."
            ),
            inputs=[
                io.String.Input(
                    "stream_id",
                    default="webcam",
                    tooltip="Which live source (letters, digits, _ . -). Wire the stream_id output to the "
                    "Live Img2Img and Live Output nodes so all three agree.",
                ),
                io.Int.Input("width", default=512, min=64, max=2048, step=8, tooltip="Frame width (multiple of 8)."),
                io.Int.Input("height", default=512, min=64, max=2048, step=8, tooltip="Frame height (multiple of 8)."),
                advanced(
                    io.Int.Input,
                    "fps",
                    default=10,
                    min=1,
                    max=60,
                    tooltip="Capture rate the browser aims for; frames beyond what the host keeps up with are dropped.",
                ),
                advanced(
                    io.Int.Input,
                    "max_in_flight",
                    default=2,
                    min=1,
                    max=8,
                    tooltip="Prompts the browser keeps queued at most; a new frame waits or is dropped.",
                ),
                advanced(
                    io.Int.Input,
                    "frames_per_prompt",
                    default=1,
                    min=1,
                    max=core.MAX_FRAMES_PER_PROMPT,
                    tooltip="Frames the browser sends per queued prompt; the image output is a batch of this many, "
                    "oldest first. Set Live Img2Img's frame_buffer_size to the same. More frames per prompt "
                    "spread the prompt's fixed cost (higher frame rate) but add up to frames_per_prompt - 1 "
                    "capture intervals of latency.",
                ),
                io.Image.Input("fallback", optional=True, tooltip="Shown until the first live frame arrives."),
            ],
            outputs=[
                io.Image.Output(
                    display_name="image",
                    tooltip="The newest frame (frames_per_prompt frames, oldest first), width x height (or the fallback).",
                ),
                io.String.Output(
                    display_name="stream_id",
                    tooltip="The stream's id as this tab owns it: wire it to Live Img2Img and Live Output.",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, stream_id, frames_per_prompt=1, **kwargs):
        # New frames make a new output; with no new frame the cached one is reused. A bad count is
        # refused by execute, with the input named (a fingerprint must not raise).
        count = frames_per_prompt if core.valid_frames_per_prompt(frames_per_prompt) else 1
        return f"{stream_id}:{SOURCES.group_seqs(stream_id, count)}"

    @classmethod
    def validate_inputs(cls, stream_id=None, width=None, height=None) -> bool | str:
        # no **kwargs: the host range-checks every input this does not name
        problem = _stream_id_problem("TurboStreamLiveInput", stream_id)
        if problem:
            return problem
        if problem := number_problem(cls, {"width": width, "height": height}):
            return "TurboStreamLiveInput: {}: {}".format(*problem)
        if width is not None and height is not None and (width % 8 or height % 8):
            return f"TurboStreamLiveInput: width/height: {width}x{height} must be multiples of 8"
        return True

    @classmethod
    def execute(
        cls, stream_id, width, height, fps=10, max_in_flight=2, frames_per_prompt=1, fallback=None
    ) -> io.NodeOutput:
        node = "TurboStreamLiveInput"
        check_stream_id(node, stream_id)
        check_numbers(
            cls, width=width, height=height, fps=fps, max_in_flight=max_in_flight, frames_per_prompt=frames_per_prompt
        )
        if width % 8 or height % 8:
            raise NodeInputError(node, "width", f"{width}x{height} must be multiples of 8 (the VAE's factor)")
        count = frames_per_prompt
        frames = SOURCES.take_group(stream_id, count)
        if frames:
            image = torch.stack([core.fit_frame(frame.image, width, height) for frame in frames])
        elif fallback is not None:
            logger.warning("%s: no live frames for stream %r yet; using the fallback image", node, stream_id)
            image = fallback[:count].permute(0, 3, 1, 2)
            image = torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear", antialias=True)
            image = image.permute(0, 2, 3, 1).clamp(0, 1)
            image = torch.cat([image, image[-1:].expand(count - image.shape[0], -1, -1, -1)])
        else:
            logger.warning(
                "%s: no live frames for stream %r yet; output is a gray placeholder. Press Start on the node "
                "(or POST frames to /turbostream/live/%s/frame).",
                node,
                stream_id,
                stream_id,
            )
            image = torch.full((count, height, width, 3), PLACEHOLDER_GRAY)
        return io.NodeOutput(image, stream_id)


class TurboStreamLiveOutput(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamLiveOutput",
            display_name="Live Output (view)",
            category="TurboStream/live",
            description=(
                "Pushes each frame to the browser that owns stream_id (only to it) and shows it on this node "
                "with fps and end-to-end latency. Nothing is written to disk unless save_every > 0."
            ),
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Image.Input("images", tooltip="The frames to show (and push) for this stream."),
                io.String.Input("stream_id", default="webcam", tooltip="The stream to push to."),
                optional(
                    io.Int.Input,
                    "save_every",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="Also save every Nth output frame to the output folder (0 = never).",
                ),
                advanced(
                    io.String.Input,
                    "filename_prefix",
                    default="turbostream/live",
                    tooltip="Where save_every writes frames, inside the output folder (subfolders allowed).",
                ),
                advanced(
                    io.Int.Input,
                    "quality",
                    default=85,
                    min=10,
                    max=100,
                    tooltip="JPEG quality of the view.",
                ),
            ],
            outputs=[],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # every prompt pushes a frame

    @classmethod
    def validate_inputs(cls, stream_id=None, filename_prefix=None) -> bool | str:
        # no **kwargs: the host range-checks every input this does not name
        if problem := _stream_id_problem("TurboStreamLiveOutput", stream_id):
            return problem
        if problem := _prefix_problem(filename_prefix):
            return f"TurboStreamLiveOutput: filename_prefix: {problem}"
        return True

    @classmethod
    def execute(cls, images, stream_id, save_every=0, filename_prefix="turbostream/live", quality=85) -> io.NodeOutput:
        node = "TurboStreamLiveOutput"
        check_stream_id(node, stream_id)
        check_numbers(cls, save_every=save_every, quality=quality)
        if problem := _prefix_problem(filename_prefix):
            raise NodeInputError(node, "filename_prefix", problem)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise NodeInputError(node, "images", f"expected an IMAGE batch (B, H, W, 3), got {tuple(images.shape)}")
        owner, taken, started = SOURCES.owner_and_current(stream_id, len(images))
        server = _prompt_server()
        if owner is None and server is not None:
            owner = getattr(server, "client_id", None)  # queued over the API without a live source
        jpegs = [core.encode_jpeg(image, quality) for image in images]
        if jpegs:
            SOURCES.set_output(stream_id, jpegs[-1])  # what read-only views (OBS) show
        if server is not None and owner:  # never broadcast: sid None would reach every client
            compute_ms = (time.monotonic() - started) * 1000 if taken else None
            # output frame i was made from input frame i when the batch sizes agree (Live Input's
            # frames_per_prompt = the stream's frame_buffer_size); else all from the newest one
            sources = taken if len(taken) == len(images) else [taken[-1] if taken else None] * len(images)
            for image, jpeg, frame in zip(images, jpegs, sources, strict=True):
                payload = {
                    "stream_id": stream_id,
                    "node": cls.hidden.unique_id,
                    "seq": frame.seq if frame is not None else None,
                    "captured_ms": frame.captured_ms if frame is not None else None,
                    "compute_ms": compute_ms,
                    "width": int(image.shape[1]),
                    "height": int(image.shape[0]),
                    "image": core.preview_url(jpeg),
                }
                server.send_sync(core.FRAME_EVENT, payload, owner)
        saved = None
        if save_every:
            count = _bump_output_count(stream_id)
            if count % save_every == 0:
                saved = ui.ImageSaveHelper.get_save_images_ui(images, filename_prefix, cls)
        return io.NodeOutput(ui=saved) if saved is not None else io.NodeOutput()


_OUTPUT_COUNTS: dict[str, int] = {}
_OUTPUT_COUNTS_MAX = 256


def _bump_output_count(stream_id: str) -> int:
    """1, 2, 3... per stream id (bounded: the table is cleared past 256 ids)."""
    if stream_id not in _OUTPUT_COUNTS and len(_OUTPUT_COUNTS) >= _OUTPUT_COUNTS_MAX:
        _OUTPUT_COUNTS.clear()
    _OUTPUT_COUNTS[stream_id] = _OUTPUT_COUNTS.get(stream_id, 0) + 1
    return _OUTPUT_COUNTS[stream_id]


# -- routes --------------------------------------------------------------------------------------------
async def _read_bounded(request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them all."""
    if request.content_length is not None and request.content_length > limit:
        raise core.LiveError(413, f"frame is {request.content_length} bytes; the limit is {limit}")
    chunks, size = [], 0
    while True:
        chunk = await request.content.read(64 << 10)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise core.LiveError(413, f"frame is over the limit of {limit} bytes")
        chunks.append(chunk)


_routes_registered = False


def register_routes() -> None:
    """``/turbostream/live/...``: open, frame, close, and a public list. Idempotent; no-op without a server."""
    global _routes_registered
    server = _prompt_server()
    if server is None or _routes_registered:
        return
    _routes_registered = True
    from aiohttp import web

    def error(exc: core.LiveError):
        return web.json_response({"error": exc.args[0]}, status=exc.status)

    def is_connected(client_id: str) -> bool:
        return client_id in server.sockets

    SOURCES.is_connected = is_connected

    @server.routes.post("/turbostream/live/{stream_id}/open")
    async def open_source(request):
        try:
            data = await _read_bounded(request, OPEN_BODY_LIMIT)
            try:
                body = json.loads(data)  # bytes: UTF-8/16/32 detected; the declared charset is ignored
            except ValueError:
                raise core.LiveError(400, 'send JSON {"client_id": "<websocket clientId>"}') from None
            client_id = body.get("client_id") if isinstance(body, dict) else None
            frames_per_prompt = body.get("frames_per_prompt", 1) if isinstance(body, dict) else 1
            stream_id = request.match_info["stream_id"]
            token = SOURCES.open(stream_id, client_id, is_connected, frames_per_prompt)
        except core.LiveError as exc:
            return error(exc)
        return web.json_response(
            {
                "stream_id": stream_id,
                "token": token,
                "view_token": SOURCES.view_token(stream_id, token),
                "view_url": f"/turbostream/live/{stream_id}/view?token={SOURCES.view_token(stream_id, token)}",
                "max_bytes": SOURCES.max_bytes,
                "max_pixels": SOURCES.max_pixels,
                "ring_size": core.ring_size(frames_per_prompt),
            }
        )

    @server.routes.post("/turbostream/live/{stream_id}/frame")
    async def post_frame(request):
        stream_id = request.match_info["stream_id"]
        token = request.headers.get(TOKEN_HEADER)
        try:
            SOURCES.authorize(stream_id, token)  # before the body is read
            core.check_content_type(request.content_type)
            data = await _read_bounded(request, SOURCES.max_bytes)
            image = core.decode_frame(data, request.content_type, SOURCES.max_bytes, SOURCES.max_pixels)
            result = SOURCES.push(stream_id, token, image, core.parse_captured_ms(request.headers.get(CAPTURED_HEADER)))
        except core.LiveError as exc:
            return error(exc)
        return web.json_response(result)

    @server.routes.post("/turbostream/live/{stream_id}/close")
    async def close_source(request):
        try:
            SOURCES.close(request.match_info["stream_id"], request.headers.get(TOKEN_HEADER))
        except core.LiveError as exc:
            return error(exc)
        return web.json_response({"closed": True})

    @server.routes.get("/turbostream/live/{stream_id}/view")
    async def view_page(request):
        """A full-window page showing only this stream's output frames (an OBS Browser Source)."""
        stream_id = request.match_info["stream_id"]
        try:
            SOURCES.read_output(stream_id, request.query.get("token"), after=1 << 62)  # 403 / 404 checks
        except core.LiveError as exc:
            return error(exc)
        return web.Response(text=core.view_html(stream_id), content_type="text/html")

    @server.routes.get("/turbostream/live/{stream_id}/latest")
    async def latest_output(request):
        """The newest output frame after ``after`` (JPEG), waiting up to ~10 s for one (204: none yet)."""
        stream_id = request.match_info["stream_id"]
        try:
            after = int(request.query.get("after", "-1"))
        except ValueError:
            return web.json_response({"error": "after must be an integer"}, status=400)
        deadline = time.monotonic() + VIEW_WAIT_S
        while True:
            try:
                found = SOURCES.read_output(stream_id, request.query.get("token"), after)
            except core.LiveError as exc:
                return error(exc)
            if found is not None:
                seq, jpeg = found
                headers = {
                    "X-TurboStream-Seq": str(seq),
                    "X-TurboStream-Stream": stream_id,
                    "Cache-Control": "no-store",
                }
                return web.Response(body=jpeg, content_type="image/jpeg", headers=headers)
            if time.monotonic() > deadline:
                return web.Response(status=204, headers={"Cache-Control": "no-store"})
            await asyncio.sleep(VIEW_POLL_S)

    @server.routes.get("/turbostream/live")
    async def list_sources(request):
        SOURCES.sweep()
        return web.json_response({"sources": SOURCES.describe(), "max_sources": SOURCES.max_sources})


NODES = [TurboStreamLiveInput, TurboStreamLiveOutput]
