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

import torch

try:  # inside ComfyUI the pack is a package; in the CPU tests the repo root is on sys.path
    from ..dpcache_core import spectral
    from ..dpcache_core.taylor import peak_bytes
except ImportError:  # pragma: no cover - depends on how the pack is imported
    from dpcache_core import spectral
    from dpcache_core.taylor import peak_bytes

log = logging.getLogger("dpcache")

WRAPPER_KEY = "dpcache_memory"
WIDTH_ATTRIBUTES = ("hidden_size", "inner_dim", "dim")  # FLUX, Chroma, HunyuanVideo / Qwen-Image / Wan


def feature_layout(model) -> tuple[int, tuple[int, ...], torch.dtype] | None:
    """(token width, patch size per latent axis from the last, the dtype the blocks compute in) of a
    MODEL's diffusion model; None when it does not say (then nothing is declared)."""
    dm = model.get_model_object("diffusion_model")
    width = next((getattr(dm, a) for a in WIDTH_ATTRIBUTES if isinstance(getattr(dm, a, None), int)), None)
    patch = getattr(dm, "patch_size", None)
    if isinstance(patch, int):
        patch = (patch, patch)
    if width is None or not patch or not all(isinstance(p, int) and p > 0 for p in patch):
        return None
    base = getattr(model, "model", None)
    dtype = getattr(base, "manual_cast_dtype", None) or (model.model_dtype() if hasattr(model, "model_dtype") else torch.float32)
    return width, tuple(patch), dtype


def cache_bytes(model, order: int, predictor: str = "taylor"):
    """A function (noise_shape, conds) -> the cache's expected peak in bytes when ``model`` samples
    a latent of ``noise_shape``: per conditioning (stream), the ``peak_bytes`` of the forecaster
    (Taylor of ``order``, or spectral) for a cache-point feature of batch x image tokens x width
    elements; None when the model's layout is unknown."""
    layout = feature_layout(model)
    if layout is None:
        return None
    width, patch, dtype = layout

    def expected(noise_shape, conds) -> int:
        spatial = list(noise_shape[2:])
        sizes = [1] * max(0, len(spatial) - len(patch)) + list(patch[-len(spatial):] if spatial else [])
        tokens = math.prod(math.ceil(s / p) for s, p in zip(spatial, sizes))
        streams = sum(len(c) for c in (conds or {}).values() if c) or 1
        numel = int(noise_shape[0]) * tokens * width
        if predictor == "spectral":
            return streams * spectral.peak_bytes(numel, dtype)
        return streams * peak_bytes(numel, order, dtype)

    return expected


class ReserveDuringLoad:
    """The PREPARE_SAMPLING wrapper: ``EXTRA_RESERVED_VRAM`` raised by the expected bytes while the
    model loads for sampling."""

    def __init__(self, expected_bytes):
        self.expected_bytes = expected_bytes

    def bytes_for(self, noise_shape, conds) -> int:
        value = self.expected_bytes
        return int(value(noise_shape, conds) if callable(value) else value)

    def __call__(self, executor, model, noise_shape, conds, *args, **kwargs):
        import comfy.model_management as mm

        extra = self.bytes_for(noise_shape, conds)
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
