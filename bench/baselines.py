"""A threshold-adaptive caching baseline in the style of TeaCache / EasyCache.

TeaCache decides online: it accumulates the relative L1 change of the first block's
timestep-modulated input between consecutive evaluations and computes the blocks in full once the
sum reaches a threshold (then resets it). At skipped evaluations it either reuses the last
computed residual (feature - block input: TeaCache's own predictor) or, for a comparison of
schedules alone, the same Taylor predictor as DPCache (``dpcache_core.TaylorPredictor``).
The threshold is tuned offline on calibration prompts to give a target number of full
evaluations (``tune_threshold``).
"""
from __future__ import annotations

import numpy as np
import torch

from dpcache_core import TaylorPredictor
from dpcache_demo import toy_model
from dpcache_demo.toy_model import modulate

from .common import SHIFT


def indicator_input(model, state) -> torch.Tensor:
    """The first double block's timestep-modulated image input (TeaCache's indicator)."""
    block = model.double_blocks[0]
    shift, scale = block.img_mod(state["vec"])[:2]
    return modulate(block.norm(state["img"]), shift, scale)


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().mean() / b.abs().mean()).item()


def count_full(distances, threshold: float, first_full_steps: int = 3) -> int:
    """Full evaluations the accumulate-and-reset rule makes on a sequence of distances."""
    acc, n = 0.0, 0
    for i, d in enumerate(distances):
        if i < first_full_steps:
            n += 1
            continue
        acc += d
        if acc >= threshold:
            n, acc = n + 1, 0.0
    return n


def indicator_distances(model, noise, cls, num_steps: int, shift: float = SHIFT) -> list[float]:
    """Indicator distances along a full-compute run (index 0 has none: 0.0)."""
    prev, out = None, []

    def fn(i, state):
        nonlocal prev
        m = indicator_input(model, state)
        out.append(0.0 if prev is None else rel_change(m, prev))
        prev = m
        return model.run_blocks(state)

    toy_model.sample(model, noise, cls, num_steps, shift, feature_fn=fn)
    return out


def tune_threshold(distance_runs, num_keys: int, first_full_steps: int = 3) -> float:
    """Threshold whose mean full-evaluation count over ``distance_runs`` is nearest ``num_keys``."""
    lo, hi = 1e-6, 1e3
    for _ in range(60):                  # bisection in log space; counts fall as the threshold grows
        mid = float(np.sqrt(lo * hi))
        mean = np.mean([count_full(d, mid, first_full_steps) for d in distance_runs])
        if mean > num_keys:
            lo = mid
        else:
            hi = mid
    cands = [lo, hi]
    err = [abs(np.mean([count_full(d, c, first_full_steps) for d in distance_runs]) - num_keys) for c in cands]
    return cands[int(np.argmin(err))]


def threshold_sample(model, noise, cls, num_steps: int, threshold: float, predictor: str = "taylor",
                     order: int = 2, shift: float = SHIFT, first_full_steps: int = 3):
    """One TeaCache-style run (batch of 1). ``predictor``: "taylor" or "residual".
    Returns (output, number of full evaluations)."""
    taylor = TaylorPredictor(order, "reference", derivatives_after=first_full_steps - 2)
    st = dict(prev=None, acc=0.0, residual=None, full=0)

    def fn(i, state):
        m = indicator_input(model, state)
        compute = i < first_full_steps or st["prev"] is None
        if not compute:
            st["acc"] += rel_change(m, st["prev"])
            compute = st["acc"] >= threshold
        st["prev"] = m
        if compute:
            st["acc"] = 0.0
            st["full"] += 1
            feature = model.run_blocks(state)
            taylor.update(i, feature)
            st["residual"] = feature - state["img"]
            return feature
        if predictor == "residual":
            return state["img"] + st["residual"]
        return taylor.predict(i)

    out = toy_model.sample(model, noise, cls, num_steps, shift, feature_fn=fn)
    return out, st["full"]
