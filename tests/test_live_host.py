"""Live routes and nodes in the real host: bad requests get a clear 4xx, frames reach their owner only."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import pytest
from conftest import history, live_workflow, queue
from PIL import Image

from turbostream.live_client import TOKEN_HEADER, LiveClient, LiveClientError

SIZE = 64


def jpeg(color=(200, 40, 40), size=(SIZE, SIZE), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def log_start(host) -> int:
    """Where the host log stood when the test began (the start-up log has torchaudio's traceback)."""
    return len(host.log_text())


def assert_serving(host, log_start: int):
    assert host.get_json("/system_stats")["system"]
    new_log = host.log_text()[log_start:]
    assert "Traceback" not in new_log and "Exception" not in new_log, new_log[-3000:]


def test_routes_and_nodes_are_registered(object_info, host):
    assert {"TurboStreamLiveInput", "TurboStreamLiveOutput"} <= set(object_info)
    assert object_info["TurboStreamLiveOutput"]["output_node"] is True
    assert "sources" in host.get_json("/turbostream/live")


def test_frames_reach_the_owner_only(host):
    async def main():
        async with LiveClient(host.url) as alice, LiveClient(host.url) as bob:
            await alice.open("alice-cam")
            await bob.open("bob-cam")
            await alice.send_frame(jpeg((220, 30, 30)), captured_ms=1234.0)
            await bob.send_frame(jpeg((30, 30, 220)))
            a_prompt = await alice.queue(live_workflow("alice-cam"))
            b_prompt = await bob.queue(live_workflow("bob-cam"))
            assert await alice.wait(a_prompt) == "execution_success", alice.errors
            assert await bob.wait(b_prompt) == "execution_success", bob.errors
            a, b = await alice.next_frame(), await bob.next_frame()
            await asyncio.sleep(0.5)
            return a, b, alice.frames.qsize(), bob.frames.qsize()

    a, b, a_more, b_more = run(main())
    assert a["stream_id"] == "alice-cam" and b["stream_id"] == "bob-cam"
    assert a["seq"] == 0 and a["captured_ms"] == 1234.0 and a["compute_ms"] > 0
    assert a["image"].startswith("data:image/jpeg;base64,") and (a["width"], a["height"]) == (SIZE, SIZE)
    assert a_more == 0 and b_more == 0, "a client got a frame that was not its own"


def test_a_frame_for_someone_elses_stream_is_refused(host, log_start):
    async def main():
        async with LiveClient(host.url) as alice, LiveClient(host.url) as mallory:
            await alice.open("owned-cam")
            with pytest.raises(LiveClientError) as taken:
                await mallory.open("owned-cam")
            mallory.stream_id, mallory.token = "owned-cam", "guess"
            with pytest.raises(LiveClientError) as forged:
                await mallory.send_frame(jpeg())
            mallory.token = None
            with pytest.raises(LiveClientError) as missing:
                await mallory.send_frame(jpeg())
            await alice.send_frame(jpeg())  # the owner still streams
            return taken.value, forged.value, missing.value

    taken, forged, missing = run(main())
    assert taken.status == 409 and "another client" in str(taken)
    assert forged.status == 403 and missing.status == 403 and "belongs to another client" in str(forged)
    assert_serving(host, log_start)


BAD_FRAMES = {
    "oversize": ("image/jpeg", b"\xff\xd8" + b"\0" * (9 << 20), 413, "limit"),
    "wrong content type": ("text/plain", jpeg(), 415, "image/jpeg"),
    "not an image": ("image/png", b"definitely not a png", 400, "not a valid PNG"),
    "truncated": ("image/png", jpeg(fmt="PNG")[:100], 400, "not a valid PNG"),
    "decompression bomb": ("image/png", None, 413, "pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_frames_get_a_clear_4xx(host, log_start, case):
    ctype, data, status, words = BAD_FRAMES[case]
    if data is None:
        buf = io.BytesIO()
        Image.new("L", (6000, 6000)).save(buf, format="PNG", optimize=True)
        data = buf.getvalue()

    async def main():
        async with LiveClient(host.url) as cl:
            await cl.open(f"bad-{case.replace(' ', '-')}")
            with pytest.raises(LiveClientError) as err:
                await cl.send_frame(data, content_type=ctype)
            ok = await cl.send_frame(jpeg())  # the source still works afterwards
            return err.value, ok

    err, ok = run(main())
    assert err.status == status and words in str(err), str(err)
    assert ok["seq"] == 0
    assert_serving(host, log_start)


@pytest.mark.parametrize("raw_id", ["..", "a%20b", "caf%C3%A9", "x" * 65, "%2E%2E", "a%5Cb"])
def test_path_like_stream_ids_are_refused(host, log_start, raw_id):
    async def main():
        async with aiohttp.ClientSession() as session:
            url = aiohttp.client.URL(f"{host.url}/turbostream/live/{raw_id}/frame", encoded=True)
            async with session.post(url, data=jpeg(), headers={"Content-Type": "image/jpeg", TOKEN_HEADER: "x"}) as r:
                return r.status, await r.text()

    status, text = run(main())
    assert status == 400 and "stream_id" in text, (status, text)
    assert_serving(host, log_start)


def test_open_needs_a_websocket_and_json(host):
    async def main():
        async with aiohttp.ClientSession() as session:
            out = []
            for body in ({"client_id": "nobody-connected"}, {"client_id": "../x"}, None):
                kw = {"json": body} if body is not None else {"data": b"{not json"}
                async with session.post(f"{host.url}/turbostream/live/cam/open", **kw) as r:
                    out.append((r.status, (await r.json())["error"]))
            return out

    results = run(main())
    assert [s for s, _ in results] == [400, 400, 400]
    assert "/ws?clientId" in results[0][1] and "client_id" in results[1][1] and "JSON" in results[2][1]


def test_live_input_without_frames_gives_the_placeholder(host, tmp_path):
    wf = {
        "1": {"class_type": "TurboStreamLiveInput", "inputs": {"stream_id": "never-opened", "width": 64, "height": 72}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "live_placeholder"}},
    }
    [path] = queue(host, wf, tmp_path).images
    with Image.open(path) as im:
        assert im.size == (64, 72)
        assert all(lo == hi and abs(lo - 127.5) <= 0.5 for lo, hi in im.getextrema())  # flat mid-gray
    assert "no live frames for stream 'never-opened' yet" in host.log_text()


def test_the_frame_is_scaled_to_the_node_size(host, tmp_path):
    async def main():
        async with LiveClient(host.url) as cl:
            await cl.open("scaled-cam")
            await cl.send_frame(jpeg((10, 200, 10), size=(160, 90), fmt="PNG"), content_type="image/png")
            wf = {
                "1": {
                    "class_type": "TurboStreamLiveInput",
                    "inputs": {"stream_id": "scaled-cam", "width": 64, "height": 64},
                },
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "live_scaled"}},
            }
            prompt_id = await cl.queue(wf)
            assert await cl.wait(prompt_id) == "execution_success"
            return prompt_id

    prompt_id = run(main())
    [image] = history(host, prompt_id)["outputs"]["2"]["images"]
    path = host.base_dir / "output" / image["subfolder"] / image["filename"]
    with Image.open(path) as im:
        assert im.size == (64, 64) and im.getpixel((32, 32)) == (10, 200, 10)


