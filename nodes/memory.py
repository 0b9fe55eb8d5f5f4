"""Tell ComfyUI's memory planner how much the DPCache cache will hold (issue 19, docs/memory.md).

ComfyUI (0.3.64) decides how many model weights to put on the GPU, and which other models to
unload, in ``comfy.model_management.load_models_gpu`` called from ``sampler_helpers.prepare_sampling``.
It keeps ``memory_required + extra_reserved_memory()`` free for inference (and at least
``minimum_memory_required + extra_reserved_memory()`` when it loads a model partly). There is no
per-model "extra memory" entry; ``extra_reserved_memory()`` reads the module global
``EXTRA_RESERVED_VRAM``. So a PREPARE_SAMPLING wrapper raises that global by the cache's expected
peak for exactly the duration of the load, and lowers it again afterwards: both estimates grow by
that amount, for this model's sampling only.

No ComfyUI import at module level: the CPU tests drive this with fakes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

try:  # inside ComfyUI the pack is a package; in the CPU tests the repo root is on sys.path
    from ..dpcache_core import spectral
    from ..dpcache_core.taylor import peak_bytes
except ImportError:  # pragma: no cover - depends on how the pack is imported
    from dpcache_core import spectral
    from dpcache_core.taylor import peak_bytes

from .block_patches import RUN_KEY

log = logging.getLogger("dpcache")

WRAPPER_KEY = "dpcache_memory"
# the token width: FLUX, Chroma, HunyuanVideo / Qwen-Image / Wan, Lumina 2, Z-Image / Kandinsky 5
WIDTH_ATTRIBUTES = ("hidden_size", "inner_dim", "dim", "model_dim")
WIDTH_LAYERS = ("first",)  # a model that states no width: its input projection's out_features (Krea2)
PATCH_ATTRIBUTES = ("patch_size", "patch")  # the patch size: most families / Krea2


def feature_layout(model) -> tuple[int, tuple[int, ...], torch.dtype] | None:
    """(token width, patch size per latent axis from the last, the dtype the blocks compute in) of a
    MODEL's diffusion model; None when it does not say (then nothing is declared)."""
    dm = model.get_model_object("diffusion_model")
    width = next((getattr(dm, a) for a in WIDTH_ATTRIBUTES if isinstance(getattr(dm, a, None), int)), None)
    if width is None:
        width = next((getattr(dm, a).out_features for a in WIDTH_LAYERS
                      if isinstance(getattr(getattr(dm, a, None), "out_features", None), int)), None)
    patch = next((getattr(dm, a) for a in PATCH_ATTRIBUTES if getattr(dm, a, None) is not None), None)
    if isinstance(patch, int):
        patch = (patch, patch)
    if width is None or not patch or not all(isinstance(p, int) and p > 0 for p in patch):
        return None
    base = getattr(model, "model", None)
    dtype = getattr(base, "manual_cast_dtype", None) or (model.model_dtype() if hasattr(model, "model_dtype") else torch.float32)
    return width, tuple(patch), dtype


def feature_numel(layout, noise_shape) -> int:
    """Elements of one stream's cache-point feature: batch x image tokens x token width."""
    width, patch, _ = layout
    spatial = list(noise_shape[2:])
    sizes = [1] * max(0, len(spatial) - len(patch)) + list(patch[-len(spatial):] if spatial else [])
    tokens = math.prod(math.ceil(s / p) for s, p in zip(spatial, sizes))
    return int(noise_shape[0]) * tokens * width


def forecaster_bytes(predictor: str, order: int, numel: int, dtype, history: int | None = None) -> int:
    """``peak_bytes`` of one stream's forecaster: Taylor of ``order``, or spectral with a ring of ``history``."""
    if predictor == "spectral":
        return spectral.peak_bytes(numel, dtype, history or spectral.DEFAULT_MAX_HISTORY)
    return peak_bytes(numel, order, dtype)


