"""Transferring a PACT to another evaluation count, and planning runs at sampling start."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nodes_fakes  # noqa: F401  (puts the repo root on sys.path)
from dpcache_core import (Budget, Planner, RunShape, Schedule, ScheduleMismatchError, build_pact, joint_trajectory,
                          path_cost, plan_run, positions_from_sigmas, solve_schedule, transfer_pact, uniform_key_steps)
from dpcache_core.transfer import index_positions, spread_ties


def trajectory(num_evals, seed=0):
    """Features of a smooth made-up trajectory sampled at num_evals evenly spaced positions."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 64, generator=g)
    return [base[0] + torch.sin(3 * x) * base[1] + x ** 2 * base[2] for x in torch.linspace(0, 1, num_evals)]


class Pacts(dict):
    def __missing__(self, key):
        order, num_evals = key
        self[key] = build_pact(trajectory(num_evals), order=order)
        return self[key]


@pytest.fixture(scope="module")
def pacts():
    return Pacts()


@pytest.mark.parametrize("order", [1, 2])
def test_same_count_and_positions_give_the_pact_itself(pacts, order):
    cost = pacts[(order, 50)]
    same = transfer_pact(cost, 50, order)
    finite = np.isfinite(cost)
    assert np.array_equal(np.isfinite(same), finite)
    assert np.allclose(same[finite], cost[finite], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("target", [12, 20, 28, 30])
def test_transfer_defines_what_a_pact_at_that_count_defines(pacts, order, target):
    moved = transfer_pact(pacts[(order, 50)], target, order)
    direct = pacts[(order, target)]
    assert moved.shape == direct.shape
    assert np.array_equal(np.isfinite(moved), np.isfinite(direct))
    assert (moved[np.isfinite(moved)] >= 0).all()


@pytest.mark.parametrize("target,keys", [(20, 6), (28, 9), (30, 10)])
def test_transferred_plan_matches_a_plan_calibrated_at_that_count(pacts, target, keys):
    moved = solve_schedule(transfer_pact(pacts[(1, 50)], target, 1), keys, 3)
    direct = solve_schedule(pacts[(1, target)], keys, 3)
    assert moved == direct


@pytest.mark.parametrize("target,keys", [(20, 6), (28, 9), (30, 10)])
def test_order_2_transfer_plans_close_to_a_pact_at_that_count(pacts, target, keys):
    """Order 2's reference history (features a-1, a) is one evaluation apart at every T, which no
    position coordinate captures: the plan is near the optimum, not always equal to it."""
    direct = pacts[(2, target)]
    best = path_cost(direct, solve_schedule(direct, keys, 3))
    moved = path_cost(direct, solve_schedule(transfer_pact(pacts[(2, 50)], target, 2), keys, 3))
    uniform = path_cost(direct, uniform_key_steps(target, keys, 3))
    assert moved <= 1.25 * best and moved < uniform


def test_positions_from_a_sigma_table():
    t = np.arange(1, 1001) / 1000
    table = 3 * t / (1 + 2 * t)  # a shifted flow table, ascending
    simple = [table[-(1 + int(x * 1000 / 20))] for x in range(20)] + [0.0]  # ComfyUI's simple scheduler
    pos = positions_from_sigmas(simple, table)
    assert pos[0] == 0.0 and pos[-1] == 1.0
    assert np.allclose(pos, np.arange(21) / 20)


def test_spread_ties_keeps_order_and_separates_heun_duplicates():
    p = spread_ties([0.0, 0.5, 0.5, 1.0])
    assert np.allclose(p, [0.0, 0.25, 0.5, 1.0])
    assert np.allclose(spread_ties(index_positions(4)), index_positions(4))


def test_budget_rules():
    assert Budget("same speed-up", 13).keys_for(28, 50) == 7
    assert Budget("target speed-up", 13, 4.0).keys_for(28, 50) == 7
    assert Budget("fixed K", 13).keys_for(28, 50) == 13
    assert Budget("fixed K", 13).keys_for(10, 50) == 10
    with pytest.raises(ValueError, match="unknown budget rule"):
        Budget("faster")


def pact_schedule(cost, keys, order=1, positions=None):
    t = cost.shape[0]
    planner = Planner(t, Budget("same speed-up", keys), 3, 0, cost=cost, positions=positions, order=order,
                      label=f"PACT calibrated at T={t}")
    return Schedule(tuple(solve_schedule(cost, keys, 3)), t, "flux", order, planner=planner)


def test_plan_run_other_count_same_count_and_manual(pacts):
    sched = pact_schedule(pacts[(1, 50)], 13)
    plan = plan_run(sched, RunShape(28))
    assert plan.schedule.num_evals == 28 and plan.schedule.num_keys == 7
    assert plan.schedule.key_steps == tuple(solve_schedule(transfer_pact(pacts[(1, 50)], 28, 1), 7, 3))
    assert plan.text.startswith("PACT calibrated at T=50; planned for T=28: 7 key evaluations")
    assert str(list(plan.schedule.key_steps)) in plan.text
    assert plan_run(sched, RunShape(50)).schedule is sched  # its own T: used as it is
    manual = Schedule((0, 1, 2, 10), 20)
    assert plan_run(manual, RunShape(20)).schedule is manual
    with pytest.raises(ScheduleMismatchError, match="makes 12 model evaluations.*T=20"):
        plan_run(manual, RunShape(12))


def test_uniform_replans_at_the_run_count():
    planner = Planner(50, Budget("same speed-up", 13), 3, 0, label="(uniform) made for T=50")
    sched = Schedule(tuple(uniform_key_steps(50, 13)), 50, source="uniform", planner=planner)
    plan = plan_run(sched, RunShape(20))
    assert plan.schedule.key_steps == tuple(uniform_key_steps(20, 5))


def test_a_pact_at_the_run_count_is_used_as_it_is(pacts):
    sched = pact_schedule(pacts[(1, 20)], 8)
    window = RunShape(10, tuple(np.arange(10) / 20 + 0.5), 1.0)
    plan = plan_run(sched, window)
    # the joint trajectory is the PACT's own T: the DP runs on the PACT itself
    assert plan.joint_num_evals == 20
    assert list(plan.joint_keys) == solve_schedule(pacts[(1, 20)], 8, 3, required=(10, 11, 12))


def test_two_windows_plan_the_same_joint_trajectory(pacts):
    """Two sampling calls over the halves of a 30-step simple schedule (e.g. Wan2.2's experts)."""
    sched = pact_schedule(pacts[(1, 50)], 13, positions=index_positions(50))
    pos = index_positions(30)
    high = RunShape(15, tuple(pos[:15]), float(pos[15]))
    low = RunShape(15, tuple(pos[15:30]), 1.0)
    assert joint_trajectory(high, 3).positions == pytest.approx(tuple(pos))
    assert joint_trajectory(low, 3).positions == pytest.approx(tuple(pos))
    a, b = plan_run(sched, high), plan_run(sched, low)
    assert a.joint_keys == b.joint_keys and a.joint_num_evals == b.joint_num_evals == 30
    assert (a.offset, b.offset) == (0, 15)
    joint = list(a.joint_keys)
    assert {0, 1, 2, 15, 16, 17} <= set(joint) and len(joint) == round(13 * 30 / 50)
    assert list(a.schedule.key_steps) == [k for k in joint if k < 15]
    assert list(b.schedule.key_steps) == [k - 15 for k in joint if k >= 15]
    assert a.schedule.key_steps[0] == 0 and b.schedule.key_steps[0] == 0
    assert "this call is evaluations 15..29 of an estimated T=30" in b.text


def test_window_counts_estimated_from_density():
    run = RunShape(6, tuple(0.25 + np.arange(6) / 24), 0.5)  # evaluations 6..11 of 24
    joint = joint_trajectory(run, 3)
    assert joint.total == 24 and joint.offset == 6
    assert joint.required == (6, 7, 8, 12, 13, 14)
