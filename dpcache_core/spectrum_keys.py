"""Spectrum's key steps for any step count: a warm-up, keys after windows that grow, a tail.

DPCache Schedule's default entry, (spectrum: no calibration), plans with them (``replan.spectrum_plan``);
the benchmarks compare against them (bench/spectrum.py re-exports them).
"""
from __future__ import annotations

import math

import numpy as np

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
