"""Live sources: frames uploaded by a browser (or any client) for a stream id, held in memory.

Pure Python + Pillow + torch; the aiohttp routes in ``nodes/live.py`` are a thin layer over
:func:`handle_open`, :func:`handle_frame` and :func:`handle_close`, which return ``(status, body)``
so every rule here is tested without a host.

Rules:

* A stream id (:func:`turbostream.registry.validate_stream_id`) is owned by one websocket client
  id. ``open`` returns a random token; every frame and the ``close`` must carry it, so a frame for
  someone else's stream is refused (403) and output frames are pushed to the owner only.
* ``open`` also returns a separate read-only *view token*: with it, anyone (an OBS "Browser Source", a
  second screen) may read that stream's newest output frame, and nothing else; it cannot upload or
  close. Closing the stream ends the view (404).
* Frames are bounded before decoding: body bytes (``TURBOSTREAM_LIVE_MAX_BYTES``, 8 MiB), image
  content types only (JPEG, PNG, WebP), and pixels read from the header before any decode
  (``TURBOSTREAM_LIVE_MAX_PIXELS``, 2048x2048; a decompression bomb never gets decoded).
* Each source keeps the newest ``RING_SIZE`` frames (uint8, never written to disk), or
  ``2 * frames_per_prompt`` when a client sends several frames per prompt; older frames are dropped
  and counted.
* A prompt takes a *group* of ``frames_per_prompt`` frames (:meth:`LiveSources.take_group`): frame
  ``seq`` belongs to group ``seq // frames_per_prompt``, and the prompt takes the newest complete
  group, so a client that uploads a group and then queues its prompt gets exactly its own frames, in
  order, even with the next group's upload under way. With 1 frame per prompt that is the newest
  frame. Until a whole group has arrived the newest frames are taken, the oldest repeated to fill it.
* Idle sources expire after ``TURBOSTREAM_STREAM_IDLE_S`` seconds once their owner's websocket is
  gone (a connected tab waiting on slow prompts keeps its source), and at most
  ``TURBOSTREAM_LIVE_MAX_SOURCES`` exist at once (a new one beyond that is refused with 429, never by
  evicting a stream that is still in use).
"""

from __future__ import annotations

import base64
import hmac
import io
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .client import LIVE_FRAME_EVENT as FRAME_EVENT  # noqa: F401 - the nodes send it
from .registry import DEFAULT_IDLE_SECONDS, validate_stream_id

logger = logging.getLogger("turbostream")

RING_SIZE = 4
MAX_FRAMES_PER_PROMPT = 8
DEFAULT_MAX_BYTES = 8 << 20
DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_MAX_SOURCES = 16
CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class LiveError(Exception):
    """A refused request: ``status`` is the HTTP status, the message says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Frame:
    """One received frame: ``image`` is ``(H, W, 3)`` uint8; ``captured_ms`` is the sender's clock."""

    seq: int
    image: torch.Tensor
    captured_ms: float | None
    received: float


@dataclass
class LiveSource:
    stream_id: str
    owner: str
    token: str
    frames: deque = field(default_factory=lambda: deque(maxlen=RING_SIZE))
    next_seq: int = 0
    received: int = 0
    dropped: int = 0
    sent: int = 0
    last_used: float = 0.0
    current: list[Frame] = field(default_factory=list)
    """The frames the running prompt took, oldest first (set by the LiveInput node, read by LiveOutput)."""
    current_started: float = 0.0
    view_token: str = ""
    """Read-only: lets a view read the output frames (never upload or close)."""
    output: tuple[int, bytes] | None = None
    """The newest output frame as (sequence number, JPEG bytes), for views."""


def check_content_type(content_type: str | None) -> str:
    """The Pillow format for an accepted content type; :class:`LiveError` 415 otherwise."""
    kind = CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower())
    if kind is None:
        raise LiveError(415, f"content type {content_type!r} is not accepted: send image/jpeg, image/png or image/webp")
    return kind


