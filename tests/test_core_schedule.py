"""The DP schedule: optimal against brute force, never worse than the reference, clear errors."""
import itertools
import json
import os

import numpy as np
import pytest

from dpcache_core import (
    Schedule,
    mandatory_steps,
    parse_key_steps,
    path_cost,
    solve_schedule,
    uniform_key_steps,
)
from bench.reference_dp import solve_schedule_reference

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")


def random_pact(rng, num_evals, inf_fraction=0.1):
    cost = rng.uniform(0.1, 10.0, size=(num_evals, num_evals + 1, num_evals + 1))
    cost[rng.random(cost.shape) < inf_fraction] = np.inf
    return cost


def brute_force(cost, num_keys, first, last, max_hop):
    """Least path cost over every feasible key set, straight from the definition."""
    num_evals = cost.shape[0]
    mandatory = set(mandatory_steps(num_evals, first, last))
    best = np.inf
    for rest in itertools.combinations(range(1, num_evals), num_keys - 1):
        keys = [0, *rest]
        if not mandatory <= set(keys):
            continue
        if any(b - a > max_hop for a, b in zip(keys, keys[1:] + [num_evals])):
            continue
        best = min(best, path_cost(cost, keys))
    return best


def test_exact_dp_equals_brute_force_on_random_pacts():
    rng = np.random.default_rng(0)
    checked = infeasible = 0
    for num_evals in range(1, 13):
        cost = random_pact(rng, num_evals)
        for first, last in [(0, 0), (1, 0), (3, 0), (2, 2), (4, 1)]:
            for max_hop in sorted({1, 2, 3, max(int(0.3 * num_evals), 1), num_evals}):
                lo = len(mandatory_steps(num_evals, first, last))
                for num_keys in range(lo, num_evals + 1):
                    expected = brute_force(cost, num_keys, first, last, max_hop)
                    if not np.isfinite(expected):
                        with pytest.raises(ValueError, match="no schedule"):
                            solve_schedule(cost, num_keys, first, last, max_hop)
                        infeasible += 1
                        continue
                    keys = solve_schedule(cost, num_keys, first, last, max_hop)
                    assert len(keys) == num_keys and keys == sorted(set(keys))
                    assert set(mandatory_steps(num_evals, first, last)) <= set(keys)
                    assert all(b - a <= max_hop for a, b in zip(keys, keys[1:] + [num_evals]))
                    assert path_cost(cost, keys) == pytest.approx(expected, rel=1e-12)
                    checked += 1
    assert checked > 500 and infeasible > 20


def test_reference_dp_is_never_better_than_exact():
    rng = np.random.default_rng(1)
    for num_evals in (8, 10, 12):
        cost = random_pact(rng, num_evals, inf_fraction=0.0)
        for num_keys in range(3, num_evals):
            try:
                ours = path_cost(cost, solve_schedule(cost, num_keys, 3, 0, 3))
            except ValueError:  # infeasible under the hop cap: the reference finds nothing either
                with pytest.raises(ValueError):
                    solve_schedule_reference(cost, num_keys, 3, 0, 3)
                continue
            theirs = path_cost(cost, solve_schedule_reference(cost, num_keys, 3, 0, 3))
            assert ours <= theirs + 1e-9


def official_cases():
    with open(os.path.join(REFERENCE, "official_schedules.json")) as f:
        schedules = json.load(f)["schedules"]
    for key, keys in schedules.items():
        family, _, k, first, last = key.split("/")
        yield family, int(k[1:]), int(first[len("first"):]), int(last[len("last"):]), keys


@pytest.mark.skipif(not os.path.isdir(REFERENCE), reason="the reference implementation's PACTs (pact_official_*.npy) are not shipped in this repository and were not found; the comparison with its DP is skipped")
def test_official_pacts_exact_dp_never_worse_and_reference_dp_reproduced():
    cases = list(official_cases())
    assert cases
    cheaper = 0
    for family, num_keys, first, last, official in cases:
        cost = np.load(os.path.join(REFERENCE, f"pact_official_{family}.npy"))
        keys = solve_schedule(cost, num_keys, first, last)
        assert len(keys) == num_keys and keys == sorted(set(keys))
        assert set(mandatory_steps(cost.shape[0], first, last)) <= set(keys)
        ours, theirs = path_cost(cost, keys), path_cost(cost, official)
        assert ours <= theirs * (1 + 1e-12)
        cheaper += ours < theirs * (1 - 1e-9)
        # Our transcription of the reference's approximate DP picks exactly the official schedules.
        assert solve_schedule_reference(cost, num_keys, first, last) == official
    assert cheaper > 0  # the exact DP does find cheaper schedules on the shipped PACTs


