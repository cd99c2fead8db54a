"""``python -m turbostream models download``: the real weights the bundled workflows name.

One catalog drives everything: where each file comes from on the Hugging Face Hub, the name and
host folder it gets, and which tiny model stands in for it when it is absent (tests, the offline
demo). Downloads use ``huggingface_hub`` for URLs, metadata and auth (so ``HF_ENDPOINT``,
``HF_TOKEN`` and ``HF_HUB_OFFLINE`` apply) and resume across runs into the host's model folders.
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
        (
            CatalogFile(
                "sd_xl_turbo_1.0_fp16.safetensors",
                "checkpoints",
                "sd_xl_turbo_1.0_fp16.safetensors",
                "tiny-sdxl.safetensors",
            ),
        ),
        "SDXL-Turbo (ADD-distilled SDXL 1.0), 1-4 steps at 512x512",
    ),
    "sd15": CatalogEntry(
        "Comfy-Org/stable-diffusion-v1-5-archive",
        (
            CatalogFile(
                "v1-5-pruned-emaonly-fp16.safetensors",
                "checkpoints",
                "v1-5-pruned-emaonly-fp16.safetensors",
                "tiny-sd15.safetensors",
            ),
        ),
        "Stable Diffusion 1.5 (base for LCM-LoRA and stream workflows)",
    ),
    "lcm-lora-sdv1-5": CatalogEntry(
        "latent-consistency/lcm-lora-sdv1-5",
        (
            CatalogFile(
                "pytorch_lora_weights.safetensors",
                "loras",
                "lcm-lora-sdv1-5.safetensors",
                "tiny-sd15-kohya.safetensors",
            ),
        ),
        "LCM-LoRA for SD1.5: 2-8 step sampling on any SD1.5 model",
    ),
    "lcm-lora-sdxl": CatalogEntry(
        "latent-consistency/lcm-lora-sdxl",
        (
            CatalogFile(
                "pytorch_lora_weights.safetensors",
                "loras",
                "lcm-lora-sdxl.safetensors",
                "tiny-sdxl-diffusers.safetensors",
            ),
        ),
        "LCM-LoRA for SDXL",
    ),
    "taesd": CatalogEntry(
        "madebyollin/taesd",
        tuple(
            CatalogFile(f"taesd_{p}.safetensors", "vae_approx", f"taesd_{p}.safetensors", f"taesd_{p}.safetensors")
            for p in ("encoder", "decoder")
        ),
        "Tiny autoencoder for SD1.x/SD2.x latents",
    ),
    "taesdxl": CatalogEntry(
        "madebyollin/taesdxl",
        tuple(
            CatalogFile(
                f"taesdxl_{p}.safetensors", "vae_approx", f"taesdxl_{p}.safetensors", f"taesdxl_{p}.safetensors"
            )
            for p in ("encoder", "decoder")
        ),
        "Tiny autoencoder for SDXL latents",
    ),
    "controlnet-sd15-canny": CatalogEntry(
        "comfyanonymous/ControlNet-v1-1_fp16_safetensors",
        (
            CatalogFile(
                "control_v11p_sd15_canny_fp16.safetensors",
                "controlnet",
                "control_v11p_sd15_canny_fp16.safetensors",
                "tiny-sd15-controlnet.safetensors",
            ),
        ),
        "ControlNet 1.1 canny (edges) for SD1.5: steer the stream with Canny of each frame",
    ),
    "controlnet-sd15-depth": CatalogEntry(
        "comfyanonymous/ControlNet-v1-1_fp16_safetensors",
        (
            CatalogFile(
                "control_v11f1p_sd15_depth_fp16.safetensors",
                "controlnet",
                "control_v11f1p_sd15_depth_fp16.safetensors",
                "tiny-sd15-controlnet.safetensors",
            ),
        ),
        "ControlNet 1.1 depth for SD1.5 (needs a depth preprocessor pack for the hint)",
    ),
}


STAGING_DIR = ".turbostream-downloads"
"""Under the models folder: huggingface_hub's partial files live here until complete (resume)."""


