"""DPCache Schedule's forecaster input and its calibration-free entry on the cost prior, (prior: no calibration)."""
import numpy as np
import pytest

import dpcache_core as core
from dpcache_core import prior
from nodes import dpcache_nodes as nd


def run_schedule(**kw):
    args = dict(pact=nd.PRIOR, key_steps=13, first_full_steps=3, last_full_steps=0, total_evaluations=50)
    args.update(kw)
    out = nd.DPCacheSchedule().schedule(**args)
    return out["result"][0], out["ui"]["text"][0]


def test_prior_is_an_entry_and_auto_the_default_forecaster():
    spec = nd.DPCacheSchedule.INPUT_TYPES()
    pact = spec["required"]["pact"]
    assert nd.PRIOR in pact[0] and "(uniform)" in pact[0]
    forecaster = spec["optional"]["forecaster"]
    assert forecaster[0] == ["auto", "spectral", "taylor"] and forecaster[1]["default"] == "auto"
    assert "Spectrum" in forecaster[1]["tooltip"] and "no calibration" in pact[1]["tooltip"]
    assert nd.DPCacheSchedule.IS_CHANGED(nd.PRIOR) == ""


@pytest.mark.parametrize("pact, k, predictor, order", [
    (nd.PRIOR, 7, "spectral", 2), (nd.PRIOR, 17, "spectral", 2), (nd.PRIOR, 18, "taylor", 1), (nd.PRIOR, 25, "taylor", 1),
    ("(uniform)", 13, "spectral", 2), ("(uniform)", 20, "taylor", 2),
])
def test_auto_forecaster_is_spectral_at_high_speed_ups_and_taylor_below(pact, k, predictor, order):
    sched, text = run_schedule(pact=pact, key_steps=k)
    assert sched.predictor == predictor and (predictor == "spectral" or sched.order == order)
    assert ("spectral forecaster" in text) == (predictor == "spectral")


def test_prior_schedule_is_the_dp_on_the_prior_with_the_chosen_forecaster():
    sched, text = run_schedule()
    want = core.solve_schedule(prior.prior_cost(50), 13, 3, 3, convention="skip")
    assert list(sched.key_steps) == want and sched.num_keys == 13
    assert want != core.uniform_key_steps(50, 13, 3)  # a plan, not even spacing
    assert sched.source == "prior" and sched.convention == "skip" and sched.model_family is None
    assert sched.predictor == "spectral" and sched.planner.prior
    assert "spectral forecaster (keeps up to 8 features per stream)" in text and "(prior) made for T=50" in text
    taylor, text = run_schedule(forecaster="taylor", taylor_order=1)
    assert taylor.predictor == "taylor" and taylor.order == 1 and taylor.key_steps == sched.key_steps
    assert "Taylor order 1 (taylor_order; keeps 2 features per stream)" in text
    uniform, _ = run_schedule(pact="(uniform)", forecaster="taylor")
    assert uniform.predictor == "taylor" and list(uniform.key_steps) == core.uniform_key_steps(50, 13, 3)


@pytest.mark.parametrize("total, run_evals", [(50, 30), (50, 100), (28, 50), (20, 20)])
def test_prior_replans_for_any_step_count(total, run_evals):
    sched, _ = run_schedule(key_steps=max(6, round(13 * total / 50)), total_evaluations=total)
    plan = core.plan_run(sched, core.RunShape(run_evals))
    k = max(1, round(sched.num_keys * run_evals / total))
    if run_evals == total:
        assert plan.schedule is sched
    else:
        want, _ = prior.solve_prior(prior.prior_cost(run_evals), k, 3)  # the last 3 where k affords them
        assert list(plan.schedule.key_steps) == want and plan.schedule.num_evals == run_evals
        assert plan.schedule.predictor == "spectral"
        assert f"(prior) made for T={total}; planned for T={run_evals}" in plan.text


@pytest.mark.parametrize("k", [9, 10, 13, 25])
def test_prior_plans_keep_the_last_three_evaluations(k):
    """Issue 18: without the last steps as keys the prior's DP ended its keys at 41-43 of 50 at K 9-10
    and lost 1-3 dB to Spectrum on the trained Wan model; every prior plan keeps the last 3 now."""
    sched, _ = run_schedule(key_steps=k)
    assert list(sched.key_steps[-3:]) == [47, 48, 49] and sched.last_full_steps == 3 and sched.num_keys == k
    for run_evals in (30, 100):  # and the plans re-made for another step count, where their K affords them
        plan = core.plan_run(sched, core.RunShape(run_evals))
        asked = sched.planner.budget.keys_for(run_evals, 50)
        fewest = next(n for n in range(asked, run_evals + 1) if feasible(run_evals, n))
        keys, kept = prior.solve_prior(prior.prior_cost(run_evals), fewest, 3)
        assert list(plan.schedule.key_steps) == keys and (kept == 3 or run_evals == 30 and k < 13)
    more, _ = run_schedule(key_steps=k, last_full_steps=4)  # a larger last_full_steps is kept as typed
    assert list(more.key_steps[-4:]) == [46, 47, 48, 49] and more.last_full_steps == 4
    fewer, _ = run_schedule(key_steps=7)  # K too small for 3 last keys under the hop cap: as many as fit
    assert fewer.num_keys == 7 and fewer.last_full_steps == 1 and fewer.key_steps[-1] == 49
    low, _ = run_schedule(key_steps=6)  # the fewest keys the hop cap allows: planned, without the final step
    assert low.num_keys == 6 and low.last_full_steps == 0 and low.key_steps[-1] < 49
    uniform, _ = run_schedule(pact="(uniform)", key_steps=k)  # the other entries are unchanged
    assert list(uniform.key_steps) == core.uniform_key_steps(50, k, 3)


