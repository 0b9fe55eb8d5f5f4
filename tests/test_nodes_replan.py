"""CPU tier: one DPCache Schedule serves runs of any evaluation count (fakes of ComfyUI's contracts)."""
from __future__ import annotations

import logging
import os

import pytest
import torch

import nodes_fakes as F
from nodes_fakes import block_calls, reset_calls
from dpcache_core import load_pact, transfer_pact, solve_schedule
from nodes import dpcache_nodes as nd
from nodes.dpcache_nodes import DPCacheApply, DPCacheCalibrate, DPCacheSchedule



@pytest.fixture
def calibrated(tmp_path, monkeypatch):
    """A PACT calibrated at 10 euler steps on the fake Wan, picked by the Schedule node."""
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    monkeypatch.setattr(nd, "pact_path", lambda name: os.path.join(tmp_path, name))
    model = F.FakePatcher(F.WanModel())
    (calib,) = DPCacheCalibrate().calibrate(model, "w10", 1, False)
    for _ in range(2):
        F.sample(calib, steps=10, cfg=1.0)
    return model, os.path.join(tmp_path, "w10.safetensors")


def test_calibration_records_each_evaluation_sigma(calibrated):
    _, path = calibrated
    _, meta = load_pact(path)
    assert meta["eval_sigmas"] == pytest.approx([float(s) for s in torch.linspace(1.0, 0.0, 11)])


@pytest.mark.parametrize("steps", [7, 10, 16])
def test_a_pact_serves_other_step_counts(calibrated, steps, caplog):
    model, path = calibrated
    out = DPCacheSchedule().schedule(pact="w10.safetensors", key_steps=5, first_full_steps=2, last_full_steps=0,
                                     total_evaluations=50)
    sched = out["result"][0]
    assert "PACT calibrated at T=10" in out["ui"]["text"][0] and "same speed-up as K=5 of T=10" in out["ui"]["text"][0]
    acc, meta = load_pact(path)
    assert meta["convention"] == "skip" and sched.convention == "skip"  # a new order-1 PACT plans skip-only (issue 11)
    k = round(5 * steps / 10)
    expected = sched.key_steps if steps == 10 else tuple(solve_schedule(transfer_pact(acc.mean(), steps, 1), k, 2, convention="skip"))
    patched = DPCacheApply().apply(model, sched)["result"][0]
    reset_calls(model)
    with caplog.at_level(logging.INFO, logger="dpcache"):
        F.sample(patched, steps=steps, cfg=1.0)
    assert set(block_calls(model).values()) == {len(expected)}
    report = [r.getMessage() for r in caplog.records if "key evaluations computed" in r.getMessage()][-1]
    assert f"{len(expected)} key evaluations computed, {steps - len(expected)} skipped of {steps}" in report
    if steps != 10:
        assert f"PACT calibrated at T=10; planned for T={steps}: {len(expected)} key evaluations" in report
        assert str(list(expected)) in report


@pytest.mark.parametrize("rule,speedup,k", [("target speed-up", 2.0, 8), ("fixed K", 1.0, 5)])  # K=4 would break the hop cap 4 at T=16
def test_uniform_replans_with_the_budget_rule(rule, speedup, k):
    model = F.FakePatcher(F.Flux())
    sched = DPCacheSchedule().schedule(pact="(uniform)", key_steps=5, first_full_steps=2, last_full_steps=0,
                                       total_evaluations=10, budget=rule, target_speedup=speedup)["result"][0]
    patched = DPCacheApply().apply(model, sched)["result"][0]
    reset_calls(model)
    F.sample(patched, steps=16, cfg=1.0)
    counts = set(block_calls(model).values())
    assert counts <= {k, 2 * k} and k in counts  # the fake double block runs on img and txt


def test_manual_keeps_its_mismatch_error():
    sched = DPCacheSchedule().schedule(pact="(manual)", key_steps=5, first_full_steps=2, last_full_steps=0,
                                       total_evaluations=10, manual_key_steps="0, 1, 4, 7")["result"][0]
    patched = DPCacheApply().apply(F.FakePatcher(F.WanModel()), sched)["result"][0]
    with pytest.raises(ValueError, match="makes 8 model evaluations.*T=10.*total_evaluations=8"):
        F.sample(patched, steps=8, cfg=1.0)


@pytest.mark.parametrize("pact", ["flux1_dev_official_T50.safetensors", "wan21_i2v_14b_official_T50.safetensors"])
@pytest.mark.parametrize("steps", [20, 28, 30])
def test_shipped_pacts_serve_other_step_counts(pact, steps):
    """The authors' T=50 PACTs (order 2, with recorded positions) planned for a run of 20-30 steps."""
    from dpcache_core import RunShape, index_positions, plan_run
    sched = DPCacheSchedule().schedule(pact=pact, key_steps=13, first_full_steps=3, last_full_steps=0,
                                       total_evaluations=50)["result"][0]
    assert sched.num_evals == 50 and sched.planner.positions is not None
    positions = tuple(index_positions(steps)[:-1])  # simple scheduler: evenly spaced
    plan = plan_run(sched, RunShape(steps, positions, 1.0))
    assert plan.schedule.num_evals == steps and plan.schedule.num_keys == round(13 * steps / 50)
    assert plan.text.startswith(f"PACT calibrated at T=50; planned for T={steps}:")
