"""Issue 11: skip-only hop costs and the history-exact order >= 2 cost, checked against what the run
really pays (``CacheRun`` on a recorded trajectory) and against brute force."""
import itertools

import numpy as np
import pytest
import torch

from dpcache_core import PactAccumulator, PactFileError, Schedule, build_pact, load_pact, mandatory_steps, path_cost, save_pact, solve_schedule
from dpcache_core.history import build_history, check_history, history_fits, history_shape
from dpcache_core.pact import sentinel_target
from dpcache_core.schedule import path_cost_history, skip_only_cost, solve_schedule_history
from replayed_runs import run_cost, smooth_trajectory


def history_run_cost(trajectory, keys, order, scheme, first_full_steps):
    """What the run pays with the Taylor forecaster of ``order``, the sentinel term included."""
    schedule = Schedule(tuple(keys), trajectory.shape[0], order=order, scheme=scheme, first_full_steps=first_full_steps)
    return run_cost(trajectory, schedule, sentinel_target(trajectory, order, scheme), trajectory.shape[0])


def key_sets(num_evals, first_full_steps, cap, count, rng):
    """Random key sets with the mandatory steps and every hop within ``cap``."""
    mandatory = set(mandatory_steps(num_evals, first_full_steps, 0))
    found = []
    while len(found) < count:
        keys = sorted(mandatory | set(rng.choice(np.arange(1, num_evals), rng.integers(0, num_evals), replace=False).tolist()))
        if all(b - a <= cap for a, b in zip(keys, keys[1:] + [num_evals])):
            found.append(keys)
    return found


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("scheme", ["reference", "exact"])
@pytest.mark.parametrize("first_full_steps", [1, 3])
def test_history_cost_is_what_the_run_pays(order, scheme, first_full_steps):
    num_evals, cap = 14, 5
    trajectory = smooth_trajectory(num_evals, seed=order)
    history = build_history(trajectory, order, scheme, max_gap=cap)
    assert history.shape == history_shape(num_evals, order, cap)
    rng = np.random.default_rng(order)
    for keys in key_sets(num_evals, first_full_steps, cap, 25, rng):
        expected = history_run_cost(trajectory, keys, order, scheme, first_full_steps)
        assert path_cost_history(history, keys, first_full_steps, scheme) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_skip_convention_is_what_the_order_1_run_pays_and_reference_is_not():
    num_evals = 14
    trajectory = smooth_trajectory(num_evals, seed=5)
    cost = build_pact(list(trajectory), order=1, max_anchor_gap=6)
    rng = np.random.default_rng(0)
    differs = 0
    for keys in key_sets(num_evals, 3, 6, 25, rng):
        expected = history_run_cost(trajectory, keys, 1, "reference", 3)
        assert path_cost(cost, keys, "skip") == pytest.approx(expected, rel=1e-4, abs=1e-6)
        differs += abs(path_cost(cost, keys) - expected) > 1e-3
    assert differs == 25  # the reference convention also counts every next key step


def test_skip_only_cost_layout():
    cost = np.full((5, 6, 6), np.inf)
    cost[:1, 0, 1] = 0.0  # i < order: the reference's free hop to the next step
    cost[:2, 1, 2] = 0.0
    for a, i in [(1, 2), (2, 3), (1, 3), (3, 4)]:
        cost[a, i, i + 1 :] = np.cumsum(np.arange(1.0, 6 - i))  # err(t) = t - i
    skip = skip_only_cost(cost)
    assert skip[1, 2, 3] == 0 and skip[1, 2, 4] == 1.0 and skip[1, 2, 5] == 1.0 + 2.0 + 3.0  # to T: unchanged
    assert skip[0, 0, 1] == 0 and np.isinf(skip[0, 0, 2])  # undefined stays undefined
    assert (np.isfinite(skip) == np.isfinite(cost)).all()
    # Computing every step costs only the sentinel hop under "skip", much more under "reference".
    assert path_cost(cost, [0, 1, 2, 3, 4], "skip") == cost[3, 4, 5] == 1.0
    assert path_cost(cost, [0, 1, 2, 3, 4]) == 1.0 + 1.0 + 1.0
    with pytest.raises(ValueError, match="unknown cost convention"):
        path_cost(cost, [0, 1, 2, 3], "bogus")


def random_pact(rng, num_evals, inf_fraction=0.1):
    cost = rng.uniform(0.1, 10.0, size=(num_evals, num_evals + 1, num_evals + 1))
    cost[rng.random(cost.shape) < inf_fraction] = np.inf
    return cost


