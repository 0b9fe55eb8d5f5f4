"""The committed Wan benchmark model (bench/weights/comfy_wan_clips.safetensors) in a real ComfyUI:
the stock UNETLoader detects and loads it with no detection fix, it denoises to the prompted class
in a few uni_pc steps, and bench.comfy_compare's Spectrum glue runs on it with K x blocks block calls."""
import os

import pytest
import torch

from bench import comfy_bench as cb
from bench import comfy_compare as cc
from bench import comfy_env
from bench import train_comfy_wan as wan


@pytest.fixture(scope="module")
def wan_model(host):
    import folder_paths
    import nodes
    folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(wan.WEIGHTS))
    (model,) = nodes.UNETLoader().load_unet(os.path.basename(wan.WEIGHTS), "default")
    return model


def test_stock_unet_loader_detects_the_trained_wan(wan_model):
    base = wan_model.model
    assert type(base).__name__ == "WAN21" and type(base.model_config).__name__ == "WAN21_T2V"
    dm = base.diffusion_model
    assert type(dm).__name__ == "WanModel" and dm.dim == wan.CONFIG["dim"] and len(dm.blocks) == wan.CONFIG["num_layers"]
    assert float(wan_model.get_model_object("model_sampling").shift) == wan.SHIFT
    assert type(base.latent_format).__name__ == "Wan21"


def foreground_colour(clip: torch.Tensor) -> str:
    """The palette colour nearest to the mean of the clip's saturated pixels (its shape: the
    backgrounds are dull greys, saturation max - min below 0.15)."""
    pixels = ((clip + 1) / 2).permute(1, 2, 3, 0).reshape(-1, 3)
    fg = pixels[pixels.amax(1) - pixels.amin(1) > 0.4]
    assert len(fg) >= 4, "no saturated pixels: the sample has no shape"
    return min(wan.RGB, key=lambda c: (fg.mean(0) - torch.tensor(wan.RGB[c])).norm().item())


def test_trained_wan_denoises_to_the_prompted_class(wan_model):
    """uni_pc, 8 steps, shift 8, cfg 5 against the negative prompt: finite, far from the starting
    noise, and each clip's shape has its prompt's colour (4 classes; random weights would not)."""
    prompts = wan.load_prompts()
    model = cb.load_model(wan.WEIGHTS, cb.WAN)
    import comfy.sample
    for cls in range(4):  # circles in red, green, blue, yellow
        latent = cb.sample(model, prompts, cls, 100 + cls, 8, cb.WAN)
        assert torch.isfinite(latent).all()
        noise = comfy.sample.prepare_noise(torch.zeros(cb.WAN.latent_shape), 100 + cls)
        assert (latent - noise).abs().mean() > 0.3
        clip = cb.decode(wan_model, latent, prompts, cb.WAN)[0] * 2 - 1
        assert foreground_colour(clip) == wan.COLOURS[cls % len(wan.COLOURS)]


def test_spectrum_glue_runs_k_of_t(wan_model):
    """Spectrum's key steps with the spectral forecaster, through Apply DPCache: K x blocks block calls."""
    prompts = wan.load_prompts()
    model = cb.load_model(wan.WEIGHTS, cb.WAN)
    steps, k = 20, 7
    num_evals = cb.count_evaluations(model, prompts, cb.WAN, steps)
    assert num_evals == steps  # uni_pc: one evaluation per step (cond and uncond in one batch)
    sched = cc.spectrum_schedule(num_evals, k)
    assert sched.predictor == "spectral" and sched.num_keys == k and sched.key_steps[0] == 0
    patched = comfy_env.boot()["nodes"]["DPCacheApply"]().apply(model, sched)["result"][0]
    with cb.BlockCounter(model) as counter:
        out = cb.sample(patched, prompts, 1, 7, steps, cb.WAN)
    assert counter.calls == k * len(counter.blocks)
    full = cb.sample(model, prompts, 1, 7, steps, cb.WAN)
    assert torch.isfinite(out).all() and not torch.equal(out, full)
    assert ((out - full).norm() / full.norm()).item() < 0.5  # an unrelated clip would be about 1.4
