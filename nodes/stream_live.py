"""Live img2img: the stream engine with its state kept across prompts, one stream per ``stream_id``."""

from __future__ import annotations

import logging
import weakref

import comfy.model_management
import torch
from comfy_api.latest import io

from ..turbostream import stream_batch as core
from ..turbostream.registry import StreamRegistry, validate_stream_id
from ._common import NodeInputError, check_numbers, check_option, check_stream_id, schema
from .stream_batch import (
    _check_model,
    _check_negative,
    _check_sizes,
    _check_vae,
    _config,
    _engine,
    _feedback_input,
    _filter_inputs,
    _model_inputs,
    _negative_input,
    _stream_inputs,
    _timesteps,
    _to_model_space,
    _to_raw,
    _validate,
    host_schedule,
    run_stream,
)
from .stream_control import frame_payloads
from .tiny_vae import tiny_decode, tiny_encode

logger = logging.getLogger("turbostream")

REGISTRY = StreamRegistry.from_env()
"""Live streams by id: survives prompts (V3 node classes cannot hold state)."""


# -- restarts and in-place changes -------------------------------------------------------------------------------------------
_SIGNATURE_FIELDS = ("the model's patches", "frame_buffer_size", "the frame size")


def _signature(model, f, latent_shape) -> tuple:
    """What a stream's state depends on besides the model objects (:func:`_model_refs`): change any of
    these and the stream restarts (the fields are named in :data:`_SIGNATURE_FIELDS`). Steps, seed and
    add_noise change in place (:meth:`StreamEngine.retarget`); prompt, guidance, delta, filter and
    feedback apply to the next call as they are."""
    return (len(model.patches), f, tuple(latent_shape))


def _model_refs(model) -> tuple[weakref.ref, weakref.ref]:
    """Weak references to the model and its sampling object; the stream restarts when either is another
    object. Not ``id()``: once the host frees its cache (``POST /free``) the reloaded model may get the
    freed one's id; and a weak reference never keeps a freed model alive."""
    return weakref.ref(model.model), weakref.ref(model.get_model_object("model_sampling"))


def _restart_reason(entry, sig: tuple, model, size: list[int]) -> str | None:
    """Why the stream in ``entry`` cannot go on with this frame (None: it can)."""
    refs = entry.value.get("model_refs", ())
    now = (model.model, model.get_model_object("model_sampling"))
    same_model = len(refs) == len(now) and all(ref() is obj for ref, obj in zip(refs, now, strict=True))
    if same_model and entry.meta.get("signature") == sig:
        return None
    old = entry.meta.get("size")
    if old and old != size:
        return "the frame size changed"
    if not same_model and any(ref() is None for ref in refs):
        return "the model was loaded again (the host freed its cache, e.g. POST /free)"
    if not same_model:
        return "the model changed"
    before = entry.meta.get("signature") or (None,) * len(sig)
    changed = [name for name, a, b in zip(_SIGNATURE_FIELDS, before, sig, strict=True) if a != b]
    return " and ".join(changed) + " changed"


def _retarget(node, stream_id, model, engine, flt, old: dict, new: dict, cfg_type, guidance, delta) -> None:
    """New steps, seed or add_noise on a running live stream: carried over in place, logged (no restart)."""
    f = engine.config.frame_buffer_size
    config = _config(new["timesteps"], f, cfg_type, guidance, delta, new["add_noise"], new["seed"])
    carried = engine.retarget(config, host_schedule(model, new["timesteps"], f))
    if new["seed"] != old["seed"]:
        flt.generator = torch.Generator().manual_seed(new["seed"])
    changes = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in new if old.get(k) != new[k])
    logger.info("%s: stream %s goes on with %s (no restart): %s", node, stream_id, changes, carried)