def feasible_keys(num_evals, num_keys, first, last, max_hop):
    mandatory = set(mandatory_steps(num_evals, first, last))
    for rest in itertools.combinations(range(1, num_evals), num_keys - 1):
        keys = [0, *rest]
        if mandatory <= set(keys) and all(b - a <= max_hop for a, b in zip(keys, keys[1:] + [num_evals])):
            yield keys


def test_skip_convention_dp_equals_brute_force():
    rng = np.random.default_rng(3)
    checked = 0
    for num_evals in range(2, 11):
        cost = random_pact(rng, num_evals)
        for first, last, max_hop in [(1, 0, 3), (3, 0, 2), (2, 1, num_evals)]:
            for num_keys in range(len(mandatory_steps(num_evals, first, last)), num_evals + 1):
                best = min((path_cost(cost, k, "skip") for k in feasible_keys(num_evals, num_keys, first, last, max_hop)), default=np.inf)
                if not np.isfinite(best):
                    with pytest.raises(ValueError, match="no schedule"):
                        solve_schedule(cost, num_keys, first, last, max_hop, convention="skip")
                    continue
                keys = solve_schedule(cost, num_keys, first, last, max_hop, convention="skip")
                assert len(keys) == num_keys
                assert path_cost(cost, keys, "skip") == pytest.approx(best, rel=1e-12)
                checked += 1
    assert checked > 60


def random_history(rng, num_evals, order, cap, inf_fraction=0.1):
    history = rng.uniform(0.1, 10.0, size=history_shape(num_evals, order, cap))
    history[rng.random(history.shape) < inf_fraction] = np.inf
    return history


@pytest.mark.parametrize("order", [2, 3])
def test_history_dp_equals_brute_force(order):
    rng = np.random.default_rng(order)
    checked = infeasible = 0
    for num_evals in range(2, 10):
        for cap in (2, 3, 4):
            history = random_history(rng, num_evals, order, cap)
            for first, last, scheme in [(1, 0, "exact"), (3, 0, "reference"), (4, 1, "reference"), (2, 0, "exact")]:
                for max_hop in sorted({2, cap}):
                    for num_keys in range(len(mandatory_steps(num_evals, first, last)), num_evals + 1):
                        best = min((path_cost_history(history, k, first, scheme)
                                    for k in feasible_keys(num_evals, num_keys, first, last, max_hop)), default=np.inf)
                        if not np.isfinite(best):
                            with pytest.raises(ValueError, match="no schedule"):
                                solve_schedule_history(history, num_keys, first, last, max_hop, scheme)
                            infeasible += 1
                            continue
                        keys = solve_schedule_history(history, num_keys, first, last, max_hop, scheme)
                        assert len(keys) == num_keys and keys == sorted(set(keys))
                        assert set(mandatory_steps(num_evals, first, last)) <= set(keys)
                        assert path_cost_history(history, keys, first, scheme) == pytest.approx(best, rel=1e-12)
                        checked += 1
    assert checked > 200 and infeasible > 5


def test_history_dp_on_a_built_tensor_beats_every_sampled_schedule():
    trajectory = smooth_trajectory(20, seed=9)
    history = build_history(trajectory, 2, "reference", max_gap=6)
    keys = solve_schedule_history(history, 8, 3, 0)
    best = path_cost_history(history, keys, 3)
    for other in key_sets(20, 3, 6, 200, np.random.default_rng(1)):
        if len(other) == 8:
            assert best <= path_cost_history(history, other, 3) + 1e-12


def test_history_errors_are_clear():
    with pytest.raises(ValueError, match=r"shape \(T, H\+1, .., H\+1, H\)"):
        check_history(np.ones((5, 3, 3, 3)))
    history = random_history(np.random.default_rng(0), 10, 2, 3)
    with pytest.raises(ValueError, match="more than the 3"):
        solve_schedule_history(history, 5, 3, 0, max_hop=4)
    with pytest.raises(ValueError, match=r"\(T, S\) matrix"):
        build_history(torch.zeros(10, 4, 4))
    with pytest.raises(ValueError, match="at least 3 evaluations"):
        build_history(torch.zeros(2, 4))
    assert history_fits(50, 2) and history_fits(50, 3) and not history_fits(100, 3)


