"""Out-of-memory fallback for batched work: a chunk that runs out of memory is retried at half the size.

Pure torch. The tiny VAE (chunks of images or latents) and the stream engine (sub-batches of stream
slots) run their batches through :func:`run_in_chunks`. When a chunk raises an out-of-memory error
(recognised by the caller's :class:`OomPolicy`, e.g. the host's ``OOM_EXCEPTION``), the runner lets
the failed call's tensors go, frees the allocator cache (``policy.free``), halves the chunk and runs
the same items again; the smaller size is kept for the rest of the batch. Every item is computed by
exactly one successful call, so the result is the one a run with those chunk sizes gives (the math
per item does not change; on CPU, convolutions may round differently for different batch sizes, in
the last bits only). A chunk of one item that still runs out of memory raises
:class:`ChunkOutOfMemoryError`, which says what ran out and what to do — never a partial result.

Fault injection (tests only): with ``TURBOSTREAM_FAULT_OOM_ABOVE=<n>`` in the environment, the
pack's chunk runners raise the out-of-memory error themselves for any chunk of more than ``n``
items, before running it (``0``: every chunk fails). It lets a test drive the fallback in a real
host, which has no memory pressure to offer on demand.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger("turbostream")

FAULT_OOM_ABOVE_ENV = "TURBOSTREAM_FAULT_OOM_ABOVE"
"""Test hook: chunks of more than this many items raise an out-of-memory error (unset: off)."""
DEFAULT_HINT = "lower the resolution, or free memory (close other programs that use the device, or unload models)"
"""What to do when one item alone does not fit (a smaller batch cannot help then)."""


class ChunkOutOfMemoryError(torch.OutOfMemoryError):
    """Out of memory even one item at a time. An ``OutOfMemoryError``, so hosts that clean up after
    one (ComfyUI unloads its models) still do."""


def is_torch_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def fault_oom_above_from_env() -> int | None:
    """The fault-injection limit from ``TURBOSTREAM_FAULT_OOM_ABOVE`` (None when unset or empty)."""
    value = os.environ.get(FAULT_OOM_ABOVE_ENV, "").strip()
    if not value:
        return None
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(f"{FAULT_OOM_ABOVE_ENV}={value!r}: expected a whole number >= 0 (or unset it)")
    return limit


@dataclass(frozen=True)
class OomPolicy:
    """How a chunk runner recognises and answers out-of-memory."""

    is_oom: Callable[[BaseException], bool] = is_torch_oom
    """True for the exceptions that mean "out of memory" (the host's ``OOM_EXCEPTION``)."""
    free: Callable[[], None] | None = None
    """Called after a failed chunk is released, before the retry (the host's ``soft_empty_cache``)."""
    fault_above: int | None = None
    """Fault injection: chunks of more than this many items raise ``fault_type`` (None: off)."""
    fault_type: type[BaseException] = torch.OutOfMemoryError
    hint: str = DEFAULT_HINT
    """What to do, ending the error raised when one item alone runs out of memory."""

    def check_fault(self, size: int, unit: str) -> None:
        if self.fault_above is not None and size > self.fault_above:
            raise self.fault_type(
                f"injected out-of-memory ({FAULT_OOM_ABOVE_ENV}={self.fault_above}): {size} {unit}(s) in one chunk"
            )


def run_in_chunks(
    fn: Callable[[int, int], None],
    total: int,
    chunk: int,
    what: str,
    policy: OomPolicy | None = None,
    unit: str = "item",
) -> int:
    """Call ``fn(start, stop)`` over ``[0, total)`` in chunks of at most ``chunk`` items, in order.

    On out-of-memory the failed chunk is run again at half its size (down to 1), and later chunks
    use the smaller size too. ``fn`` must leave no partial result behind when it raises (write its
    output only after computing it). Returns the chunk size in use at the end (``<= chunk``).

    Raises :class:`ChunkOutOfMemoryError` (``"<what>: out of memory even with one <unit> per chunk
    ...; <policy.hint>"``) when a single item does not fit; other exceptions pass through unchanged.
    """
    policy = policy or OomPolicy()
    size = max(1, min(chunk, total))
    start = 0
    while start < total:
        stop = min(start + size, total)
        failed = False
        try:
            policy.check_fault(stop - start, unit)
            fn(start, stop)
        except Exception as exc:
            if not policy.is_oom(exc):
                raise
            if stop - start == 1:
                raise ChunkOutOfMemoryError(
                    f"{what}: out of memory even with one {unit} per chunk ({type(exc).__name__}: {exc}); {policy.hint}"
                ) from exc
            failed = True
        if failed:
            # outside the except block: the failed call's frames (and the tensors they hold) are gone
            if policy.free is not None:
                policy.free()
            size = (stop - start) // 2
            logger.warning("%s: out of memory with %d %ss per chunk; retrying with %d", what, stop - start, unit, size)
            continue
        start = stop
    return size
