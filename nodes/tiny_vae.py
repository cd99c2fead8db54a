"""Tiny VAE nodes: load a TAESD-family autoencoder as a host VAE; decode and encode in chunks."""

from __future__ import annotations

import logging
import re

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..turbostream import tiny_vae as core
from ..turbostream.oom import run_in_chunks
from ._common import NodeInputError, advanced, check_option, host_oom_policy, schema

logger = logging.getLogger("turbostream")

AUTO = "auto"
_HALF = re.compile(r"^(?P<base>.+)_(?P<half>encoder|decoder)\.[^./]+$")
_SINGLE_FILE_HINTS = ("taesd", "taef1", "tiny")


def _approx_bases() -> list[str]:
    return sorted({m["base"] for f in folder_paths.get_filename_list("vae_approx") if (m := _HALF.match(f))})


def installed_tiny_vaes() -> list[str]:
    """Combo options: ``vae_approx/<base>`` for each encoder/decoder pair (or lone half) and
    ``vae/<file>`` for single-file AutoencoderTiny weights in the ``vae`` folder, then each base's bare
    name as the host's VAELoader spells it (``taesd``, ``taesdxl``), so either spelling is accepted."""
    bases = _approx_bases()
    singles = [f for f in folder_paths.get_filename_list("vae") if any(h in f.lower() for h in _SINGLE_FILE_HINTS)]
    return [f"vae_approx/{b}" for b in bases] + [f"vae/{f}" for f in sorted(singles)] + bases


def _unknown_name(node: str, vae_name) -> NodeInputError:
    names = installed_tiny_vaes()
    listed = ", ".join(names) if names else "none: put a <name>_encoder / <name>_decoder pair in models/vae_approx"
    return NodeInputError(
        node,
        "vae_name",
        f"{vae_name!r} is not an installed tiny VAE; valid names: {listed} "
        "(python -m turbostream models download taesd fetches TAESD)",
    )


def _read(node: str, folder: str, name: str) -> dict[str, torch.Tensor]:
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise NodeInputError(node, "vae_name", f"{folder}/{name} is not installed")
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as exc:  # safetensors/torch raise many types for a damaged file
        raise NodeInputError(
            node,
            "vae_name",
            f"cannot read {folder}/{name} ({type(exc).__name__}: {exc}); the file "
            "is corrupt or truncated: download it again",
        ) from None
    return {k: v.float() for k, v in sd.items()}


def _family(node: str, vae_name: str, latent_family: str, files: list[dict]) -> core.TinyVAEFamily:
    if latent_family != AUTO:
        return core.FAMILIES[latent_family]
    family = core.family_from_name(vae_name.split("/", 1)[1])
    if family is not None:
        return family
    raise NodeInputError(
        node,
        "latent_family",
        f"cannot tell from the name {vae_name!r} which latents it reads "
        "(taesd and taesdxl weights have the same shapes); choose latent_family: "
        + ", ".join(f"{f.name} ({f.models})" for f in core.FAMILIES.values()),
    )


