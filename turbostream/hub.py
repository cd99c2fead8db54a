"""``python -m turbostream models download``: the real weights the bundled workflows name.

One catalog drives everything: where each file comes from on the Hugging Face Hub, the name and
host folder it gets, and which tiny model stands in for it when it is absent (tests, the offline
demo). Downloads go through ``huggingface_hub`` (resumable, honours ``HF_ENDPOINT``, ``HF_TOKEN``
and ``HF_HUB_OFFLINE``) into the host's model folders.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

logger = logging.getLogger("turbostream")


@dataclass(frozen=True)
class CatalogFile:
    filename: str
    """Path of the file inside the Hub repository."""
    folder: str
    """Host model folder (``checkpoints``, ``loras``, ``vae_approx``...)."""
    name: str
    """File name in that folder: the name the bundled workflows use."""
    tiny: str
    """File name of the tiny stand-in under the same folder of the tiny-model cache."""


@dataclass(frozen=True)
class CatalogEntry:
    repo_id: str
    files: tuple[CatalogFile, ...]
    description: str


CATALOG: dict[str, CatalogEntry] = {
    "sd-turbo": CatalogEntry(
        "stabilityai/sd-turbo",
        (CatalogFile("sd_turbo.safetensors", "checkpoints", "sd_turbo.safetensors", "tiny-sd21.safetensors"),),
        "SD-Turbo (ADD-distilled SD 2.1), 1-4 steps at 512x512",
    ),
    "sdxl-turbo": CatalogEntry(
        "stabilityai/sdxl-turbo",
        (CatalogFile("sd_xl_turbo_1.0_fp16.safetensors", "checkpoints", "sd_xl_turbo_1.0_fp16.safetensors",
                     "tiny-sdxl.safetensors"),),
        "SDXL-Turbo (ADD-distilled SDXL 1.0), 1-4 steps at 512x512",
    ),
    "sd15": CatalogEntry(
        "Comfy-Org/stable-diffusion-v1-5-archive",
        (CatalogFile("v1-5-pruned-emaonly-fp16.safetensors", "checkpoints", "v1-5-pruned-emaonly-fp16.safetensors",
                     "tiny-sd15.safetensors"),),
        "Stable Diffusion 1.5 (base for LCM-LoRA and stream workflows)",
    ),
    "lcm-lora-sdv1-5": CatalogEntry(
        "latent-consistency/lcm-lora-sdv1-5",
        (CatalogFile("pytorch_lora_weights.safetensors", "loras", "lcm-lora-sdv1-5.safetensors",
                     "tiny-sd15-kohya.safetensors"),),
        "LCM-LoRA for SD1.5: 2-8 step sampling on any SD1.5 model",
    ),
    "lcm-lora-sdxl": CatalogEntry(
        "latent-consistency/lcm-lora-sdxl",
        (CatalogFile("pytorch_lora_weights.safetensors", "loras", "lcm-lora-sdxl.safetensors",
                     "tiny-sdxl-diffusers.safetensors"),),
        "LCM-LoRA for SDXL",
    ),
    "taesd": CatalogEntry(
        "madebyollin/taesd",
        tuple(CatalogFile(f"taesd_{p}.safetensors", "vae_approx", f"taesd_{p}.safetensors", f"taesd_{p}.safetensors")
              for p in ("encoder", "decoder")),
        "Tiny autoencoder for SD1.x/SD2.x latents",
    ),
    "taesdxl": CatalogEntry(
        "madebyollin/taesdxl",
        tuple(CatalogFile(f"taesdxl_{p}.safetensors", "vae_approx", f"taesdxl_{p}.safetensors",
                          f"taesdxl_{p}.safetensors") for p in ("encoder", "decoder")),
        "Tiny autoencoder for SDXL latents",
    ),
}


STAGING_DIR = ".turbostream-downloads"
"""Under the models folder: huggingface_hub's partial files live here until complete (resume)."""


class DownloadError(UserError):
    """A download that could not complete; the message says what to do."""


def download(names: list[str], models_dir: str | os.PathLike) -> list[Path]:
    """Download catalog entries into ``models_dir/<folder>/<name>``; skips files already there.

    Resumable: ``huggingface_hub`` keeps partial files in ``models_dir/.turbostream-downloads``
    and continues them on the next call; a finished file is renamed into place.
    """
    unknown = [n for n in names if n not in CATALOG]
    if unknown:
        raise DownloadError(f"unknown model name(s) {', '.join(unknown)}; known: {', '.join(CATALOG)}")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - dependency of the pack
        raise DownloadError("huggingface_hub is not installed: pip install huggingface_hub") from exc

    models_dir = Path(models_dir)
    written = []
    for name in names:
        entry = CATALOG[name]
        for f in entry.files:
            dest = models_dir / f.folder / f.name
            if dest.is_file():
                logger.info("%s already present", dest)
                written.append(dest)
                continue
            logger.info("downloading %s/%s -> %s", entry.repo_id, f.filename, dest)
            staging = models_dir / STAGING_DIR / entry.repo_id.replace("/", "--")
            try:
                fetched = hf_hub_download(repo_id=entry.repo_id, filename=f.filename, local_dir=staging)
            except LocalEntryNotFoundError as exc:
                raise DownloadError(
                    f"cannot reach the Hugging Face Hub for {entry.repo_id}/{f.filename} (offline?). "
                    f"Connect to the internet, set HF_ENDPOINT to a mirror, or copy the file to {dest} by hand."
                ) from exc
            except HfHubHTTPError as exc:
                raise DownloadError(f"download of {entry.repo_id}/{f.filename} failed: {exc}. "
                                    "If the repository is gated, accept its licence and set HF_TOKEN.") from exc
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, dest)  # same filesystem: a rename, no second copy of a 5 GB file
            written.append(dest)
    return written