def decode_frame(data: bytes, content_type: str, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Check and decode one uploaded image to ``(H, W, 3)`` uint8.

    Raises :class:`LiveError` 413 for too many bytes or pixels, 415 for a content type that is not
    JPEG/PNG/WebP, 400 for bytes that are not a complete image of the declared type.
    """
    from PIL import Image, UnidentifiedImageError

    kind = check_content_type(content_type)
    if len(data) > max_bytes:
        raise LiveError(413, f"frame is {len(data)} bytes; the limit is {max_bytes} (lower the capture resolution)")
    if not data:
        raise LiveError(400, "empty body: send the encoded frame as the request body")
    try:
        # open() reads only the header, so the size check below happens before any pixel is decoded.
        with Image.open(io.BytesIO(data), formats=[kind]) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise LiveError(413, f"frame is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
            im.load()
            rgb = im.convert("RGB")
    except LiveError:
        raise
    except Image.DecompressionBombError as exc:
        raise LiveError(413, f"frame refused as a decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise LiveError(400, f"body is not a valid {kind} image ({type(exc).__name__}: {exc})") from None
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(height, width, 3)


def encode_jpeg(image: torch.Tensor, quality: int = 85) -> bytes:
    """``(H, W, 3)`` float image in 0..1 → JPEG bytes."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def preview_url(jpeg: bytes) -> str:
    """JPEG bytes → a ``data:image/jpeg;base64,...`` URL."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def encode_preview(image: torch.Tensor, quality: int = 85) -> str:
    """``(H, W, 3)`` float image in 0..1 → a ``data:image/jpeg;base64,...`` URL."""
    return preview_url(encode_jpeg(image, quality))


def fit_frame(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(height, width, 3)`` float 0..1: scaled to cover, centre-cropped."""
    x = image.permute(2, 0, 1)[None].float() / 255.0
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - height) // 2, (nw - width) // 2
        x = x[..., top : top + height, left : left + width]
    return x[0].permute(1, 2, 0).clamp(0, 1).contiguous()


