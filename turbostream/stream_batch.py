"""StreamDiffusion-style stream batch: several frames at different timesteps in one denoiser call.

Pure torch (StreamDiffusion: Kodaira et al., arXiv 2312.12491, and its reference implementation
cumulo-autumn/StreamDiffusion, PyPI ``streamdiffusion`` 0.1.1, ``pipeline.py``). All latents here are in
the denoiser's own space ("model space", unit variance) and in the VP convention:
``x_t = alpha_t * x0 + beta_t * eps`` with ``alpha_t = sqrt(abar_t)``, ``beta_t = sqrt(1 - abar_t)``.

Layout: ``n = len(timesteps)`` steps, ``f = frame_buffer_size`` frames per call, ``N = n * f`` slots,
step-major (slots ``[i*f, (i+1)*f)`` are at timestep ``i``). Each call denoises all ``N`` slots at
once, returns the ``f`` finished frames (the last step's x0) and moves every other slot one step on:
``buffer = alpha[f:] * x0[:-f] + beta[f:] * init_noise[f:]`` (no noise term with ``add_noise`` off).
Output of call ``k`` is the frame group fed at call ``k - (n - 1)``; ``drain`` helpers below give N
aligned outputs for N inputs (no warm-up frames).

The denoiser is any callable ``denoise(x, t, cond) -> x0`` with ``x`` of shape ``(B, C, H, W)`` and
``t`` the integer timestep per sample. To do guidance arithmetic on eps, the engine needs the
denoiser's affine map ``x0 = a_t * x + b_t * eps`` per slot: plain epsilon models have
``a = 1 / alpha, b = -beta / alpha``; LCM models add the boundary condition
``x0 = c_out * (x - beta * eps) / alpha + c_skip * x`` (``SlotSchedule``).

Upstream bugs not copied: warm-up "brown" frames (we drain), slicing by 1 instead of ``f`` (we shift
by ``f`` everywhere, stock noise included), ``initialize`` only right for ``f = 1`` (we evaluate the
unconditional prediction for all ``f`` newest slots), prompt changes resetting the stream (the
conditioning is a per-call argument and never touches the buffers).

Per-slot payloads (e.g. each frame's ControlNet hint): a group may come with ``f`` opaque payload objects,
one per frame; they move through the buffer with their frames, and the denoiser is called as
``denoise(x, t, cond, slots=[payload per slot])`` so that every slot is treated with its own frame's
payload (``turbostream/stream_control.py``). Without payloads the denoiser is called as before.

Out of memory in a denoiser call: the slots are evaluated again in sub-batches of half the size
(``turbostream.oom``; the same per-slot math), down to one slot, then a clear error. Run a frame
inside :func:`transaction` and a failed frame leaves the stream as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .oom import OomPolicy, run_in_chunks

logger = logging.getLogger("turbostream")

LCM_ORIGINAL_STEPS = 50
"""LCM's original schedule: ``timesteps[i] = 999 - 20 * i`` for i = 0..49 (diffusers ``LCMScheduler`` with
``original_inference_steps=50``; Luo et al., arXiv 2310.04378)."""
NUM_TRAIN_TIMESTEPS = 1000
LCM_STRIDE = NUM_TRAIN_TIMESTEPS // LCM_ORIGINAL_STEPS
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
"""LCM boundary scalings: ``c_skip = SIGMA_DATA^2 / ((10 t)^2 + SIGMA_DATA^2)``, ``c_out = 10 t / sqrt(...)``."""
SIMILARITY_EPS = 1e-6
CFG_TYPES = ("none", "self", "initialize", "full")
INDEX_MODES = ("lcm_index", "timesteps")


class StreamError(ValueError):
    """A stream request that cannot be served. ``input_name`` names the input to change."""

    def __init__(self, message: str, input_name: str) -> None:
        super().__init__(message)
        self.input_name = input_name


# -- schedule ----------------------------------------------------------------------------------------
def lcm_timesteps(t_index_list: Sequence[int]) -> list[int]:
    """Indices into LCM's 50-step grid -> timesteps (``[32, 45]`` -> ``[359, 99]``)."""
    return [NUM_TRAIN_TIMESTEPS - 1 - LCM_STRIDE * i for i in t_index_list]


