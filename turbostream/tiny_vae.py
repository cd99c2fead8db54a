"""Tiny autoencoders (TAESD family) as diffusers ``AutoencoderTiny``, configured from the weights.

Pure torch + diffusers. Facts (madebyollin/taesd, its README and ``taesd.py``; diffusers
``AutoencoderTiny``; ComfyUI's ``comfy/taesd/taesd.py`` and ``comfy/latent_formats.py`` for the scales):

* TAESD encoder and decoder have ~1.2M parameters each; the decoder clamps its input with
  ``tanh(x / 3) * 3``. The networks work on *scaled* latents (unit variance); the host works on
  *raw* latents, so each family carries a scale and shift:
  ``decode(x) = dec((x - shift) * scale)`` (output in [-1, 1]) and
  ``encode(img) = enc(img) / scale + shift`` (``img`` in [-1, 1]).
* The variant comes from the tensors: latent channels are the decoder's first conv input (or the
  encoder's last conv output) — 4 for SD1.x/SD2.x/SDXL, 16 for SD3/Flux — and the block layout is read
  from the Sequential indices. Scale/shift cannot be read from tensors (taesd and taesdxl have the
  same shapes), so they come from the family: the file naming the host uses (``taesd_*``,
  ``taesdxl_*``, ``taesd3_*``, ``taef1_*``) or an explicit choice.

Two file layouts are read: madebyollin's (one file per half, keys ``"<index>.<param>"`` of an
``nn.Sequential``; the decoder's index 0 is the parameterless clamp) and diffusers' single-file
``AutoencoderTiny`` (``encoder.layers.<index>...`` / ``decoder.layers.<index>...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

RGB_CHANNELS = 3
SPATIAL_FACTOR = 8
"""Pixels per latent cell in each direction (three stride-2 stages)."""


@dataclass(frozen=True)
class TinyVAEFamily:
    name: str
    latent_channels: int
    scale: float
    shift: float
    models: str
    """Which base models' latents it reads, for messages."""


FAMILIES: dict[str, TinyVAEFamily] = {
    f.name: f
    for f in (
        TinyVAEFamily("taesd", 4, 0.18215, 0.0, "SD1.x/SD2.x"),
        TinyVAEFamily("taesdxl", 4, 0.13025, 0.0, "SDXL"),
        TinyVAEFamily("taesd3", 16, 1.5305, 0.0609, "SD3"),
        TinyVAEFamily("taef1", 16, 0.3611, 0.1159, "Flux"),
    )
}
"""Scale/shift per family, as ComfyUI applies them to raw latents (``comfy/latent_formats.py``:
SD15 0.18215, SDXL 0.13025, SD3 1.5305/0.0609, Flux 0.3611/0.1159)."""


class TinyVAEError(ValueError):
    """A file or request the tiny VAE cannot serve; the message says what would."""


def families_for_channels(channels: int) -> list[TinyVAEFamily]:
    return [f for f in FAMILIES.values() if f.latent_channels == channels]


def family_from_name(file_name: str) -> TinyVAEFamily | None:
    """The family a file name follows (``taesdxl_decoder.safetensors`` -> taesdxl), longest match first."""
    base = file_name.rsplit("/", 1)[-1].lower()
    for name in sorted(FAMILIES, key=len, reverse=True):
        if base.startswith(name):
            return FAMILIES[name]
    return None


# -- layout from tensors ---------------------------------------------------------------------------
_INDEX = re.compile(r"^(\d+)\.(.*)$")


