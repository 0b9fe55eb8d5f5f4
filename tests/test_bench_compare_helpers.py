"""bench.comfy_compare's helpers that need no ComfyUI: metrics, prompt sets, the Pareto plot."""
import math

import numpy as np
import torch
from PIL import Image

from bench import comfy_compare as cc


def test_ssim_and_psnr():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 16, 16, generator=g)
    assert abs(cc.ssim(ref, ref) - 1.0) < 1e-12
    assert math.isinf(cc.psnr(ref, ref))
    small = (ref + 0.01 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    large = (ref + 0.2 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    assert 1.0 > cc.ssim(small, ref) > cc.ssim(large, ref)
    assert cc.psnr(small, ref) > cc.psnr(large, ref)
    assert abs(cc.psnr(ref + 0.1, ref) - 20.0) < 1e-4  # mse 0.01 at data range 1


def test_held_out_prompts_are_not_calibration_prompts():
    held, calib = cc.prompt_list(8, 9000), cc.prompt_list(4, 1000, offset=2)
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
