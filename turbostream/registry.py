"""A bounded registry of live stream states, keyed by stream id (pure Python).

ComfyUI clones and locks V3 node classes per call, so state that must outlive one prompt (a live
stream's latent buffer, noise, filter reference) lives here: one entry per id, least-recently-used
eviction past ``max_streams`` or ``max_bytes``, and idle entries dropped after ``idle_seconds``
(checked on every access, so no background thread is needed).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("turbostream")

STREAM_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_MAX_STREAMS = 8
DEFAULT_IDLE_SECONDS = 300.0
DEFAULT_MAX_BYTES = 2 << 30


def validate_stream_id(stream_id: str) -> str:
    """1-64 characters of letters, digits, ``_``, ``.`` and ``-``; never a path."""
    if not isinstance(stream_id, str) or not STREAM_ID_PATTERN.match(stream_id) or stream_id in (".", ".."):
        raise ValueError(f"stream_id {stream_id!r} is not valid: use 1-64 letters, digits, '_', '.' or '-'")
    return stream_id


@dataclass
class Entry:
    value: Any
    nbytes: int
    created: float
    last_used: float
    meta: dict = field(default_factory=dict)


class StreamRegistry:
    def __init__(
        self,
        max_streams: int = DEFAULT_MAX_STREAMS,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_streams = max_streams
        self.idle_seconds = idle_seconds
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.RLock()

    @classmethod
    def from_env(cls) -> StreamRegistry:
        """Limits from ``TURBOSTREAM_MAX_STREAMS``, ``TURBOSTREAM_STREAM_IDLE_S``, ``TURBOSTREAM_STREAM_MAX_MB``."""
        return cls(
            max_streams=int(os.environ.get("TURBOSTREAM_MAX_STREAMS", DEFAULT_MAX_STREAMS)),
            idle_seconds=float(os.environ.get("TURBOSTREAM_STREAM_IDLE_S", DEFAULT_IDLE_SECONDS)),
            max_bytes=int(float(os.environ.get("TURBOSTREAM_STREAM_MAX_MB", DEFAULT_MAX_BYTES / 2**20)) * 2**20),
        )

    def sweep(self) -> list[str]:
        """Drop idle entries; returns their ids."""
        now = self.clock()
        with self._lock:
            idle = [k for k, e in self._entries.items() if now - e.last_used > self.idle_seconds]
            for k in idle:
                del self._entries[k]
        for k in idle:
            logger.info("stream %s expired after %.0f s idle", k, self.idle_seconds)
        return idle

    def get(self, stream_id: str) -> Entry | None:
        self.sweep()
        with self._lock:
            entry = self._entries.get(stream_id)
            if entry is not None:
                entry.last_used = self.clock()
                self._entries.move_to_end(stream_id)
            return entry

    def put(self, stream_id: str, value: Any, nbytes: int = 0, **meta) -> Entry:
        validate_stream_id(stream_id)
        self.sweep()
        now = self.clock()
        with self._lock:
            self._entries.pop(stream_id, None)
            entry = Entry(value, nbytes, now, now, dict(meta))
            self._entries[stream_id] = entry
            evicted = []
            while len(self._entries) > self.max_streams or (
                len(self._entries) > 1 and sum(e.nbytes for e in self._entries.values()) > self.max_bytes
            ):
                old, _ = self._entries.popitem(last=False)
                evicted.append(old)
        for old in evicted:
            logger.info(
                "stream %s evicted (registry limits: %d streams, %.0f MB)",
                old,
                self.max_streams,
                self.max_bytes / 2**20,
            )
        return entry

    def remove(self, stream_id: str) -> bool:
        with self._lock:
            return self._entries.pop(stream_id, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def describe(self) -> list[dict]:
        now = self.clock()
        with self._lock:
            return [
                {
                    "stream_id": k,
                    "idle_s": round(now - e.last_used, 3),
                    "age_s": round(now - e.created, 3),
                    "bytes": e.nbytes,
                    **e.meta,
                }
                for k, e in self._entries.items()
            ]