class LiveSources:
    """The live sources of one server, thread-safe (routes run on the event loop, nodes on the worker)."""

    def __init__(
        self,
        max_sources: int = DEFAULT_MAX_SOURCES,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sources = max_sources
        self.idle_seconds = idle_seconds
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.clock = clock
        self.is_connected: Callable[[str], bool] = lambda client_id: False
        """Whether a websocket client id is connected; the routes set it to the server's sockets."""
        self._sources: dict[str, LiveSource] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> LiveSources:
        env = os.environ.get
        return cls(
            max_sources=int(env("TURBOSTREAM_LIVE_MAX_SOURCES", DEFAULT_MAX_SOURCES)),
            idle_seconds=float(env("TURBOSTREAM_STREAM_IDLE_S", DEFAULT_IDLE_SECONDS)),
            max_bytes=int(env("TURBOSTREAM_LIVE_MAX_BYTES", DEFAULT_MAX_BYTES)),
            max_pixels=int(env("TURBOSTREAM_LIVE_MAX_PIXELS", DEFAULT_MAX_PIXELS)),
        )

    def sweep(self) -> list[str]:
        """Drop sources idle longer than ``idle_seconds`` whose owner is no longer connected."""
        now = self.clock()
        with self._lock:
            idle = [
                k
                for k, s in self._sources.items()
                if now - s.last_used > self.idle_seconds and not self.is_connected(s.owner)
            ]
            for k in idle:
                del self._sources[k]
        for k in idle:
            logger.info("live source %s expired after %.0f s idle", k, self.idle_seconds)
        return idle

    def open(
        self,
        stream_id: str,
        client_id: str,
        is_connected: Callable[[str], bool] | None = None,
        frames_per_prompt: int = 1,
    ) -> str:
        """Claim ``stream_id`` for ``client_id``; returns the token that frames must carry.

        ``frames_per_prompt`` (1..``MAX_FRAMES_PER_PROMPT``) sizes the ring for a client that sends
        that many frames per prompt (two groups: the one a prompt takes and the next one arriving).

        The same client may re-open (a reloaded tab gets a new token). Another client gets 409 while
        the owner's websocket is connected; a source whose owner is gone is handed over.
        """
        _check_stream_id(stream_id)
        is_connected = is_connected or (lambda _: True)
        if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.match(client_id):
            raise LiveError(400, "client_id must be the websocket clientId (1-64 letters, digits, '_' or '-')")
        _check_frames_per_prompt(frames_per_prompt)
        if not is_connected(client_id):
            raise LiveError(400, f"client {client_id!r} has no open websocket: connect /ws?clientId=... first")
        self.sweep()
        with self._lock:
            src = self._sources.get(stream_id)
            if src is not None and src.owner != client_id and is_connected(src.owner):
                raise LiveError(409, f"stream {stream_id!r} is in use by another client: choose another stream_id")
            if src is None and len(self._sources) >= self.max_sources:
                raise LiveError(
                    429, f"{self.max_sources} live sources are open; close one or wait for idle ones to expire"
                )
            token = secrets.token_urlsafe(24)
            view_token = secrets.token_urlsafe(24)
            self._sources[stream_id] = LiveSource(
                stream_id,
                client_id,
                token,
                frames=deque(maxlen=ring_size(frames_per_prompt)),
                last_used=self.clock(),
                view_token=view_token,
            )
        logger.info("live source %s opened", stream_id)
        return token

    def view_token(self, stream_id: str, token: str | None) -> str:
        """The read-only view token of ``stream_id``, for its owner (``token``)."""
        with self._lock:
            return self._owned(stream_id, token).view_token

    def set_output(self, stream_id: str, jpeg: bytes) -> None:
        """Keep ``jpeg`` as the stream's newest output frame (for views); no-op for an unknown stream."""
        with self._lock:
            src = self._sources.get(stream_id)
            if src is not None:
                seq = src.output[0] + 1 if src.output is not None else 0
                src.output = (seq, jpeg)

    def read_output(self, stream_id: str, view_token: str | None, after: int = -1) -> tuple[int, bytes] | None:
        """The newest output frame newer than ``after`` for a view holding ``view_token`` (None: none yet).

        Raises :class:`LiveError` 404 when there is no such stream (never opened, closed or expired) and
        403 for a missing or wrong view token: a view never sees another stream's frames.
        """
        _check_stream_id(stream_id)
        with self._lock:
            src = self._sources.get(stream_id)
            if src is None:
                raise LiveError(404, f"no live stream {stream_id!r}: it has ended (or never started)")
            if not view_token or not hmac.compare_digest(src.view_token, view_token):
                raise LiveError(403, f"missing or wrong view token for stream {stream_id!r}")
            if src.output is None or src.output[0] <= after:
                return None
            return src.output

    def _owned(self, stream_id: str, token: str | None) -> LiveSource:
        _check_stream_id(stream_id)
        src = self._sources.get(stream_id)
        if src is None:
            raise LiveError(404, f"no live source {stream_id!r}: open it first (POST .../open), or it expired")
        if not token or not hmac.compare_digest(src.token, token):
            raise LiveError(403, f"stream {stream_id!r} belongs to another client (missing or wrong token)")
        return src

    def authorize(self, stream_id: str, token: str | None) -> None:
        """Raise 400/403/404 unless ``token`` owns ``stream_id`` (checked before a body is read)."""
        with self._lock:
            self._owned(stream_id, token)

    def push(self, stream_id: str, token: str | None, image: torch.Tensor, captured_ms: float | None = None) -> dict:
        self.sweep()
        with self._lock:
            src = self._owned(stream_id, token)
            if len(src.frames) == src.frames.maxlen:
                src.dropped += 1  # the oldest frame was never taken by a prompt
            frame = Frame(src.next_seq, image, captured_ms, self.clock())
            src.frames.append(frame)
            src.next_seq += 1
            src.received += 1
            src.last_used = frame.received
            return {"stream_id": stream_id, "seq": frame.seq, "dropped": src.dropped}

    def close(self, stream_id: str, token: str | None) -> None:
        with self._lock:
            self._owned(stream_id, token)
            del self._sources[stream_id]
        logger.info("live source %s closed", stream_id)

    def take_group(self, stream_id: str, count: int = 1) -> list[Frame]:
        """The newest complete group of ``count`` frames, oldest first, marked as the running prompt's
        frames ([] when the source has none). Frames stay in the ring (a later prompt may take them
        again when no newer group arrived). See the module rules for the grouping."""
        _check_frames_per_prompt(count)
        self.sweep()
        with self._lock:
            src = self._sources.get(stream_id)
            if src is None or not src.frames:
                return []
            if src.frames.maxlen < ring_size(count):  # the node asks for more than the client declared
                src.frames = deque(src.frames, maxlen=ring_size(count))
            src.current, src.current_started = _group(src.frames, count), self.clock()
            src.last_used = src.current_started
            return list(src.current)

    def group_seqs(self, stream_id: str, count: int = 1) -> tuple[int, ...]:
        """The sequence numbers :meth:`take_group` would take now (() when none): a cache key."""
        with self._lock:
            src = self._sources.get(stream_id)
            return tuple(f.seq for f in _group(src.frames, count)) if src is not None and src.frames else ()

    def owner_and_current(self, stream_id: str, sent: int = 1) -> tuple[str | None, list[Frame], float]:
        """For ``sent`` output frames: (owner client id, the frames the prompt took, when it took them)."""
        with self._lock:
            src = self._sources.get(stream_id)
            if src is None:
                return None, [], 0.0
            src.sent += sent
            src.last_used = self.clock()
            return src.owner, list(src.current), src.current_started

    def describe(self) -> list[dict]:
        """Public facts only (no owners, no tokens)."""
        now = self.clock()
        with self._lock:
            return [
                {
                    "stream_id": s.stream_id,
                    "received": s.received,
                    "dropped": s.dropped,
                    "sent": s.sent,
                    "idle_s": round(now - s.last_used, 3),
                }
                for s in self._sources.values()
            ]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sources)

    def clear(self) -> None:
        with self._lock:
            self._sources.clear()


