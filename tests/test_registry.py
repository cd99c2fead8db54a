"""The live-stream registry: LRU and memory bounds, idle expiry, stream id validation."""

from __future__ import annotations

import pytest

from turbostream.registry import StreamRegistry, validate_stream_id


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lru_bound_and_touch_order():
    reg = StreamRegistry(max_streams=2, idle_seconds=100, clock=Clock())
    reg.put("a", 1)
    reg.put("b", 2)
    assert reg.get("a").value == 1  # a is now the most recent
    reg.put("c", 3)
    assert reg.ids() == ["a", "c"]


def test_memory_bound_keeps_the_newest():
    reg = StreamRegistry(max_streams=10, idle_seconds=100, max_bytes=250, clock=Clock())
    for name in "abc":
        reg.put(name, name, nbytes=100)
    assert reg.ids() == ["b", "c"]
    reg.put("huge", 0, nbytes=10_000)  # alone over the cap: kept (one stream always fits), others go
    assert reg.ids() == ["huge"]


def test_idle_streams_expire_on_access():
    clock = Clock()
    reg = StreamRegistry(max_streams=100, idle_seconds=5, clock=clock)
    for i in range(50):  # 50 streams opened and abandoned...
        reg.put(f"s{i}", i)
    clock.now = 3
    assert reg.get("s7") is not None  # ...except s7, used again
    clock.now = 6.5
    assert sorted(reg.sweep()) == sorted(f"s{i}" for i in range(50) if i != 7)
    assert reg.ids() == ["s7"]
    clock.now = 20
    reg.sweep()
    assert len(reg) == 0


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "..", "x" * 65, "sp ace", "ü", None, 3])
def test_stream_id_validation(bad):
    with pytest.raises(ValueError, match="not valid"):
        validate_stream_id(bad)


def test_valid_ids():
    for good in ("default", "cam-1", "user_2.main", "A" * 64):
        assert validate_stream_id(good) == good
