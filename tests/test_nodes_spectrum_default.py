"""DPCache Schedule's calibration-free default, (spectrum: no calibration): Spectrum's key steps.

Chosen by leave-one-model-out on four trained bench models: no rule on the cost prior stayed at or
above Spectrum's schedule with the spectral forecaster at every K and model (BENCHMARKS.md)."""
import numpy as np
import pytest

import dpcache_core as core
from dpcache_core.replan import spectrum_plan
from nodes import dpcache_nodes as nd


def run_schedule(**kw):
    args = dict(pact=nd.SPECTRUM, key_steps=13, first_full_steps=3, last_full_steps=0, total_evaluations=50)
    args.update(kw)
    out = nd.DPCacheSchedule().schedule(**args)
    return out["result"][0], out["ui"]["text"][0]


def test_spectrum_is_the_first_and_default_entry_and_the_prior_stays_an_entry():
    pact = nd.DPCacheSchedule.INPUT_TYPES()["required"]["pact"]
    assert pact[0][:4] == [nd.SPECTRUM, nd.PRIOR, "(uniform)", "(manual)"] and pact[1]["default"] == nd.SPECTRUM
    assert "Spectrum's key steps" in pact[1]["tooltip"] and "leave-one-model-out" in pact[1]["tooltip"]
    assert nd.DPCacheSchedule.IS_CHANGED(nd.SPECTRUM) == ""


@pytest.mark.parametrize("total, k", [(50, 9), (50, 13), (50, 17), (50, 25), (30, 6), (30, 8), (30, 10), (30, 15)])
def test_spectrum_entry_plans_spectrums_key_steps(total, k):
    sched, text = run_schedule(key_steps=k, total_evaluations=total)
    assert list(sched.key_steps) == core.spectrum_key_steps(total, k) and sched.num_keys == k
    assert sched.source == "spectrum" and sched.model_family is None and sched.planner.spectrum
    assert f"(spectrum) made for T={total}" in text


def test_spectrum_entry_forecaster():
    """auto: the spectral forecaster at every K (the rule chosen by leave-one-model-out; with the
    other entries auto picks Taylor at K = 25 of 50); the typed forecaster and order are honoured."""
    for k in (9, 13, 17, 25):
        sched, text = run_schedule(key_steps=k)
        assert sched.predictor == "spectral" and "spectral forecaster" in text
    assert run_schedule(pact=nd.PRIOR, key_steps=25)[0].predictor == "taylor"
    taylor, text = run_schedule(forecaster="taylor", taylor_order=1)
    assert taylor.predictor == "taylor" and taylor.order == 1 and "Taylor order 1 (taylor_order" in text
    assert taylor.key_steps == run_schedule()[0].key_steps


@pytest.mark.parametrize("total, run_evals", [(50, 30), (50, 100), (30, 50), (20, 20)])
def test_spectrum_entry_replans_for_any_step_count(total, run_evals):
    sched, _ = run_schedule(key_steps=max(6, round(13 * total / 50)), total_evaluations=total)
    plan = core.plan_run(sched, core.RunShape(run_evals))
    if run_evals == total:
        assert plan.schedule is sched
        return
    k = max(1, round(sched.num_keys * run_evals / total))
    assert list(plan.schedule.key_steps) == spectrum_plan(run_evals, k) and plan.schedule.num_evals == run_evals
    assert plan.schedule.predictor == sched.predictor
    assert f"(spectrum) made for T={total}; planned for T={run_evals}" in plan.text


def test_spectrum_plan_keeps_the_mandatory_steps_and_a_partial_runs_windows():
    assert spectrum_plan(50, 13) == core.spectrum_key_steps(50, 13)
    more = spectrum_plan(50, 13, first_full_steps=7, last_full_steps=5)
    assert more[:7] == list(range(7)) and more[-5:] == list(range(45, 50)) and len(more) == 13
    sched, _ = run_schedule(key_steps=10, total_evaluations=20)
    plan = core.plan_run(sched, core.RunShape(10, positions=tuple(0.5 + 0.05 * np.arange(10)), end=1.0))
    assert plan.joint_num_evals == 20 and plan.offset == 10
    assert {10, 11, 12} <= set(plan.joint_keys) and plan.schedule.key_steps[:3] == (0, 1, 2)


def test_spectrum_entry_target_speedup_budget():
    sched, _ = run_schedule(budget="target speed-up", target_speedup=3.85)
    assert sched.num_keys == 13 and list(sched.key_steps) == core.spectrum_key_steps(50, 13)
