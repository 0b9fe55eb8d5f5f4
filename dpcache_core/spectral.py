"""A spectral forecaster of the cache-point feature, and Spectrum's fixed key-step schedule.

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
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from .history import histories, history_shape
from .pact import default_max_gap, sentinel_target
from .taylor import block_elements, element_blocks

DEFAULT_DEGREE = 4  # Chebyshev T_0 .. T_4 (the paper's m = 4)
DEFAULT_RIDGE = 0.1  # the paper's lambda
DEFAULT_BLEND = 0.5  # weight of the spectral fit; 1 - blend goes to the local linear extrapolation
DEFAULT_MAX_HISTORY = 8  # features kept per stream (a ring): memory = 8 x one feature; 8 measured as good as 16 (BENCHMARKS.md)
# forecaster "auto": spectral from this ideal speed-up T/K up (K <= 17 of 50), Taylor below, where the
# spectral fit lost to Taylor on the trained FLUX benchmark (BENCHMARKS.md, "Forecasters and a calibration-free default")
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
                     blend: float = DEFAULT_BLEND) -> np.ndarray:
    """Weights of the prediction at ``t`` on features at ``times`` (oldest first): the forecast is
    ``sum_j w_j F(times_j)``. Pure numbers, so the planner can use them without features."""
    times = np.asarray(times, dtype=np.float64)
    n = times.shape[0]
    if n == 0:
        raise RuntimeError("SpectralPredictor.predict called before any update (no key step yet)")
    design = chebyshev_basis(to_tau(times), degree)  # (n, P)
    gram = design.T @ design + ridge * np.eye(degree + 1)
    spectral = design @ np.linalg.solve(gram, chebyshev_basis(to_tau(t), degree)[0])  # (n,)
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
                 max_history: int = DEFAULT_MAX_HISTORY):
        if degree < 0:
            raise ValueError(f"Chebyshev degree must be >= 0, got {degree}")
        if not ridge > 0:
            raise ValueError(f"ridge lambda must be > 0, got {ridge}")
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend weight must lie in [0, 1], got {blend}")
        if max_history < 2:
            raise ValueError(f"max_history must be at least 2 (the local extrapolation needs two), got {max_history}")
        self.degree, self.ridge, self.blend, self.max_history = int(degree), float(ridge), float(blend), int(max_history)
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
        return spectral_weights(list(self.times), t, self.degree, self.ridge, self.blend)

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
            out[index].copy_(acc)
        return out

    def nbytes(self) -> int:
        """Bytes held by the kept features."""
        return sum(f.numel() * f.element_size() for f in self.features)


# Spectrum's published window settings (initial window N, growth alpha) at T = 50, by the number of
# keys they place between a warm-up of 5 and the tail: the paper's default (2, 0.75) and the
# faster (3, 2) and (10, 3) settings.
WINDOW_ANCHORS = ((3, 10.0, 3.0), (5, 3.0, 2.0), (9, 2.0, 0.75))


def window_anchor(middle: int, num_evals: int) -> tuple[float, float]:
    """The (N, alpha) Spectrum would use to place ``middle`` window keys: the published settings,
    linearly interpolated in the key count between them (held beyond), scaled by T / 50."""
    counts = [a[0] for a in WINDOW_ANCHORS]
    n = float(np.interp(middle, counts, [a[1] for a in WINDOW_ANCHORS]))
    alpha = float(np.interp(middle, counts, [a[2] for a in WINDOW_ANCHORS]))
    scale = num_evals / 50.0
    return n * scale, alpha * scale


def spectrum_key_steps(num_evals: int, num_keys: int, warmup: int | None = None, tail: int | None = None) -> list[int]:
    """Spectrum's fixed, step-count-aware key steps: ``warmup`` full steps, then windows that grow
    (the next key floor(N) evaluations after the previous one, N growing by alpha after each key),
    then ``tail`` full steps at the end.

    ``warmup`` defaults to round(T / 10) (5 at T = 50, the ComfyUI ports' default); ``tail`` to 3,
    fewer (at least 1) when K leaves the windows fewer than 3 keys. The windows' (N, alpha), on a
    grid of quarters, is the one placing exactly K - warmup - tail keys before the tail that lies
    nearest to Spectrum's published settings for that many keys (``window_anchor``). At T = 50:
    K = 17 gives (2, 0.75): 0-4, 6, 8, 11, 15, 20, 25, 31, 38, 46-49; K = 13 gives (3, 2):
    0-4, 7, 12, 19, 28, 39, 47-49; K = 9 gives (10, 3) with a tail of 1: 0-4, 14, 27, 43, 49.
    """
    if num_evals < 1 or num_keys < 1:
        raise ValueError(f"need T >= 1 and K >= 1, got T={num_evals}, K={num_keys}")
    if num_keys >= num_evals:
        return list(range(num_evals))
    warm = max(1, round(num_evals / 10)) if warmup is None else int(warmup)
    warm = max(1, min(warm, num_keys - 1))
    end = min(3, max(1, num_keys - warm - 3)) if tail is None else int(tail)
    end = max(0, min(end, num_keys - warm))
    middle = num_keys - warm - end
    tail_start = num_evals - end
    head = list(range(warm))
    last = list(range(tail_start, num_evals))
    if middle <= 0:
        return sorted(set(head) | set(last))
    anchor_n, anchor_a = window_anchor(middle, num_evals)
    span = tail_start - warm
    best, best_distance = None, math.inf
    for quarter_n in range(4, 4 * span + 1):
        for quarter_a in range(0, 4 * span + 1):
            n, a = quarter_n / 4, quarter_a / 4
            keys = growing_windows(warm - 1, tail_start, n, a)
            if len(keys) < middle:  # faster growth only removes keys
                break
            distance = abs(n - anchor_n) + abs(a - anchor_a)
            if len(keys) == middle and distance < best_distance - 1e-12:
                best, best_distance = keys, distance
    if best is None:  # no growing window fits exactly (tiny spans): spread the middle keys evenly
        spread = np.linspace(warm - 1, tail_start, middle + 2)[1:-1]
        best = sorted({int(round(x)) for x in spread})
    return sorted(set(head) | set(best) | set(last))


def growing_windows(last: int, stop: int, window: float, growth: float) -> list[int]:
    """Keys after ``last``, each floor(window) evaluations after the previous one, the window growing
    by ``growth`` after each key, up to (not including) ``stop``."""
    keys = []
    while True:
        last += max(1, math.floor(window + 1e-9))
        if last >= stop:
            return keys
        keys.append(last)
        window += growth


def history_weights(i: int, offsets: np.ndarray, num_evals: int, hops: int, degree: int, ridge: float,
                    blend: float) -> np.ndarray:
    """(n, m+1, hops): the spectral forecast's weight on each key (offsets[n, k] evaluations before
    key ``i``, -1 = absent) at evaluations i+1 .. i+hops, with the forecaster holding only those keys."""
    n, slots = offsets.shape
    out = np.zeros((n, slots, hops))
    count = (offsets >= 0).sum(axis=1)
    steps = (i + np.arange(1, hops + 1)) / num_evals
    target = chebyshev_basis(to_tau(steps), degree)  # (hops, P)
    for q in np.unique(count):
        rows = np.flatnonzero(count == q)
        back = offsets[rows, :q][:, ::-1]  # oldest first
        times = (i - back) / num_evals  # (r, q)
        design = chebyshev_basis(to_tau(times.ravel()), degree).reshape(len(rows), q, degree + 1)
        gram = np.einsum("rqp,rqs->rps", design, design) + ridge * np.eye(degree + 1)
        solved = np.linalg.solve(gram, np.broadcast_to(target.T, (len(rows), degree + 1, hops)))
        weights = blend * np.einsum("rqp,rph->rqh", design, solved)  # (r, q, hops)
        linear = np.zeros((len(rows), q, hops))
        linear[:, -1] = 1.0
        if q >= 2:
            k = np.arange(1, hops + 1)[None, :] / (back[:, -2] - back[:, -1])[:, None]
            linear[:, -1] += k
            linear[:, -2] -= k
        weights += (1.0 - blend) * linear
        out[rows, :q] = weights[:, ::-1]  # back to newest first, matching offsets
    return out


def build_spectral_history(trajectory, memory: int = 2, max_gap: int | None = None, degree: int = DEFAULT_DEGREE,
                           ridge: float = DEFAULT_RIDGE, blend: float = DEFAULT_BLEND,
                           chunk_elements: int = 1 << 21) -> np.ndarray:
    """The history cost tensor (``history.build_history``'s layout, "exact" history: it starts at
    key 0) of the spectral forecaster holding the last ``memory`` + 1 keys: what a run with
    ``SpectralPredictor(max_history=memory + 1)`` pays, given the last ``memory`` gaps. With the
    default ring of 8 keys it is the cost given the last keys only (older keys also weigh in the
    run's fit). ``trajectory``: (T, S), row t the feature at evaluation t; the hop to T is scored
    against the same synthetic sentinel as a PACT of order 1."""
    traj = torch.as_tensor(trajectory).detach().to(torch.float32)
    if traj.ndim != 2:
        raise ValueError(f"the trajectory must be a (T, S) matrix, got shape {tuple(traj.shape)}")
    num_evals, width = traj.shape
    if memory < 1 or num_evals < 2:
        raise ValueError(f"need memory >= 1 and at least 2 evaluations, got memory={memory}, T={num_evals}")
    cap = max_gap or default_max_gap(num_evals)
    targets = torch.cat([traj, sentinel_target(traj, 1, "reference")[None]])
    gaps = np.array(histories(memory, cap), dtype=np.int64).reshape(-1, memory)
    offsets = np.full((len(gaps), memory + 1), -1, dtype=np.int64)
    for n, g in enumerate(gaps):
        back = [0] + list(np.cumsum([x for x in g if x > 0]))
        offsets[n, : len(back)] = back
    flat_index = np.ravel_multi_index(gaps.T, (cap + 1,) * memory)
    reach = offsets.max(axis=1)
    out = np.full((num_evals, (cap + 1) ** memory, cap), np.inf)
    per_chunk = max(1, chunk_elements // (cap * width))
    for i in range(num_evals):
        hops = min(cap, num_evals - i)
        rows = np.flatnonzero(reach <= i)
        weights = torch.from_numpy(history_weights(i, offsets[rows], num_evals, hops, degree, ridge, blend)).float()
        for start in range(0, len(rows), per_chunk):
            sel = slice(start, start + per_chunk)
            keys = torch.from_numpy(np.where(offsets[rows[sel]] >= 0, i - offsets[rows[sel]], i))
            predicted = torch.einsum("rqh,rqs->rhs", weights[sel], traj[keys])
            err = (predicted - targets[i + 1: i + 1 + hops]).abs_().mean(dim=2).double() / 2
            cum = torch.cumsum(err, dim=1).numpy()
            cost = np.zeros_like(cum)
            cost[:, 1:] = cum[:, :-1]  # hop h skips i+1 .. i+h-1
            if i + hops == num_evals:
                cost[:, hops - 1] = cum[:, hops - 1]
            out[i, flat_index[rows[sel]], :hops] = cost
    return out.reshape(history_shape(num_evals, memory, cap))
