"""Calibrate -> Schedule -> Apply as real workflows, validated and run by ComfyUI's own executor
(execution.validate_prompt + execution.PromptExecutor, the code behind POST /prompt)."""
from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from comfy_host import ALL_KEYS, BlockCounter, build_model, conditioning, psnr, sample

pytestmark = pytest.mark.comfy

STEPS, K, CFG = 20, 8, 3.0
CAPTURED = {}


class DPCacheTestModel:
    """Test only: one of the tiny models of conftest.py as a MODEL."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": (list(ALL_KEYS),)}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, key):
        return (build_model(key),)


class DPCacheTestInputs:
    """Test only: the random conditioning and empty latent of conftest.conditioning."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": (list(ALL_KEYS),)}}
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, key):
        pos, neg, latent = conditioning(key)
        return (pos, neg, {"samples": latent})


class DPCacheTestCapture:
    """Test only: keeps the sampled latent for the test to inspect."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "label": ("STRING", {"default": "out"})}}
    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def keep(self, samples, label):
        CAPTURED[label] = samples["samples"].clone()
        return {}


@pytest.fixture(scope="module")
def executor(host):
    import execution
    import nodes
    import server
    for cls in (DPCacheTestModel, DPCacheTestInputs, DPCacheTestCapture):
        nodes.NODE_CLASS_MAPPINGS[cls.__name__] = cls
    import inspect
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:  # newer ComfyUI: main.py passes these
        return execution.PromptExecutor(server.PromptServer.instance, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server.PromptServer.instance)


def run(executor, prompt):
    """Validate and execute like the server's /prompt + worker; returns the history outputs."""
    import execution
    pid = str(uuid.uuid4())
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
    assert ok, f"invalid prompt: {error} {node_errors}"
    executor.execute(prompt, pid, {}, outputs)
    if not executor.success:
        errors = [m for m in executor.status_messages if m[0] == "execution_error"]
        raise AssertionError(f"workflow failed: {errors[-1][1]['exception_message'] if errors else executor.status_messages}")
    return executor.history_result["outputs"]


def ksampler(model, seed):
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["2", 2], "denoise": 1.0}}


def calibrate_prompt(key, name, seed, reset=False, check_runs=0):
    return {
        "1": {"class_type": "DPCacheTestModel", "inputs": {"key": key}},
        "2": {"class_type": "DPCacheTestInputs", "inputs": {"key": key}},
        "3": {"class_type": "DPCacheCalibrate", "inputs": {"model": ["1", 0], "pact_name": name, "order": 2, "reset": reset,
                                                           "check_runs": check_runs}},
        "4": ksampler(["3", 0], seed),
        "5": {"class_type": "DPCacheTestCapture", "inputs": {"samples": ["4", 0], "label": "calibrated"}},
    }


def apply_prompt(key, pact, seed):
    return {
        "1": {"class_type": "DPCacheTestModel", "inputs": {"key": key}},
        "2": {"class_type": "DPCacheTestInputs", "inputs": {"key": key}},
        "6": {"class_type": "DPCacheSchedule", "inputs": {"pact": pact, "key_steps": K, "first_full_steps": 3,
                                                           "last_full_steps": 0, "total_evaluations": 50, "manual_key_steps": ""}},
        "7": {"class_type": "DPCacheApply", "inputs": {"model": ["1", 0], "schedule": ["6", 0]}},
        "8": ksampler(["7", 0], seed),
        "9": {"class_type": "DPCacheTestCapture", "inputs": {"samples": ["8", 0], "label": "fast"}},
        # the same un-patched MODEL, sampled elsewhere in the same graph
        "10": ksampler(["1", 0], seed),
        "11": {"class_type": "DPCacheTestCapture", "inputs": {"samples": ["10", 0], "label": "plain"}},
    }


