"""One DPCache Schedule serves runs of any step count and sampler, and partial (KSamplerAdvanced) runs,
inside a real ComfyUI: each run computes its blocks only at the keys its report names."""
from __future__ import annotations

import logging
import re

import pytest

from comfy_host import BlockCounter, build_model, conditioning, psnr, sample

pytestmark = pytest.mark.comfy

CAL_STEPS, K = 20, 8


class KeyRecorder(BlockCounter):
    """BlockCounter that also records at which model calls the first block ran."""

    def __enter__(self):
        super().__enter__()
        self.computed_calls = []
        first = self.blocks[0][1]
        inner = first.forward

        def recording(*args, **kwargs):
            if not self.computed_calls or self.computed_calls[-1] != self.model_calls - 1:
                self.computed_calls.append(self.model_calls - 1)
            return inner(*args, **kwargs)

        first.forward = recording
        return self


def calibrate(host, key, name, steps=CAL_STEPS, seeds=(1, 2)):
    import nodes
    model = build_model(key)
    (calib,) = nodes.NODE_CLASS_MAPPINGS["DPCacheCalibrate"]().calibrate(model, name, 1, True)
    for seed in seeds:
        sample(calib, key, steps=steps, seed=seed)
    return model


def schedule_node(pact, k=K):
    import nodes
    out = nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"]().schedule(
        pact=pact, key_steps=k, first_full_steps=3, last_full_steps=0, total_evaluations=50, manual_key_steps="")
    return out["result"][0], out["ui"]["text"][0]


def apply(model, sched):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, sched)["result"][0]


def reported_keys(caplog, pattern):
    """The key list after ``pattern`` in the last run report."""
    line = [r.getMessage() for r in caplog.records if "key evaluations computed" in r.getMessage()][-1]
    keys = re.search(pattern + r"\[([\d, ]*)\]", line)
    assert keys, line
    return [int(k) for k in keys.group(1).split(",") if k.strip()], line


def test_pact_at_20_serves_12_20_30_steps_and_heun(host, pact_dir, caplog):
    core = host["core"]
    model = calibrate(host, "flux", "flux_euler_20")
    acc, meta = core.load_pact(str(pact_dir / "flux_euler_20.safetensors"))
    assert acc.num_evals == CAL_STEPS and len(meta["eval_sigmas"]) == len(meta["positions"]) == CAL_STEPS + 1
    assert meta["positions"][0] == 0.0 and meta["positions"][-1] == 1.0
    sched, text = schedule_node("flux_euler_20.safetensors")
    assert sched.num_evals == CAL_STEPS and sched.num_keys == K and "PACT calibrated at T=20" in text
    fast = apply(model, sched)
    for sampler, steps, evals in [("euler", 12, 12), ("euler", 20, 20), ("euler", 30, 30), ("heun", 10, 19)]:
        ref = sample(model, "flux", steps=steps, sampler=sampler)
        with caplog.at_level(logging.INFO, logger="dpcache"), KeyRecorder(model) as c:
            out = sample(fast, "flux", steps=steps, sampler=sampler)
        assert c.model_calls == evals
        if evals == CAL_STEPS:  # the PACT's own T: its plan as it is
            keys, line = list(sched.key_steps), [r.getMessage() for r in caplog.records][-1]
            assert "planned for" not in line
        else:
            keys, line = reported_keys(caplog, rf"PACT calibrated at T=20; planned for T={evals}: \d+ key evaluations.*?keys ")
            scaled = round(K * evals / CAL_STEPS)  # same speed-up; raised only where the hop cap needs more
            assert len(keys) == scaled or (len(keys) > scaled and f"raised from {scaled}" in line)
        assert c.computed_calls == keys  # blocks ran at the planned keys and nowhere else
        assert set(c.counts.values()) == {len(keys)}
        db = psnr(ref, out)
        print(f"\n[host] replan flux {sampler} {steps} steps ({evals} evaluations): {line}; block calls "
              f"{c.total}, PSNR {db:.2f} dB")
        assert db > 25.0


def test_manual_schedule_keeps_its_mismatch_error(host):
    import nodes
    sched = nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"]().schedule(
        pact="(manual)", key_steps=K, first_full_steps=3, last_full_steps=0, total_evaluations=20,
        manual_key_steps="0, 1, 2, 6, 10, 14")["result"][0]
    with pytest.raises(ValueError, match="makes 12 model evaluations.*T=20.*total_evaluations=12"):
        sample(apply(build_model("wan_t2v"), sched), "wan_t2v", steps=12)


