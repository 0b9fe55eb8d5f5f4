"""bench.comfy_bench's and bench.comfy_compare's helpers that need no ComfyUI: metrics, prompt sets, the Pareto plot."""
import math

import numpy as np
import torch
from PIL import Image

from bench import comfy_bench as cb
from bench import comfy_compare as cc
from bench import train_comfy_wan


def test_ssim_and_psnr():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 16, 16, generator=g)
    assert abs(cb.ssim(ref, ref) - 1.0) < 1e-12
    assert math.isinf(cb.psnr(ref, ref))
    small = (ref + 0.01 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    large = (ref + 0.2 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    assert 1.0 > cb.ssim(small, ref) > cb.ssim(large, ref)
    assert cb.psnr(small, ref) > cb.psnr(large, ref)
    assert abs(cb.psnr(ref + 0.1, ref) - 20.0) < 1e-4  # mse 0.01 at data range 1


def test_held_out_prompts_are_not_calibration_prompts():
    held, calib = cb.prompt_list(8, 9000), cb.prompt_list(4, 1000, offset=2)
    assert not set(held) & set(calib)
    assert len({c for c, _ in held}) == 8


def test_pareto_png(tmp_path):
    rows = [dict(series="plain", skipped=0.0, speedup=1.0, psnr_mean=float("inf")),
            dict(series="LazyCache", skipped=0.5, speedup=1.8, psnr_mean=25.0),
            dict(series="LazyCache", skipped=0.7, speedup=2.9, psnr_mean=18.0),
            dict(series="DPCache calibrated o1", skipped=0.74, speedup=2.2, psnr_mean=40.0)]
    for x_key in ("skipped", "speedup"):
        path = tmp_path / f"{x_key}.png"
        cc.pareto_png(str(path), rows, x_key=x_key)
        img = np.asarray(Image.open(path))
        assert img.shape == (460, 760, 3)
        assert (img == np.array(cc.SERIES_COLOURS["LazyCache"], np.uint8)).all(-1).sum() > 20


def test_compare_k_sweeps():
    assert cc.compare_ks(50) == (7, 9, 10, 13, 17, 20, 25)
    assert cc.compare_ks(30) == (4, 5, 6, 8, 10, 12, 15)  # the 50-step sweep x 3/5
    assert cc.compare_ks(20) == (3, 4, 5, 7, 8, 10)  # scaled and deduplicated


def test_frames_side_by_side():
    img = torch.rand(2, 3, 4, 5)
    assert cb.frames_side_by_side(img) is img
    clip = torch.rand(2, 3, 3, 4, 5)
    wide = cb.frames_side_by_side(clip)
    assert wide.shape == (2, 3, 4, 15)
    assert torch.equal(wide[..., 5:10], clip[:, :, 1])


def test_models_are_sampled_as_their_workflows():
    assert (cb.FLUX.sampler, cb.FLUX.cfg, cb.FLUX.shift, cb.FLUX.negative) == ("euler", 1.0, None, None)
    assert (cb.WAN.sampler, cb.WAN.scheduler, cb.WAN.cfg, cb.WAN.shift) == ("uni_pc", "simple", 5.0, 8.0)
    assert cb.WAN.latent_shape[2] == train_comfy_wan.FRAMES and len(cb.WAN.latent_shape) == 5
    prompts = train_comfy_wan.make_prompts()
    cond = cb.conditioning(prompts, 3)
    assert cond[0][1] == {} and torch.equal(cond[0][0][0], prompts["context"][3])
    flux = {"context": torch.zeros(2, 8, 64), "pooled": torch.ones(2, 32)}
    assert cb.conditioning(flux, 1)[0][1]["pooled_output"].shape == (1, 32)


def test_easycache_per_half_fix_adds_each_halfs_own_difference():
    from types import SimpleNamespace
    cond, uncond = object(), object()
    holder = SimpleNamespace(first_cond_uuid=cond, total_steps_skipped=0,
                             uuid_cache_diffs={cond: torch.full((1, 2), 1.0), uncond: torch.full((1, 2), 10.0)})
    x = torch.zeros(2, 2)
    out = cc.add_cache_diff_per_half(holder, x, [cond, uncond])
    assert out.tolist() == [[1.0, 1.0], [10.0, 10.0]]  # ComfyUI 0.3.64's own step gives 11 in both rows
    assert holder.total_steps_skipped == 1
    x2 = torch.zeros(4, 2)  # two rows per half
    cc.add_cache_diff_per_half(holder, x2, [uncond, cond])
    assert x2[:2].eq(10.0).all() and x2[2:].eq(1.0).all() and holder.total_steps_skipped == 2