class DownloadError(UserError):
    """A download that could not complete; the message says what to do."""


CHUNK_BYTES = 1 << 20


def _fetch(url: str, dest: Path, staging: Path, label: str) -> None:
    """Download ``url`` to ``dest`` through a ``.partial`` file that a later call resumes (HTTP Range).

    huggingface_hub resolves the URL, headers (token) and metadata; since release 1.x it no longer
    resumes across processes, so the transfer itself is ours.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.utils import build_hf_headers
    from tqdm import tqdm

    meta = get_hf_file_metadata(url)
    etag = (meta.etag or "noetag").strip('"')[:16]
    partial = staging / f"{dest.name}.{etag}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    for stale in staging.glob(f"{dest.name}.*.partial"):
        if stale != partial:
            stale.unlink()  # the file changed on the Hub: its old bytes are useless
    start = partial.stat().st_size if partial.is_file() else 0
    if meta.size is not None and start > meta.size:
        start = 0
    headers = build_hf_headers()
    if start:
        headers["Range"] = f"bytes={start}-"
        logger.info("resuming %s at %d bytes", label, start)
    request = urllib.request.Request(meta.location or url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            if start and resp.status != 206:
                start = 0  # the server ignored the Range request: start over
            with (
                open(partial, "ab" if start else "wb") as fh,
                tqdm(total=meta.size, initial=start, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar,
            ):
                while chunk := resp.read(CHUNK_BYTES):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(
            f"download of {label} broke off ({exc}); run the same command again to resume "
            f"from {partial.stat().st_size if partial.is_file() else 0} bytes"
        ) from None
    size = partial.stat().st_size
    if meta.size is not None and size != meta.size:
        raise DownloadError(
            f"download of {label} ended at {size} of {meta.size} bytes; run the same command again to resume"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, dest)  # same filesystem: a rename, no second copy of a 5 GB file


def download(names: list[str], models_dir: str | os.PathLike) -> list[Path]:
    """Download catalog entries into ``models_dir/<folder>/<name>``; skips files already there.

    Resumable: partial files stay in ``models_dir/.turbostream-downloads`` and the next call
    continues them with an HTTP Range request; a finished file is renamed into place.
    """
    unknown = [n for n in names if n not in CATALOG]
    if unknown:
        raise DownloadError(f"unknown model name(s) {', '.join(unknown)}; known: {', '.join(CATALOG)}")
    try:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as exc:  # pragma: no cover - a dependency of the pack
        raise DownloadError("huggingface_hub is not installed: pip install huggingface_hub") from exc

    models_dir = Path(models_dir)
    written = []
    for name in names:
        entry = CATALOG[name]
        for f in entry.files:
            dest = models_dir / f.folder / f.name
            label = f"{entry.repo_id}/{f.filename}"
            if dest.is_file():
                logger.info("%s already present", dest)
                written.append(dest)
                continue
            logger.info("downloading %s -> %s", label, dest)
            staging = models_dir / STAGING_DIR / entry.repo_id.replace("/", "--")
            try:
                _fetch(hf_hub_url(entry.repo_id, f.filename), dest, staging, label)
            except HfHubHTTPError as exc:
                raise DownloadError(
                    f"download of {label} failed: {str(exc).splitlines()[0]}. "
                    "If the repository is gated, accept its licence and set HF_TOKEN."
                ) from None
            except ConnectionError as exc:  # includes huggingface_hub's OfflineModeIsEnabled
                raise DownloadError(
                    f"cannot reach the Hugging Face Hub for {label} (offline? {exc}). Connect to the internet, "
                    f"set HF_ENDPOINT to a mirror, or copy the file to {dest} by hand."
                ) from None
            written.append(dest)
    return written