VIEW_PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>TurboStream · {title}</title>
<style>html,body{{margin:0;height:100%;background:#000;overflow:hidden}}
img{{width:100%;height:100%;object-fit:contain;display:block}}
#ended{{display:none;position:fixed;inset:0;color:#888;font:16px sans-serif;
align-items:center;justify-content:center}}</style></head>
<body><img id="frame" alt=""><div id="ended">the stream has ended</div>
<script>
// Read-only view of one stream's output frames (an OBS Browser Source): waits for each newer frame.
const params = new URLSearchParams(location.search);
const base = location.pathname.replace(/\/view$/, "/latest");
const img = document.getElementById("frame");
window.__tsView = {{frames: 0, streams: [], ended: false, status: null}};
let after = -1;
async function next() {{
  for (;;) {{
    let res;
    try {{
      res = await fetch(`${{base}}?token=${{encodeURIComponent(params.get("token") || "")}}&after=${{after}}`,
                        {{cache: "no-store"}});
    }} catch (err) {{
      await new Promise((r) => setTimeout(r, 1000));
      continue;
    }}
    window.__tsView.status = res.status;
    if (res.status === 204) continue;
    if (!res.ok) {{
      window.__tsView.ended = true;
      document.getElementById("ended").style.display = "flex";
      img.style.display = "none";
      return;
    }}
    after = Number(res.headers.get("X-TurboStream-Seq"));
    window.__tsView.streams.push(res.headers.get("X-TurboStream-Stream"));
    const url = URL.createObjectURL(await res.blob());
    const old = img.src;
    img.src = url;
    if (old) URL.revokeObjectURL(old);
    window.__tsView.frames += 1;
  }}
}}
next();
</script></body></html>
"""


def view_html(stream_id: str) -> str:
    """The view page for ``stream_id`` (the id is validated: letters, digits, ``_ . -`` only)."""
    _check_stream_id(stream_id)
    return VIEW_PAGE.format(title=stream_id)


def ring_size(frames_per_prompt: int) -> int:
    """How many frames a source keeps for a client sending ``frames_per_prompt`` frames per prompt."""
    return max(RING_SIZE, 2 * frames_per_prompt)


def _group(frames: deque, count: int) -> list[Frame]:
    """The newest complete group of ``count`` frames in ``frames`` (see the module rules), else the
    newest ``count`` frames with the oldest repeated to fill the group."""
    end = (frames[-1].seq + 1) // count * count  # one past the newest complete group
    group = [f for f in frames if end - count <= f.seq < end]
    if len(group) == count:
        return group
    newest = list(frames)[-count:]
    return [newest[0]] * (count - len(newest)) + newest


def valid_frames_per_prompt(value) -> bool:
    """Whether ``value`` is a whole number from 1 to ``MAX_FRAMES_PER_PROMPT``."""
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= MAX_FRAMES_PER_PROMPT


def _check_frames_per_prompt(value) -> None:
    if not valid_frames_per_prompt(value):
        raise LiveError(
            400, f"frames_per_prompt must be a whole number from 1 to {MAX_FRAMES_PER_PROMPT}, got {value!r}"
        )


def _check_stream_id(stream_id: str) -> None:
    try:
        validate_stream_id(stream_id)
    except ValueError as exc:
        raise LiveError(400, str(exc)) from None


def parse_captured_ms(value: str | None) -> float | None:
    """The sender's capture time in ms (``X-TurboStream-Captured``); None when absent or not a number."""
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        return None
    return ms if ms == ms and abs(ms) < 1e15 else None
