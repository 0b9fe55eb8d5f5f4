"""Transfer a PACT calibrated at T evaluations to a run of T' evaluations (any step count or sampler).

The rule, in words. A PACT entry C[a, i, j] is a sum of per-evaluation prediction errors: predict
from key i (whose previous key is a) and add the error at every evaluation t = i+1 .. j. The error
*increment* at one evaluation, ``inc[a, i, t] = C[a, i, t] - C[a, i, t-1]``, depends on where key i
sits in the trajectory, how far back its previous key is and how far forward t is. So every
increment is placed at three coordinates on the normalised position of the trajectory (0 = first
evaluation, 1 = the end, where the sentinel t = T sits): the key's position, the distance back to
the previous key and the distance forward to t. For the T' evaluations of the run, each increment
is read off by trilinear interpolation at the run's own three coordinates (the error at distance
forward 0 is 0; distances back beyond the calibrated range take the nearest calibrated one), and
C' is rebuilt by cumulative sums over t. Anchors beyond the hop cap of T' stay +inf, as does
everything the reference convention leaves undefined; the first ``order`` keys get the reference's
zero entries ``C'[:i+1, i, i+1] = 0``.

Positions are by default the evaluation index over T (``index_positions``). When the PACT and the
run both know the sigma of every evaluation, positions come from sigma through the model's own
sigma table (``positions_from_sigmas``), so a different scheduler or a second-order sampler lands
on the right part of the calibrated trajectory. With a PACT and a run that use the same scheduler
(e.g. simple at 50 and at 28 steps), both choices give the same positions.
"""
from __future__ import annotations

import numpy as np

from .pact import default_max_gap
from .schedule import check_cost


def index_positions(num_evals: int) -> np.ndarray:
    """Positions t / T of evaluations 0 .. T-1 and of the sentinel T (at 1.0)."""
    return np.arange(num_evals + 1, dtype=np.float64) / num_evals


def spread_ties(positions) -> np.ndarray:
    """Positions made strictly increasing: equal ones (heun's corrector evaluates at the next
    step's sigma) are spread evenly between the previous distinct position and theirs."""
    p = np.maximum.accumulate(np.asarray(positions, dtype=np.float64))
    out = p.copy()
    n, start = len(p), 0
    while start < n:
        end = start
        while end + 1 < n and p[end + 1] == p[start]:
            end += 1
        if end > start:
            low = p[start - 1] if start > 0 else p[start] - (p[min(end + 1, n - 1)] - p[start] or 1.0 / n)
            count = end - start + 1
            out[start:end + 1] = low + (p[start] - low) * np.arange(1, count + 1) / count
        start = end + 1
    return out


def positions_from_sigmas(sigmas, sigma_table) -> np.ndarray:
    """Normalised positions of ``sigmas`` through a model's sigma table.

    ``sigma_table``: the model's ascending sigmas at timesteps 1/L .. L/L (ComfyUI's
    ``model_sampling.sigmas``). Position = 1 - timestep: 0 at the table's largest sigma
    (sigma_max), 1 at sigma 0. The simple and normal schedulers then space their steps evenly.
    """
    table = np.asarray(sigma_table, dtype=np.float64).reshape(-1)
    if table.size < 2 or np.any(np.diff(table) < 0):
        raise ValueError("a sigma table must be ascending with at least 2 entries")
    levels = np.concatenate([[0.0], table])
    times = np.arange(table.size + 1, dtype=np.float64) / table.size
    return 1.0 - np.interp(np.asarray(sigmas, dtype=np.float64), levels, times)


def check_positions(positions, count: int, what: str) -> np.ndarray:
    p = np.asarray(positions, dtype=np.float64).reshape(-1)
    if p.shape != (count,) or not np.all(np.isfinite(p)):
        raise ValueError(f"{what}: expected {count} finite positions, got {p.shape[0]}")
    if np.any(np.diff(p) < 0):
        raise ValueError(f"{what}: positions must not decrease")
    return spread_ties(p)


