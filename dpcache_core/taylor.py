"""Taylor (finite-difference) prediction of a feature from earlier key steps (DESIGN §2)."""
from __future__ import annotations

import itertools
import math

import torch

SCHEMES = ("reference", "exact")
CHUNK_ELEMENTS = 1 << 20  # the most elements in one block of the in-place update and the prediction (4 MiB in float32)
MIN_CHUNK_ELEMENTS = 1 << 16  # the fewest (a block is 1/16 of the feature between the two)


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown predictor scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    return scheme


def derivatives_after_for(scheme: str, first_full_steps: int) -> int | None:
    """The run's ``derivatives_after``: the reference scheme refreshes derivatives only at key steps
    after ``first_full_steps - 2`` (as the reference code does); the exact scheme always does."""
    return first_full_steps - 2 if check_scheme(scheme) == "reference" else None


class TaylorPredictor:
    """Predicts a feature at any later step from the features seen at key steps.

    ``update(step, feature)`` at each key step, ``predict(step)`` at skipped ones.

    Two ways to form the factors from the key-step history, both of order ``order``:

    - ``"exact"`` (default): Newton divided differences over the last ``order + 1`` key steps,
      evaluated in Newton form. Exact for polynomials of degree <= ``order`` in the step.
    - ``"reference"``: the reference implementation's TaylorSeer recurrence
      ``D_{n+1}(s) = (D_n(s) - D_n(p)) / (s - p)`` and prediction ``sum_n D_n (t-s)^n / n!``.
      It is exact only up to degree 1; the shipped PACTs and the calibration default use it.

    ``derivatives_after``: the reference only refreshes derivative factors at key steps
    ``s > derivatives_after`` (it passes ``first_full_steps - 2``); ``None`` always refreshes.

    Memory: the feature is kept as a detached copy in its own dtype (16-bit features stay 16-bit,
    others become float32), each derivative factor in float32. ``update`` rewrites these buffers in
    place and ``predict`` sums in float32 straight into its output, both block by block
    (``block_elements``), so the peak is the factors plus at most two float32 blocks
    (``peak_bytes``). Tensors passed in are never written to, and no output aliases a factor.
    """

    def __init__(self, order: int = 2, scheme: str = "exact", derivatives_after: int | None = None):
        if order < 0:
            raise ValueError(f"Taylor order must be >= 0, got {order}")
        self.order = int(order)
        self.scheme = check_scheme(scheme)
        self.derivatives_after = derivatives_after
        self.reset()

    def reset(self) -> None:
        """Forget every key step."""
        self.factors: list[torch.Tensor] = []
        self.steps: list[float] = []  # key steps behind the factors, newest first

    @property
    def ready(self) -> bool:
        return bool(self.factors)

    def update(self, step: float, feature: torch.Tensor) -> None:
        """Record the fully computed ``feature`` at key step ``step``, rewriting the factors in place.

        The same arithmetic as ``new[n+1] = (new[n].float() - old[n].float()) / span_n`` over whole
        tensors, done per block: the new first difference goes into a free float32 buffer (the
        oldest factor, no longer needed, or a new one while the history grows), each higher one
        over the old factor it replaces.
        """
        step = float(step)
        if self.steps and step <= self.steps[0]:
            raise ValueError(f"key steps must increase: got {step} after {self.steps[0]}")
        feature = feature.detach()
        keep = feature.dtype if feature.dtype in (torch.float16, torch.bfloat16) else torch.float32
        old = self.factors
        if old and old[0].shape != feature.shape:
            raise ValueError(
                f"the feature's shape changed from {tuple(old[0].shape)} to {tuple(feature.shape)} between key "
                "steps: a predictor follows one feature; reset() it (or use a new one) for another shape"
            )
        refresh = self.derivatives_after is None or step > self.derivatives_after
        count = min(self.order, len(old)) + 1 if refresh and old else 1  # factors after this update
        if count > 1:
            spans = [step - (self.steps[n] if self.scheme == "exact" else self.steps[0]) for n in range(count - 1)]
            if count > len(old):  # the history grows: one more float32 factor
                free = torch.empty(feature.shape, dtype=torch.float32, device=old[0].device)
            else:  # the oldest derivative is not needed any more
                free = old[count - 1]
            for index in element_blocks(feature.shape, block_elements(feature.numel())):
                part = feature[index]
                newer = free[index]
                newer.copy_(part).sub_(old[0][index]).div_(spans[0])  # new D1 = (F - F_old) / span
                for n in range(1, count - 1):  # new D_{n+1} = (new D_n - old D_n) / span, over old D_n
                    target = old[n][index]
                    torch.sub(newer, target, out=target).div_(spans[n])
                    newer = target
                if old[0].dtype == keep:
                    old[0][index].copy_(part)
            first = old[0] if old[0].dtype == keep else copy_of(feature, keep)
            self.factors = [first, free] + old[1 : count - 1]
        elif old and old[0].dtype == keep:
            old[0].copy_(feature)
            self.factors = [old[0]]  # derivatives not refreshed: dropped, as the reference does
        else:
            del old
            self.factors = []  # free the old buffers before the copy
            self.factors = [copy_of(feature, keep)]
        self.steps = ([step] + self.steps)[: self.order + 1]

    def coefficients(self, step: float) -> list[float]:
        """Weights of the factors in the prediction at ``step``."""
        if not self.factors:
            raise RuntimeError("TaylorPredictor.predict called before any update (no key step yet)")
        dt = float(step) - self.steps[0]
        if self.scheme == "reference":
            return [dt**n / math.factorial(n) for n in range(len(self.factors))]
        weights, w = [], 1.0
        for n in range(len(self.factors)):
            weights.append(w)
            w *= float(step) - self.steps[n]
        return weights

    def predict(self, step: float, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The predicted feature at ``step``, summed in float32 and written into ``out`` (any dtype and
        strides, e.g. a slice of the model's own tensor) or into a new tensor of ``dtype`` (default
        float32). Returns ``out``. Only one float32 block (``block_elements``) is allocated besides it.
        """
        weights = self.coefficients(step)
        first = self.factors[0]
        if out is None:
            out = torch.empty(first.shape, dtype=dtype or torch.float32, device=first.device)
        elif out.shape != first.shape:
            raise ValueError(f"prediction output has shape {tuple(out.shape)}, the feature {tuple(first.shape)}")
        if out.dtype == torch.float32 and out.device == first.device:  # sum in place, no block buffer
            out.copy_(first)
            for w, factor in zip(weights[1:], self.factors[1:]):
                out.add_(factor, alpha=w)
            return out
        size = block_elements(first.numel())
        buffer = torch.empty(size, dtype=torch.float32, device=first.device)
        for index in element_blocks(first.shape, size):
            block = first[index]
            acc = buffer[: block.numel()].view(block.shape).copy_(block)
            for w, factor in zip(weights[1:], self.factors[1:]):
                acc.add_(factor[index], alpha=w)
            out[index].copy_(clamp_for(acc, out.dtype))
        return out

    def nbytes(self) -> int:
        """Bytes held by the factors."""
        return sum(f.numel() * f.element_size() for f in self.factors)


def clamp_for(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``acc`` (a float32 block of a prediction) clamped in place to the finite range of ``dtype`` when
    that range is narrower than float32's (float16: +-65504): an extrapolation past it would be written
    as inf, then NaN after the model's final norm (a black image), as ComfyUI's FLUX blocks clamp fp16.
    float32 and bfloat16 (float32's range) are left as they are, at no cost."""
    if dtype.is_floating_point and dtype.itemsize < 4 and dtype != torch.bfloat16:
        top = torch.finfo(dtype).max
        acc.clamp_(-top, top)
    return acc


def copy_of(feature: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of ``feature`` in ``dtype``."""
    return torch.empty(feature.shape, dtype=dtype, device=feature.device).copy_(feature)


def block_elements(numel: int) -> int:
    """Elements per block for a feature of ``numel`` elements: 1/16 of it, kept within
    [``MIN_CHUNK_ELEMENTS``, ``CHUNK_ELEMENTS``] (and at most ``numel``)."""
    return max(1, min(numel, max(MIN_CHUNK_ELEMENTS, min(CHUNK_ELEMENTS, numel // 16))))


def element_blocks(shape, max_elements: int):
    """Index tuples that cut a tensor of ``shape`` into blocks of at most ``max_elements`` elements:
    whole trailing dimensions, slices of the one before, every index of the ones before that.
    Basic indexing, so each block is a view."""
    shape = tuple(shape)
    axis, inner = len(shape), 1
    while axis > 0 and inner * shape[axis - 1] <= max_elements:
        axis -= 1
        inner *= shape[axis]
    if axis == 0:
        yield ()
        return
    axis -= 1  # cut along this dimension
    step = max(1, max_elements // inner)
    for prefix in itertools.product(*(range(n) for n in shape[:axis])):
        for start in range(0, shape[axis], step):
            yield prefix + (slice(start, start + step),)


def peak_bytes(numel: int, order: int, dtype: torch.dtype) -> int:
    """An upper bound on one predictor's memory at any moment, transients included: the feature in
    its kept dtype, ``order`` float32 factors and two float32 blocks (the block sum of ``predict``,
    or on a CPU the float32 copy PyTorch makes of a 16-bit block in a mixed-dtype subtraction).
    The output ``predict`` writes into is the caller's (at a skipped evaluation: the block output
    the model would have made anyway) and is not counted."""
    keep = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    element = torch.empty((), dtype=keep).element_size()
    return numel * (element + 4 * order) + 2 * 4 * block_elements(numel)
