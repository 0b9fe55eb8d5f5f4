"""Issue 20 in a real ComfyUI: a ddim_uniform run (ComfyUI's own scheduler) is whole, so Calibrate
writes a whole-run PACT of the run's step count and Apply uses its plan as it is; (uniform) plans
one joint schedule across two KSamplerAdvanced calls."""
from __future__ import annotations

import logging
import os

import pytest

from comfy_host import build_model, sample
from test_host_replan import KeyRecorder, advanced, apply, reported_keys

pytestmark = pytest.mark.comfy


def test_ddim_uniform_is_a_whole_run(host, pact_dir, caplog):
    import comfy.samplers
    import nodes
    core = host["core"]
    model = build_model("flux")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", 20)
    steps = len(sigmas) - 1
    (calib,) = nodes.NODE_CLASS_MAPPINGS["DPCacheCalibrate"]().calibrate(model, "", 1, True)
    sample(calib, "flux", steps=20, scheduler="ddim_uniform")
    name = f"flux_euler_ddim_uniform_{steps}.safetensors"  # family_sampler_scheduler_T
    assert name in os.listdir(pact_dir), os.listdir(pact_dir)
    acc, meta = core.load_pact(str(pact_dir / name))
    assert acc.num_evals == steps and "windows" not in meta and meta["scheduler"] == "ddim_uniform"
    assert 0.0 < meta["positions"][0] < meta["positions"][1] - meta["positions"][0]  # below sigma_max, by less than a step
    sched = nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"]().schedule(
        pact=name, key_steps=8, first_full_steps=3, last_full_steps=0, total_evaluations=50, manual_key_steps="")["result"][0]
    with caplog.at_level(logging.INFO, logger="dpcache"), KeyRecorder(model) as c:
        sample(apply(model, sched), "flux", steps=20, scheduler="ddim_uniform")
    report = [r.getMessage() for r in caplog.records if "key evaluations computed" in r.getMessage()][-1]
    assert "planned for" not in report and "this call is" not in report, report
    assert c.computed_calls == list(sched.key_steps)


@pytest.mark.parametrize("k, share", [(9, 4), (7, 4)])
def test_uniform_two_calls_each_compute_the_budgets_share(host, caplog, k, share):
    """Two KSamplerAdvanced calls of 10 of 20 steps: each computes round(K x 10 / 20) of its evaluations,
    its part of a joint plan of the whole trajectory (as the CPU tier's expert test)."""
    import comfy.sample
    import nodes
    from comfy_host import conditioning
    model = build_model("wan_t2v")
    sched = nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"]().schedule(
        pact="(uniform)", key_steps=k, first_full_steps=3, last_full_steps=0, total_evaluations=20,
        manual_key_steps="")["result"][0]
    fast = apply(model, sched)
    _, _, latent = conditioning("wan_t2v")
    noise = comfy.sample.prepare_noise(latent, 42)
    mid = None
    for start, end in ((0, 10), (10, 20)):
        with caplog.at_level(logging.INFO, logger="dpcache"), KeyRecorder(model) as c:
            if start == 0:
                mid = advanced(fast, "wan_t2v", noise, latent, 20, start, end)
            else:
                advanced(fast, "wan_t2v", noise, mid, 20, start, end, add_noise=False)
        mine, line = reported_keys(caplog, r"this call computes \d+ of 10: ")
        assert c.computed_calls == mine and mine[:3] == [0, 1, 2]
        assert len(mine) == share and "budget's share" in line, line
        print(f"\n[host] (uniform) K={k}, steps {start}..{end} of 20: {line}")
