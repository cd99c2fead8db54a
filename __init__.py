"""TurboStream: real-time, few-step Stable Diffusion for ComfyUI (V3 nodes).

Outside a ComfyUI host (the command-line tools, the core's unit tests) ``comfy_api`` is missing and
this file defines nothing but ``WEB_DIRECTORY``; the core package ``turbostream`` never needs it.
"""

WEB_DIRECTORY = "./js"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import ALL_NODES, on_load

    class TurboStreamExtension(ComfyExtension):
        async def on_load(self) -> None:
            # Newer hosts await this before get_node_list(); 0.3.75 never calls it, so the same
            # idempotent setup also runs from get_node_list().
            on_load()

        async def get_node_list(self):
            on_load()
            return list(ALL_NODES)

    async def comfy_entrypoint() -> ComfyExtension:
        return TurboStreamExtension()
