"""LCM-LoRA fusing: which base a LoRA was made for, how well it fits a model, and a cache of fused weights.

Pure torch (plus the standard library). The host's LoRA machinery does the key mapping and the
weight math; this module decides whether the result may be applied and remembers fused tensors.

* **Base detection** (STYLE rule 7: from tensors, never the file name). The cross-attention
  ``attn2`` ``to_k`` / ``to_v`` layers read the text encoder's hidden states, so their input width
  names the base: 768 SD1.x, 1024 SD2.x, 2048 SDXL, 1280 the SDXL refiner. Without such layers, a
  second text encoder (``lora_te2_`` / ``text_encoder_2.``) means SDXL and the first text encoder's
  width (768 CLIP-L, 1024 OpenCLIP-H) tells SD1.x from SD2.x.
* **Match policy.** A LoRA is a set of *modules* (one per patched layer, e.g.
  ``lora_unet_..._attn2_to_k`` with its ``lora_up`` / ``lora_down`` / ``alpha`` tensors). The node
  counts the modules that land on a layer of the model with the right shape; a base mismatch, no
  match at all, or more than ``UNMATCHED_TOLERANCE`` of the modules left over is an error: the host
  itself only logs "lora key not loaded" and applies whatever happened to match.
* **Fused-weight cache.** ``FUSED_WEIGHTS`` keeps the merged tensors of the last few fuses (LRU,
  ``FUSE_CACHE_ENTRIES``), dropped as soon as the model they belong to is garbage collected, and
  counts how often the weights were really computed (``computations``).
"""

from __future__ import annotations

import math
import os
import re
import uuid
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

# -- bases -----------------------------------------------------------------------------------------
BASE_SD1 = "SD1.x"
BASE_SD2 = "SD2.x"
BASE_SDXL = "SDXL"
BASE_SDXL_REFINER = "SDXL refiner"

CONTEXT_DIM_BASES = {768: BASE_SD1, 1024: BASE_SD2, 2048: BASE_SDXL, 1280: BASE_SDXL_REFINER}
"""UNet cross-attention context width (= ``attn2.to_k`` input width) of each base."""
TEXT_ENCODER_WIDTH_BASES = {768: BASE_SD1, 1024: BASE_SD2}
"""Hidden width of a single-text-encoder LoRA's encoder: CLIP-L (SD1.x), OpenCLIP-H (SD2.x)."""
LCM_LORA_FOR_BASE = {BASE_SD1: "lcm-lora-sdv1-5.safetensors", BASE_SDXL: "lcm-lora-sdxl.safetensors"}
"""The LCM-LoRA file (catalog name, ``python -m turbostream models download``) for each base."""

UNMATCHED_TOLERANCE = 0.02
"""Largest fraction of a LoRA's modules that may find no layer (or a layer of another shape) before
the node refuses the LoRA; those few are skipped with a warning. 0.02 = 1 in 50."""
FUSE_CACHE_ENTRIES = 4
"""Fused weight sets kept for re-use, least recently used evicted first. One set is one LoRA at one
strength on one model (or its CLIP): a style LoRA + LCM-LoRA chain with a CLIP uses three. Entries
whose clone is still alive cost no extra memory (they share the tensors); the others hold their
patched weights until evicted or until their model is freed."""
FUSE_WORKSPACE_FACTOR = 3
"""Scratch memory while fusing one weight, in fp32 copies of it (weight, LoRA product, result)."""