def increment_grid(cost: np.ndarray, order: int) -> np.ndarray:
    """grid[i, g, h]: the error increment at t = i + h predicting from key i with previous key i - g.

    h runs 0 .. T (h = 0: the zero error at the key itself), g 0 .. T-1. Only anchors the PACT
    formed are filled (g >= 1, keys i >= ``order``: the reference's first keys carry zeros by
    convention, not errors); the rest is +inf.
    """
    num_evals = cost.shape[0]
    grid = np.full((num_evals, num_evals, num_evals + 1), np.inf)
    for i in range(order, num_evals):
        rows = cost[:i, i, i:]  # [a, t = i .. T]; C[a, i, i] is inf, read as 0
        run = np.concatenate([np.zeros((i, 1)), rows[:, 1:]], axis=1)
        with np.errstate(invalid="ignore"):
            inc = np.diff(run, axis=1)  # inc[a, h-1] for t = i + h
        g = i - np.arange(i)
        grid[i, g, 1:num_evals - i + 1] = np.where(np.isfinite(inc), inc, np.inf)
        formed = np.isfinite(rows[:, 1])
        grid[i, g[formed], 0] = 0.0
    return grid


def interpolate(grid: np.ndarray, x: np.ndarray, g: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``grid`` at fractional (x, g, h), over the finite corners only
    (their weights renormalised); +inf where no finite corner has weight."""
    shape = np.array(grid.shape) - 1
    x = np.asarray(x, dtype=np.float64)
    coords = [np.clip(np.asarray(c, dtype=np.float64), 0, s) for c, s in zip((x, g, h), shape)]
    lows = [np.minimum(np.floor(c).astype(int), s - 1) if s > 0 else np.zeros_like(c, dtype=int)
            for c, s in zip(coords, shape)]
    fracs = [c - lo for c, lo in zip(coords, lows)]
    total = np.zeros_like(x)
    weight = np.zeros_like(x)
    for dx in (0, 1):
        for dg in (0, 1):
            for dh in (0, 1):
                w = ((fracs[0] if dx else 1 - fracs[0]) * (fracs[1] if dg else 1 - fracs[1])
                     * (fracs[2] if dh else 1 - fracs[2]))
                ix = np.minimum(lows[0] + dx, shape[0])
                ig = np.minimum(lows[1] + dg, shape[1])
                ih = np.minimum(lows[2] + dh, shape[2])
                v = grid[ix, ig, ih]
                ok = np.isfinite(v) & (w > 0)
                total += np.where(ok, w * np.where(ok, v, 0.0), 0.0)
                weight += np.where(ok, w, 0.0)
    out = np.full_like(x, np.inf)
    has = weight > 1e-12
    out[has] = total[has] / weight[has]
    return out


def transfer_pact(
    cost,
    num_evals: int,
    order: int,
    source_positions=None,
    target_positions=None,
    max_hop: int | None = None,
) -> np.ndarray:
    """The PACT ``cost`` (T, T+1, T+1), reference convention, transferred to ``num_evals`` = T'.

    ``source_positions`` (T+1) and ``target_positions`` (T'+1): normalised positions of every
    evaluation and of the sentinel, non-decreasing (ties are spread, see ``spread_ties``);
    default index / T. ``max_hop``: the anchor cap at T' (default max(int(0.3 T'), 1)).
    Returns a (T', T'+1, T'+1) tensor in the same convention. With T' = T and the same positions
    it returns the PACT's own entries within the cap.
    """
    cost = check_cost(cost)
    src_evals = cost.shape[0]
    if num_evals < order + 1:
        raise ValueError(f"a run of {num_evals} evaluations is too short for a PACT of order {order}")
    src = check_positions(index_positions(src_evals) if source_positions is None else source_positions,
                          src_evals + 1, "PACT positions")
    dst = check_positions(index_positions(num_evals) if target_positions is None else target_positions,
                          num_evals + 1, "run positions")
    # The run's positions as fractional evaluation indices of the PACT.
    frac = np.interp(dst, src, np.arange(src_evals + 1, dtype=np.float64))
    grid = increment_grid(cost, order)
    cap = max_hop or default_max_gap(num_evals)
    out = np.full((num_evals, num_evals + 1, num_evals + 1), np.inf)
    for i in range(order):
        out[: i + 1, i, i + 1] = 0.0
    max_back = max(min(default_max_gap(src_evals), src_evals - 1), 1)
    for i in range(order, num_evals):
        anchors = np.arange(max(order - 1, i - cap), i)
        steps = np.arange(i + 1, num_evals + 1)
        a, t = np.meshgrid(anchors, steps, indexing="ij")
        x = np.full(a.shape, min(max(frac[i], float(order)), src_evals - 1.0))
        back = np.clip(frac[i] - frac[a], 1.0, max_back)
        forward = frac[t] - frac[i]
        inc = interpolate(grid, x.ravel(), back.ravel(), forward.ravel()).reshape(a.shape)
        out[anchors, i, i + 1:] = np.cumsum(inc, axis=1)
    return out
