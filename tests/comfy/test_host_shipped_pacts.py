"""The PACTs shipped in cost_matrices/ inside a real ComfyUI: listed by DPCache Schedule, planned and
applied through ComfyUI's executor; and how ComfyUI's sigmas compare with the ones they were
calibrated on (the numbers quoted in cost_matrices/README.md)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from comfy_host import PACK_DIR, BlockCounter, build_model
from test_host_workflow import CAPTURED, executor, run  # noqa: F401  (executor is a fixture)

pytestmark = pytest.mark.comfy

STEPS, K = 50, 13
SHIPPED = {"flux": "flux1_dev_official_T50.safetensors", "wan": "wan21_i2v_14b_official_T50.safetensors"}


def shipped_meta(host, family):
    return host["core"].load_pact(os.path.join(PACK_DIR, "cost_matrices", SHIPPED[family]))[1]


def test_shipped_pacts_are_listed_where_comfyui_looks(host):
    import folder_paths
    import nodes
    listed = folder_paths.get_filename_list("dpcache")
    choices = nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"].INPUT_TYPES()["required"]["pact"][0]
    for name in SHIPPED.values():
        assert name in listed and name in choices
        assert os.path.samefile(folder_paths.get_full_path("dpcache", name), os.path.join(PACK_DIR, "cost_matrices", name))


@pytest.mark.parametrize("key,sampler,cfg", [("flux", "euler", 1.0), ("wan_i2v", "uni_pc", 3.0)])
def test_shipped_pact_plans_and_applies_in_a_workflow(host, executor, key, sampler, cfg):  # noqa: F811
    family = "flux" if key == "flux" else "wan"
    pact = SHIPPED[family]
    prompt = {
        "1": {"class_type": "DPCacheTestModel", "inputs": {"key": key}},
        "2": {"class_type": "DPCacheTestInputs", "inputs": {"key": key}},
        "6": {"class_type": "DPCacheSchedule", "inputs": {"pact": pact, "key_steps": K, "first_full_steps": 3,
                                                           "last_full_steps": 0, "total_evaluations": STEPS, "manual_key_steps": ""}},
        "7": {"class_type": "DPCacheApply", "inputs": {"model": ["1", 0], "schedule": ["6", 0]}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0], "seed": 5, "steps": STEPS, "cfg": cfg, "sampler_name": sampler, "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["2", 2], "denoise": 1.0}},
        "9": {"class_type": "DPCacheTestCapture", "inputs": {"samples": ["8", 0], "label": "shipped"}},
    }
    model = build_model(key)
    with BlockCounter(model) as c:
        out = run(executor, prompt)
    text = out["6"]["text"][0]
    info = out["6"]["dpcache_schedule"][0]
    assert f"{K} of {STEPS} evaluations" in text and info["source"] == f"pact:{pact}"
    calls_per_eval = 1 if cfg == 1.0 else 2  # cfg > 1: cond and uncond (ComfyUI batches them on CPU: one call)
    assert set(c.counts.values()) <= {K, K * calls_per_eval}, c.counts  # blocks ran at the key evaluations only
    assert bool(np.isfinite(CAPTURED["shipped"].numpy()).all())
    print(f"\n[host] shipped {pact} on tiny {key} ({sampler}, {STEPS} steps): '{text}', block calls per block "
          f"{sorted(set(c.counts.values()))} for {STEPS} evaluations")


def diffusers_flux_sigmas(width, height, steps=STEPS):
    """diffusers' FLUX.1-dev schedule: linspace(1, 1/steps) shifted by mu from the image size."""
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = (width // 16) * (height // 16) * slope + 0.5 - slope * 256
    t = np.linspace(1.0, 1.0 / steps, steps)
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def test_comfyui_flux_sigmas_match_the_flux_pact_at_1024(host):
    import comfy.samplers
    ms = build_model("flux").get_model_object("model_sampling")
    comfy = comfy.samplers.calculate_sigmas(ms, "simple", STEPS).double().numpy()
    meta = shipped_meta(host, "flux")
    assert meta["shift"] == 1.15 == pytest.approx(float(ms.shift))
    gap = np.abs(comfy - np.array(meta["eval_sigmas"])).max()
    assert gap < 1e-4, gap
    # positions: 1 - timestep of each sigma in the model's own sigma table (0 = sigma_max, 1 = sigma 0)
    table = ms.sigmas.double().numpy()
    times = np.arange(table.size + 1) / table.size
    positions = 1.0 - np.interp(comfy, np.concatenate([[0.0], table]), times)
    assert np.abs(positions - np.array(meta["positions"])).max() < 1e-6
    gaps = {f"{w}x{h}": float(np.abs(diffusers_flux_sigmas(w, h) - comfy[:STEPS]).max())
            for w, h in ((1024, 1024), (768, 768), (512, 512), (1536, 1536))}
    assert gaps["1024x1024"] < 1e-4
    # the numbers quoted in cost_matrices/README.md
    assert [round(gaps[s], 3) for s in ("768x768", "512x512", "1536x1536")] == [0.076, 0.129, 0.213]
    print(f"\n[host] FLUX euler/simple {STEPS} steps, ComfyUI shift {float(ms.shift)} vs the PACT's sigmas: max gap "
          f"{gap:.1e}; vs diffusers at " + ", ".join(f"{s}: {g:.3f}" for s, g in gaps.items()))


def test_comfyui_wan_sigmas_against_the_wan_pact(host):
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    model = ModelSamplingSD3().patch(build_model("wan_i2v"), shift=8.0)[0]  # as in the shipped Wan workflows
    comfy = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS).double().numpy()
    pact = np.array(shipped_meta(host, "wan")["eval_sigmas"])
    above = int((comfy[:STEPS] > 0.5).sum()), int((pact[:STEPS] > 0.5).sum())
    assert above == (45, 25)  # quoted in README.md and cost_matrices/README.md
    print(f"\n[host] Wan uni_pc/simple {STEPS} steps at shift 8: {above[0]} steps above sigma 0.5; the Wan PACT's "
          f"calibration (Euler, shift 1.0 by our reading): {above[1]}; max sigma gap {np.abs(comfy - pact).max():.3f}")
