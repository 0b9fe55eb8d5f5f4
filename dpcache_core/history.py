"""History-exact hop costs for Taylor order >= 2 (issue 11).

At run time the order-m factors at a key step i come from the last m+1 *key* steps, not from the
recorded features just before the previous key (which the reference PACT uses). The history tensor
holds the cost the run really pays:

    hist[i, g_1, .., g_m, h - 1] = sum of err(t) for t = i+1 .. i+h-1    (i + h < T)
                                 = sum of err(t) for t = i+1 .. T        (i + h = T, the sentinel hop)

for a key step i whose previous keys lie g_1, g_1 + g_2, .. evaluations before it and whose next
key is i + h ("skip" convention: the next key is computed, so it costs nothing).
err(t) = mean(|pred_t - F_t|) / 2 as in the reference PACT, and the target at t = T is the same
synthetic sentinel. Gap index 0 means "no earlier key": the predictor's history starts there
(key 0, or a key where the reference scheme resets its derivatives). Gaps and hops are at most
the hop cap H, so the tensor has shape (T, H+1, .., H+1, H) with m middle axes; entries that
cannot be formed are +inf.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from .pact import default_max_gap, sentinel_target
from .taylor import TaylorPredictor, check_scheme

MAX_ENTRIES = 8_000_000  # about 100 MB with its counts; order 3 at T=100 would need 89 M


def history_shape(num_evals: int, order: int, max_gap: int) -> tuple[int, ...]:
    return (num_evals,) + (max_gap + 1,) * order + (max_gap,)


def history_fits(num_evals: int, order: int, max_gap: int | None = None) -> bool:
    """Whether the history tensor for these sizes stays within ``MAX_ENTRIES``."""
    shape = history_shape(num_evals, order, max_gap or default_max_gap(num_evals))
    return int(np.prod(shape)) <= MAX_ENTRIES


def check_history(history, num_evals: int | None = None) -> tuple[np.ndarray, int, int]:
    """(tensor as float64, order, hop cap H) of a history tensor; ValueError if the shape is not one."""
    history = np.asarray(history, dtype=np.float64)
    order, cap = history.ndim - 2, history.shape[-1] if history.ndim else 0
    if order < 1 or cap < 1 or history.shape != history_shape(history.shape[0], order, cap):
        raise ValueError(f"a history cost tensor must have shape (T, H+1, .., H+1, H), got {history.shape}")
    if num_evals is not None and history.shape[0] != num_evals:
        raise ValueError(f"history cost tensor is for T={history.shape[0]} evaluations, the PACT for T={num_evals}")
    return history, order, cap


def histories(order: int, max_gap: int) -> list[tuple[int, ...]]:
    """Every valid gap tuple (g_1 .. g_m), 0 = no earlier key; once 0, the older gaps are 0 too."""
    out = []
    for gaps in itertools.product(range(max_gap + 1), repeat=order):
        if all(g > 0 or all(x == 0 for x in gaps[n:]) for n, g in enumerate(gaps)):
            out.append(gaps)
    return out


@lru_cache(maxsize=8)
def hop_weights(order: int, scheme: str, max_gap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear weights of the run's prediction, per history and hop.

    Returns (gap tuples G (n, m), key offsets (n, m+1): how far before i each key lies, -1 if
    absent, weights (n, H, m+1): the prediction at i + h is sum_k weights[., h-1, k] F_{i - offset_k}).
    The predictor is linear in the features, so feeding ``TaylorPredictor`` unit vectors at the
    key steps gives exactly the weights the run applies to the real features.
    """
    check_scheme(scheme)
    gaps = histories(order, max_gap)
    offsets = np.full((len(gaps), order + 1), -1, dtype=np.int64)
    weights = np.zeros((len(gaps), max_gap, order + 1), dtype=np.float64)
    for n, g in enumerate(gaps):
        back = [0] + list(np.cumsum([x for x in g if x > 0]))
        offsets[n, : len(back)] = back
        predictor = TaylorPredictor(order, scheme)
        for k in reversed(range(len(back))):  # oldest key first
            unit = torch.zeros(order + 1, dtype=torch.float64)
            unit[k] = 1.0
            predictor.update(-back[k], unit)
        for h in range(1, max_gap + 1):
            weights[n, h - 1] = predictor.predict(h).double().numpy()
    return np.array(gaps, dtype=np.int64).reshape(len(gaps), order), offsets, weights


def build_history(
    trajectory,
    order: int = 2,
    scheme: str = "reference",
    max_gap: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk_elements: int = 1 << 19,
) -> np.ndarray:
    """The history cost tensor (see the module docstring) of one full-compute trajectory.

    ``trajectory``: a (T, S) float matrix, row t the cache-point feature at evaluation t (all N
    elements, or a fixed sample of S of them). ``progress(done, total)`` is called per key step i.
    """
    check_scheme(scheme)
    if order < 1:
        raise ValueError(f"a history cost tensor needs Taylor order >= 1, got {order}")
    traj = torch.as_tensor(trajectory).detach()
    if traj.ndim != 2:
        raise ValueError(f"the trajectory must be a (T, S) matrix, got shape {tuple(traj.shape)}")
    traj = traj.to(torch.float32)
    num_evals, width = traj.shape
    if num_evals < order + 1:
        raise ValueError(f"a history cost tensor of order {order} needs at least {order + 1} evaluations, got {num_evals}")
    cap = max_gap or default_max_gap(num_evals)
    targets = torch.cat([traj, sentinel_target(traj, order, scheme)[None]])  # t = 0 .. T
    gaps, offsets, weights = hop_weights(order, scheme, cap)
    flat_index = np.ravel_multi_index(gaps.T, (cap + 1,) * order)
    reach = offsets.max(axis=1)  # the oldest key's distance before i
    weights_t = torch.from_numpy(weights).to(device=traj.device, dtype=torch.float32)
    out = np.full((num_evals, (cap + 1) ** order, cap), np.inf)
    per_chunk = max(1, chunk_elements // (cap * width))
    for i in range(num_evals):
        hops = min(cap, num_evals - i)  # the hop to i + hops <= T
        rows = np.flatnonzero(reach <= i)
        for start in range(0, len(rows), per_chunk):
            sel = rows[start : start + per_chunk]
            keys = torch.from_numpy(np.where(offsets[sel] >= 0, i - offsets[sel], i)).to(traj.device)
            predicted = torch.bmm(weights_t[sel, :hops], traj[keys])  # (n, hops, S)
            err = (predicted - targets[i + 1 : i + 1 + hops]).abs_().mean(dim=2).double() / 2
            cum = torch.cumsum(err, dim=1).cpu().numpy()
            cost = np.zeros_like(cum)
            cost[:, 1:] = cum[:, :-1]  # hop h skips i+1 .. i+h-1
            if i + hops == num_evals:  # the sentinel hop also counts the target at T
                cost[:, hops - 1] = cum[:, hops - 1]
            out[i, flat_index[sel], :hops] = cost
        if progress is not None:
            progress(i + 1, num_evals)
    return out.reshape(history_shape(num_evals, order, cap))
