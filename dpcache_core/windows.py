"""PACTs recorded on partial sampling runs: each is a window of one whole trajectory.

Wan2.2 A14B samples one trajectory with two models: a KSamplerAdvanced on the high-noise expert
makes evaluations 0..9 of 20, a second on the low-noise expert makes 10..19. DPCache Calibrate on
each expert records its own window; both windows go into one PACT of the whole trajectory (T = 20),
so DPCache Schedule plans both experts jointly and the DP itself splits the budget K between them
where that lowers the total planned error.

A window's sample (its own PACT, shape (n, n+1, n+1)) is placed at its offset in the whole PACT.
The cache never carries from one sampling call to the next, so the window's first evaluation is a
key with no history: whichever key precedes it (in the previous window), the hop from it costs what
the window's own first hop costs (``C[a, s, :] = C_w[0, 0, :]`` for every a < s). Entries that
cross a window's edges stay +inf: no hop may jump over the start of a call, and the window's last
hop ends at its own sentinel, the next window's start. The path cost of a whole-trajectory schedule
is therefore the sum of the windows' own path costs, and the joint DP optimum is the best split.

Metadata ``windows``: ``[[offset, num_evals, samples], ...]`` sorted by offset.
"""
from __future__ import annotations

import numpy as np


def embed_window(sample, offset: int, total: int) -> np.ndarray:
    """The window's PACT sample (n, n+1, n+1) placed at evaluations ``offset .. offset + n - 1`` of a
    ``total``-evaluation trajectory; +inf everywhere else except the fresh-start row (module docstring)."""
    sample = np.asarray(sample, dtype=np.float64)
    n = sample.shape[0]
    if sample.shape != (n, n + 1, n + 1) or offset < 0 or offset + n > total:
        raise ValueError(f"a window of {n} evaluations at offset {offset} does not fit a trajectory of {total}")
    out = np.full((total, total + 1, total + 1), np.inf)
    out[offset:offset + n, offset:offset + n + 1, offset:offset + n + 1] = sample
    out[:offset, offset, offset:offset + n + 1] = sample[0, 0]
    return out


def add_window(windows, offset: int, num_evals: int) -> list[list[int]]:
    """``windows`` metadata with one more sample of the window (offset, num_evals).

    Windows are either equal or disjoint; an overlapping one is a clear error."""
    out = [list(map(int, w)) for w in (windows or [])]
    for w in out:
        if (w[0], w[1]) == (offset, num_evals):
            w[2] += 1
            return out
        if w[0] < offset + num_evals and offset < w[0] + w[1]:
            raise ValueError(
                f"this run covers evaluations {offset}..{offset + num_evals - 1} of the trajectory, overlapping the "
                f"window {w[0]}..{w[0] + w[1] - 1} already in the PACT; use the same start/end steps as before, "
                "or another pact_name"
            )
    out.append([int(offset), int(num_evals), 1])
    return sorted(out)


def drop_window(acc, windows, offset: int, num_evals: int) -> list[list[int]]:
    """Remove the window's samples from ``acc`` (sums and counts of its keys' rows) and its metadata entry."""
    acc.sums[:, offset:offset + num_evals] = 0.0
    acc.counts[:, offset:offset + num_evals] = 0
    kept = [list(map(int, w)) for w in (windows or []) if (w[0], w[1]) != (offset, num_evals)]
    acc.samples = sum(w[2] for w in kept)
    return kept


def covered_range(windows, total: int) -> tuple[int, int]:
    """(lo, hi): the evaluations the recorded windows cover, which must be contiguous."""
    if not windows:
        return 0, total
    spans = sorted((int(w[0]), int(w[0]) + int(w[1])) for w in windows)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start != end:
            raise ValueError(
                f"the PACT covers evaluations {[f'{a}..{b - 1}' for a, b in spans]} of T={total} with a gap at "
                f"{end}..{start - 1}: calibrate the missing window (its KSamplerAdvanced with DPCache Calibrate "
                "and the same pact_name)"
            )
    return spans[0][0], spans[-1][1]


def boundaries(windows) -> list[int]:
    """Where the later windows start: the evaluations a sampling call begins afresh."""
    starts = sorted(int(w[0]) for w in (windows or []))
    return starts[1:]


def crop(cost: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The PACT of evaluations lo .. hi-1 alone (their own trajectory, sentinel at hi)."""
    return np.array(cost[lo:hi, lo:hi + 1, lo:hi + 1])


def planning_view(cost: np.ndarray, meta: dict):
    """(cost, positions or None, window starts) of a loaded PACT as DPCache Schedule plans it.

    A PACT without ``windows`` is returned as it is. One recorded on partial runs is cropped to the
    evaluations its windows cover (one expert's PACT is that expert's trajectory); ``starts`` are
    the later windows' first evaluations in the cropped indices, where a sampling call begins afresh.
    """
    total = cost.shape[0]
    positions = meta.get("positions")
    if not (isinstance(positions, list) and len(positions) == total + 1):
        positions = None
    windows = meta.get("windows")
    if not windows:
        return cost, positions, []
    lo, hi = covered_range(windows, total)
    starts = [s - lo for s in boundaries(windows)]
    if (lo, hi) == (0, total):
        return cost, positions, starts
    return crop(cost, lo, hi), (positions[lo:hi + 1] if positions else None), starts


def window_positions(old, mine, window) -> list | None:
    """Positions of the whole trajectory: the file's (or evenly spaced), this window's measured ones in place."""
    offset, total, n = window
    if not (isinstance(mine, list) and len(mine) == n + 1):
        return old if isinstance(old, list) and len(old) == total + 1 else None
    if isinstance(old, list) and len(old) == total + 1:
        out = list(old)
    else:  # outside the window: evenly spaced between the window's ends and 0 / 1
        start, end = mine[0], mine[-1]
        out = [start * k / offset for k in range(offset)] + [0.0] * (n + 1) + \
              [end + (1.0 - end) * k / (total - offset - n) for k in range(1, total - offset - n + 1)]
    out[offset:offset + n + 1] = mine
    return [round(float(p), 8) for p in out]
