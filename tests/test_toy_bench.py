"""Fast checks of the benchmark helpers: dataset, threshold baseline, cached sampling."""
import numpy as np
import pytest
import torch

from bench.baselines import count_full, threshold_sample, tune_threshold
from bench.common import cached_sample, held_out_prompts, calibration_prompts, psnr, rel_l1
from bench.train_toy import draw_shapes
from dpcache_demo import toy_model as tm

SMALL = dict(tm.TOY_FLUX, hidden=32, heads=2, depth_double=1, depth_single=1, image_size=16)


def test_draw_shapes_is_seeded_and_in_range():
    a, la = draw_shapes(np.random.default_rng([0, 5]), 8)
    b, lb = draw_shapes(np.random.default_rng([0, 5]), 8)
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and torch.equal(la, lb)
    assert a.min() >= -1 and a.max() <= 1 and 0 <= la.min() and la.max() < len(tm.CLASS_NAMES)


def test_prompts_are_disjoint():
    assert not set(calibration_prompts(10)) & set(held_out_prompts(16))


def test_threshold_counting_and_tuning():
    d = [0.0] + [0.1] * 19
    assert count_full(d, 0.0) == 20 and count_full(d, 1e9) == 3
    assert count_full(d, 0.25) == 3 + 17 // 3
    thr = tune_threshold([d], 8)
    assert count_full(d, thr) == 8


def test_threshold_sample_extremes_and_cached_sample():
    model = tm.build_model(SMALL)
    noise = tm.make_noise(SMALL, 0)
    full = tm.sample(model, noise, 1, 8)
    out, n = threshold_sample(model, noise, torch.tensor([1]), 8, 0.0)
    assert n == 8 and torch.equal(out, full)
    model.block_calls = 0
    out, n = threshold_sample(model, noise, torch.tensor([1]), 8, 1e9, predictor="residual")
    assert n == 3 and model.block_calls == 3 * 2
    same, run = cached_sample(model, noise, 1, list(range(8)), 8)
    assert torch.equal(same, full) and run.computed == 8
    fast, run = cached_sample(model, noise, 1, [0, 1, 2, 5], 8)
    assert run.computed == 4 and run.skipped == 4
    assert psnr(fast, full)[0] > 20 and 0 < rel_l1(fast, full)[0] < 0.2
    assert np.isinf(psnr(full, full)[0])


@pytest.mark.parametrize("name", ["quality", "speed", "memory", "core_speed"])
def test_bench_commands_import(name):
    mod = __import__(f"bench.{name}", fromlist=["main"])
    assert callable(mod.main) and mod.__doc__