def advanced(model, key, noise, latent, steps, start, end, seed=42, cfg=1.0, add_noise=True):
    """KSamplerAdvanced's call: the slice start..end of a steps-step schedule, leftover noise returned."""
    import comfy.sample
    import torch
    pos, neg, _ = conditioning(key)
    return comfy.sample.sample(model, noise if add_noise else torch.zeros_like(latent), steps, cfg, "euler", "simple",
                               pos, neg, latent, disable_noise=not add_noise, start_step=start, last_step=end,
                               force_full_denoise=end >= steps, seed=seed, disable_pbar=True)


@pytest.mark.parametrize("steps", [20, 30])
def test_partial_runs_plan_one_joint_trajectory(host, pact_dir, caplog, steps):
    """Two sampling calls over the halves of 20 or 30 steps (Wan2.2 A14B's high- then low-noise
    expert): each computes only its keys of a joint plan, the budget's share of its own evaluations,
    and each call's first evaluations are keys. At 30 the PACT is transferred."""
    import comfy.sample
    model = calibrate(host, "wan_t2v", "wan_euler_20")
    sched, _ = schedule_node("wan_euler_20.safetensors")
    fast = apply(model, sched)
    _, _, latent = conditioning("wan_t2v")
    noise = comfy.sample.prepare_noise(latent, 42)
    half = steps // 2
    ref_mid = advanced(model, "wan_t2v", noise, latent, steps, 0, half)
    ref = advanced(model, "wan_t2v", noise, ref_mid, steps, half, steps, add_noise=False)
    calls = {}
    mid = None
    for part, (start, end) in (("high", (0, half)), ("low", (half, steps))):
        with caplog.at_level(logging.INFO, logger="dpcache"), KeyRecorder(model) as c:
            if part == "high":
                mid = out = advanced(fast, "wan_t2v", noise, latent, steps, start, end)
            else:
                out = advanced(fast, "wan_t2v", noise, mid, steps, start, end, add_noise=False)
        mine, line = reported_keys(caplog, rf"this call computes \d+ of {half}: ")
        joint, _ = reported_keys(caplog, r"joint plan \d+ key evaluations.*?keys ")
        assert c.model_calls == half and c.computed_calls == mine and mine[:3] == [0, 1, 2]
        assert f"evaluations {start}..{end - 1} of an estimated T={steps}" in line
        calls[part] = (mine, joint)
        print(f"\n[host] partial run {part} (steps {start}..{end} of {steps}): {line}; block calls {c.total}")
    for part, offset in (("high", 0), ("low", half)):  # each call's keys are its part of the joint plan it solved
        mine, joint = calls[part]
        assert mine == [k - offset for k in joint if offset <= k < offset + half]
        assert len(mine) == max(3, round(K * half / CAL_STEPS))  # the same speed-up on the evaluations it runs
    db = psnr(ref, out)
    print(f"\n[host] partial runs of {steps} steps: keys {calls['high'][0]} + {calls['low'][0]}, PSNR of the "
          f"two-call result {db:.2f} dB")
    assert db > 25.0


def test_a_denoise_run_computes_the_budgets_share(host, caplog):
    """KSampler at denoise 0.6 over 10 steps, a (uniform) schedule of K = 5 of T = 10: 5 of the 10
    evaluations it runs are computed (the joint plan placed 4 there before)."""
    import comfy.sample
    import nodes
    sched = nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"]().schedule(
        pact="(uniform)", key_steps=5, first_full_steps=3, last_full_steps=0, total_evaluations=10,
        manual_key_steps="")["result"][0]
    model = build_model("flux")
    pos, neg, latent = conditioning("flux")
    noise = comfy.sample.prepare_noise(latent, 7)
    with caplog.at_level(logging.INFO, logger="dpcache"), KeyRecorder(model) as c:
        comfy.sample.sample(apply(model, sched), noise, 10, 1.0, "euler", "simple", pos, neg, latent, denoise=0.6,
                            seed=7, disable_pbar=True)
    mine, line = reported_keys(caplog, r"this call computes \d+ of 10: ")
    print(f"\n[host] denoise 0.6: {line}")
    assert c.model_calls == 10 and len(mine) == 5 and c.computed_calls == mine
