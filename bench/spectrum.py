"""The spectral forecaster's history cost tensor, used by the benchmarks only (bench/forecasters.py), so
kept out of dpcache_core, which holds what the nodes run; and Spectrum's key steps, re-exported from
dpcache_core.spectrum_keys (DPCache Schedule's default entry plans with them). The forecaster itself is
dpcache_core.spectral."""
from __future__ import annotations


import numpy as np
import torch

from dpcache_core.history import histories, history_shape
from dpcache_core.pact import default_max_gap, sentinel_target
from dpcache_core.spectral import DEFAULT_BLEND, DEFAULT_DEGREE, DEFAULT_RIDGE, chebyshev_basis, to_tau
# Spectrum's key steps live in dpcache_core (the default entry plans with them); re-exported here
from dpcache_core.spectrum_keys import WINDOW_ANCHORS, growing_windows, spectrum_key_steps, window_anchor  # noqa: F401



def history_weights(i: int, offsets: np.ndarray, num_evals: int, hops: int, degree: int, ridge: float,
                    blend: float) -> np.ndarray:
    """(n, m+1, hops): the spectral forecast's weight on each key (offsets[n, k] evaluations before
    key ``i``, -1 = absent) at evaluations i+1 .. i+hops, with the forecaster holding only those keys
    (``spectral.spectral_weights``, centred, for many key sets at once)."""
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
        spectral = np.einsum("rqp,rph->rqh", design, solved)  # (r, q, hops)
        spectral[:, -1] += 1.0 - spectral.sum(axis=1)  # centred, as spectral.spectral_weights
        weights = blend * spectral
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
