"""The reference implementation's approximate DP, transcribed for comparison with the exact DP of
dpcache_core.schedule (bench/quality.py, bench/core_speed.py and the tests); no node uses it."""
from __future__ import annotations

import numpy as np

from dpcache_core.schedule import prepare


def solve_schedule_reference(cost, num_keys: int, first_full_steps: int = 3, last_full_steps: int = 0, max_hop: int | None = None) -> list[int]:
    """The reference implementation's approximate DP, for comparison only.

    It keeps, per (key count, step), only the best predecessor and uses that as the anchor of the
    next hop (and the step before when both are mandatory), so it can miss the optimum.
    """
    cost, mandatory, hop, allowed = prepare(cost, num_keys, first_full_steps, last_full_steps, max_hop)
    num_evals = cost.shape[0]
    is_mandatory = np.zeros(num_evals + 1, dtype=bool)
    is_mandatory[mandatory + [num_evals]] = True
    best = np.full((num_keys + 1, num_evals + 1), np.inf)
    came_from = np.zeros((num_keys + 1, num_evals + 1), dtype=int)
    best[0, 0] = 0.0
    for n in range(1, num_keys + 1):
        for d in range(n, num_evals + 1):
            for c in range(max(n - 1, d - hop), d):
                if not np.isfinite(best[n - 1, c]) or not allowed[c, d]:
                    continue
                if c == 0:
                    anchor = 0
                elif is_mandatory[c] and is_mandatory[c - 1]:
                    anchor = c - 1
                else:
                    anchor = came_from[n - 1, c]
                total = best[n - 1, c] + cost[anchor, c, d]
                if total < best[n, d]:
                    best[n, d], came_from[n, d] = total, c
    if not np.isfinite(best[num_keys, num_evals]):
        raise ValueError(f"the reference DP finds no finite schedule with K={num_keys} of T={num_evals}")
    keys, step = [], num_evals
    for n in range(num_keys, 0, -1):
        step = int(came_from[n, step])
        keys.append(step)
    return keys[::-1]