def test_save_every_nth_frame(host):
    async def main():
        async with LiveClient(host.url) as cl:
            await cl.open("saving-cam")
            saved = []
            for i in range(4):
                await cl.send_frame(jpeg((40 * i, 100, 100)))
                prompt_id = await cl.queue(live_workflow("saving-cam", save_every=2, filename_prefix="live_every2"))
                assert await cl.wait(prompt_id) == "execution_success", cl.errors
                outputs = history(host, prompt_id)["outputs"]
                saved.append(len(outputs.get("8", {}).get("images", [])))
            return saved, cl.frames.qsize()

    saved, pushed = run(main())
    assert saved == [0, 1, 0, 1] and pushed == 4


def test_bad_node_inputs_are_named(host):
    wf = live_workflow("bad/id")

    async def main():
        async with LiveClient(host.url) as cl:
            with pytest.raises(LiveClientError) as err:
                await cl.queue(wf)
            return err.value

    err = run(main())
    assert err.status == 400 and "TurboStreamLiveInput: stream_id" in str(err)


COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220)]


def _pixel(frame: dict) -> tuple[int, ...]:
    import base64

    with Image.open(io.BytesIO(base64.b64decode(frame["image"].split(",", 1)[1]))) as im:
        return im.convert("RGB").getpixel((SIZE // 2, SIZE // 2))


def _near(a, b, tol=12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_several_frames_per_prompt_come_back_in_order(host):
    """frames_per_prompt 3: a prompt takes its client's whole group, oldest first, even with the next
    group's upload under way; each output frame carries its own input frame's seq and capture time."""
    wf = {
        "1": {
            "class_type": "TurboStreamLiveInput",
            "inputs": {"stream_id": "group-cam", "width": SIZE, "height": SIZE, "frames_per_prompt": 3},
        },
        "2": {"class_type": "TurboStreamLiveOutput", "inputs": {"images": ["1", 0], "stream_id": ["1", 1]}},
    }

    async def main():
        async with LiveClient(host.url) as cl:
            opened = await cl.open("group-cam", frames_per_prompt=3)
            for i in range(5):  # group 0, and two frames of group 1
                await cl.send_frame(jpeg(COLOURS[i]), captured_ms=100.0 + i)
            first = await cl.queue(wf)
            assert await cl.wait(first) == "execution_success", cl.errors
            await cl.send_frame(jpeg(COLOURS[5]), captured_ms=105.0)
            second = await cl.queue(wf)
            assert await cl.wait(second) == "execution_success", cl.errors
            return opened, [await cl.next_frame() for _ in range(6)], cl.frames.qsize()

    opened, frames, more = run(main())
    assert opened["ring_size"] == 6 and more == 0
    assert [f["seq"] for f in frames] == [0, 1, 2, 3, 4, 5]
    assert [f["captured_ms"] for f in frames] == [100.0 + i for i in range(6)]
    for frame, colour in zip(frames, COLOURS, strict=True):
        assert _near(_pixel(frame), colour), (frame["seq"], _pixel(frame), colour)


def test_live_img2img_streams_a_group_per_prompt(host):
    """Live Input frames_per_prompt 2 into Live Img2Img frame_buffer_size 2: two frames out per prompt,
    each with its own input frame's seq; a mismatch is refused naming both inputs."""
    wf = live_workflow("group-live")
    wf["6"]["inputs"]["frames_per_prompt"] = 2
    wf["7"]["inputs"]["frame_buffer_size"] = 2

    async def main():
        async with LiveClient(host.url) as cl:
            await cl.open("group-live", frames_per_prompt=2)
            for k in range(3):
                await cl.send_frames([jpeg(COLOURS[2 * k]), jpeg(COLOURS[2 * k + 1])])
                prompt_id = await cl.queue(wf)
                assert await cl.wait(prompt_id) == "execution_success", cl.errors
            frames = [await cl.next_frame() for _ in range(6)]
            bad = dict(wf, **{"7": {**wf["7"], "inputs": {**wf["7"]["inputs"], "frame_buffer_size": 1}}})
            await cl.send_frames([jpeg(COLOURS[0]), jpeg(COLOURS[1])])
            prompt_id = await cl.queue(bad)
            return frames, await cl.wait(prompt_id), cl.errors.get(prompt_id, {})

    frames, ended, error = run(main())
    assert [f["seq"] for f in frames] == [0, 1, 2, 3, 4, 5]
    assert ended == "execution_error" and error.get("node_type") == "TurboStreamLiveImg2Img"
    assert (
        "frames_per_prompt" in error.get("exception_message", "") and "frame_buffer_size" in error["exception_message"]
    )
