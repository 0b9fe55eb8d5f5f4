"""CPU tier: a partial run (denoise < 1, a KSamplerAdvanced window) computes the budget's share of the
evaluations it runs, the same speed-up as a whole run (dpcache_core/replan.py ``plan_run``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dpcache_core import Budget, Planner, RunShape, Schedule, plan_run, uniform_key_steps
from dpcache_core.prior import prior_cost
from dpcache_core.transfer import positions_from_sigmas, spread_ties

TABLE = (torch.arange(1, 1001) / 1000.0).numpy()  # a flow model's sigma table: the position is 1 - sigma


def shape_of(sigmas) -> RunShape:
    s = [float(x) for x in sigmas]
    positions = spread_ties(positions_from_sigmas(s[:-1], TABLE))
    return RunShape(len(s) - 1, tuple(float(p) for p in positions), float(positions_from_sigmas([s[-1]], TABLE)[0]))


def denoised(steps: int, denoise: float) -> torch.Tensor:
    """The sigmas of KSampler at ``denoise`` < 1: the last steps + 1 of int(steps / denoise) steps."""
    return torch.linspace(1.0, 0.0, int(steps / denoise) + 1)[-(steps + 1):]


def uniform(t: int, k: int, rule: str = "same speed-up") -> Schedule:
    return Schedule(tuple(uniform_key_steps(t, k)), t, source="uniform", planner=Planner(t, Budget(rule, k), 3, 0))


def pact(t: int, k: int) -> Schedule:
    cost = prior_cost(t)
    return Schedule(tuple(uniform_key_steps(t, k)), t, source="pact",
                    planner=Planner(t, Budget("same speed-up", k), 3, 0, cost=cost, order=1, label="a PACT"))


@pytest.mark.parametrize("make", [uniform, pact])
def test_denoise_run_computes_the_budgets_share_of_its_evaluations(make):
    run = shape_of(denoised(10, 0.6))
    assert run.partial and run.num_evals == 10
    plan = plan_run(make(10, 5), run)  # K = 5 of T = 10: 5 of the run's 10 (4 before)
    assert plan.schedule.num_evals == 10 and len(plan.schedule.key_steps) == 5, plan.text
    assert "computes 5 of 10" in plan.text


@pytest.mark.parametrize("steps,denoise,k,t", [(20, 0.5, 5, 20), (30, 0.75, 13, 50), (12, 0.4, 4, 12)])
def test_the_share_keeps_the_ratio_t_over_k(steps, denoise, k, t):
    plan = plan_run(uniform(t, k), shape_of(denoised(steps, denoise)))
    want = max(int(round(k * steps / t)), 3)  # at least the call's first 3 evaluations
    assert len(plan.schedule.key_steps) == want, plan.text


def test_two_windows_of_one_trajectory_each_get_their_share():
    sigmas = torch.linspace(1.0, 0.0, 21)
    high, low = shape_of(sigmas[:9]), shape_of(sigmas[8:])  # a Wan2.2 split at step 8 of 20
    assert high.partial and low.partial
    ks = [len(plan_run(uniform(20, 8), w).schedule.key_steps) for w in (high, low)]
    assert ks == [max(3, round(8 * 8 / 20)), round(8 * 12 / 20)]


def test_fixed_k_counts_over_the_whole_trajectory_as_before():
    run = shape_of(denoised(10, 0.6))
    plan = plan_run(uniform(10, 5, "fixed K"), run)
    assert "budget's share" not in plan.text
    assert len(plan.schedule.key_steps) == len([k for k in plan.joint_keys if plan.offset <= k < plan.offset + 10])


def test_a_window_too_short_for_any_skip_says_so():
    """4 evaluations with the first 3 always computed: 2 asked, 3 is the fewest."""
    plan = plan_run(uniform(8, 4), shape_of(torch.linspace(1.0, 0.0, 9)[:5]))
    assert len(plan.schedule.key_steps) == 3 and "3, not 2" in plan.text
    assert np.all(np.diff(plan.schedule.key_steps) > 0)
