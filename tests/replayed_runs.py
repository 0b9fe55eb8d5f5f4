"""Test helpers: a smooth made-up trajectory, and what a cached run really pays on it (the cost a
history-exact DP must reproduce)."""
import torch

from dpcache_core.runtime import CacheRun


def smooth_trajectory(num_evals, width=48, seed=0):
    """A curved, noisy trajectory so that every order of prediction makes a different error."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, num_evals)[:, None]
    a, b, c = (torch.randn(3, width, generator=g)).unbind(0)
    return torch.sin(3 * t * a) + t**2 * b + 0.05 * torch.randn(num_evals, width, generator=g) + c


def run_cost(trajectory, schedule, sentinel, sentinel_at, new_predictor=None):
    """What a run with ``schedule`` pays on ``trajectory`` (its features at the keys): err(t) =
    mean|pred - F_t| / 2 at every skipped t, plus mean|prediction at ``sentinel_at`` - ``sentinel``| / 2."""
    run = CacheRun(schedule)
    if new_predictor is not None:
        run.new_predictor = new_predictor
    total = 0.0
    for t in range(trajectory.shape[0]):
        if run.start_evaluation():
            run.update("s", trajectory[t])
        else:
            total += float((run.predict("s") - trajectory[t]).abs().mean()) / 2
    return total + float((run.predictors["s"].predict(sentinel_at) - sentinel).abs().mean()) / 2