class TurboStreamLiveImg2Img(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamLiveImg2Img",
            display_name="Live Img2Img (stream)",
            category="TurboStream/stream",
            description=(
                "The stream engine with state kept across prompts, keyed by stream_id: queue one frame per "
                "prompt to stream continuously. Output lags the input by len(t_index_list) - 1 frames; "
                "during the first calls the newest frame's one-step result is shown instead of nothing. "
                "Prompt, guidance, delta, filter and feedback changes apply in place; a new t_index_list "
                "(strength), seed or add_noise is carried over in place, with no warm-up frames (logged); a new "
                "model (or LoRA), frame size or frame_buffer_size restarts it (logged with the reason)."
            ),
            not_idempotent=True,
            inputs=[
                *_model_inputs(),
                io.Image.Input("image", tooltip="The newest frame (or frame_buffer_size frames)."),
                io.String.Input(
                    "stream_id",
                    default="default",
                    tooltip="Which stream this frame belongs to (letters, digits, _ . -).",
                ),
                *_stream_inputs("32,45", "self"),
                *_filter_inputs(),
                _negative_input(),
                _feedback_input(),
            ],
            outputs=[
                io.Image.Output(
                    display_name="image",
                    tooltip="The finished frame: the one fed len(t_index_list) - 1 calls ago (a one-step estimate "
                    "of the newest frame while the stream warms up).",
                )
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # every prompt is a new frame of the stream

    @classmethod
    def validate_inputs(cls, t_index_list, stream_id, index_mode="lcm_index") -> bool | str:
        if stream_id is not None:
            try:
                validate_stream_id(stream_id)
            except ValueError as exc:
                return str(exc)
        return _validate(t_index_list, index_mode)

    @classmethod
    @torch.inference_mode()
    def execute(
        cls,
        model,
        positive,
        vae,
        image,
        stream_id,
        t_index_list,
        cfg_type,
        guidance,
        frame_buffer_size=1,
        add_noise=True,
        seed=0,
        similarity_threshold=0.0,
        max_skip_frames=10,
        delta=1.0,
        index_mode="lcm_index",
        negative=None,
        feedback=0.0,
    ) -> io.NodeOutput:
        node = "TurboStreamLiveImg2Img"
        check_stream_id(node, stream_id)
        check_option(node, "cfg_type", cfg_type, core.CFG_TYPES)
        check_numbers(
            cls, guidance=guidance, delta=delta, frame_buffer_size=frame_buffer_size, seed=seed,
            similarity_threshold=similarity_threshold, max_skip_frames=max_skip_frames, feedback=feedback,
        )  # fmt: skip
        timesteps = _timesteps(node, t_index_list, index_mode)
        f = frame_buffer_size
        if image.ndim != 4 or image.shape[0] != f:
            raise NodeInputError(
                node,
                "image",
                f"expected {f} frame(s) (frame_buffer_size), got shape {tuple(image.shape)}: set Live Input's "
                "frames_per_prompt (or the batch feeding this node) to frame_buffer_size",
            )
        _check_sizes(node, "image", image.shape[1], image.shape[2])
        _check_model(node, model)
        _check_vae(node, model, vae)
        _check_negative(node, cfg_type, guidance, negative)
        channels = model.get_model_object("latent_format").latent_channels
        latent_shape = (channels, image.shape[1] // 8, image.shape[2] // 8)
        sig = _signature(model, f, latent_shape)
        settings = {"timesteps": list(timesteps), "seed": seed, "add_noise": add_noise}
        entry = REGISTRY.get(stream_id)
        reason = entry and _restart_reason(entry, sig, model, list(image.shape[1:3]))
        if reason:
            logger.info("%s: stream %s restarts: %s", node, stream_id, reason)
            entry = None
        if entry is None:
            state = {
                "engine": _engine(node, model, timesteps, f, cfg_type, guidance, delta, add_noise, seed, latent_shape),
                "filter": core.SimilarityFilter(similarity_threshold, max_skip_frames, seed),
                "last": None,
                "model_refs": _model_refs(model),
            }
            engine = state["engine"]
            nbytes = sum(t.numel() * t.element_size() for t in (engine.init_noise, engine.buffer, engine.stock_noise))
            entry = REGISTRY.put(
                stream_id, state, nbytes=nbytes, signature=sig, size=list(image.shape[1:3]), frames=0, settings=settings
            )
        state = entry.value
        engine, flt = state["engine"], state["filter"]
        # All or nothing: an interrupt or error mid-frame leaves the stream as it was before the frame.
        with core.transaction(engine, engine.config, flt, state, entry.meta):
            if entry.meta.get("settings") != settings:
                _retarget(
                    node, stream_id, model, engine, flt, entry.meta["settings"], settings, cfg_type, guidance, delta
                )
                entry.meta["settings"] = settings
            engine.config.cfg_type, engine.config.guidance, engine.config.delta = cfg_type, guidance, delta
            flt.threshold, flt.max_skip_frames = similarity_threshold, max_skip_frames
            entry.meta["frames"] += 1
            if state["last"] is not None and flt.should_skip(image * 2 - 1):
                out = state["last"]
            else:
                if state["last"] is None:
                    flt.should_skip(image * 2 - 1)  # the first frame becomes the filter's reference
                z = _to_model_space(model, tiny_encode(node, vae, image))
                # each frame's ControlNet hints enter the stream with it and stay with it to the end
                payload = frame_payloads(node, f, image.shape[1], image.shape[2], model, positive, negative)
                finished = run_stream(
                    model,
                    seed,
                    engine,
                    positive,
                    negative,
                    lambda denoise: engine.img2img(z, denoise, positive, negative, payload=payload, feedback=feedback),
                )
                # warm-up: the buffer holds no finished frame yet; show the newest frame's one-step estimate
                x0 = finished if engine.calls > engine.lag else engine.last_first_x0
                out = tiny_decode(node, vae, _to_raw(model, x0))
                state["last"] = out
            entry.meta["calls"] = engine.calls
            # an interrupt that arrived while the frame was computed drops it (the transaction rolls back)
            comfy.model_management.throw_exception_if_processing_interrupted()
        return io.NodeOutput(
            out,
            ui={
                "turbostream_stream": [
                    {
                        "stream_id": stream_id,
                        "lag_frames": engine.lag,
                        "calls": engine.calls,
                        "warming_up": engine.calls <= engine.lag,
                    }
                ]
            },
        )


NODES = [TurboStreamLiveImg2Img]


def register_routes() -> None:
    """``GET /turbostream/streams``: the live streams (ids, idle seconds, frames); sweeps idle ones."""
    import sys

    if "server" not in sys.modules:  # not inside a running host (tests import the pack in-process)
        return
    from aiohttp import web

    server = getattr(sys.modules["server"].PromptServer, "instance", None)
    if server is None:
        return

    @server.routes.get("/turbostream/streams")
    async def list_streams(request):
        REGISTRY.sweep()
        return web.json_response(
            {"streams": REGISTRY.describe(), "idle_seconds": REGISTRY.idle_seconds, "max_streams": REGISTRY.max_streams}
        )
