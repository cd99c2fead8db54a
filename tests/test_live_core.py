"""Live sources without a host: frame checks, ownership, the ring buffer, limits and expiry."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from turbostream import live

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1024 * 1024}


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w=96, h=64) -> Image.Image:
    x = torch.linspace(0, 255, w).to(torch.uint8)
    arr = torch.stack([x.expand(h, w), x.flip(0).expand(h, w), torch.full((h, w), 128, dtype=torch.uint8)], -1)
    return Image.fromarray(arr.numpy())


@pytest.mark.parametrize("fmt,ctype", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_decode_accepts_images(fmt, ctype):
    out = live.decode_frame(encode(gradient(), fmt), ctype, **LIMITS)
    assert out.shape == (64, 96, 3) and out.dtype == torch.uint8
    if fmt == "PNG":
        assert torch.equal(out, torch.from_numpy(np.array(gradient())))


@pytest.mark.parametrize("ctype", ["text/plain", "application/octet-stream", "", None, "image/svg+xml", "image/gif"])
def test_decode_refuses_other_content_types(ctype):
    with pytest.raises(live.LiveError) as err:
        live.decode_frame(encode(gradient(), "PNG"), ctype, **LIMITS)
    assert err.value.status == 415 and "image/jpeg" in str(err.value)


def test_decode_refuses_oversize_body():
    with pytest.raises(live.LiveError) as err:
        live.decode_frame(b"\x89PNG" + b"0" * 2000, "image/png", max_bytes=1000, max_pixels=10**6)
    assert err.value.status == 413 and "1000" in str(err.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, not an image", encode(gradient(), "PNG")[:200], encode(gradient(), "JPEG")],
    ids=["empty", "text", "truncated-png", "jpeg-declared-as-png"],
)
def test_decode_refuses_bad_bytes(data):
    with pytest.raises(live.LiveError) as err:
        live.decode_frame(data, "image/png", **LIMITS)
    assert err.value.status == 400


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    bomb = encode(Image.new("L", (4000, 4000)), "PNG", optimize=True)  # 16 MP in a few KB
    assert len(bomb) < 64 << 10
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(live.LiveError) as err:
        live.decode_frame(bomb, "image/png", **LIMITS)
    assert err.value.status == 413 and "4000x4000" in str(err.value)
    assert decoded == []


def test_fit_frame_covers_and_centre_crops():
    image = torch.zeros(100, 200, 3, dtype=torch.uint8)
    image[:, 50:150] = 255  # a white centre band, half the width
    out = live.fit_frame(image, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == torch.float32
    assert out.mean() > 0.95  # the centre crop is the white band
    same = live.fit_frame(image, 200, 100)
    assert torch.equal(same, image.float() / 255)


def connected(*ids):
    return lambda client_id: client_id in ids


def test_ownership_and_tokens():
    sources = live.LiveSources()
    token = sources.open("cam", "alice", connected("alice", "bob"))
    frame = torch.zeros(8, 8, 3, dtype=torch.uint8)
    assert sources.push("cam", token, frame, 123.0)["seq"] == 0
    with pytest.raises(live.LiveError) as err:
        sources.push("cam", "forged", frame)
    assert err.value.status == 403
    with pytest.raises(live.LiveError) as err:
        sources.push("cam", None, frame)
    assert err.value.status == 403
    with pytest.raises(live.LiveError) as err:
        sources.open("cam", "bob", connected("alice", "bob"))
    assert err.value.status == 409
    with pytest.raises(live.LiveError) as err:
        sources.push("nope", token, frame)
    assert err.value.status == 404
    # Alice's tab went away: Bob may take the id over, and Alice's old token stops working.
    bob = sources.open("cam", "bob", connected("bob"))
    with pytest.raises(live.LiveError):
        sources.push("cam", token, frame)
    sources.push("cam", bob, frame)
    assert sources.owner_and_current("cam")[0] == "bob"
    with pytest.raises(live.LiveError):
        sources.close("cam", token)
    sources.close("cam", bob)
    assert len(sources) == 0


@pytest.mark.parametrize("stream_id", ["../etc", "a/b", "..", "", "x" * 65, "caf\u00e9", "a b", "a\\b"])
def test_path_like_stream_ids_are_refused(stream_id):
    sources = live.LiveSources()
    with pytest.raises(live.LiveError) as err:
        sources.open(stream_id, "alice")
    assert err.value.status == 400


@pytest.mark.parametrize("client_id", ["", "a/b", None, 5, "x" * 65])
def test_bad_client_ids_are_refused(client_id):
    with pytest.raises(live.LiveError) as err:
        live.LiveSources().open("cam", client_id)
    assert err.value.status == 400


def test_open_needs_a_connected_websocket():
    with pytest.raises(live.LiveError) as err:
        live.LiveSources().open("cam", "alice", connected())
    assert err.value.status == 400 and "/ws?clientId" in str(err.value)


def test_ring_keeps_the_newest_frames_and_counts_drops():
    sources = live.LiveSources()
    token = sources.open("cam", "alice")
    for i in range(live.RING_SIZE + 3):
        sources.push("cam", token, torch.full((2, 2, 3), i, dtype=torch.uint8), captured_ms=float(i))
    [frame] = sources.take_group("cam")
    assert frame.seq == live.RING_SIZE + 2 and frame.captured_ms == live.RING_SIZE + 2
    assert int(frame.image[0, 0, 0]) == live.RING_SIZE + 2
    assert sources.describe()[0]["dropped"] == 3
    owner, current, _ = sources.owner_and_current("cam")
    assert owner == "alice" and current == [frame]
    assert sources.group_seqs("cam") == (frame.seq,) and sources.group_seqs("other") == ()


def _push(sources, token, seqs, stream_id="cam"):
    for i in seqs:
        sources.push(stream_id, token, torch.full((2, 2, 3), i, dtype=torch.uint8), captured_ms=float(i))


def _seqs(frames):
    return [f.seq for f in frames]


def test_a_prompt_takes_its_clients_whole_group_of_frames():
    """Frames per prompt: the newest complete group, in order, even with the next group half uploaded."""
    sources = live.LiveSources()
    token = sources.open("cam", "alice", frames_per_prompt=3)
    assert sources.take_group("cam", 3) == []
    _push(sources, token, [0, 1])
    assert _seqs(sources.take_group("cam", 3)) == [0, 0, 1]  # no whole group yet: the oldest repeated
    _push(sources, token, [2, 3, 4])  # group 0 complete, group 1 on its way
    assert sources.group_seqs("cam", 3) == (0, 1, 2)
    group = sources.take_group("cam", 3)
    assert _seqs(group) == [0, 1, 2] and [int(f.image[0, 0, 0]) for f in group] == [0, 1, 2]
    _push(sources, token, [5])
    assert _seqs(sources.take_group("cam", 3)) == [3, 4, 5]
    owner, current, _ = sources.owner_and_current("cam", sent=3)
    assert owner == "alice" and _seqs(current) == [3, 4, 5] and sources.describe()[0]["sent"] == 3
    # with one frame per prompt a group is the newest frame, as before
    assert _seqs(sources.take_group("cam", 1)) == [5] and sources.group_seqs("cam") == (5,)


def test_the_ring_keeps_two_groups():
    sources = live.LiveSources()
    token = sources.open("cam", "alice", frames_per_prompt=4)
    _push(sources, token, range(8))
    assert sources.describe()[0]["dropped"] == 0 and _seqs(sources.take_group("cam", 4)) == [4, 5, 6, 7]
    # a node asking for more frames than the client declared grows the ring from then on
    token = sources.open("b", "bob")
    _push(sources, token, range(4), "b")
    assert _seqs(sources.take_group("b", 4)) == [0, 1, 2, 3]
    _push(sources, token, range(4, 10), "b")
    assert _seqs(sources.take_group("b", 4)) == [4, 5, 6, 7] and sources.describe()[1]["dropped"] == 2


@pytest.mark.parametrize("count", [0, live.MAX_FRAMES_PER_PROMPT + 1, True, "2", 1.5])
def test_bad_frames_per_prompt_is_refused(count):
    sources = live.LiveSources()
    with pytest.raises(live.LiveError) as err:
        sources.open("cam", "alice", frames_per_prompt=count)
    assert err.value.status == 400 and "frames_per_prompt" in str(err.value)
    sources.open("cam", "alice")
    with pytest.raises(live.LiveError):
        sources.take_group("cam", count)


def test_source_limit_refuses_new_ids_without_evicting_active_ones():
    sources = live.LiveSources(max_sources=2)
    sources.open("a", "alice")
    sources.open("b", "bob")
    with pytest.raises(live.LiveError) as err:
        sources.open("c", "carol")
    assert err.value.status == 429
    assert sorted(s["stream_id"] for s in sources.describe()) == ["a", "b"]


def test_idle_sources_expire():
    now = [0.0]
    sources = live.LiveSources(idle_seconds=10, clock=lambda: now[0])
    token = sources.open("a", "alice")
    sources.open("b", "bob")
    now[0] = 6.0
    sources.push("a", token, torch.zeros(2, 2, 3, dtype=torch.uint8))
    now[0] = 12.0
    assert sources.sweep() == ["b"]
    now[0] = 30.0
    assert sources.take_group("a") == [] and len(sources) == 0


def test_a_connected_owner_keeps_an_idle_source():
    now = [0.0]
    sources = live.LiveSources(idle_seconds=10, clock=lambda: now[0])
    sources.is_connected = connected("alice")
    sources.open("a", "alice")
    sources.open("b", "bob")
    now[0] = 60.0
    assert sources.sweep() == ["b"]  # alice's tab is still there, waiting on slow prompts
    sources.is_connected = connected()
    assert sources.sweep() == ["a"]


def test_describe_reveals_no_owner_or_token():
    sources = live.LiveSources()
    token = sources.open("cam", "alice-client")
    text = repr(sources.describe())
    assert token not in text and "alice-client" not in text


@pytest.mark.parametrize(
    "value,expected", [("1700000000000", 1.7e12), (None, None), ("soon", None), ("nan", None), ("1e400", None)]
)
def test_parse_captured_ms(value, expected):
    assert live.parse_captured_ms(value) == expected


def test_encode_preview_round_trips():
    import base64

    image = torch.rand(16, 24, 3)
    url = live.encode_preview(image)
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size == (24, 16) and im.format == "JPEG"