def test_prior_cost_is_the_normalised_mean_of_the_shipped_pacts():
    base = prior.prior_cost()
    assert base.shape == (50, 51, 51) and not base.flags.writeable
    parts = []
    for name in prior.PRIOR_SOURCES:
        acc, meta = core.load_pact(f"{prior.SHIPPED_DIR}/{name}")
        moved = core.transfer_pact(acc.mean(), 50, 2, meta["positions"], core.index_positions(50))
        parts.append(moved / prior.one_skip_scale(moved))
    finite = np.isfinite(parts[0]) & np.isfinite(parts[1])
    np.testing.assert_allclose(base[finite], (parts[0][finite] + parts[1][finite]) / 2)
    assert prior.one_skip_scale(base) == pytest.approx(1.0, rel=0.2)  # both weigh about the same


def test_prior_and_forecaster_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown forecaster 'fourier'"):
        run_schedule(forecaster="fourier")
    with pytest.raises(ValueError, match="needs the shipped PACTs .* reinstall the pack, or use \\(uniform\\)"):
        prior.prior_cost(50, folder=str(tmp_path))
    with pytest.raises(ValueError, match="at least 3 evaluations"):
        prior.prior_cost(2)
    with pytest.raises(ValueError, match="K=60 key steps is more than the T=50"):
        run_schedule(key_steps=60)


def test_prior_plans_a_partial_run_on_the_joint_trajectory():
    """A KSamplerAdvanced slice (e.g. Wan2.2 A14B's second expert): the joint plan on the prior, sized so
    that the call computes the budget's share of its own evaluations (K = 10 of 20: 5 of its 10)."""
    sched, _ = run_schedule(key_steps=10, total_evaluations=20)
    plan = core.plan_run(sched, core.RunShape(10, positions=tuple(0.5 + 0.05 * np.arange(10)), end=1.0))
    assert plan.joint_num_evals == 20 and plan.offset == 10 and len(plan.schedule.key_steps) == 5
    want, _ = prior.solve_prior(prior.prior_cost(20, core.index_positions(20)), len(plan.joint_keys), 3, 0,
                                [10, 11, 12], "skip")  # the prior's kept-last rule, fewer where K cannot afford them
    assert list(plan.joint_keys) == want
    assert list(plan.schedule.key_steps) == [k - 10 for k in want if k >= 10] and plan.schedule.key_steps[:3] == (0, 1, 2)


@pytest.mark.parametrize("steps", [20, 24, 50])
def test_prior_replanned_keeps_the_budget_and_drops_last_keys_it_cannot_afford(steps):
    """Schedule defaults (K = 13 of 50) re-planned at sampling start: the same speed-up at every run
    length; the last 3 evaluations are kept only where that K affords them under the hop cap."""
    sched, _ = run_schedule()
    plan = core.plan_run(sched, core.RunShape(steps))
    k = sched.planner.budget.keys_for(steps, 50)
    assert plan.schedule.num_keys == k and "raised" not in plan.text
    assert steps / k >= 3.85 - 0.5  # 20 steps: 5 keys (4x), not 8 (2.5x)
    keys, kept = prior.solve_prior(prior.prior_cost(steps), k, 3, 0)
    assert list(plan.schedule.key_steps) == keys
    assert (kept == 3) == (steps == 50) and keys[len(keys) - kept:] == list(range(steps - kept, steps))
    # where K must be raised, the note is true: the fewest keys the first steps and the hop cap allow
    few, _ = run_schedule(key_steps=10)
    asked = few.planner.budget.keys_for(steps, 50)
    short = core.plan_run(few, core.RunShape(steps))
    fewest = next(n for n in range(asked, steps + 1) if feasible(steps, n))
    assert short.schedule.num_keys == fewest and (f"raised from {asked}: the fewest" in short.text) == (fewest > asked)


def feasible(steps, k):
    try:
        prior.solve_prior(prior.prior_cost(steps), k, 3)
        return True
    except ValueError:
        return False
