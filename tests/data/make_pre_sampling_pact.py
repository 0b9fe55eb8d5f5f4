"""How tests/data/pre_sampling_T16.safetensors was made: run with dpcache_core as of commit fbfa3d0
(before sampled calibration: full trajectories, every j), e.g.

    mkdir -p out/old && git archive fbfa3d0 dpcache_core | tar -x -C out/old && PYTHONPATH=out/old python tests/data/make_pre_sampling_pact.py

It writes the file and prints the exact DP schedules the old code chose (copied into
tests/test_sampled_calibration.py).
"""
import os

import torch

from dpcache_core import PactAccumulator, build_pact, save_pact, solve_schedule

T = 16


def trajectory(seed):
    g = torch.Generator().manual_seed(seed)
    base, drift, curve = (torch.randn(2, 3, 16, generator=g) for _ in range(3))
    return [base + drift * t / T + curve * (t / T) ** 2 + 0.02 * torch.randn(2, 3, 16, generator=g) for t in range(T)]


acc = PactAccumulator(T)
for seed in (1, 2):
    acc.add(build_pact(trajectory(seed), order=2))
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pre_sampling_T16.safetensors")
save_pact(out, acc, {"model_family": "flux", "order": 2, "scheme": "reference", "sampler": "euler", "resolution": "64x64"})
mean = acc.mean()
print({k: solve_schedule(mean, k, 3) for k in (6, 7, 8, 10)})