@pytest.mark.parametrize("key", ["flux", "wan_t2v", "wan_i2v"])
def test_calibrate_schedule_apply_workflow(host, executor, pact_dir, key):
    core = host["core"]
    name = f"test_{key}"
    path = os.path.join(pact_dir, name + ".safetensors")
    model = build_model(key)

    # (d) two queued calibration prompts (new seed each, as the UI's seed widget does) -> 2 samples;
    #     FLUX with Calibrate's default check runs (each run then samples its checks), Wan without
    import nodes
    default = nodes.NODE_CLASS_MAPPINGS["DPCacheCalibrate"].INPUT_TYPES()["optional"]["check_runs"][1]["default"]
    check_runs = default if key == "flux" else 0
    with BlockCounter(model) as c:
        for seed in (1, 2):
            run(executor, calibrate_prompt(key, name, seed, check_runs=check_runs))
    if check_runs:
        checks = core.load_pact(path)[1]["forecaster_checks"]
        assert checks["runs"] == 2 and len(set(c.counts.values())) == 1 and min(c.counts.values()) > 2 * STEPS
    else:
        assert set(c.counts.values()) == {2 * STEPS}  # calibration computes every evaluation
    calibrated_ref = sample(model, key, steps=STEPS, cfg=CFG, seed=2)
    assert (CAPTURED["calibrated"] - calibrated_ref).abs().max().item() <= 1e-6
    acc, meta = core.load_pact(path)
    assert acc.samples == 2 and meta["samples"] == 2
    assert (meta["model_family"], meta["num_evals"], meta["order"]) == ("flux" if key.startswith("flux") else "wan", STEPS, 2)
    assert (meta["sampler"], meta["scheduler"], meta["resolution"]) == ("euler", "simple", "64x64" if key == "flux" else "64x64x9")
    # order 2: the history-exact cost is stored too, and the file is planned on it (issue 11)
    assert meta["convention"] == "skip" and acc.history_counts.max() == 2

    # an interrupted calibration run adds nothing and leaves the file as it was
    import comfy.model_management
    import nodes
    before = open(path, "rb").read()
    (calib,) = nodes.NODE_CLASS_MAPPINGS["DPCacheCalibrate"]().calibrate(model, name, 2, False)

    def stop(step, *_):
        if step == 4:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(calib, key, steps=STEPS, cfg=CFG, callback=stop)
    assert open(path, "rb").read() == before
    assert [f for f in os.listdir(pact_dir) if f != name + ".safetensors"] == []

    # schedule from the PACT, apply, and sample the un-patched model in the same graph
    pact = name + ".safetensors"
    assert pact in nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"].INPUT_TYPES()["required"]["pact"][0]
    with BlockCounter(model) as c:
        out = run(executor, apply_prompt(key, pact, seed=7))
    text = out["6"]["text"][0]
    assert f"{K} of {STEPS} evaluations" in text and f"ideal speed-up {STEPS / K:.2f}x" in text
    # with check runs (FLUX) they choose the forecaster; else the file's replay trajectories do
    chosen_by = "by the calibration's check runs at K=" if check_runs else "forecaster chosen by replay on"
    assert chosen_by in text and "keys planned on" in text
    n_blocks = len(c.counts)
    assert c.total == (STEPS + K) * n_blocks  # plain run: every block 20x; accelerated: 8x
    plain_ref = sample(model, key, steps=STEPS, cfg=CFG, seed=7)
    # (e) the un-patched MODEL gives the same output as without DPCache in the graph
    assert (CAPTURED["plain"] - plain_ref).abs().max().item() <= 1e-6
    db = psnr(plain_ref, CAPTURED["fast"])
    print(f"\n[host] workflow {key}: PACT samples {acc.samples}, schedule '{text}', "
          f"block calls {c.total} for plain + accelerated ({STEPS}+{K} evaluations x {n_blocks} blocks), PSNR {db:.2f} dB")
    assert db > 25.0


def test_schedule_node_errors(host, executor, pact_dir):
    """Errors reach the user as a failed prompt with a message that says what to do."""
    core = host["core"]
    name = "wan_pact"
    acc = core.PactAccumulator(STEPS)
    import numpy as np
    acc.add(np.random.default_rng(0).random((STEPS, STEPS + 1, STEPS + 1)))
    core.save_pact(os.path.join(pact_dir, name + ".safetensors"), acc, {"model_family": "wan", "order": 2, "scheme": "reference"})
    with pytest.raises(AssertionError, match="planned on a wan PACT"):
        run(executor, apply_prompt("flux", name + ".safetensors", seed=1))
    bad = apply_prompt("flux", "(uniform)", seed=1)
    bad["6"]["inputs"].update(key_steps=60, total_evaluations=STEPS)
    with pytest.raises(AssertionError, match="K=60 key steps is more than the T=20"):
        run(executor, bad)
    mismatch = apply_prompt("flux", "(manual)", seed=1)  # a typed T=50 list, 20-step run ((uniform) re-plans)
    mismatch["6"]["inputs"].update(manual_key_steps="0, 1, 2, 10, 30")
    with pytest.raises(AssertionError, match="makes 20 model evaluations.*T=50.*total_evaluations=20"):
        run(executor, mismatch)
    # and a PACT of another T in the calibration file: refused before sampling, file kept
    with pytest.raises(AssertionError, match="T=20 evaluations.*this run is flux"):
        run(executor, calibrate_prompt("flux", name, seed=3))
