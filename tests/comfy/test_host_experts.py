"""Wan2.2 A14B two-expert sampling through ComfyUI's executor: KSamplerAdvanced steps 0..10 on the
high-noise expert, 10..20 on the low-noise one (the template's split). DPCache Calibrate on both
experts fills one PACT of the whole trajectory; one DPCache Schedule feeds an Apply DPCache on each
expert, and each expert computes only its own key evaluations."""
from __future__ import annotations

import os

import pytest

from comfy_host import BlockCounter, build_model, psnr
from test_host_workflow import CAPTURED, executor, run  # noqa: F401  (executor: module fixture)

pytestmark = pytest.mark.comfy

STEPS, SPLIT, CFG, K, FIRST = 20, 10, 3.0, 10, 2


def advanced(model, latent, start, end, seed, first):
    return {"class_type": "KSamplerAdvanced", "inputs": {
        "model": model, "add_noise": "enable" if first else "disable", "noise_seed": seed, "steps": STEPS, "cfg": CFG,
        "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["2", 1],
        "latent_image": latent, "start_at_step": start, "end_at_step": end,
        "return_with_leftover_noise": "enable" if first else "disable"}}


def two_expert_prompt(seed, patch_high=None, patch_low=None, extra=None):
    """high expert -> [patch] -> KSamplerAdvanced 0..10 -> low expert -> [patch] -> KSamplerAdvanced 10..20."""
    prompt = {
        "1": {"class_type": "DPCacheTestModel", "inputs": {"key": "wan22_high"}},
        "11": {"class_type": "DPCacheTestModel", "inputs": {"key": "wan22_low"}},
        "2": {"class_type": "DPCacheTestInputs", "inputs": {"key": "wan22_high"}},
    }
    high, low = ["1", 0], ["11", 0]
    if patch_high:
        prompt["3"] = dict(patch_high, inputs=dict(patch_high["inputs"], model=["1", 0]))
        prompt["13"] = dict(patch_low, inputs=dict(patch_low["inputs"], model=["11", 0]))
        high, low = ["3", 0], ["13", 0]
    prompt["4"] = advanced(high, ["2", 2], 0, SPLIT, seed, True)
    prompt["14"] = advanced(low, ["4", 0], SPLIT, 10000, seed, False)
    prompt["5"] = {"class_type": "DPCacheTestCapture", "inputs": {"samples": ["14", 0], "label": "experts"}}
    prompt.update(extra or {})
    return prompt


def calibrate(name, reset=False):
    return {"class_type": "DPCacheCalibrate", "inputs": {"pact_name": name, "order": 1, "reset": reset}}