def parse_t_index_list(text: str, mode: str = "lcm_index") -> list[int]:
    """Validated timesteps from the node's ``t_index_list`` string.

    ``lcm_index``: strictly increasing indices in 0-49 of the LCM grid. ``timesteps``: strictly
    decreasing raw timesteps in 0-999 (for turbo models, e.g. ``999`` or ``999,499``).
    """
    if mode not in INDEX_MODES:
        raise StreamError(f"unknown index mode {mode!r}; expected one of {', '.join(INDEX_MODES)}", "index_mode")
    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not parts:
        raise StreamError("t_index_list is empty: give e.g. 32,45", "t_index_list")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise StreamError(f"t_index_list: {bad!r} is not an integer", "t_index_list") from None
    if mode == "lcm_index":
        limit, ordered = LCM_ORIGINAL_STEPS - 1, all(b > a for a, b in zip(values, values[1:], strict=False))
        order = "strictly increasing (sorted, no duplicates)"
    else:
        limit, ordered = NUM_TRAIN_TIMESTEPS - 1, all(b < a for a, b in zip(values, values[1:], strict=False))
        order = "strictly decreasing (no duplicates)"
    outside = [v for v in values if not 0 <= v <= limit]
    if outside:
        raise StreamError(f"t_index_list: {outside[0]} is outside 0-{limit} for index_mode {mode}", "t_index_list")
    if not ordered:
        raise StreamError(f"t_index_list must be {order} for index_mode {mode}, got {text.strip()}", "t_index_list")
    return lcm_timesteps(values) if mode == "lcm_index" else values


def lcm_boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCM's boundary condition at integer timesteps ``t``."""
    scaled = t.double() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