def test_pact_file_with_history_round_trips_and_merges(tmp_path):
    rng = np.random.default_rng(0)
    num_evals = 8
    acc = PactAccumulator(num_evals)
    samples = [random_history(rng, num_evals, 2, 3, inf_fraction=0.3) for _ in range(3)]
    for h in samples:
        acc.add(random_pact(rng, num_evals), history=h)
    path = str(tmp_path / "h.safetensors")
    save_pact(path, acc, {"order": 2, "convention": "skip"})
    loaded, meta = load_pact(path)
    assert meta["convention"] == "skip"
    np.testing.assert_array_equal(loaded.history_mean(), acc.history_mean())
    finite = np.isfinite(samples[0]) & np.isfinite(samples[1]) & np.isfinite(samples[2])
    np.testing.assert_allclose(loaded.history_mean()[finite], (sum(samples) / 3)[finite])
    # Merging with a PACT without history keeps the history; merging two with history adds them.
    plain = PactAccumulator(num_evals)
    plain.add(random_pact(rng, num_evals))
    plain.merge(loaded)
    np.testing.assert_array_equal(plain.history_counts, acc.history_counts)
    loaded.merge(acc)
    np.testing.assert_array_equal(loaded.history_counts, 2 * acc.history_counts)
    with pytest.raises(ValueError, match="same Taylor order"):
        loaded.add_history(random_history(rng, num_evals, 3, 3))
    # A file without the history tensors loads as before.
    old = PactAccumulator(num_evals)
    old.add(random_pact(rng, num_evals))
    save_pact(path, old, {"order": 2})
    loaded, meta = load_pact(path)
    assert loaded.history_mean() is None and "convention" not in meta


def test_broken_history_tensor_is_a_clear_error(tmp_path):
    from safetensors.numpy import save_file

    acc = PactAccumulator(6)
    acc.add(np.ones((6, 7, 7)), history=np.ones(history_shape(6, 2, 2)))
    path = str(tmp_path / "b.safetensors")
    save_pact(path, acc, {"order": 2})
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["history_counts"] = tensors["history_counts"][:, :2]
    save_file(tensors, path, metadata=header)
    with pytest.raises(PactFileError, match="broken history cost tensor"):
        load_pact(path)


def test_merge_cli_keeps_the_history_tensor_and_a_common_convention(tmp_path):
    from dpcache_core.merge import merge_pacts

    rng = np.random.default_rng(5)
    num_evals, paths = 8, []
    for n, (convention, with_history) in enumerate([("skip", True), ("skip", True), (None, False)]):
        acc = PactAccumulator(num_evals)
        acc.add(random_pact(rng, num_evals), history=random_history(rng, num_evals, 2, 3, 0.0) if with_history else None)
        meta = {"model_family": "flux", "order": 2, "scheme": "reference"}
        if convention:
            meta["convention"] = convention
        paths.append(str(tmp_path / f"p{n}.safetensors"))
        save_pact(paths[-1], acc, meta)
    merged, meta = merge_pacts(paths[:2])
    assert meta["convention"] == "skip" and merged.history_counts.max() == 2
    merged, meta = merge_pacts(paths)  # a file from before issue 11: planned as before
    assert meta["convention"] == "reference" and merged.history_counts.max() == 2 and merged.samples == 3


def test_a_history_exact_schedule_is_replanned_skip_only_for_another_count():
    from dpcache_core.replan import Budget, Planner, RunShape, plan_run
    from dpcache_core.transfer import transfer_pact

    num_evals, trajectory = 12, smooth_trajectory(12, seed=3)
    cost = build_pact(list(trajectory), order=2)
    history = build_history(trajectory, 2)
    keys = solve_schedule_history(history, 6, 3, 0)
    planner = Planner(num_evals, Budget("same speed-up", 6), 3, 0, cost=cost, order=2, label="PACT calibrated at T=12")
    sched = Schedule(tuple(keys), num_evals, order=2, convention="history", planner=planner)
    assert plan_run(sched, RunShape(num_evals)).schedule is sched  # its own count: as planned
    plan = plan_run(sched, RunShape(16))  # the history tensor does not transfer; the skip-only reading does
    assert list(plan.schedule.key_steps) == solve_schedule(transfer_pact(cost, 16, 2), 8, 3, convention="skip")


def test_history_dp_names_the_smallest_k_that_works():
    history = build_history(torch.randn(20, 64, generator=torch.Generator().manual_seed(0)).cumsum(0), 2)
    with pytest.raises(ValueError, match="the smallest K that works is 5"):
        solve_schedule_history(history, 4)
    assert len(solve_schedule_history(history, 5)) == 5
