"""The Path-Aware Cost Tensor (PACT) of DESIGN §2, and its sample accumulator."""
from __future__ import annotations

import functools
from typing import Callable

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


def as_trajectory(features) -> torch.Tensor:
    """Features as one (T, S) float32 tensor: a (T, ...) tensor is reshaped (no copy when it is
    float32 and contiguous); a sequence or generator of features is flattened and stacked."""
    if isinstance(features, torch.Tensor):
        if features.ndim < 2:
            raise ValueError(f"a trajectory tensor must be (T, S) (one row per evaluation), got shape {tuple(features.shape)}")
        return features.detach().reshape(features.shape[0], -1).float()
    flat = [f.detach().reshape(-1) for f in features]
    if len({f.numel() for f in flat}) > 1:
        raise ValueError("every feature of a trajectory must have the same number of elements")
    if not flat:
        return torch.empty((0, 0))
    out = torch.empty((len(flat), flat[0].numel()), dtype=torch.float32, device=flat[0].device)
    for t, f in enumerate(flat):
        out[t] = f
    return out


@functools.lru_cache(maxsize=16)
def residual_weights(num_evals: int, order: int, scheme: str, anchor_gap: int, hop: int) -> tuple:
    """Per key step i >= order: (first anchor, last target j, W) with W[a, t, k] the weight of
    F_{a-order+1+k} - F_i in pred_t - F_i, for anchors a = first .. i-1 and t = i+1 .. j.

    Predictions are linear in the points (F_{a-order+1} .. F_a, F_i), so the weights come from the
    same ``TaylorPredictor`` fed with one-hot vectors; they sum to 1 over the points, which is why
    the prediction error can be computed from differences to F_i (small numbers: no cancellation).
    """
    eye = torch.eye(order + 1, dtype=torch.float64)
    out = []
    for i in range(order, num_evals):
        first = max(order - 1, i - anchor_gap)
        last = min(i + hop, num_evals)
        steps = range(i + 1, last + 1)
        weights = np.zeros((i - first, len(steps), order))
        for n, anchor in enumerate(range(first, i)):
            points = [(anchor - order + 1 + k, eye[k]) for k in range(order)] + [(i, eye[order])]
            predictor = fit_predictor(points, order, scheme)
            factors = torch.stack(predictor.factors).double().numpy()  # (n_factors, order + 1)
            coeffs = np.array([predictor.coefficients(t) for t in steps])  # (n_t, n_factors)
            w = coeffs @ factors
            assert np.allclose(w.sum(axis=1), 1.0, atol=1e-4), "Taylor weights must sum to 1"
            weights[n] = w[:, :order]
        out.append((first, last, torch.from_numpy(weights).float()))
    return tuple(out)


def build_pact(
    features,
    order: int = 2,
    scheme: str = "reference",
    max_anchor_gap: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_hop: int | None = None,
    block_elements: int = 1 << 20,
) -> np.ndarray:
    """Cost tensor C[a, i, j] (shape (T, T+1, T+1), float64, +inf where undefined) of one trajectory.

    ``features``: a (T, S) tensor (row t: the cache point at evaluation t, or a fixed sample of S
    of its elements, see ``TrajectoryRecorder``), or a sequence/generator of T features (flattened).
    C[a, i, j] is the summed error ``mean(|pred_t - F_t|) / 2`` for t = i+1 .. j when i is a key
    step whose predecessor is a, with factors built from F_{a-order+1} .. F_a and F_i; j = T
    compares with the synthetic sentinel target. Only entries the DP can use are computed:
    i - a <= ``max_anchor_gap`` (default max(int(0.3 T), 1), the DP's hop cap) and j - i <=
    ``max_hop`` (default ``max_anchor_gap``); the rest is +inf. ``progress(done, total)`` is
    called per i. The work runs on the features' device in blocks of about ``block_elements``
    values: the extra memory is O(T x S).
    """
    check_scheme(scheme)
    if order < 1:
        raise ValueError(f"a PACT needs Taylor order >= 1, got {order}")
    trajectory = as_trajectory(features)
    num_evals, size = trajectory.shape
    if num_evals < order + 1:
        raise ValueError(f"a PACT of order {order} needs at least {order + 1} evaluations, got {num_evals}")
    device = trajectory.device
    sentinel = sentinel_target(trajectory, order, scheme)
    gap = max_anchor_gap or default_max_gap(num_evals)
    hop = max_hop or gap
    cost = np.full((num_evals, num_evals + 1, num_evals + 1), np.inf)
    for i in range(order):
        cost[: i + 1, i, i + 1] = 0.0
    for n, (first, last, weights) in enumerate(residual_weights(num_evals, order, scheme, gap, hop)):
        i = n + order
        weights = weights.to(device)
        # Rows first-order+1 .. last (the sentinel stands for row T), as differences to F_i.
        lo = first - order + 1
        rows = trajectory[lo : min(last, num_evals - 1) + 1]
        anchors, targets = weights.shape[0], weights.shape[1]
        errors = torch.zeros((anchors, targets), dtype=torch.float64, device=device)
        block = max(block_elements // (anchors * targets), 256)
        residual = torch.empty((anchors, targets, min(block, size)), device=device)
        for start in range(0, size, block):
            local = rows[:, start : start + block] - trajectory[i, start : start + block]
            if last == num_evals:
                local = torch.cat([local, (sentinel[start : start + block] - trajectory[i, start : start + block])[None]])
            out = residual if local.shape[1] == residual.shape[2] else residual[:, :, : local.shape[1]].contiguous()
            # pred_t - F_t = sum_k W[a, t, k] (F_{a-order+1+k} - F_i) - (F_t - F_i); the points
            # F_{a-order+1+k} - F_i for a = first .. i-1 are rows k .. k+A-1 of ``local``.
            torch.addcmul(local[i - lo + 1 :].neg(), weights[:, :, 0, None], local[:anchors, None], out=out)
            for k in range(1, order):
                out.addcmul_(weights[:, :, k, None], local[k : k + anchors, None])
            errors += out.abs_().sum(dim=2)  # abs + sum: several times faster than vector_norm(ord=1) on CPU
        errors = errors.cpu().numpy() / (2 * size)
        cost[first:i, i, i + 1 : last + 1] = np.cumsum(errors, axis=1)
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
        self.trajectories: np.ndarray | None = None  # optional replay trajectories (n, T, elements), ``replay``

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.sums.shape

    def add(self, cost: np.ndarray, history: np.ndarray | None = None, trajectories: np.ndarray | None = None) -> None:
        """Add one PACT sample, and its history cost tensor (``dpcache_core.history``) and replay
        trajectories (``dpcache_core.replay``) if given."""
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
        if trajectories is not None:
            self.add_trajectories(trajectories)

    def add_trajectories(self, trajectories: np.ndarray) -> None:
        """Keep replay trajectories (n, T, elements) after the ones held, up to ``replay.REPLAY_BYTE_CAP``."""
        from .replay import combine

        self.trajectories = combine(self.trajectories, trajectories, self.num_evals)

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
        if other.trajectories is not None:
            self.add_trajectories(other.trajectories)

    def mean(self) -> np.ndarray:
        """The averaged cost tensor."""
        out = np.full(self.shape, np.inf)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen]
        return out
