"""TurboStream core: pure-torch few-step sampling, stream batch and the command-line tools.

This package never imports ``comfy`` at module level, so it can be used and tested without a
ComfyUI host. Submodules that need torch import it themselves; ``turbostream.host`` uses only
the standard library so that it can provision the virtual environment that brings torch.
"""

import logging

__version__ = "0.1.0"

logger = logging.getLogger("turbostream")
