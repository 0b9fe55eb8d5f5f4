"""A spectral forecaster of the cache-point feature (Spectrum's key-step schedule is in spectrum_keys.py).

Written from the Spectrum paper (Han et al., "Adaptive Spectral Feature Forecasting for Diffusion
Sampling Acceleration", CVPR 2026, arXiv 2603.01623): the feature is a function of a time
coordinate, fitted by ridge regression on a Chebyshev basis over the features computed so far,
and the forecast is blended with a local linear extrapolation from the last two.

Time coordinate ``t``: the evaluation's position in the run, ``index / num_evals`` in [0, 1)
(Spectrum's own choice: step / number of steps), mapped to tau = 2 t - 1 in [-1, 1] for the basis.

The fit is linear in the features, so it is done in the small (history x basis) space: the
prediction at t is ``sum_j a_j(t) F_j`` over the kept features F_j, with the weights
``a(t) = X (X^T X + lambda I)^-1 x(t)`` (X: the basis at the kept times, x(t): the basis at t).
No coefficient tensor is formed; the cost per prediction is one pass over the kept features.

Centred (the default): the ridge fit shrinks towards 0 (the paper's weights sum to 0.4-0.97: a
constant 1000 was forecast as 917 or 791, harmless only where the model normalises right after the
cache point), so the fit is made on the deviations from the newest feature: ``1 - sum(a)`` is added
to the newest weight, the weights sum to 1 and a constant is forecast exactly. Penalising only the
curvature terms would make lines exact too, but lost 4 to 7 dB on the trained FLUX model
(bench/results/spectral_centring.md); ``centred=False`` is the paper's fit.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from .taylor import block_elements, clamp_for, element_blocks

DEFAULT_DEGREE = 4  # Chebyshev T_0 .. T_4 (the paper's m = 4)
DEFAULT_RIDGE = 0.1  # the paper's lambda
DEFAULT_BLEND = 0.5  # weight of the spectral fit; 1 - blend goes to the local linear extrapolation
DEFAULT_MAX_HISTORY = 8  # features kept per stream (a ring): memory = 8 x one feature; 8 measured as good as 16 (BENCHMARKS.md)
# forecaster "auto": spectral from this ideal speed-up T/K up (K <= 17 of 50), Taylor below, where the
# spectral fit lost to Taylor on the trained FLUX benchmark (bench/results/history_spectrum.md, "Forecasters and a calibration-free default")
AUTO_SPECTRAL_SPEEDUP = 2.9


def auto_forecaster(ideal_speedup: float) -> str:
    """The forecaster "auto" picks for a plan of ideal speed-up T/K: "spectral" on long hops, else "taylor"."""
    return "spectral" if ideal_speedup >= AUTO_SPECTRAL_SPEEDUP else "taylor"


def chebyshev_basis(tau, degree: int) -> np.ndarray:
    """(n, degree + 1) matrix of T_0(tau) .. T_degree(tau) for the n values of ``tau`` (float64)."""
    tau = np.atleast_1d(np.asarray(tau, dtype=np.float64))
    cols = [np.ones_like(tau)]
    if degree >= 1:
        cols.append(tau)
    for _ in range(2, degree + 1):
        cols.append(2.0 * tau * cols[-1] - cols[-2])
    return np.stack(cols, axis=1)


def to_tau(t) -> np.ndarray:
    """The basis coordinate tau = 2 t - 1 of a time coordinate t in [0, 1]."""
    return 2.0 * np.asarray(t, dtype=np.float64) - 1.0


def spectral_weights(times, t: float, degree: int = DEFAULT_DEGREE, ridge: float = DEFAULT_RIDGE,
                     blend: float = DEFAULT_BLEND, centred: bool = True) -> np.ndarray:
    """Weights of the prediction at ``t`` on features at ``times`` (oldest first): the forecast is
    ``sum_j w_j F(times_j)``. Pure numbers, so the planner can use them without features.
    ``centred`` (the default): they sum to 1, a constant is forecast exactly (module docstring)."""
    times = np.asarray(times, dtype=np.float64)
    n = times.shape[0]
    if n == 0:
        raise RuntimeError("SpectralPredictor.predict called before any update (no key step yet)")
    design = chebyshev_basis(to_tau(times), degree)  # (n, P)
    gram = design.T @ design + ridge * np.eye(degree + 1)
    spectral = design @ np.linalg.solve(gram, chebyshev_basis(to_tau(t), degree)[0])  # (n,)
    if centred:  # the fit of the deviations from the newest feature: weights that sum to 1
        spectral[-1] += 1.0 - spectral.sum()
    linear = np.zeros(n)
    linear[-1] = 1.0
    if n >= 2:
        k = (float(t) - times[-1]) / (times[-1] - times[-2])
        linear[-1] += k
        linear[-2] -= k
    return blend * spectral + (1.0 - blend) * linear



def peak_bytes(numel: int, dtype: torch.dtype, max_history: int = DEFAULT_MAX_HISTORY) -> int:
    """An upper bound on one SpectralPredictor's memory at any moment: its ring of kept features
    (16-bit ones as they are, others in float32), one more while a new key is copied in before the
    oldest leaves, and the float32 block ``predict`` sums in."""
    size = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    return (max_history + 1) * size * int(numel) + 4 * block_elements(int(numel))

class SpectralPredictor:
    """Predicts a feature at a later time from the features seen at key evaluations.

    ``update(t, feature)`` at each key evaluation, ``predict(t)`` at skipped ones; ``t`` is the
    time coordinate (see the module docstring), increasing. The last ``max_history`` features are
    kept (16-bit features stay 16-bit, others become float32); tensors passed in are never written.
    """

    def __init__(self, degree: int = DEFAULT_DEGREE, ridge: float = DEFAULT_RIDGE, blend: float = DEFAULT_BLEND,
                 max_history: int = DEFAULT_MAX_HISTORY, centred: bool = True):
        if degree < 0:
            raise ValueError(f"Chebyshev degree must be >= 0, got {degree}")
        if not ridge > 0:
            raise ValueError(f"ridge lambda must be > 0, got {ridge}")
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend weight must lie in [0, 1], got {blend}")
        if max_history < 2:
            raise ValueError(f"max_history must be at least 2 (the local extrapolation needs two), got {max_history}")
        self.degree, self.ridge, self.blend, self.max_history = int(degree), float(ridge), float(blend), int(max_history)
        self.centred = bool(centred)
        self.reset()

    def reset(self) -> None:
        """Forget every key evaluation."""
        self.features: deque[torch.Tensor] = deque(maxlen=self.max_history)
        self.times: deque[float] = deque(maxlen=self.max_history)

    @property
    def ready(self) -> bool:
        return bool(self.features)

    def update(self, t: float, feature: torch.Tensor) -> None:
        """Record the fully computed ``feature`` at time coordinate ``t``."""
        t = float(t)
        if not math.isfinite(t):
            raise ValueError(f"the time coordinate must be finite, got {t}")
        if self.times and t <= self.times[-1]:
            raise ValueError(f"key times must increase: got {t} after {self.times[-1]}")
        feature = feature.detach()
        keep = feature.dtype if feature.dtype in (torch.float16, torch.bfloat16) else torch.float32
        self.features.append(feature.to(keep, copy=True))
        self.times.append(t)

    def weights(self, t: float) -> np.ndarray:
        """The weight of each kept feature (oldest first) in the prediction at ``t``."""
        return spectral_weights(list(self.times), t, self.degree, self.ridge, self.blend, self.centred)

    def predict(self, t: float, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The predicted feature at ``t``, summed in float32 block by block and written into ``out``
        (any dtype and strides, e.g. a slice of the model's tensor) or a new tensor of ``dtype``
        (default float32), as ``TaylorPredictor.predict``. Returns ``out``."""
        weights = [float(w) for w in self.weights(t)]
        last = self.features[-1]
        if out is None:
            out = torch.empty(last.shape, dtype=dtype or torch.float32, device=last.device)
        elif out.shape != last.shape:
            raise ValueError(f"prediction output has shape {tuple(out.shape)}, the feature {tuple(last.shape)}")
        size = block_elements(last.numel())
        buffer = torch.empty(size, dtype=torch.float32, device=last.device)
        for index in element_blocks(last.shape, size):
            acc = buffer[: last[index].numel()].view(last[index].shape).zero_()
            for w, feature in zip(weights, self.features):
                acc.add_(feature[index], alpha=w)
            out[index].copy_(clamp_for(acc, out.dtype))
        return out

    def nbytes(self) -> int:
        """Bytes held by the kept features."""
        return sum(f.numel() * f.element_size() for f in self.features)
