"""CPU tier: Wan2.2 A14B-style two-expert sampling (two models, each a KSamplerAdvanced window of one
trajectory): both experts calibrate into one PACT, one schedule plans both, each computes only its keys."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest

import nodes_fakes as F
from dpcache_core import load_pact
from nodes import dpcache_nodes
from nodes.dpcache_nodes import DPCacheApply, DPCacheCalibrate, make_schedule

STEPS, SPLIT = 10, 5
HIGH, LOW = (0, SPLIT), (SPLIT, STEPS)


def experts():
    high, low = F.WanModel(), F.WanModel()
    for b in low.blocks:  # another model: the low-noise expert
        b.w = b.w.flip(0) * 1.5
    return F.FakePatcher(high), F.FakePatcher(low)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(dpcache_nodes, "calibration_folder", lambda: str(tmp_path))
    monkeypatch.setattr(dpcache_nodes, "pact_path", lambda name: str(tmp_path / name))
    return tmp_path


def calibrate_both(high, low, name="wan22", reset=False, cfg=2.0):
    (ch,) = DPCacheCalibrate().calibrate(high, name, 1, reset)
    (cl,) = DPCacheCalibrate().calibrate(low, name, 1, reset)
    F.sample(ch, steps=STEPS, cfg=cfg, window=HIGH)
    F.sample(cl, steps=STEPS, cfg=cfg, window=LOW)


def block_calls(patcher):
    return sorted({b.calls for b in patcher.dm.blocks})


def test_two_experts_calibrate_into_one_pact_of_the_whole_trajectory(folder):
    high, low = experts()
    calibrate_both(high, low)
    acc, meta = load_pact(str(folder / "wan22.safetensors"))
    assert acc.num_evals == STEPS and meta["windows"] == [[0, SPLIT, 1], [SPLIT, STEPS - SPLIT, 1]]
    assert meta["steps"] == STEPS and len(meta["positions"]) == STEPS + 1
    np.testing.assert_allclose(meta["positions"], np.arange(STEPS + 1) / STEPS, atol=1e-6)
    cost = acc.mean()
    assert np.isinf(cost[:SPLIT, :SPLIT, SPLIT + 1:]).all()  # no hop across the experts' boundary
    assert np.isfinite(cost[0, SPLIT, SPLIT + 1])  # the low expert's first key follows any high key
    calibrate_both(high, low)  # a second prompt adds a sample to each window
    assert load_pact(str(folder / "wan22.safetensors"))[1]["windows"] == [[0, SPLIT, 2], [SPLIT, STEPS - SPLIT, 2]]
    # reset on one expert's node drops only its own window
    (cl,) = DPCacheCalibrate().calibrate(low, "wan22", 1, True)
    F.sample(cl, steps=STEPS, cfg=2.0, window=LOW)
    acc, meta = load_pact(str(folder / "wan22.safetensors"))
    assert meta["windows"] == [[0, SPLIT, 2], [SPLIT, STEPS - SPLIT, 1]] and acc.samples == 3


def test_one_schedule_applies_to_both_experts_each_computing_its_keys(folder, caplog):
    high, low = experts()
    calibrate_both(high, low)
    sched, _, _ = make_schedule("wan22.safetensors", 6, first_full_steps=1)
    keys = list(sched.key_steps)
    assert SPLIT in keys and sched.num_evals == STEPS
    ah = DPCacheApply().apply(high, sched)["result"][0]
    al = DPCacheApply().apply(low, sched)["result"][0]
    for m in (high, low):
        for b in m.dm.blocks:
            b.calls = 0
    with caplog.at_level(logging.INFO, logger="dpcache"):
        F.sample(ah, steps=STEPS, cfg=2.0, window=HIGH)
        F.sample(al, steps=STEPS, cfg=2.0, window=LOW)
    mine_high = [k for k in keys if k < SPLIT]
    mine_low = [k - SPLIT for k in keys if k >= SPLIT]
    assert block_calls(high) == [len(mine_high)] and block_calls(low) == [len(mine_low)]
    assert mine_high[0] == 0 and mine_low[0] == 0  # each expert's first evaluation is a key
    report = [r.getMessage() for r in caplog.records if "this call computes" in r.getMessage()]
    assert len(report) == 4  # the plan line and the run summary of each expert
    assert f"this call computes {len(mine_high)} of {SPLIT}: {mine_high}" in report[0]
    assert f"this call computes {len(mine_low)} of {STEPS - SPLIT}: {mine_low}" in report[2]


def test_one_expert_pact_plans_that_expert_alone(folder):
    high, low = experts()
    (cl,) = DPCacheCalibrate().calibrate(low, "low_only", 1, False)
    F.sample(cl, steps=20, cfg=2.0, window=(10, 20))
    sched, cost, _ = make_schedule("low_only.safetensors", 4, first_full_steps=1)
    assert sched.num_evals == 10 and cost.shape[0] == 10 and sched.planner.span[0] == pytest.approx(0.5)
    al = DPCacheApply().apply(low, sched)["result"][0]
    for b in low.dm.blocks:
        b.calls = 0
    F.sample(al, steps=20, cfg=2.0, window=(10, 20))
    assert block_calls(low) == [4]


def test_whole_runs_and_windows_do_not_mix(folder, caplog):
    high, low = experts()
    calibrate_both(high, low, name="mix")
    before = (folder / "mix.safetensors").read_bytes()
    (c,) = DPCacheCalibrate().calibrate(high, "mix", 1, False)
    F.sample(c, steps=STEPS, cfg=2.0)  # found after the run: said, the output returned, the file untouched
    assert re.search("nothing added.*holds windows of partial sampling runs.*new pact_name", caplog.text)
    assert (folder / "mix.safetensors").read_bytes() == before
    (c,) = DPCacheCalibrate().calibrate(high, "whole", 1, False)
    F.sample(c, steps=STEPS, cfg=2.0)
    (c,) = DPCacheCalibrate().calibrate(high, "whole", 1, False)
    caplog.clear()
    F.sample(c, steps=STEPS, cfg=2.0, window=HIGH)
    assert re.search("nothing added.*calibrated on whole sampling runs.*evaluations 0..4 of T=10", caplog.text)
    (c,) = DPCacheCalibrate().calibrate(high, "mix", 1, False)
    caplog.clear()
    F.sample(c, steps=STEPS, cfg=2.0, window=(3, 8))
    assert re.search("nothing added.*overlapping the window", caplog.text)
    assert (folder / "mix.safetensors").read_bytes() == before


def test_a_sampler_of_unknown_count_is_placed_from_its_recorded_sigmas(folder):
    """uni_pc-like samplers: the count is not known before sampling; the window is placed when the run ends."""
    high, low = experts()
    for model, window in ((high, HIGH), (low, LOW)):
        (c,) = DPCacheCalibrate().calibrate(model, "unknown", 1, False)
        F.sample(c, steps=STEPS, cfg=2.0, window=window, sampler="some_new_sampler")
    acc, meta = load_pact(str(folder / "unknown.safetensors"))
    assert acc.num_evals == STEPS and meta["windows"] == [[0, SPLIT, 1], [SPLIT, STEPS - SPLIT, 1]]
