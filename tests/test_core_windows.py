"""PACTs of partial runs (dpcache_core.windows): placement, bookkeeping, and the joint plan is the best budget split."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dpcache_core import PactAccumulator, build_pact, path_cost, solve_schedule
from dpcache_core.windows import add_window, covered_range, crop, drop_window, embed_window, planning_view


def trajectory(n, seed, wiggle):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, generator=g)
    t = torch.arange(n, dtype=torch.float32)[:, None] / n
    return base + torch.sin(6 * t + torch.randn(64, generator=g)) * wiggle + t * t * torch.randn(64, generator=g)


def two_window_pact(n1=10, n2=10, order=1):
    total = n1 + n2
    gap = max(int(0.3 * total), 1)
    high = build_pact(trajectory(n1, 1, 0.3), order=order, max_anchor_gap=gap)
    low = build_pact(trajectory(n2, 2, 3.0), order=order, max_anchor_gap=gap)  # the low expert changes faster
    return high, low, embed_window(high, 0, total) + 0, embed_window(low, n1, total)


def test_embed_places_the_window_and_its_fresh_start_row():
    high, low, e_high, e_low = two_window_pact()
    assert np.array_equal(e_low[10:, 10:, 10:], low)
    for a in range(10):  # any key of the previous window may precede the window's first key
        assert np.array_equal(e_low[a, 10, 10:], low[0, 0])
    assert np.isinf(e_low[:10, :10]).all() and np.isinf(e_low[:10, 11:]).all()
    assert np.array_equal(e_high[:10, :11, :11], high) and np.isinf(e_high[:, :, 11:]).all()
    with pytest.raises(ValueError, match="does not fit"):
        embed_window(low, 15, 20)


def joint_cost():
    high, low, e_high, e_low = two_window_pact()
    acc = PactAccumulator(20)
    acc.add(e_high)
    acc.add(e_low)
    return high, low, acc.mean()


@pytest.mark.parametrize("k", [6, 7, 8, 10, 12])
def test_joint_plan_is_the_best_split_between_windows(k):
    """The joint DP's cost equals the best of every split k1 + k2 = K of the windows' own DPs."""
    high, low, cost = joint_cost()
    keys = solve_schedule(cost, k, first_full_steps=1, required=[10])
    assert 10 in keys  # the second call's first evaluation is a key
    best = min(
        path_cost(high, solve_schedule(high, k1, first_full_steps=1, max_hop=6))
        + path_cost(low, solve_schedule(low, k - k1, first_full_steps=1, max_hop=6))
        for k1 in range(2, k - 1)
        if _feasible(high, k1) and _feasible(low, k - k1)
    )
    assert path_cost(cost, keys) == pytest.approx(best)
    own = [x for x in keys if x < 10], [x - 10 for x in keys if x >= 10]
    assert path_cost(cost, keys) == pytest.approx(path_cost(high, own[0]) + path_cost(low, own[1]))


def _feasible(cost, k):
    try:
        solve_schedule(cost, k, first_full_steps=1, max_hop=6)
        return True
    except ValueError:
        return False


def test_the_split_follows_the_errors():
    """The low window changes faster in this PACT, so it gets more of the budget than an even split."""
    _, _, cost = joint_cost()
    keys = solve_schedule(cost, 8, first_full_steps=1, required=[10])
    assert sum(k >= 10 for k in keys) > sum(k < 10 for k in keys)


def test_windows_bookkeeping():
    w = add_window(None, 10, 10)
    w = add_window(w, 0, 10)
    w = add_window(w, 0, 10)
    assert w == [[0, 10, 2], [10, 10, 1]]
    with pytest.raises(ValueError, match="overlapping the window 0..9"):
        add_window(w, 5, 10)
    assert covered_range(w, 20) == (0, 20)
    assert covered_range([[10, 10, 1]], 20) == (10, 20)
    with pytest.raises(ValueError, match="gap at 5..9.*calibrate the missing window"):
        covered_range([[0, 5, 1], [10, 10, 1]], 20)
    _, _, e_high, e_low = two_window_pact()
    acc = PactAccumulator(20)
    acc.add(e_high)
    acc.add(e_low)
    kept = drop_window(acc, w, 0, 10)
    assert kept == [[10, 10, 1]] and acc.samples == 1
    assert np.array_equal(acc.mean(), e_low)


def test_planning_view_crops_one_expert_and_lists_later_starts():
    high, low, e_high, e_low = two_window_pact()
    positions = [i / 20 for i in range(21)]
    cost, pos, starts = planning_view(e_low, {"windows": [[10, 10, 1]], "positions": positions})
    assert np.array_equal(cost, low) and pos == positions[10:] and starts == []
    acc = PactAccumulator(20)
    acc.add(e_high)
    acc.add(e_low)
    cost, pos, starts = planning_view(acc.mean(), {"windows": [[0, 10, 1], [10, 10, 1]], "positions": positions})
    assert cost.shape == (20, 21, 21) and pos == positions and starts == [10]
    assert np.array_equal(crop(cost, 0, 10), high)
    plain = np.zeros((5, 6, 6))
    assert planning_view(plain, {})[0] is plain


def test_brute_force_agrees_on_a_small_joint_pact():
    """Exhaustive search over every schedule with the window start as a key: the DP finds the optimum."""
    total = 8
    high = build_pact(trajectory(4, 3, 0.5), order=1, max_anchor_gap=4)
    low = build_pact(trajectory(4, 4, 2.0), order=1, max_anchor_gap=4)
    acc = PactAccumulator(total)
    acc.add(embed_window(high, 0, total))
    acc.add(embed_window(low, 4, total))
    cost = acc.mean()
    for k in range(3, 8):
        best = min((path_cost(cost, [0, *rest]) for rest in itertools.combinations(range(1, total), k - 1) if 4 in rest),
                   default=np.inf)
        if not np.isfinite(best):  # order 1: each window's first two evaluations are keys
            with pytest.raises(ValueError):
                solve_schedule(cost, k, first_full_steps=1, required=[4], max_hop=4)
            continue
        keys = solve_schedule(cost, k, first_full_steps=1, required=[4], max_hop=4)
        assert path_cost(cost, keys) == pytest.approx(best)
