"""ComfyUI glue: one module per capability, each exporting ``NODES``; gathered here."""

import logging

from . import add_distill, add_sampler, conditioning, lcm_lora, live, stream_batch, stream_live, tiny_vae

logger = logging.getLogger("turbostream")

ALL_NODES: list = [
    *add_sampler.NODES,
    *tiny_vae.NODES,
    *lcm_lora.NODES,
    *stream_batch.NODES,
    *stream_live.NODES,
    *conditioning.NODES,
    *live.NODES,
    *add_distill.NODES,
]

_loaded = False


def on_load() -> None:
    """Idempotent one-time setup shared by ``ComfyExtension.on_load`` and ``get_node_list``."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    stream_live.register_routes()
    live.register_routes()
    logger.info("TurboStream loaded: %d nodes", len(ALL_NODES))