@pytest.mark.parametrize(
    "num_keys, first, last, message",
    [(51, 3, 0, "more than the T=50"), (2, 3, 0, "fewer than the 3 mandatory"), (4, 3, 2, "fewer than the 5")],
)
def test_infeasible_requests_name_the_numbers(num_keys, first, last, message):
    cost = np.ones((50, 51, 51))
    with pytest.raises(ValueError, match=message):
        solve_schedule(cost, num_keys, first, last)


def test_no_finite_path_and_bad_shape():
    cost = np.full((10, 11, 11), np.inf)
    with pytest.raises(ValueError, match="no schedule with K=5 key steps of T=10"):
        solve_schedule(cost, 5)
    with pytest.raises(ValueError, match=r"shape \(T, T\+1, T\+1\)"):
        solve_schedule(np.ones((10, 10, 10)), 5)


def test_hop_cap_makes_small_k_infeasible_and_names_the_smallest_k_that_works():
    cost = np.ones((50, 51, 51))
    # 3 mandatory keys (0, 1, 2) + one more cannot cover the 48 steps from 2 to the sentinel in hops of 15
    with pytest.raises(ValueError, match="hop cap 15.*the smallest K that works is 6"):
        solve_schedule(cost, 4, 3, 0)
    assert len(solve_schedule(cost, 6, 3, 0)) == 6  # 2 -> 17 -> 32 -> 47 -> 50: four hops of <= 15
    with pytest.raises(ValueError):
        solve_schedule(cost, 5, 3, 0)
    with pytest.raises(ValueError, match="no K works"):
        solve_schedule(np.full((10, 11, 11), np.inf), 5)


def test_path_cost_convention():
    cost = np.arange(5 * 6 * 6, dtype=float).reshape(5, 6, 6)
    # keys 0, 2, 3: C[0,0,2] + C[0,2,3] + C[2,3,5]
    assert path_cost(cost, [0, 2, 3]) == cost[0, 0, 2] + cost[0, 2, 3] + cost[2, 3, 5]
    with pytest.raises(ValueError, match="start with evaluation 0"):
        path_cost(cost, [1, 2])
    with pytest.raises(ValueError, match="out of range"):
        path_cost(cost, [0, 5])


@pytest.mark.parametrize("num_evals, num_keys, first, last", [(50, 13, 3, 0), (50, 9, 4, 1), (20, 20, 3, 0), (28, 7, 1, 0), (10, 3, 3, 0)])
def test_uniform_key_steps(num_evals, num_keys, first, last):
    keys = uniform_key_steps(num_evals, num_keys, first, last)
    assert len(keys) == num_keys and keys == sorted(set(keys)) and keys[-1] < num_evals
    assert set(mandatory_steps(num_evals, first, last)) <= set(keys)
    free_gaps = np.diff(keys[max(first, 1) - 1 : len(keys) - last] + [num_evals - last if last else num_evals])
    assert free_gaps.max() - free_gaps.min() <= 1  # evenly spread


def test_parse_key_steps():
    assert parse_key_steps("0, 1, 2, 5; 9-11 14", 20) == [0, 1, 2, 5, 9, 10, 11, 14]
    assert parse_key_steps("3 7", 10) == [0, 3, 7]
    for bad, message in [("", "no key steps"), ("1, x", "cannot read key step 'x'"), ("5-2", "backwards"), ("0, 30", "out of range")]:
        with pytest.raises(ValueError, match=message):
            parse_key_steps(bad, 20)


def test_schedule_value():
    schedule = Schedule((0, 1, 2, 10), num_evals=20, model_family="flux")
    assert schedule.num_keys == 4 and schedule.ideal_speedup == 5.0
    assert schedule.is_key(10) and not schedule.is_key(11)
    assert "4 key of 20" in schedule.describe()
    with pytest.raises(ValueError, match="strictly increasing"):
        Schedule((0, 2, 2), num_evals=5)
    with pytest.raises(ValueError, match="unknown predictor scheme"):
        Schedule((0,), num_evals=5, scheme="magic")
    with pytest.raises(Exception):
        schedule.num_evals = 3  # frozen: it is shared between nodes