def cache_bytes(model, order: int, predictor: str = "taylor"):
    """A function (noise_shape, conds) -> the cache's expected peak in bytes when ``model`` samples
    a latent of ``noise_shape``: per conditioning (stream), the ``peak_bytes`` of the forecaster
    (Taylor of ``order``, or spectral) for a cache-point feature of batch x image tokens x width
    elements; None when the model's layout is unknown. A run that checked its memory
    (``MemoryFit``) declares its own figure instead (``ReserveDuringLoad``)."""
    layout = feature_layout(model)
    if layout is None:
        return None

    def expected(noise_shape, conds) -> int:
        streams = sum(len(c) for c in (conds or {}).values() if c) or 1
        return streams * forecaster_bytes(predictor, order, feature_numel(layout, noise_shape), layout[2])

    return expected


# --------------------------------------------------------------------------------------------
# The forecaster that fits: a step after the forecaster was chosen, which may only downgrade it

SPECTRAL_MIN_HISTORY = 4  # the shortest spectral ring tried before Taylor 1 (degree 4 is ridge-fitted on it)


@dataclass(frozen=True)
class MemoryFit:
    """What one run's cache will hold: forecaster, Taylor order, spectral ring, the streams that run,
    their expected peak in bytes, and why the forecaster was changed ("" when it was not)."""

    predictor: str
    order: int
    history: int | None
    streams: int
    bytes: int
    note: str = ""


def fit_forecaster(predictor: str, order: int, numel: int, dtype, streams: int, available: int | None) -> MemoryFit:
    """The chosen forecaster when its cache fits in ``available`` bytes (None: not known, kept);
    else the spectral forecaster with the longest shorter ring that fits (down to
    ``SPECTRAL_MIN_HISTORY``), else Taylor order 1; else Taylor order 1 anyway, and the note says
    ComfyUI will offload weights. Only ever moves to a smaller cache."""

    def need(p, o, h=None):
        return streams * forecaster_bytes(p, o, numel, dtype, h)

    history = spectral.DEFAULT_MAX_HISTORY if predictor == "spectral" else None
    chosen = need(predictor, order, history)
    if available is None or chosen <= available:
        return MemoryFit(predictor, order, history, streams, chosen)
    gib = 2 ** 30
    head = (f"the {predictor} forecaster's cache ({chosen / gib:.2f} GiB for {streams} stream(s)) does not fit the "
            f"{max(available, 0) / gib:.2f} GiB of GPU memory left beside the model")
    if predictor == "spectral":
        for h in range(history - 1, SPECTRAL_MIN_HISTORY - 1, -1):
            if need("spectral", order, h) <= available:
                return MemoryFit("spectral", order, h, streams, need("spectral", order, h),
                                 f"{head}: its ring keeps {h} key features instead of {history}")
    small = need("taylor", 1)
    if small <= available:
        return MemoryFit("taylor", 1, None, streams, small, f"{head}: Taylor order 1 predicts instead ({small / gib:.2f} GiB)")
    if predictor == "taylor" and order == 1:
        return MemoryFit(predictor, order, None, streams, chosen, f"{head}: ComfyUI will offload model weights to make room")
    return MemoryFit("taylor", 1, None, streams, small, f"{head}: Taylor order 1 predicts instead ({small / gib:.2f} GiB), "
                     "and ComfyUI will still offload model weights to make room")


def streams_that_run(guider) -> int:
    """Conditionings evaluated per sampler evaluation: the positive ones, and the negative ones unless
    ComfyUI skips them (cfg 1, or none connected)."""
    conds = getattr(guider, "conds", None) or {}
    positive = len(conds.get("positive") or []) or 1
    negative = len(conds.get("negative") or [])
    cfg = getattr(guider, "cfg", None)
    skipped = cfg is not None and float(cfg) == 1.0 and not guider.model_options.get("disable_cfg1_optimization", False)
    return positive + (0 if skipped else negative)


