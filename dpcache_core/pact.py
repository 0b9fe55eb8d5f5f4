"""The Path-Aware Cost Tensor (PACT) of DESIGN §2, and its sample accumulator."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from .taylor import TaylorPredictor, check_scheme

SENTINEL_EXTRAPOLATION_WEIGHT = 0.8  # reference: target at j = T is 0.8 * extrapolation + 0.2 * mean


def default_max_gap(num_evals: int) -> int:
    """The reference's cap on anchor distance and on every hop: max(int(0.3 T), 1)."""
    return max(int(0.3 * num_evals), 1)


def fit_predictor(points: list[tuple[int, torch.Tensor]], order: int, scheme: str) -> TaylorPredictor:
    """A predictor fed with ``points`` (step, feature) in order, as if each were a key step."""
    predictor = TaylorPredictor(order, scheme)
    for step, feature in points:
        predictor.update(step, feature)
    return predictor


def sentinel_target(trajectory: torch.Tensor, order: int, scheme: str) -> torch.Tensor:
    """The synthetic feature at j = T: 0.8 x the extrapolation of the last order+1 features + 0.2 x their mean."""
    num_evals = trajectory.shape[0]
    first = max(num_evals - order - 1, 0)
    last = [(t, trajectory[t]) for t in range(first, num_evals)]
    extrapolated = fit_predictor(last, order, scheme).predict(num_evals)
    mean = trajectory[first:].mean(dim=0)
    w = SENTINEL_EXTRAPOLATION_WEIGHT
    return w * extrapolated + (1 - w) * mean


def build_pact(
    features: Iterable[torch.Tensor],
    order: int = 2,
    scheme: str = "reference",
    max_anchor_gap: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 16,
) -> np.ndarray:
    """Cost tensor C[a, i, j] (shape (T, T+1, T+1), float64, +inf where undefined) of one trajectory.

    ``features``: the cache-point features F_0 .. F_{T-1} of one full-compute run, as a sequence
    or a generator (each is copied to float32 as it arrives). C[a, i, j] is the summed error
    ``mean(|pred_t - F_t|) / 2`` for t = i+1 .. j when i is a key step whose predecessor is a,
    with factors built from F_{a-order+1} .. F_a and F_i. Anchors are limited to i - a <=
    ``max_anchor_gap`` (default max(int(0.3 T), 1)). ``progress(done, total)`` is called per i.
    """
    check_scheme(scheme)
    flat = [f.detach().reshape(-1) for f in features]
    num_evals = len(flat)
    if num_evals < order + 1:
        raise ValueError(f"a PACT of order {order} needs at least {order + 1} evaluations, got {num_evals}")
    if len({f.numel() for f in flat}) != 1:
        raise ValueError("every feature of a trajectory must have the same number of elements")
    # Targets for t = 0 .. T: the recorded features, then the synthetic sentinel.
    targets = torch.empty((num_evals + 1, flat[0].numel()), dtype=torch.float32, device=flat[0].device)
    for t, f in enumerate(flat):
        targets[t] = f
    del flat
    trajectory = targets[:num_evals]
    targets[num_evals] = sentinel_target(trajectory, order, scheme)
    gap = max_anchor_gap or default_max_gap(num_evals)
    cost = np.full((num_evals, num_evals + 1, num_evals + 1), np.inf)
    for i in range(order):
        cost[: i + 1, i, i + 1] = 0.0
    for i in range(order, num_evals):
        for anchor in range(max(order - 1, i - gap), i):
            points = [(t, trajectory[t]) for t in range(anchor - order + 1, anchor + 1)] + [(i, trajectory[i])]
            predictor = fit_predictor(points, order, scheme)
            factors = torch.stack(predictor.factors)  # (n, N)
            errors = []
            for start in range(i + 1, num_evals + 1, chunk):
                steps = range(start, min(start + chunk, num_evals + 1))
                weights = torch.tensor([predictor.coefficients(t) for t in steps], dtype=torch.float32, device=factors.device)
                predicted = weights @ factors
                errors.append((predicted - targets[start : start + len(steps)]).abs_().mean(dim=1) / 2)
            cost[anchor, i, i + 1 :] = np.cumsum(torch.cat(errors).double().numpy())
        if progress is not None:
            progress(i - order + 1, num_evals - order)
    return cost


class PactAccumulator:
    """Element-wise sums and counts of the finite entries of PACT samples.

    Samples added later, or accumulated on another machine and merged, give exactly the
    mean over all of them. ``mean()`` is +inf where no sample had a finite entry.
    """

    def __init__(self, num_evals: int):
        if num_evals < 1:
            raise ValueError(f"a PACT needs at least one evaluation, got num_evals={num_evals}")
        self.num_evals = int(num_evals)
        shape = (self.num_evals, self.num_evals + 1, self.num_evals + 1)
        self.sums = np.zeros(shape, dtype=np.float64)
        self.counts = np.zeros(shape, dtype=np.int64)
        self.samples = 0
        self.history_sums: np.ndarray | None = None  # optional history cost tensor (order >= 2)
        self.history_counts: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.sums.shape

    def add(self, cost: np.ndarray, history: np.ndarray | None = None) -> None:
        """Add one PACT sample, and its history cost tensor (``dpcache_core.history``) if given."""
        cost = np.asarray(cost, dtype=np.float64)
        if cost.shape != self.shape:
            raise ValueError(
                f"PACT sample has shape {cost.shape} but this PACT is for T={self.num_evals} "
                f"evaluations (shape {self.shape}); calibrate with the same number of evaluations"
            )
        finite = np.isfinite(cost)
        self.sums[finite] += cost[finite]
        self.counts += finite
        self.samples += 1
        if history is not None:
            self.add_history(history)

    def add_history(self, history: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Add one history cost tensor (or, with ``counts``, sums and counts accumulated elsewhere)."""
        from .history import check_history

        history, _, _ = check_history(history, self.num_evals)
        if counts is None:
            finite = np.isfinite(history)
            history, counts = np.where(finite, history, 0.0), finite.astype(np.int64)
        if self.history_sums is None:
            self.history_sums = np.zeros(history.shape)
            self.history_counts = np.zeros(history.shape, dtype=np.int64)
        elif self.history_sums.shape != history.shape:
            raise ValueError(
                f"history cost tensor has shape {history.shape} but this PACT holds {self.history_sums.shape}; "
                "calibrate with the same Taylor order"
            )
        self.history_sums += history
        self.history_counts += counts

    def history_mean(self) -> np.ndarray | None:
        """The averaged history cost tensor (+inf where never seen), or None if the PACT has none."""
        if self.history_sums is None:
            return None
        out = np.full(self.history_sums.shape, np.inf)
        seen = self.history_counts > 0
        out[seen] = self.history_sums[seen] / self.history_counts[seen]
        return out

    def merge(self, other: "PactAccumulator") -> None:
        """Add every sample of ``other``."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge PACTs for T={other.num_evals} and T={self.num_evals} evaluations")
        self.sums += other.sums
        self.counts += other.counts
        self.samples += other.samples
        if other.history_sums is not None:
            self.add_history(other.history_sums, other.history_counts)

    def mean(self) -> np.ndarray:
        """The averaged cost tensor."""
        out = np.full(self.shape, np.inf)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen]
        return out