# Tensor-name endings of every LoRA/LyCORIS format the host's ``comfy.lora.load_lora`` reads
# (``comfy/weight_adapter/*.py`` and the generic diff/set formats): ``<module><suffix>``.
LORA_SUFFIXES = (
    ".lora_up.weight",
    ".lora_down.weight",
    ".lora_mid.weight",
    "_lora.up.weight",
    "_lora.down.weight",
    ".lora_B.weight",
    ".lora_A.weight",
    ".lora.up.weight",
    ".lora.down.weight",
    ".lora_B",
    ".lora_A",
    ".lora_linear_layer.up.weight",
    ".lora_linear_layer.down.weight",
    ".lora_B.default.weight",
    ".lora_A.default.weight",
    ".alpha",
    ".dora_scale",
    ".reshape_weight",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".lokr_w1",
    ".lokr_w2",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_t2",
    ".oft_blocks",
    ".rescale",
    ".a1.weight",
    ".a2.weight",
    ".b1.weight",
    ".b2.weight",
    ".diff",
    ".diff_b",
    ".set_weight",
    ".w_norm",
    ".b_norm",
)
# The factor that multiplies a layer's input, per format: its shape[1:] is the layer's input shape.
_DOWN_SUFFIXES = (".lora_down.weight", "_lora.down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_A",
                  ".lora_linear_layer.down.weight", ".lora_A.default.weight")  # fmt: skip
_UP_SUFFIXES = (".lora_up.weight", "_lora.up.weight", ".lora_B.weight", ".lora.up.weight", ".lora_B",
                ".lora_linear_layer.up.weight", ".lora_B.default.weight")  # fmt: skip
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_prior_te_", "text_encoder.",
                         "text_encoder_2.", "text_encoders.")  # fmt: skip
_SDXL_TEXT_ENCODER_PREFIXES = ("lora_te2_", "text_encoder_2.")
_CROSS_ATTN_KV = re.compile(r"attn2_(processor_)?to_[kv]$")

Shape = tuple[int, ...]
Modules = dict[str, dict[str, Shape]]
"""``{module name: {suffix: tensor shape}}``, e.g. ``{"lora_unet_x": {".lora_up.weight": (320, 4), ...}}``."""


class LoRAFileError(ValueError):
    """A file that cannot be used as a LoRA at all (unreadable, or no LoRA tensors in it)."""


class LoRAMatchError(ValueError):
    """A LoRA that does not fit the model; the message names both sides and the fix."""