@dataclass
class SlotSchedule:
    """Per-slot constants, each a ``(N,)`` float64 tensor except ``t`` (int64)."""

    t: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor

    @classmethod
    def build(
        cls,
        timesteps: Sequence[int],
        sigmas: Sequence[float],
        frame_buffer_size: int,
        boundary: str = "none",
        skip_on: str = "vp",
    ) -> SlotSchedule:
        """Slots step-major from per-step k-diffusion ``sigmas`` (``sigma = beta / alpha``).

        ``boundary``: ``"lcm"`` for LCM-sampling denoisers, ``"none"`` for plain epsilon/x0 ones.
        ``skip_on``: where the LCM ``c_skip`` term is applied — ``"vp"`` (diffusers, ``c_skip * x_t``)
        or ``"ve"`` (ComfyUI, ``c_skip * x_t / alpha``); it only matters for the eps reconstruction.
        """
        f = frame_buffer_size
        t = torch.tensor(list(timesteps), dtype=torch.long).repeat_interleave(f)
        sig = torch.tensor([float(s) for s in sigmas], dtype=torch.float64).repeat_interleave(f)
        alpha = (1 + sig**2).rsqrt()
        beta = sig * alpha
        if boundary == "lcm":
            c_skip, c_out = lcm_boundary(t)
            if skip_on == "ve":
                c_skip = c_skip / alpha
        elif boundary == "none":
            c_skip, c_out = torch.zeros_like(alpha), torch.ones_like(alpha)
        else:
            raise ValueError(f"unknown boundary {boundary!r}; expected 'lcm' or 'none'")
        return cls(t, alpha, beta, c_skip, c_out)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with ``x0 = a * x + b * eps`` per slot."""
        return self.c_out / self.alpha + self.c_skip, -self.c_out * self.beta / self.alpha


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


# -- similarity filter ---------------------------------------------------------------------------------
class SimilarityFilter:
    """Stochastic similarity filter (StreamDiffusion paper §3.4, upstream ``image_filter.py``) with its own
    seeded generator.

        A frame is skipped with probability ``max(0, (cos - threshold) / (1 - threshold))`` where ``cos``
        is its cosine similarity to the last processed frame; at most ``max_skip_frames`` frames in a row
        are skipped (then one is processed regardless). Processed frames become the reference.
        ``threshold <= 0`` or ``>= 1`` turns it off. (Upstream counts skips without resetting the count when
        a frame is processed by chance, and allows one extra skip; we count consecutive skips.)
    """

    def __init__(self, threshold: float, max_skip_frames: int, seed: int) -> None:
        self.threshold = threshold
        self.max_skip_frames = max_skip_frames
        self.generator = torch.Generator().manual_seed(seed)
        self.reference: torch.Tensor | None = None
        self.skipped = 0
        self.last_similarity: float | None = None

    @property
    def enabled(self) -> bool:
        return 0.0 < self.threshold < 1.0

    def should_skip(self, frame: torch.Tensor) -> bool:
        """``frame`` in [-1, 1] (any shape). Updates the reference when the frame is processed."""
        if not self.enabled or self.reference is None or self.reference.shape != frame.shape:
            self.reference, self.skipped = frame.detach().clone(), 0
            return False
        cos = cosine_similarity(self.reference, frame)
        self.last_similarity = cos
        skip_prob = max(0.0, (cos - self.threshold) / (1.0 - self.threshold))
        u = torch.rand((), generator=self.generator, dtype=torch.float64).item()
        if u < skip_prob and self.skipped < self.max_skip_frames:
            self.skipped += 1
            return True
        self.reference, self.skipped = frame.detach().clone(), 0
        return False


# -- engine ----------------------------------------------------------------------------------------
Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class StreamConfig:
    timesteps: list[int]
    frame_buffer_size: int = 1
    cfg_type: str = "self"
    guidance: float = 1.2
    delta: float = 1.0
    add_noise: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.timesteps:
            raise StreamError("no timesteps", "t_index_list")
        if self.frame_buffer_size < 1:
            raise StreamError(
                f"frame_buffer_size must be at least 1, got {self.frame_buffer_size}", "frame_buffer_size"
            )
        if self.cfg_type not in CFG_TYPES:
            raise StreamError(f"unknown cfg_type {self.cfg_type!r}; expected one of {', '.join(CFG_TYPES)}", "cfg_type")

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def slots(self) -> int:
        return self.steps * self.frame_buffer_size

    @property
    def uses_guidance(self) -> bool:
        return self.cfg_type != "none" and self.guidance != 1.0


@dataclass
class StreamEngine:
    """State of one stream. ``latent_shape`` is ``(C, H, W)`` of one frame's latent."""

    config: StreamConfig
    schedule: SlotSchedule
    latent_shape: tuple[int, int, int]
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    init_noise: torch.Tensor | None = None
    calls: int = 0
    evaluations: int = 0
    last_first_x0: torch.Tensor | None = None
    """x0 of the newest group in the last call (a one-step estimate; shown while a live stream warms up)."""
    last_x0: torch.Tensor | None = None
    """x0 of every slot in the last call (step-major): where :meth:`retarget` carries the buffered frames from."""
    last_finished: torch.Tensor | None = None
    """x0 of the latest group that left the stream as a real frame (what ``feedback`` blends into the next
    input; None until the first frame is through)."""
    last_slots: tuple | None = None
    """The slot payloads of the last call (None: none had one)."""
    oom: OomPolicy = field(default_factory=OomPolicy)
    """Out-of-memory in a denoiser call: evaluate the slots in smaller sub-batches (``turbostream.oom``)."""
    label: str = "stream engine"
    """Names the stream in messages (the node sets it)."""
    max_eval_batch: int | None = None
    """Slots per denoiser call after an out-of-memory (None: all slots in one call)."""
    buffer: torch.Tensor = field(init=False)
    stock_noise: torch.Tensor = field(init=False)
    generator: torch.Generator = field(init=False)
    buffer_payload: tuple = field(init=False)
    """The payload of each buffer slot (step-major, like ``buffer``); ``None`` where a frame came without."""

    def __post_init__(self) -> None:
        cfg = self.config
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        shape = (cfg.slots, *self.latent_shape)
        if self.init_noise is None:
            self.init_noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        if tuple(self.init_noise.shape) != shape:
            raise ValueError(f"init_noise must have shape {shape}, got {tuple(self.init_noise.shape)}")
        self.init_noise = self.init_noise.to(self.device, self.dtype)
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        cfg = self.config
        f = cfg.frame_buffer_size
        self.buffer = torch.zeros(((cfg.steps - 1) * f, *self.latent_shape), device=self.device, dtype=self.dtype)
        # RCFG stock noise as the next call uses it: the f newest slots carry the noise they were noised
        # with, the others what the previous call left (nothing yet). Upstream StreamDiffusion keeps a
        # zero-initialised stock and shifts ``[init_noise[:1]; stock[:-1]]`` at the start of every call, so
        # its first call also sees ``[init_noise_0, 0, ...]`` (checked against streamdiffusion 0.1.1).
        rest = torch.zeros(((cfg.steps - 1) * f, *self.latent_shape), device=self.device, dtype=self.dtype)
        self.stock_noise = torch.cat([self.init_noise[:f], rest], dim=0)
        self.buffer_payload = (None,) * ((cfg.steps - 1) * f)

    @property
    def lag(self) -> int:
        """Calls between feeding a frame group and receiving its result."""
        return self.config.steps - 1

    def _col(self, v: torch.Tensor) -> torch.Tensor:
        return _col(v, self.buffer if self.buffer.numel() else self.init_noise)

    def first_slot_img2img(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents ``(f, C, H, W)`` noised to the first timestep with the stream's fixed noise."""
        f = self.config.frame_buffer_size
        s = self.schedule
        return (
            self._col(s.alpha[:f]) * latents.to(self.device, self.dtype) + self._col(s.beta[:f]) * self.init_noise[:f]
        )

    def fresh_txt2img(self) -> torch.Tensor:
        """A fresh Gaussian group for txt2img, from the stream's own generator."""
        shape = (self.config.frame_buffer_size, *self.latent_shape)
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(self.device, self.dtype)

    def _eval(
        self, denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Any, slots: tuple | None = None
    ) -> torch.Tensor:
        """``denoise`` over all slots of ``x``: in one call, or in sub-batches after an out-of-memory
        (the same per-slot math; the sub-batch size found is kept for the rest of the stream).
        ``slots``: the payload of each slot, handed to the denoiser (sliced like ``x``)."""
        total = x.shape[0]
        self.evaluations += total
        parts: list[torch.Tensor] = []

        def run(start: int, stop: int) -> None:
            if slots is None:
                parts.append(denoise(x[start:stop], t[start:stop], cond))
            else:
                parts.append(denoise(x[start:stop], t[start:stop], cond, slots=list(slots[start:stop])))

        limit = min(total, self.max_eval_batch or total)
        used = run_in_chunks(
            run, total, limit, f"{self.label}: denoising {total} stream slot(s)", self.oom, unit="slot"
        )
        if used < limit:
            logger.warning("%s: evaluating the stream in sub-batches of %d slots from now on", self.label, used)
            self.max_eval_batch = used
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def step(
        self, first: torch.Tensor, denoise: Denoiser, cond: Any, uncond: Any = None, payload: Sequence | None = None
    ) -> torch.Tensor:
        """One call: ``first`` is the new group already at the first timestep, ``(f, C, H, W)``.

        ``payload``: one object per frame of the group (or None): it enters the first slots with the
        frames and moves on with them; while any slot has one, the denoiser gets ``slots=``.
        Returns x0 of the ``f`` slots that finished (the last step's group).
        """
        cfg, s = self.config, self.schedule
        f = cfg.frame_buffer_size
        guided = cfg.uses_guidance
        if guided and cfg.cfg_type in ("full", "initialize") and uncond is None:
            raise StreamError(
                f"cfg_type {cfg.cfg_type} needs a negative conditioning; connect one, or use cfg_type self or none",
                "negative",
            )
        x = torch.cat([first.to(self.device, self.dtype), self.buffer], dim=0)
        t = s.t.to(self.device)
        if payload is not None and len(payload) != f:
            raise ValueError(f"payload must have one entry per frame of the group ({f}), got {len(payload)}")
        slots = (*(payload if payload is not None else (None,) * f), *self.buffer_payload)
        slots = slots if any(p is not None for p in slots) else None
        # 1. the conditional prediction for every slot
        x0 = self._eval(denoise, x, t, cond, slots)
        a, b = (self._col(v) for v in s.affine())
        eps_c = (x0 - a * x) / b
        eps = eps_c
        # 2. guidance (eps space, all parameterisations here are affine in eps)
        if guided:
            if cfg.cfg_type == "full":
                eps_u = (self._eval(denoise, x, t, uncond, slots) - a * x) / b
            else:
                stock = self.stock_noise
                if cfg.cfg_type == "initialize":
                    x0_u = self._eval(denoise, x[:f], t[:f], uncond, None if slots is None else slots[:f])
                    stock = torch.cat([(x0_u - a[:f] * x[:f]) / b[:f], stock[f:]], dim=0)
                eps_u = cfg.delta * stock
            eps = eps_u + cfg.guidance * (eps_c - eps_u)
            x0 = a * x + b * eps
            # 3. residual CFG: stock noise for the next call (each slot moves f places on)
            if cfg.cfg_type in ("self", "initialize"):
                self.stock_noise = self._next_stock_noise(stock, eps)
        # 4. finished frames out, the rest one step on
        out = x0[-f:]
        self.last_first_x0 = x0[:f]
        self.last_x0, self.last_slots = x0, slots
        if self.calls >= self.lag:  # the finished slots hold a real frame (not the empty buffer's)
            self.last_finished = out
        if cfg.steps > 1:
            nxt = x0[:-f]
            self.buffer = self._col(s.alpha[f:]) * nxt
            if cfg.add_noise:
                self.buffer = self.buffer + self._col(s.beta[f:]) * self.init_noise[f:]
            self.buffer_payload = tuple(slots[:-f]) if slots is not None else (None,) * (len(x) - f)
        self.calls += 1
        return out

    def _next_stock_noise(self, stock: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Spec §5 with shifts of ``f``: for slot i, ``delta_i = x0_map(beta_i * s_i, eps_i) *
        alpha_{i+f} / beta_{i+f}`` (1 past the end), ``s'_i = init_noise[(i + f) mod N] + delta_i``;
        the next call sees ``[init_noise[:f], s'[:-f]]``."""
        f, s = self.config.frame_buffer_size, self.schedule
        a, b = (self._col(v) for v in s.affine())
        beta = self._col(s.beta)
        delta_x = a * (beta * stock) + b * eps
        ones = torch.ones(f, dtype=torch.float64)
        alpha_next = self._col(torch.cat([s.alpha[f:], ones]))
        beta_next = self._col(torch.cat([s.beta[f:], ones]))
        delta_x = alpha_next * delta_x / beta_next
        s_new = torch.roll(self.init_noise, shifts=-f, dims=0) + delta_x
        return torch.cat([self.init_noise[:f], s_new[:-f]], dim=0)

    def img2img(
        self,
        latents: torch.Tensor,
        denoise: Denoiser,
        cond: Any,
        uncond: Any = None,
        payload: Sequence | None = None,
        feedback: float = 0.0,
    ) -> torch.Tensor:
        """One img2img call for the clean latent group ``latents``.

        ``feedback`` (0-1, temporal feedback in the spirit of the Daydream StreamDiffusion fork's feedback
        processor): before the group is noised into the first slot, its clean latent is blended with the
        latest finished output (``last_finished``: x0, in model space, of the group that left the stream in
        the previous call, ``lag`` frames behind this input): ``z <- (1 - feedback) * z + feedback * x0_prev``.
        Nothing is blended before the first output exists.
        """
        if feedback and self.last_finished is not None:
            latents = torch.lerp(latents.to(self.device, self.dtype), self.last_finished, float(feedback))
        return self.step(self.first_slot_img2img(latents), denoise, cond, uncond, payload)

    def retarget(self, config: StreamConfig, schedule: SlotSchedule) -> str:
        """Go on with new steps, seed or noise setting without a restart; returns what was carried, for the log.

        The noise (and the stream's generator) becomes what a fresh stream with ``config`` draws from its
        seed. Every buffered frame keeps its place in time: the frame fed ``j`` calls before the next call
        goes to the new step ``j``, re-noised from its current x0 estimate with the new noise
        (``alpha_j * x0 + beta_j * noise_j``). With more steps than before, the steps past the old ones get
        the frame that left the stream last (it is shown once more: the lag grew); with fewer, the oldest
        buffered frames are dropped (the lag shrank). RCFG's stock noise starts again as at the start. After
        ``steps`` calls the stream equals a fresh one started on the same frames with ``config``.
        The frame group size cannot change here (the frames in the buffer are grouped by it).
        """
        old_steps, f = self.config.steps, self.config.frame_buffer_size
        if config.frame_buffer_size != f:
            raise ValueError("retarget keeps frame_buffer_size; a new one needs a new stream")
        x0, slots, calls = self.last_x0, self.last_slots, self.calls
        self.config, self.schedule = config, schedule
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        shape = (config.slots, *self.latent_shape)
        self.init_noise = torch.randn(shape, generator=self.generator, dtype=torch.float32).to(self.device, self.dtype)
        self._reset_buffers()
        carried = repeated = 0
        if x0 is not None and config.steps > 1:
            groups, payloads = [], []
            for j in range(1, config.steps):
                source = min(j - 1, old_steps - 1)
                if source >= calls:  # that slot held no frame yet (a young stream)
                    groups.append(torch.zeros_like(x0[:f]))
                    payloads += [None] * f
                    continue
                carried += source == j - 1
                repeated += source != j - 1
                groups.append(x0[source * f : (source + 1) * f])
                payloads += list(slots[source * f : (source + 1) * f]) if slots is not None else [None] * f
            estimates = torch.cat(groups, dim=0)
            self.buffer = self._col(schedule.alpha[f:]) * estimates
            if config.add_noise:
                self.buffer = self.buffer + self._col(schedule.beta[f:]) * self.init_noise[f:]
            self.buffer_payload = tuple(payloads)
        self.last_x0 = self.last_slots = None
        return (
            f"{carried} buffered frame group(s) carried to timesteps {list(config.timesteps)}"
            + (f", {repeated} step(s) given the last finished frame again" if repeated else "")
            + f", noise from seed {config.seed}"
        )

    def txt2img(
        self,
        denoise: Denoiser,
        cond: Any,
        uncond: Any = None,
        latents: torch.Tensor | None = None,
        payload: Sequence | None = None,
    ) -> torch.Tensor:
        return self.step(self.fresh_txt2img() if latents is None else latents, denoise, cond, uncond, payload)


@contextmanager
def transaction(*objects: Any) -> Iterator[None]:
    """Put the objects (their attributes, or a dict's items) back as they were if the block raises.

    A live stream's state is then either fully updated by a frame or untouched by it, whatever
    interrupts the call (the host's interrupt, out of memory, a bad input found late). This works
    because the engine and the filter replace their tensors instead of writing into them; the
    states of ``torch.Generator`` attributes are saved and restored too.
    """
    saved = []
    for obj in objects:
        attrs = obj if isinstance(obj, dict) else vars(obj)
        generators = {k: v.get_state() for k, v in attrs.items() if isinstance(v, torch.Generator)}
        saved.append((attrs, dict(attrs), generators))
    try:
        yield
    except BaseException:
        for attrs, copy, generators in saved:
            attrs.clear()
            attrs.update(copy)
            for k, state in generators.items():
                copy[k].set_state(state)
        raise


def stream_frames(
    engine: StreamEngine,
    groups: Sequence[torch.Tensor | None],
    denoise: Denoiser,
    cond: Any,
    uncond: Any = None,
    skip: Sequence[bool] | None = None,
    on_call: Callable[[int, int], None] | None = None,
    payloads: Sequence[Sequence | None] | None = None,
    feedback: float = 0.0,
) -> list[torch.Tensor]:
    """Run a whole clip through the stream and return one output per group, aligned (no lag).

    ``groups[i]`` is a clean latent group ``(f, C, H, W)`` for img2img, or ``None`` for txt2img.
    ``skip[i]`` (similarity filter) reuses the previous group's output instead of feeding group i.
    ``payloads[i]``: the group's per-frame payloads (see :meth:`StreamEngine.step`), or None.
    ``feedback``: see :meth:`StreamEngine.img2img` (the drain calls blend too, as a live stream would).
    The pipeline is drained: ``lag`` extra calls feed the last group again (with its payloads) and
    their extra outputs are dropped; the first ``lag`` outputs (from the empty buffer) are dropped too.
    """
    skip = list(skip) if skip is not None else [False] * len(groups)
    payloads = list(payloads) if payloads is not None else [None] * len(groups)
    fed = [i for i, s in enumerate(skip) if not s]
    if not fed:
        fed, skip[0] = [0], False
    order = fed + [fed[-1]] * engine.lag
    results: list[torch.Tensor] = []
    total = len(order)
    for call, i in enumerate(order):
        group, payload = groups[i], payloads[i]
        if group is None:
            out = engine.txt2img(denoise, cond, uncond, payload=payload)
        else:
            out = engine.img2img(group, denoise, cond, uncond, payload=payload, feedback=feedback)
        if call >= engine.lag and len(results) < len(fed):
            results.append(out)
        if on_call is not None:
            on_call(call + 1, total)
    by_group: list[torch.Tensor] = []
    last = None
    fed_out = dict(zip(fed, results, strict=True))
    for i in range(len(groups)):
        last = fed_out.get(i, last)
        by_group.append(last)
    return by_group


def frame_groups(count: int, frame_buffer_size: int) -> tuple[list[slice], int]:
    """Slices of ``frame_buffer_size`` frames covering ``count`` frames, and how many frames of padding
    the last group needs (it repeats the last frame)."""
    groups = [slice(i, min(i + frame_buffer_size, count)) for i in range(0, count, frame_buffer_size)]
    pad = (-count) % frame_buffer_size
    return groups, pad


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0, eps=SIMILARITY_EPS)
    )


def expected_evaluations(config: StreamConfig) -> int:
    """Denoiser evaluations per call: n*f (none/self), n*f + f (initialize), 2*n*f (full)."""
    n_f = config.slots
    if not config.uses_guidance or config.cfg_type == "self":
        return n_f
    return n_f + config.frame_buffer_size if config.cfg_type == "initialize" else 2 * n_f
