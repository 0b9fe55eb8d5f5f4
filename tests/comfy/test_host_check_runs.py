"""DPCache Calibrate's check runs inside a real ComfyUI: after the recorded run it samples the same
noise and conditioning again with each forecaster; a check with every evaluation a key reproduces the
recorded output exactly, the output returned is the recorded run's, and DPCache Schedule's forecaster
auto then follows the checks."""
from __future__ import annotations

import sys

import pytest
import torch

from comfy_host import BlockCounter, build_model, sample

pytestmark = pytest.mark.comfy

STEPS, CFG = 20, 3.0  # cfg 3: cond and uncond, two streams


def pack_module(host, name):
    return sys.modules[host["pack"].__name__ + "." + name]


@pytest.mark.parametrize("key", ["flux", "wan_t2v"])
def test_check_runs_follow_the_recorded_run(host, pact_dir, key):
    import nodes
    core = host["core"]
    model = build_model(key)
    plain = sample(model, key, steps=STEPS, cfg=CFG, seed=3)
    (calib,) = nodes.NODE_CLASS_MAPPINGS["DPCacheCalibrate"]().calibrate(model, "checks", 1, True, check_runs=1)
    with BlockCounter(model) as counter:
        out = sample(calib, key, steps=STEPS, cfg=CFG, seed=3)
    assert torch.equal(out, plain)  # the recorded run's output, not a check run's
    acc, meta = core.load_pact(str(pact_dir / "checks.safetensors"))
    checks = meta["forecaster_checks"]
    ks = [int(k) for k in checks["ks"]]  # check_ks's, less any the DP cannot plan (K=4 of 20 under the hop cap)
    assert checks["runs"] == 1 and set(ks) <= set(core.check_runs.check_ks(STEPS)) and len(ks) >= 3, checks
    for k, row in checks["ks"].items():
        assert {"taylor 1", "taylor 2", "spectral"} <= set(row) and set(row) == set(checks["keys"][k])
        assert all(len(v) == 1 and 10 < v[0] < core.check_runs.MAX_DB for v in row.values()), row
    per_block = set(counter.counts.values())
    core_labels = core.check_runs.forecaster_of
    checked = sum(int(k) for k, row in checks["keys"].items()  # each distinct plan is sampled once
                  for _ in {(core_labels(label), tuple(keys)) for label, keys in row.items()})
    assert per_block == {STEPS + checked}, per_block  # the recorded run, then each check at its K keys

    with BlockCounter(model) as counter:  # the file has its check run: the next run only records
        sample(calib, key, steps=STEPS, cfg=CFG, seed=4)
    assert set(counter.counts.values()) == {STEPS}
    acc, meta = core.load_pact(str(pact_dir / "checks.safetensors"))
    assert acc.samples == 2 and meta["forecaster_checks"] == checks

    out = nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"]().schedule("checks.safetensors", 8, 3, 0, STEPS)
    text = out["ui"]["text"][0]
    k, means = core.check_runs.checked_ranking(meta, 8)
    assert f"forecaster chosen by the calibration's check runs at K={k}" in text, text
    print(f"\n[host] {key} check runs at K={ks} (PSNR dB): {checks['ks']}; schedule: {text[:160]}")


def test_a_check_with_every_key_reproduces_the_recorded_run(host, pact_dir, monkeypatch):
    """The conditioning is reset before each check run: at K = T it is bit-identical to the recorded run."""
    import nodes
    core = host["core"]
    check_hook = pack_module(host, "nodes.check_hook")
    every = [(STEPS, name, core.choose.Candidate(name, tuple(range(STEPS)), "every evaluation", 0.0))
             for name in ("taylor 1", "spectral")]  # two check runs: the second sees conditioning reset again
    monkeypatch.setattr(check_hook, "planned_checks", lambda acc, meta: every)
    model = build_model("flux")
    (calib,) = nodes.NODE_CLASS_MAPPINGS["DPCacheCalibrate"]().calibrate(model, "every", 1, True, check_runs=1)
    sample(calib, "flux", steps=STEPS, cfg=CFG, seed=5)
    _, meta = core.load_pact(str(pact_dir / "every.safetensors"))
    assert meta["forecaster_checks"]["ks"] == {str(STEPS): {"taylor 1": [core.check_runs.MAX_DB],
                                                                 "spectral": [core.check_runs.MAX_DB]}}


def test_no_check_runs_when_off(host, pact_dir):
    import nodes
    core = host["core"]
    model = build_model("flux")
    (calib,) = nodes.NODE_CLASS_MAPPINGS["DPCacheCalibrate"]().calibrate(model, "off", 1, True, check_runs=0)
    with BlockCounter(model) as counter:
        sample(calib, "flux", steps=STEPS, cfg=CFG)
    assert set(counter.counts.values()) == {STEPS}
    _, meta = core.load_pact(str(pact_dir / "off.safetensors"))
    assert "forecaster_checks" not in meta
