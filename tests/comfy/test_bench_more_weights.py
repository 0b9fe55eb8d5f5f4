"""The two more bench models (bench/train_comfy_more.py) in a real ComfyUI: the stock UNETLoader
detects and loads them (Qwen-Image with the harness's shape-detection fix, HunyuanVideo with stock
detection), they denoise away from the starting noise with their bench sampling, and DPCache's
default schedule runs on them with K x blocks block calls."""
import importlib.util
import os

import pytest
import torch

from bench import comfy_bench as cb
from bench import train_comfy_more as more


def detection_fix():
    """Install the harness's narrow-model detection fix (skip when this ComfyUI has none)."""
    try:
        path = os.path.join(cb.flux_detect_fix_dir(), "flux_detect_patch.py")
    except SystemExit as exc:
        pytest.skip(str(exc))
    spec = importlib.util.spec_from_file_location("bench_detect_patch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.apply()


@pytest.mark.parametrize("bench, model_class, config_class", [
    (cb.HUNYUAN, "HunyuanVideo", "HunyuanVideo"), (cb.QWEN, "QwenImage", "QwenImage")])
def test_stock_unet_loader_loads_the_bench_model(host, bench, model_class, config_class):
    if bench.detect_fix:
        detection_fix()
    model = cb.load_model(bench.weights, bench)
    base = model.model
    assert type(base).__name__ == model_class and type(base.model_config).__name__ == config_class
    prompts = bench.trainer.load_prompts(bench.weights)
    latent = cb.sample(model, prompts, 0, 7, 8, bench)
    import comfy.sample
    noise = comfy.sample.prepare_noise(torch.zeros(bench.latent_shape), 7)
    assert torch.isfinite(latent).all() and (latent - noise).abs().mean() > 0.3
    steps, k = 20, 6
    import nodes
    schedule = nodes.NODE_CLASS_MAPPINGS["DPCacheSchedule"]
    sched = schedule().schedule(schedule.INPUT_TYPES()["required"]["pact"][1]["default"], k, 3, 0, steps)["result"][0]
    patched = nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, sched)["result"][0]
    with cb.BlockCounter(model) as counter:
        out = cb.sample(patched, prompts, 0, 7, steps, bench)
    assert counter.calls in (k * len(counter.blocks), 2 * k * len(counter.blocks))  # cond/uncond in one batch or two
    assert torch.isfinite(out).all()


def test_more_data_draws_every_class():
    import numpy as np
    for kind in ("qwen", "hunyuan"):
        rgb, labels = more.SPECS[kind].draw(np.random.default_rng(0), 32, labels=np.arange(32) % 16)
        assert rgb.shape == (32, 3, more.SPECS[kind].frames, 16, 16) and rgb.min() >= -1 and rgb.max() <= 1
        assert sorted(set(labels.tolist())) == list(range(16))
