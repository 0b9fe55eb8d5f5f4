"""Taylor (finite-difference) prediction of a feature from earlier key steps (DESIGN §2)."""
from __future__ import annotations

import math

import torch

SCHEMES = ("reference", "exact")


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

    The feature is kept as a detached copy (16-bit features stay 16-bit, others become float32),
    derivative factors in float32; tensors passed in are never written to.
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
        """Record the fully computed ``feature`` at key step ``step``."""
        step = float(step)
        if self.steps and step <= self.steps[0]:
            raise ValueError(f"key steps must increase: got {step} after {self.steps[0]}")
        feature = feature.detach()
        # The feature itself is kept losslessly in its own dtype (bf16 on a GPU: half the memory);
        # differences are taken and kept in float32.
        keep = feature.dtype if feature.dtype in (torch.float16, torch.bfloat16) else torch.float32
        new = [feature.to(keep, copy=True)]
        refresh = self.derivatives_after is None or step > self.derivatives_after
        if refresh:
            for n in range(min(self.order, len(self.factors))):
                span = step - (self.steps[n] if self.scheme == "exact" else self.steps[0])
                new.append((new[n].float() - self.factors[n].float()) / span)
        self.factors = new
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

    def predict(self, step: float) -> torch.Tensor:
        """The predicted feature at ``step`` (a new float32 tensor)."""
        weights = self.coefficients(step)
        out = self.factors[0].to(torch.float32, copy=True)
        for w, factor in zip(weights[1:], self.factors[1:]):
            out.add_(factor, alpha=w)
        return out

    def nbytes(self) -> int:
        """Bytes held by the factors."""
        return sum(f.numel() * f.element_size() for f in self.factors)
