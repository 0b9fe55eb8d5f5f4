"""A calibration-free cost prior: the shipped PACTs, each normalised, averaged in trajectory position.

DPCache Schedule's "(prior)" entry plans with it when no PACT was calibrated for the model. The
shipped PACTs (FLUX.1-dev and Wan2.1-I2V-14B, the DPCache authors' calibrations at T = 50) are
read at their recorded trajectory positions (from their sigmas), transferred to evenly spaced
positions (``transfer.transfer_pact``; simple/normal schedulers space their steps evenly in
position), each divided by its own scale (the mean cost of skipping one evaluation, so that every
model weighs the same whatever its feature magnitude) and averaged where both are defined.
The result is a reference-convention PACT; it is planned with skip-only costs, like a calibrated one.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from .schedule import cost_for, solve_schedule
from .store import load_pact
from .transfer import index_positions, transfer_pact

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cost_matrices")
PRIOR_SOURCES = ("flux1_dev_official_T50.safetensors", "wan21_i2v_14b_official_T50.safetensors")
PRIOR_EVALS = 50
PRIOR_ORDER = 2  # the shipped PACTs' Taylor order (reference scheme)
#: Plans on the prior keep the last evaluations as keys (DPCache Schedule: this many, or the typed
#: last_full_steps if more; fewer where K cannot afford them). Without them the DP ended its keys at
#: 41-43 of 50 at K 9-10 and lost 1-3 dB to Spectrum on the trained Wan model; with the last 3 it was
#: level with or ahead of Spectrum at every K 9-25 of 50 on both trained models, where 1 and 2 were not
#: (BENCHMARKS.md, "Against Spectrum", issue 18).
PRIOR_LAST_FULL_STEPS = 3


def one_skip_scale(cost: np.ndarray) -> float:
    """The mean skip-only cost of skipping exactly one evaluation after a key (previous key just before)."""
    skip = cost_for(cost, "skip")
    num_evals = cost.shape[0]
    values = [skip[i - 1, i, i + 2] for i in range(1, num_evals - 1)]
    values = [v for v in values if np.isfinite(v) and v > 0]
    if not values:
        raise ValueError("a PACT without finite one-skip costs cannot be normalised")
    return float(np.mean(values))


def normalised(cost: np.ndarray, positions, num_evals: int) -> np.ndarray:
    moved = transfer_pact(cost, num_evals, PRIOR_ORDER, positions, index_positions(num_evals))
    return moved / one_skip_scale(moved)


@lru_cache(maxsize=4)
def _base(folder: str, sources: tuple) -> np.ndarray:
    tensors = []
    for name in sources:
        acc, meta = load_pact(os.path.join(folder, name))
        tensors.append(normalised(acc.mean(), meta.get("positions"), PRIOR_EVALS))
    stack = np.stack(tensors)
    finite = np.isfinite(stack)
    count = finite.sum(axis=0)
    total = np.where(finite, stack, 0.0).sum(axis=0)
    out = np.full(stack.shape[1:], np.inf)
    out[count > 0] = total[count > 0] / count[count > 0]
    out.setflags(write=False)
    return out


def prior_cost(num_evals: int = PRIOR_EVALS, positions=None, folder: str = SHIPPED_DIR,
               sources: tuple = PRIOR_SOURCES) -> np.ndarray:
    """The prior PACT for ``num_evals`` evaluations at ``positions`` (T+1 normalised positions,
    default evenly spaced): made at T = 50 and transferred; reference convention. ValueError
    (with what to do) when a shipped PACT is missing or the run is too short."""
    missing = [s for s in sources if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise ValueError(f"the cost prior needs the shipped PACTs {missing} in {folder}: reinstall the pack, "
                         "or use (uniform)")
    if num_evals < PRIOR_ORDER + 1:
        raise ValueError(f"the cost prior needs at least {PRIOR_ORDER + 1} evaluations, got {num_evals}; use (uniform)")
    base = _base(folder, tuple(sources))
    if num_evals == PRIOR_EVALS and positions is None:
        return base
    return transfer_pact(base, int(num_evals), PRIOR_ORDER, None, positions)


def solve_prior(cost: np.ndarray, num_keys: int, first_full_steps: int, last_full_steps: int = 0, required=(),
                convention: str = "skip") -> tuple[list[int], int]:
    """(keys, last evaluations kept): the DP (skip-only by default) on the prior ``cost`` keeping the
    last ``PRIOR_LAST_FULL_STEPS`` evaluations as keys (or ``last_full_steps`` if more), fewer, down to
    ``last_full_steps``, where ``num_keys`` cannot afford them under the hop cap. ValueError when
    ``num_keys`` cannot plan the run even without them. Used at the Schedule's T and when the plan
    is made again for a run of another length (``replan.Planner.solve``)."""
    for last in range(max(last_full_steps, PRIOR_LAST_FULL_STEPS), last_full_steps, -1):
        try:
            return solve_schedule(cost, num_keys, first_full_steps, last, required=required, convention=convention), last
        except ValueError:
            continue
    keys = solve_schedule(cost, num_keys, first_full_steps, last_full_steps, required=required, convention=convention)
    return keys, last_full_steps