def _sequential_entries(sd: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _INDEX.match(key)
        if not m:
            raise TinyVAEError(f"unexpected key {key!r}: not a TAESD / AutoencoderTiny layout")
        entries.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return entries


def _kinds(entries: dict[int, dict[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """(``"block"`` or ``"conv"``, a weight giving the channels) per parametrised entry, in order."""
    out = []
    for index in sorted(entries):
        params = entries[index]
        if "conv.0.weight" in params:
            out.append(("block", params["conv.0.weight"]))
        elif "weight" in params and params["weight"].ndim == 4:
            out.append(("conv", params["weight"]))
        else:
            raise TinyVAEError(f"entry {index} ({', '.join(sorted(params))}) is neither a conv nor a TAESD block")
    return out


@dataclass(frozen=True)
class HalfLayout:
    block_out_channels: tuple[int, ...]
    num_blocks: tuple[int, ...]
    latent_channels: int


def encoder_layout(sd: dict[str, torch.Tensor]) -> HalfLayout:
    """conv_in, blocks, (stride-2 conv, blocks)*, conv_out -> stage channels, blocks per stage."""
    kinds = _kinds(_sequential_entries(sd))
    if len(kinds) < 3 or kinds[0][0] != "conv" or kinds[-1][0] != "conv" or kinds[0][1].shape[1] != RGB_CHANNELS:
        raise TinyVAEError("not a TAESD encoder: expected conv(3 -> C), blocks, ..., conv(C -> latent)")
    stages: list[list[int]] = []
    for kind, weight in kinds[:-1]:
        if kind == "conv":
            stages.append([weight.shape[0], 0])
        else:
            stages[-1][1] += 1
    return HalfLayout(tuple(c for c, _ in stages), tuple(n for _, n in stages), kinds[-1][1].shape[0])


def decoder_layout(sd: dict[str, torch.Tensor]) -> HalfLayout:
    """conv_in, (blocks, conv)* -> stage channels, blocks per stage; latent channels = conv_in's input."""
    kinds = _kinds(_sequential_entries(sd))
    if len(kinds) < 3 or kinds[0][0] != "conv" or kinds[-1][0] != "conv" or kinds[-1][1].shape[0] != RGB_CHANNELS:
        raise TinyVAEError("not a TAESD decoder: expected conv(latent -> C), blocks, ..., conv(C -> 3)")
    stages: list[list[int]] = []
    count = 0
    for kind, weight in kinds[1:]:
        if kind == "block":
            count += 1
        else:
            stages.append([weight.shape[1], count])
            count = 0
    return HalfLayout(tuple(c for c, _ in stages), tuple(n for _, n in stages), kinds[0][1].shape[1])


def split_halves(files: list[dict[str, torch.Tensor]]) -> tuple[dict | None, dict | None]:
    """(encoder, decoder) state dicts in madebyollin's index layout, from one diffusers single file
    or one or two madebyollin files (told apart by their first conv: 3 input channels = encoder)."""
    encoder = decoder = None
    for sd in files:
        if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in sd):
            enc = {k[len("encoder.layers.") :]: v for k, v in sd.items() if k.startswith("encoder.layers.")}
            # diffusers' decoder has no clamp module: shift indices by one to madebyollin's numbering
            dec = {}
            for k, v in sd.items():
                if k.startswith("decoder.layers."):
                    index, rest = k[len("decoder.layers.") :].split(".", 1)
                    dec[f"{int(index) + 1}.{rest}"] = v
            encoder, decoder = enc or encoder, dec or decoder
            continue
        first = sd.get("0.weight")
        if first is not None and first.ndim == 4 and first.shape[1] == RGB_CHANNELS:
            encoder = sd
        elif "1.weight" in sd and sd["1.weight"].ndim == 4:
            decoder = sd
        else:
            raise TinyVAEError(
                "not a TAESD or AutoencoderTiny file (no encoder conv_in '0.weight' with 3 input "
                "channels, no decoder conv_in '1.weight')"
            )
    return encoder, decoder


# -- the network -------------------------------------------------------------------------------------
class TinyAutoencoder(nn.Module):
    """diffusers ``AutoencoderTiny`` plus the family's raw-latent scale/shift.

    ``decode``: raw latents ``(B, C, h, w)`` -> images ``(B, 3, 8h, 8w)`` in [-1, 1].
    ``encode``: images ``(B, 3, H, W)`` in [-1, 1], H and W multiples of 8 -> raw latents.
    """

    def __init__(
        self, family: TinyVAEFamily, encoder_sd: dict | None, decoder_sd: dict | None, source: str = ""
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderTiny

        if encoder_sd is None and decoder_sd is None:
            raise TinyVAEError("no encoder and no decoder weights given")
        enc = encoder_layout(encoder_sd) if encoder_sd is not None else None
        dec = decoder_layout(decoder_sd) if decoder_sd is not None else None
        channels = {h.latent_channels for h in (enc, dec) if h is not None}
        if len(channels) != 1:
            raise TinyVAEError(f"encoder and decoder disagree on latent channels ({sorted(channels)}): not a pair")
        latent_channels = channels.pop()
        if latent_channels != family.latent_channels:
            fits = ", ".join(f.name for f in families_for_channels(latent_channels)) or "none known"
            raise TinyVAEError(
                f"the weights have {latent_channels} latent channels but {family.name} latents have "
                f"{family.latent_channels}; families with {latent_channels}: {fits}"
            )
        default_enc = HalfLayout((64, 64, 64, 64), (1, 3, 3, 3), latent_channels)
        default_dec = HalfLayout((64, 64, 64, 64), (3, 3, 3, 1), latent_channels)
        enc_l, dec_l = enc or default_enc, dec or default_dec
        self.net = AutoencoderTiny(
            latent_channels=latent_channels,
            encoder_block_out_channels=enc_l.block_out_channels,
            num_encoder_blocks=enc_l.num_blocks,
            decoder_block_out_channels=dec_l.block_out_channels,
            num_decoder_blocks=dec_l.num_blocks,
        )
        state = {}
        if encoder_sd is not None:
            state.update({f"encoder.layers.{k}": v for k, v in encoder_sd.items()})
        if decoder_sd is not None:
            for k, v in decoder_sd.items():
                index, rest = k.split(".", 1)
                state[f"decoder.layers.{int(index) - 1}.{rest}"] = v
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        needed = [
            k
            for k in missing
            if (k.startswith("encoder.") and encoder_sd is not None)
            or (k.startswith("decoder.") and decoder_sd is not None)
        ]
        if needed or unexpected:
            raise TinyVAEError(f"weights do not fit AutoencoderTiny: missing {needed[:3]}, unexpected {unexpected[:3]}")
        self.family = family
        self.has_encoder = encoder_sd is not None
        self.has_decoder = decoder_sd is not None
        self.source = source
        self.register_buffer("vae_scale", torch.tensor(family.scale), persistent=False)
        self.register_buffer("vae_shift", torch.tensor(family.shift), persistent=False)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.has_decoder:
            raise TinyVAEError(
                f"{self.source or 'this tiny VAE'} has no decoder; add the {self.family.name}_decoder file to decode"
            )
        return self.net.decoder((latents - self.vae_shift) * self.vae_scale)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if not self.has_encoder:
            raise TinyVAEError(
                f"{self.source or 'this tiny VAE'} has no encoder; add the {self.family.name}_encoder "
                "file (e.g. models/vae_approx/"
                f"{self.family.name}_encoder.safetensors) to encode"
            )
        return self.net.encoder(images) / self.vae_scale + self.vae_shift


def to_taesd_state_dict(encoder_sd: dict | None, decoder_sd: dict | None, family: TinyVAEFamily) -> dict:
    """The halves in the host's ``comfy.sd.VAE`` TAESD layout (``taesd_encoder.*``, ``vae_scale``...)."""
    sd = {}
    for prefix, half in (("taesd_encoder.", encoder_sd), ("taesd_decoder.", decoder_sd)):
        for k, v in (half or {}).items():
            sd[prefix + k] = v
    sd["vae_scale"] = torch.tensor(family.scale)
    sd["vae_shift"] = torch.tensor(family.shift)
    return sd


# -- images ----------------------------------------------------------------------------------------
def to_rgb(images: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """NHWC images with 1 (grey), 3 or 4 (RGBA) channels -> 3 channels, and a note of what was done.

    Grey is repeated to RGB; alpha is dropped (the colour channels are encoded as they are, which is
    what the host's VAEEncode does). Other channel counts are an error.
    """
    channels = images.shape[-1]
    if channels == RGB_CHANNELS:
        return images, None
    if channels == 1:
        return images.expand(*images.shape[:-1], RGB_CHANNELS), "converted 1-channel (grey) images to RGB"
    if channels == 4:
        return images[..., :RGB_CHANNELS], "dropped the alpha channel of RGBA images"
    raise TinyVAEError(f"images have {channels} channels; expected 3 (RGB), 1 (grey) or 4 (RGBA)")


def crop_to_multiple(images: torch.Tensor, multiple: int = SPATIAL_FACTOR) -> torch.Tensor:
    """Centre-crop NHWC images so height and width are multiples of ``multiple`` (the host's policy)."""
    for dim in (1, 2):
        size = images.shape[dim]
        keep = (size // multiple) * multiple
        if keep == 0:
            raise TinyVAEError(
                f"images are {images.shape[2]}x{images.shape[1]}; both sides must be at least {multiple}"
            )
        if keep != size:
            images = images.narrow(dim, (size % multiple) // 2, keep)
    return images


def chunk_size(free_bytes: float, per_item_bytes: float, limit: int = 64) -> int:
    """How many items fit in ``free_bytes`` (at least 1, at most ``limit``)."""
    if per_item_bytes <= 0:
        return limit
    return int(max(1, min(limit, free_bytes // per_item_bytes)))


def decode_bytes_per_item(
    latent_hw: tuple[int, int], channels: int = 64, dtype_size: int = 4, live_tensors: int = 6
) -> float:
    """Peak activation bytes to decode one latent: the widest stage (full resolution, 64 channels)
    holds a few tensors alive at once (block input, two convs, skip)."""
    h, w = latent_hw
    return float(h * SPATIAL_FACTOR * w * SPATIAL_FACTOR * channels * dtype_size * live_tensors)


encode_bytes_per_item = decode_bytes_per_item
"""The encoder's widest stage is its first (full resolution, 64 channels): the same estimate."""