def test_two_experts_calibrate_and_apply_in_one_graph(host, executor, pact_dir):  # noqa: F811
    core = host["core"]
    high, low = build_model("wan22_high"), build_model("wan22_low")
    name = "wan22_a14b"
    with BlockCounter(high) as ch, BlockCounter(low) as cl:
        for seed in (1, 2):
            run(executor, two_expert_prompt(seed, calibrate(name), calibrate(name)))
    assert set(ch.counts.values()) == {2 * SPLIT} and set(cl.counts.values()) == {2 * (STEPS - SPLIT)}
    acc, meta = core.load_pact(os.path.join(pact_dir, name + ".safetensors"))
    assert acc.num_evals == STEPS and meta["windows"] == [[0, SPLIT, 2], [SPLIT, STEPS - SPLIT, 2]]
    assert meta["model_family"] == "wan" and len(meta["positions"]) == STEPS + 1

    run(executor, two_expert_prompt(7))
    plain = CAPTURED["experts"].clone()
    schedule = {"class_type": "DPCacheSchedule", "inputs": {
        "pact": name + ".safetensors", "key_steps": K, "first_full_steps": FIRST, "last_full_steps": 0,
        "total_evaluations": STEPS, "manual_key_steps": "", "budget": "same speed-up", "target_speedup": 3.85}}
    apply = {"class_type": "DPCacheApply", "inputs": {"schedule": ["6", 0]}}
    with BlockCounter(high) as ch, BlockCounter(low) as cl:
        out = run(executor, two_expert_prompt(7, apply, apply, {"6": schedule}))
    keys = [int(k) for k in out["6"]["text"][0].split("key steps [")[1].split("]")[0].split(",")]
    assert len(keys) == K  # the Schedule's plan of the whole trajectory
    # each expert computes the budget's share of its own evaluations (K x its count / T), its first keys included
    share_high, share_low = round(K * SPLIT / STEPS), round(K * (STEPS - SPLIT) / STEPS)
    assert set(ch.counts.values()) == {share_high} and set(cl.counts.values()) == {share_low}
    assert ch.model_calls == SPLIT and cl.model_calls == STEPS - SPLIT  # cfg batched: one call per evaluation
    db = psnr(plain, CAPTURED["experts"])
    print(f"\n[host] wan22 A14B two experts (KSamplerAdvanced 0..{SPLIT} / {SPLIT}..{STEPS}): schedule keys {keys}; "
          f"high computed {share_high} of {SPLIT} ({ch.total}/{SPLIT * len(ch.counts)} block calls), "
          f"low computed {share_low} of {STEPS - SPLIT} ({cl.total}/{(STEPS - SPLIT) * len(cl.counts)} block calls), "
          f"PSNR {db:.2f} dB")
    assert db > 20.0


def test_wrong_family_pact_on_an_expert_is_refused(host, executor, pact_dir):  # noqa: F811
    core = host["core"]
    import numpy as np
    acc = core.PactAccumulator(STEPS)
    acc.add(np.random.default_rng(0).random((STEPS, STEPS + 1, STEPS + 1)))
    core.save_pact(os.path.join(pact_dir, "five_b.safetensors"), acc, {"model_family": "wan22_5b", "order": 1, "scheme": "reference"})
    schedule = {"class_type": "DPCacheSchedule", "inputs": {
        "pact": "five_b.safetensors", "key_steps": K, "first_full_steps": FIRST, "last_full_steps": 0,
        "total_evaluations": STEPS, "manual_key_steps": "", "budget": "same speed-up", "target_speedup": 3.85}}
    apply = {"class_type": "DPCacheApply", "inputs": {"schedule": ["6", 0]}}
    with pytest.raises(AssertionError, match="planned on a wan22_5b PACT.*Wan2.1 / Wan2.2 A14B"):
        run(executor, two_expert_prompt(3, apply, apply, {"6": schedule}))


def test_shipped_wan_pact_plans_both_experts(host, executor, pact_dir):  # noqa: F811
    """The wan22_i2v workflow's setting: the shipped Wan2.1 PACT (T=50), target speed-up 2x, transferred to the
    20 evaluations of the two expert calls: 10 keys in all, each expert's first two computed."""
    high, low = build_model("wan22_high"), build_model("wan22_low")
    schedule = {"class_type": "DPCacheSchedule", "inputs": {
        "pact": "wan21_i2v_14b_official_T50.safetensors", "key_steps": 10, "first_full_steps": FIRST, "last_full_steps": 0,
        "total_evaluations": STEPS, "manual_key_steps": "", "budget": "target speed-up", "target_speedup": 2.0}}
    apply = {"class_type": "DPCacheApply", "inputs": {"schedule": ["6", 0]}}
    with BlockCounter(high) as ch, BlockCounter(low) as cl:
        run(executor, two_expert_prompt(5, apply, apply, {"6": schedule}))
    nh, nl = ch.counts["blocks.0"], cl.counts["blocks.0"]
    assert len(set(ch.counts.values())) == len(set(cl.counts.values())) == 1
    assert nh >= FIRST and nl >= FIRST and nh + nl == STEPS // 2
    print(f"\n[host] wan22 A14B experts on the shipped Wan2.1 PACT, target 2x: high computed {nh} of {SPLIT}, "
          f"low {nl} of {STEPS - SPLIT}")