def free_vram(guider, noise_shape) -> int | None:
    """GPU bytes the cache may use without ComfyUI offloading this model's weights: free now, plus what
    other loaded models hold (ComfyUI unloads them first), less this model's weights still to load, its
    activation estimate and ComfyUI's reserve. None off a GPU or without ComfyUI."""
    try:
        import comfy.model_management as mm
        import comfy.sampler_helpers as helpers
    except ImportError:
        return None
    try:
        patcher = guider.model_patcher
        device = patcher.load_device
        if getattr(device, "type", "cpu") == "cpu":
            return None
        others = sum(m.model_loaded_memory() for m in mm.current_loaded_models
                     if m.model is not None and not m.model.is_clone(patcher) and m.device == device)
        to_load = patcher.model_size() - patcher.loaded_size()
        activations, _ = helpers.estimate_memory(patcher, noise_shape, guider.conds)
        return int(mm.get_free_memory(device) + others - to_load - activations - mm.extra_reserved_memory())
    except Exception as exc:  # an older or newer ComfyUI: the forecaster is kept, the log says why
        log.info("DPCache: free GPU memory not known (%s); the forecaster is not checked against it", exc)
        return None


def fit_run(schedule, guider, noise_shape):
    """(schedule, MemoryFit) for a run: the schedule's forecaster, downgraded by ``fit_forecaster`` when
    its cache does not fit the free GPU memory (``free_vram``); (schedule, None) when the model's layout
    is unknown."""
    layout = feature_layout(guider.model_patcher)
    if layout is None:
        return schedule, None
    fit = fit_forecaster(schedule.predictor, schedule.order, feature_numel(layout, noise_shape), layout[2],
                         streams_that_run(guider), free_vram(guider, noise_shape))
    if (fit.predictor, fit.order) != (schedule.predictor, schedule.order):
        schedule = replace(schedule, predictor=fit.predictor, order=fit.order)
    if fit.note:
        log.warning("DPCache: %s", fit.note)
    return schedule, fit


class ReserveDuringLoad:
    """The PREPARE_SAMPLING wrapper: ``EXTRA_RESERVED_VRAM`` raised by the expected bytes while the
    model loads for sampling."""

    def __init__(self, expected_bytes):
        self.expected_bytes = expected_bytes

    def bytes_for(self, noise_shape, conds, model_options=None) -> int:
        """The run's own figure (the streams that run, the forecaster that fits) when it checked its
        memory (``MemoryFit`` on the run in ``model_options``), else ``expected_bytes``."""
        run = ((model_options or {}).get("transformer_options") or {}).get(RUN_KEY)
        fit = getattr(run, "memory", None)
        if fit is not None:
            return int(fit.bytes)
        value = self.expected_bytes
        return int(value(noise_shape, conds) if callable(value) else value)

    def __call__(self, executor, model, noise_shape, conds, *args, **kwargs):
        import comfy.model_management as mm

        options = kwargs.get("model_options", args[0] if args else None)
        extra = self.bytes_for(noise_shape, conds, options if isinstance(options, dict) else None)
        if extra <= 0:
            return executor(model, noise_shape, conds, *args, **kwargs)
        log.info("DPCache: reserving %.1f MiB for the cache while the model loads", extra / 2**20)
        mm.EXTRA_RESERVED_VRAM += extra
        try:
            return executor(model, noise_shape, conds, *args, **kwargs)
        finally:
            mm.EXTRA_RESERVED_VRAM -= extra

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone: share, it is immutable
        return self


def reserve(model, expected_bytes) -> None:
    """Declare on ``model`` (a clone) the memory the cache will need: ``expected_bytes``, a number
    or a function (noise_shape, conds) -> bytes (``cache_bytes``); None declares nothing."""
    if expected_bytes is None:
        log.info("DPCache: this model does not say its token width; the cache's memory is not declared to ComfyUI")
        return
    try:
        from comfy.patcher_extension import WrappersMP

        kind = WrappersMP.PREPARE_SAMPLING
    except ImportError:  # CPU tests (the name ComfyUI uses)
        kind = "prepare_sampling"
    model.add_wrapper_with_key(kind, WRAPPER_KEY, ReserveDuringLoad(expected_bytes))