# -- reading a LoRA's layout -----------------------------------------------------------------------
def _shape(value) -> Shape:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``"<module><suffix>"`` -> ``(module, suffix)`` for the longest known LoRA suffix, else None."""
    best = None
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix) and (best is None or len(suffix) > len(best)):
            best = suffix
    return None if best is None else (key[: -len(best)], best)


def lora_modules(state_dict: Mapping[str, object]) -> tuple[Modules, list[str]]:
    """Group a LoRA state dict (tensors or shapes) by module; also return the keys that are not LoRA tensors."""
    modules: Modules = {}
    foreign = []
    for key in sorted(state_dict):
        split = split_lora_key(key)
        if split is None:
            foreign.append(key)
        else:
            modules.setdefault(split[0], {})[split[1]] = _shape(state_dict[key])
    return modules, foreign


def is_text_encoder_module(name: str) -> bool:
    """True for modules that patch a text encoder (kohya ``lora_te*_``, diffusers ``text_encoder*.``)."""
    return name.startswith(TEXT_ENCODER_PREFIXES)


def _first(tensors: Mapping[str, Shape], suffixes: tuple[str, ...]) -> Shape | None:
    return next((tensors[s] for s in suffixes if s in tensors), None)


def module_delta_shape(tensors: Mapping[str, Shape]) -> tuple[int, int] | None:
    """``(out_features, in_numel)`` of the weight a module's tensors produce, or None when unknown.

    ``in_numel`` is the product of the weight's non-output dimensions (``in`` for a linear layer,
    ``in * kh * kw`` for a convolution). Covers plain LoRA (no Tucker ``lora_mid``, no reshape),
    LoHa and LoKr without Tucker cores, and full ``diff`` weights; other formats return None.
    """
    if any(s in tensors for s in (".lora_mid.weight", ".reshape_weight", ".hada_t1", ".lokr_t2")):
        return None
    up, down = _first(tensors, _UP_SUFFIXES), _first(tensors, _DOWN_SUFFIXES)
    if up is not None and down is not None and len(up) >= 2 and len(down) >= 2:
        return up[0], math.prod(down[1:])
    if ".hada_w1_a" in tensors and ".hada_w1_b" in tensors:
        return tensors[".hada_w1_a"][0], math.prod(tensors[".hada_w1_b"][1:])
    w1 = tensors.get(".lokr_w1")
    w1 = w1 if w1 is not None else _lokr_product(tensors.get(".lokr_w1_a"), tensors.get(".lokr_w1_b"))
    w2 = tensors.get(".lokr_w2")
    w2 = w2 if w2 is not None else _lokr_product(tensors.get(".lokr_w2_a"), tensors.get(".lokr_w2_b"))
    if w1 is not None and w2 is not None and len(w1) == 2 and len(w2) >= 2:
        return w1[0] * w2[0], w1[1] * math.prod(w2[1:])
    diff = tensors.get(".diff")
    if diff is not None and len(diff) >= 2:
        return diff[0], math.prod(diff[1:])
    return None


def _lokr_product(a: Shape | None, b: Shape | None) -> Shape | None:
    return None if a is None or b is None else (a[0], *b[1:])


def module_in_features(tensors: Mapping[str, Shape]) -> int | None:
    """Input width of a linear layer patched by this module (``in_numel`` of ``module_delta_shape``)."""
    shape = module_delta_shape(tensors)
    return None if shape is None else shape[1]


def fits(target_shape: Shape, tensors: Mapping[str, Shape]) -> bool:
    """Whether a module's weight delta has the target weight's shape (True when the format is unknown)."""
    shape = module_delta_shape(tensors)
    if shape is None or len(target_shape) < 1:
        return True
    return shape == (target_shape[0], math.prod(target_shape[1:]))


def _normalized(name: str) -> str:
    return name.replace(".", "_")


def describe_lora_base(modules: Modules) -> tuple[str | None, str]:
    """``(base, evidence)``: the base a LoRA was made for, from its tensors, and why; base None if unknown."""
    widths = Counter(
        w
        for name, tensors in modules.items()
        if not is_text_encoder_module(name) and _CROSS_ATTN_KV.search(_normalized(name))
        if (w := module_in_features(tensors)) is not None
    )
    if widths:
        width, _ = widths.most_common(1)[0]
        base = CONTEXT_DIM_BASES.get(width)
        return base, f"its cross-attention to_k/to_v layers read {width}-wide text features"
    if any(name.startswith(_SDXL_TEXT_ENCODER_PREFIXES) for name in modules):
        return BASE_SDXL, "it patches a second text encoder (text_encoder_2 / lora_te2_), which only SDXL has"
    te_widths = Counter(
        w
        for name, tensors in modules.items()
        if name.startswith(("lora_te_", "text_encoder."))
        if (w := module_in_features(tensors)) is not None and "mlp_fc2" not in _normalized(name)
    )
    if te_widths:
        width, _ = te_widths.most_common(1)[0]
        base = TEXT_ENCODER_WIDTH_BASES.get(width)
        if base is not None:
            return base, f"its text-encoder layers are {width} wide"
    return None, "no cross-attention or text-encoder layers to tell it from"


def detect_lora_base(state_dict: Mapping[str, object]) -> str | None:
    """The base (``BASE_SD1``, ``BASE_SD2``, ``BASE_SDXL``, ``BASE_SDXL_REFINER``) a LoRA was made for, or None."""
    return describe_lora_base(lora_modules(state_dict)[0])[0]


def base_for_context_dim(context_dim: int | None) -> str | None:
    """The base of a UNet from its cross-attention context width (the host's ``unet_config["context_dim"]``)."""
    return CONTEXT_DIM_BASES.get(context_dim) if context_dim is not None else None


# -- match policy ----------------------------------------------------------------------------------
@dataclass
class MatchReport:
    """How a LoRA's modules landed on a model (and its CLIP, when one is connected)."""

    applied: list[str] = field(default_factory=list)
    """Modules that patch a layer of the right shape."""
    unmatched: list[str] = field(default_factory=list)
    """Modules whose name maps to no layer of the model (or of the CLIP)."""
    misfit: list[str] = field(default_factory=list)
    """Modules that map to a layer of another shape (never applied)."""
    skipped: list[str] = field(default_factory=list)
    """Text-encoder modules not considered because no CLIP was connected."""

    @property
    def total(self) -> int:
        """Modules considered: applied + unmatched + misfit (skipped ones excluded)."""
        return len(self.applied) + len(self.unmatched) + len(self.misfit)

    @property
    def rejected(self) -> int:
        return len(self.unmatched) + len(self.misfit)

    def allowed_rejects(self) -> int:
        """How many modules may be left over: ``floor(UNMATCHED_TOLERANCE * total)``."""
        return int(UNMATCHED_TOLERANCE * self.total)


def _examples(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _an(phrase: str) -> str:
    """``phrase`` with its indefinite article, by sound: "an SDXL model", "an unknown-base model", "a LoRA"."""
    return ("an " if phrase[:1] in "AEIOSaeiou" else "a ") + phrase  # our phrases: SD..., LoRA, unknown


def describe_model(base: str | None, family: str, context_dim: int | None) -> str:
    """How messages name a model: ``"SD1.x model (SD15, cross-attention width 768)"``."""
    return f"{base or 'unknown-base'} model ({family}, cross-attention width {context_dim})"


def _fix(model_base: str | None, lora_base: str | None) -> str:
    if model_base is None:
        return "Use a LoRA made for this model's base."
    hint = f" (for LCM: {LCM_LORA_FOR_BASE[model_base]})" if model_base in LCM_LORA_FOR_BASE else ""
    other = f", or load {_an(lora_base)} checkpoint" if lora_base and lora_base != model_base else ""
    return f"Pick a LoRA made for {model_base}{hint}{other}."


def match_problem(
    report: MatchReport,
    lora_name: str,
    lora_base: str | None,
    evidence: str,
    model_base: str | None,
    model_desc: str,
) -> str | None:
    """The error message for a LoRA that must not be applied to the model, or None when it may be.

    Args:
        report: where the modules landed.
        lora_name: the file name, for the message.
        lora_base / evidence: ``describe_lora_base`` of the LoRA.
        model_base: ``base_for_context_dim`` of the model (None if unknown).
        model_desc: ``describe_model`` of the model.
    """
    apparent = _an(f"{lora_base} LoRA ({evidence})" if lora_base else f"LoRA of unknown base ({evidence})")
    if lora_base and model_base and lora_base != model_base:
        return (
            f"{lora_name} is {apparent}, but the model is {_an(model_desc)}; "
            f"{len(report.applied)} of its {report.total} LoRA keys would land on it. " + _fix(model_base, lora_base)
        )
    if report.total == 0:
        return (
            f"{lora_name} only patches the text encoder ({len(report.skipped)} LoRA keys) and no clip is "
            "connected; connect the CLIP of the checkpoint to apply it."
        )
    if not report.applied:
        return (
            f"none of the {report.total} LoRA keys of {lora_name} match a layer of this {model_desc} "
            f"(e.g. {_examples(report.unmatched or report.misfit)}); it is {apparent}. " + _fix(model_base, lora_base)
        )
    if report.rejected > report.allowed_rejects():
        return (
            f"only {len(report.applied)} of the {report.total} LoRA keys of {lora_name} fit this {model_desc}: "
            f"{len(report.unmatched)} match no layer and {len(report.misfit)} have another shape "
            f"(e.g. {_examples(report.unmatched + report.misfit)}), more than the "
            f"{UNMATCHED_TOLERANCE:.0%} tolerance ({report.allowed_rejects()} of {report.total}); "
            f"it is {apparent}. Applying part of a LoRA gives wrong images. " + _fix(model_base, lora_base)
        )
    return None


def applied_message(lora_name: str, report: MatchReport, parts: Mapping[str, int]) -> str:
    """The per-link log line: ``"<file>: applied N of M LoRA keys (model a, clip b)"`` plus leftovers."""
    detail = ", ".join(f"{k} {v}" for k, v in parts.items())
    msg = f"{lora_name}: applied {len(report.applied)} of {report.total} LoRA keys ({detail})"
    if report.rejected:
        msg += f"; skipped {report.rejected} that do not fit: {_examples(report.unmatched + report.misfit)}"
    if report.skipped:
        msg += f"; {len(report.skipped)} text-encoder keys unused (no clip connected)"
    return msg


# -- fused-weight cache ----------------------------------------------------------------------------
FusedWeights = dict[str, torch.nn.Parameter]


@dataclass
class _Entry:
    owner: weakref.ref
    weights: FusedWeights


class FusedWeightCache:
    """Bounded LRU registry of fused weights, one entry per (owner module, key).

    ``owner`` is the module the weights belong to (the host's ``BaseModel`` or text-encoder
    module); an entry is only returned for that very object and is dropped when it is garbage
    collected. ``computations`` counts the calls that really computed weights; ``hits`` the re-uses.
    """

    def __init__(self, max_entries: int = FUSE_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.computations = 0
        self.hits = 0
        self._entries: OrderedDict[tuple[int, Hashable], _Entry] = OrderedDict()
        self._finalizers: dict[int, weakref.finalize] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(
        self, key: Hashable, owner: object, compute: Callable[[], FusedWeights]
    ) -> tuple[FusedWeights, bool]:
        """The weights cached under ``(owner, key)``, else ``compute()`` stored; returns ``(weights, computed)``."""
        full = (id(owner), key)
        entry = self._entries.get(full)
        if entry is not None and entry.owner() is owner:
            self._entries.move_to_end(full)
            self.hits += 1
            return entry.weights, False
        weights = compute()
        self.computations += 1
        self._entries[full] = _Entry(weakref.ref(owner), weights)
        self._entries.move_to_end(full)
        if id(owner) not in self._finalizers:
            self._finalizers[id(owner)] = weakref.finalize(owner, self._drop_owner, id(owner))
        while len(self._entries) > self.max_entries:
            (owner_id, _), _ = self._entries.popitem(last=False)
            self._forget_owner_if_unused(owner_id)
        return weights, True

    def _drop_owner(self, owner_id: int) -> None:
        for full in [k for k in self._entries if k[0] == owner_id]:
            del self._entries[full]
        self._finalizers.pop(owner_id, None)

    def _forget_owner_if_unused(self, owner_id: int) -> None:
        if not any(k[0] == owner_id for k in self._entries):
            finalizer = self._finalizers.pop(owner_id, None)
            if finalizer is not None:
                finalizer.detach()

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        for finalizer in self._finalizers.values():
            finalizer.detach()
        self._finalizers.clear()
        self._entries.clear()


FUSED_WEIGHTS = FusedWeightCache()
"""The process-wide registry the node uses (cross-prompt state lives here, nowhere else)."""

_FUSED_UUID_NAMESPACE = uuid.UUID("9b7f4c1e-3a0d-4c55-8f3e-2d6a1b0c7e42")


def stable_uuid(key: Hashable) -> uuid.UUID:
    """A UUID that is a pure function of ``repr(key)``: equal fused weights get equal patch ids."""
    return uuid.uuid5(_FUSED_UUID_NAMESPACE, repr(key))


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(resolved path, size, mtime_ns)``: changes when the file on disk is replaced or edited."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return str(resolved), st.st_size, st.st_mtime_ns


def fuse_workspace_bytes(numels: list[int]) -> int:
    """Scratch memory to fuse weights one at a time: ``FUSE_WORKSPACE_FACTOR`` fp32 copies of the largest."""
    return FUSE_WORKSPACE_FACTOR * 4 * max(numels, default=0)