def patcher_class():
    """The host's patcher class: newer hosts replace ModelPatcher with CoreModelPatcher."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def build_vae(module: core.TinyAutoencoder) -> comfy.sd.VAE:
    """A host ``VAE`` whose network is ``module`` and whose patcher the host's model management owns.

    The host's own constructor (fed the same weights in its TAESD layout) sets every attribute its
    VAEDecode / VAEEncode use; then the network is swapped for the diffusers one.
    """
    state = module.net.state_dict()
    enc = {k[len("encoder.layers.") :]: v for k, v in state.items() if k.startswith("encoder.layers.")}
    dec = {}
    for k, v in state.items():
        if k.startswith("decoder.layers."):
            index, rest = k[len("decoder.layers.") :].split(".", 1)
            dec[f"{int(index) + 1}.{rest}"] = v
    vae = comfy.sd.VAE(sd=core.to_taesd_state_dict(enc, dec, module.family))
    module.to(dtype=vae.vae_dtype).eval().requires_grad_(False)
    vae.first_stage_model = module
    vae.patcher = patcher_class()(
        model=module, load_device=vae.device, offload_device=comfy.model_management.vae_offload_device()
    )
    return vae


def load_tiny_vae(node: str, vae_name: str, latent_family: str = AUTO) -> comfy.sd.VAE:
    check_option(node, "latent_family", latent_family, [AUTO, *core.FAMILIES])
    if not isinstance(vae_name, str):
        raise _unknown_name(node, vae_name)
    if "/" not in vae_name and vae_name in _approx_bases():
        vae_name = f"vae_approx/{vae_name}"  # the host's VAELoader spelling of the same pair
    kind, _, name = vae_name.partition("/")
    if kind == "vae_approx":
        names = [f for f in folder_paths.get_filename_list("vae_approx") if (m := _HALF.match(f)) and m["base"] == name]
        if not names:
            raise _unknown_name(node, vae_name)
        files = [_read(node, "vae_approx", f) for f in sorted(names)]
    elif kind == "vae":
        files = [_read(node, "vae", name)]
    else:
        raise _unknown_name(node, vae_name)
    try:
        encoder_sd, decoder_sd = core.split_halves(files)  # the layout first: a full-size VAE is no tiny one
        family = _family(node, vae_name, latent_family, files)
        module = core.TinyAutoencoder(family, encoder_sd, decoder_sd, source=vae_name)
    except core.TinyVAEError as exc:
        raise NodeInputError(node, "vae_name", f"{vae_name}: {exc}") from None
    halves = " + ".join(h for h, ok in (("encoder", module.has_encoder), ("decoder", module.has_decoder)) if ok)
    logger.info(
        "tiny VAE %s: %s (%s latents, %d channels), %s",
        vae_name,
        family.name,
        family.models,
        family.latent_channels,
        halves,
    )
    return build_vae(module)


def _tiny(vae) -> core.TinyAutoencoder | None:
    module = getattr(vae, "first_stage_model", None)
    return module if isinstance(module, core.TinyAutoencoder) else None


CPU_CHUNK_BYTES = 64 << 20
"""On a CPU, a chunk whose widest activations pass this budget runs slower per image, not faster (its
activations spill out of the caches: 16 frames at 256x256 in one batch took ~1.4x as long per frame as
one at a time on the 2-core test machine, ``bench_tiny_vae``). GPUs batch as far as memory allows."""


def _load(vae, per_item_bytes: float, batch: int) -> int:
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=per_item_bytes, force_full_load=True)
    free = comfy.model_management.get_free_memory(vae.device)
    if torch.device(vae.device).type == "cpu":
        free = min(free, max(CPU_CHUNK_BYTES, per_item_bytes))
    return core.chunk_size(free, per_item_bytes, limit=max(batch, 1))


def _prepare(vae, x: torch.Tensor) -> torch.Tensor:
    x = x.to(device=vae.device, dtype=vae.vae_dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x


def tiny_decode(node: str, vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents ``(B, C, h, w)`` -> images ``(B, 8h, 8w, 3)`` in [0, 1] on the intermediate device."""
    tiny = _tiny(vae)
    if latents.ndim != 4:
        raise NodeInputError(node, "samples", f"expected image latents (B, C, H, W), got shape {tuple(latents.shape)}")
    if latents.shape[0] == 0:
        raise NodeInputError(node, "samples", "the latent batch is empty")
    if tiny is None:
        return vae.decode(latents)  # any other VAE: the host's own path
    if latents.shape[1] != tiny.latent_channels:
        fits = " or ".join(f"{f.name} ({f.models})" for f in core.families_for_channels(latents.shape[1]))
        raise NodeInputError(
            node,
            "samples",
            f"the latent has {latents.shape[1]} channels but this tiny VAE "
            f"({tiny.family.name}, for {tiny.family.models} latents) takes {tiny.latent_channels}"
            + (f"; a {latents.shape[1]}-channel latent fits {fits}" if fits else ""),
        )
    if not tiny.has_decoder:
        raise NodeInputError(
            node,
            "vae",
            f"{tiny.source} has no decoder; add models/vae_approx/{tiny.family.name}_decoder.safetensors to decode",
        )
    b, _, h, w = latents.shape
    per_item = core.decode_bytes_per_item((h, w), dtype_size=comfy.model_management.dtype_size(vae.vae_dtype))
    n = _load(vae, per_item, b)
    out = torch.empty(
        (b, h * core.SPATIAL_FACTOR, w * core.SPATIAL_FACTOR, core.RGB_CHANNELS),
        device=comfy.model_management.intermediate_device(),
    )
    pbar = comfy.utils.ProgressBar(b)

    def decode_chunk(start: int, stop: int) -> None:
        img = tiny.decode(_prepare(vae, latents[start:stop]))
        out[start:stop] = torch.clamp((img.to(out.device).float() + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1)
        pbar.update(stop - start)

    with torch.inference_mode():
        run_in_chunks(
            decode_chunk,
            b,
            n,
            f"{node}: decoding {b} latent(s) to {w * core.SPATIAL_FACTOR}x{h * core.SPATIAL_FACTOR}",
            host_oom_policy(),
            unit="image",
        )
    return out


def tiny_encode(node: str, vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images ``(B, H, W, 1|3|4)`` in [0, 1] -> raw latents; sizes are centre-cropped to multiples of 8."""
    tiny = _tiny(vae)
    if pixels.ndim != 4 or pixels.shape[0] == 0:
        raise NodeInputError(
            node, "pixels", f"expected a non-empty image batch (B, H, W, C), got {tuple(pixels.shape)}"
        )
    try:
        pixels, note = core.to_rgb(pixels)
        cropped = core.crop_to_multiple(pixels)
    except core.TinyVAEError as exc:
        raise NodeInputError(node, "pixels", str(exc)) from None
    if note:
        logger.info("%s: %s", node, note)
    if cropped.shape != pixels.shape:
        logger.info(
            "%s: centre-cropped %dx%d to %dx%d (multiples of 8)",
            node,
            pixels.shape[2],
            pixels.shape[1],
            cropped.shape[2],
            cropped.shape[1],
        )
    if tiny is None:
        return vae.encode(cropped)
    if not tiny.has_encoder:
        raise NodeInputError(
            node,
            "vae",
            f"{tiny.source} has no encoder; add models/vae_approx/"
            f"{tiny.family.name}_encoder.safetensors (or a full AutoencoderTiny file) to encode",
        )
    b, hh, ww, _ = cropped.shape
    per_item = core.encode_bytes_per_item(
        (hh // 8, ww // 8), dtype_size=comfy.model_management.dtype_size(vae.vae_dtype)
    )
    n = _load(vae, per_item, b)
    out = torch.empty((b, tiny.latent_channels, hh // 8, ww // 8), device=comfy.model_management.intermediate_device())
    pbar = comfy.utils.ProgressBar(b)

    def encode_chunk(start: int, stop: int) -> None:
        x = (cropped[start:stop] * 2.0 - 1.0).movedim(-1, 1)
        out[start:stop] = tiny.encode(_prepare(vae, x)).to(out.device).float()
        pbar.update(stop - start)

    with torch.inference_mode():
        run_in_chunks(
            encode_chunk, b, n, f"{node}: encoding {b} image(s) of {ww}x{hh}", host_oom_policy(), unit="image"
        )
    return out


class TurboStreamTinyVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamTinyVAELoader",
            display_name="Tiny VAE Loader (TAESD)",
            category="TurboStream/vae",
            description=(
                "Loads a TAESD-family tiny autoencoder (vae_approx encoder/decoder pairs or a single-file "
                "diffusers AutoencoderTiny in vae/) under the host's model management. ~20x faster than the "
                "full VAE, at the cost of fine detail and some flicker. Works with VAEDecode/VAEEncode too."
            ),
            inputs=[
                io.Combo.Input(
                    "vae_name",
                    options=installed_tiny_vaes(),
                    tooltip="vae_approx/<name> (or just <name>, as VAE Loader lists it): the "
                    "<name>_encoder/_decoder pair (a lone decoder decodes only); vae/<file>: a single-file "
                    "AutoencoderTiny.",
                ),
                advanced(
                    io.Combo.Input,
                    "latent_family",
                    options=[AUTO, *core.FAMILIES],
                    default=AUTO,
                    tooltip="Which latents it reads (sets the scale/shift): auto follows the file name "
                    "(taesd, taesdxl, taesd3, taef1); set it for files named otherwise.",
                ),
            ],
            outputs=[io.Vae.Output(tooltip="A host VAE: use it with these nodes or VAEDecode / VAEEncode.")],
        )

    @classmethod
    def execute(cls, vae_name, latent_family=AUTO) -> io.NodeOutput:
        return io.NodeOutput(load_tiny_vae("TurboStreamTinyVAELoader", vae_name, latent_family))


class TurboStreamTinyVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamTinyVAEDecode",
            display_name="Tiny VAE Decode",
            category="TurboStream/vae",
            description="LATENT -> IMAGE with a tiny VAE, batched in chunks sized from free memory (any other VAE "
            "is decoded by the host's own path).",
            inputs=[
                io.Latent.Input("samples", tooltip="Raw latents from a sampler (the family's scale/shift is applied)."),
                io.Vae.Input("vae", tooltip="From Tiny VAE Loader."),
            ],
            outputs=[io.Image.Output(tooltip="Images in [0, 1], one per latent.")],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        return io.NodeOutput(tiny_decode("TurboStreamTinyVAEDecode", vae, samples["samples"]))


class TurboStreamTinyVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="TurboStreamTinyVAEEncode",
            display_name="Tiny VAE Encode",
            category="TurboStream/vae",
            description="IMAGE -> LATENT with a tiny VAE, batched in chunks sized from free memory.",
            inputs=[
                io.Image.Input(
                    "pixels",
                    tooltip="Images in [0, 1]. Grey is repeated to RGB, alpha is dropped; sizes "
                    "that are not multiples of 8 are centre-cropped, as the host does.",
                ),
                io.Vae.Input("vae", tooltip="From Tiny VAE Loader (needs the encoder half)."),
            ],
            outputs=[io.Latent.Output(tooltip="Raw latents for this VAE's model family, one per image.")],
        )

    @classmethod
    def execute(cls, pixels, vae) -> io.NodeOutput:
        return io.NodeOutput({"samples": tiny_encode("TurboStreamTinyVAEEncode", vae, pixels)})


NODES = [TurboStreamTinyVAELoader, TurboStreamTinyVAEDecode, TurboStreamTinyVAEEncode]
