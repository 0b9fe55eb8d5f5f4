"""PACT construction against a slow, direct transcription of DESIGN §2, and the accumulator."""
import math

import numpy as np
import pytest
import torch

from dpcache_core import PactAccumulator, build_pact


def slow_factors(points, order, scheme):
    """Factors from (step, feature) points, transcribed from the formulas (no shared code)."""
    history = []  # list of (step, factors)
    for step, feature in points:
        factors = [feature.double()]
        if history:
            prev_step, prev = history[-1]
            steps_back = [s for s, _ in reversed(history)]  # newest first
            for n in range(min(order, len(prev))):
                span = step - (steps_back[n] if scheme == "exact" else prev_step)
                factors.append((factors[n] - prev[n]) / span)
        history.append((step, factors))
    return history


def slow_predict(points, order, scheme, t):
    history = slow_factors(points, order, scheme)
    step, factors = history[-1]
    if scheme == "reference":
        return sum(f * (t - step) ** n / math.factorial(n) for n, f in enumerate(factors))
    steps_back = [s for s, _ in reversed(history)]
    return sum(f * math.prod(t - steps_back[k] for k in range(n)) for n, f in enumerate(factors))


def slow_pact(features, order, scheme, gap):
    """DESIGN §2 entry by entry: C[a,i,j] = sum_{t=i+1..j} mean|pred_t - F_t| / 2, for the
    entries the DP can use (i - a <= gap, j - i <= gap)."""
    T = len(features)
    last = [(t, features[t]) for t in range(T - order - 1, T)]
    extrapolated = slow_predict(last, order, scheme, T)
    target_T = 0.8 * extrapolated + 0.2 * torch.stack([f.double() for _, f in last]).mean(0)
    cost = np.full((T, T + 1, T + 1), np.inf)
    for i in range(order):
        cost[: i + 1, i, i + 1] = 0.0
    for i in range(order, T):
        for a in range(T):
            if not (a < i and i - a <= gap and a - order + 1 >= 0):
                continue
            points = [(t, features[t]) for t in range(a - order + 1, a + 1)] + [(i, features[i])]
            for j in range(i + 1, min(i + gap, T) + 1):
                total = 0.0
                for t in range(i + 1, j + 1):
                    target = target_T if t == T else features[t].double()
                    total += (slow_predict(points, order, scheme, t) - target).abs().mean().item() / 2
                cost[a, i, j] = total
    return cost


def smooth_trajectory(T, shape=(2, 3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    base, drift, curve = (torch.randn(shape, generator=g) for _ in range(3))
    return [base + drift * t / T + curve * (t / T) ** 2 + 0.01 * torch.randn(shape, generator=g) for t in range(T)]


@pytest.mark.parametrize("order, scheme, T, gap", [(2, "reference", 9, None), (1, "reference", 8, 3), (2, "exact", 10, 4), (3, "reference", 9, 5)])
def test_build_pact_equals_direct_transcription(order, scheme, T, gap):
    features = smooth_trajectory(T, seed=order + T)
    fast = build_pact(features, order=order, scheme=scheme, max_anchor_gap=gap)
    slow = slow_pact(features, order, scheme, gap or max(int(0.3 * T), 1))
    assert fast.shape == (T, T + 1, T + 1)
    np.testing.assert_array_equal(np.isfinite(fast), np.isfinite(slow))
    finite = np.isfinite(slow)
    np.testing.assert_allclose(fast[finite], slow[finite], rtol=2e-5, atol=1e-7)


def test_reference_conventions_finite_pattern():
    T, order = 50, 2
    features = smooth_trajectory(T, shape=(64,))
    cost = build_pact(features, order=order)
    assert cost[0, 0, 1] == 0 and cost[0, 1, 2] == 0 and cost[1, 1, 2] == 0
    assert np.isinf(cost[0, 0, 2]) and np.isinf(cost[0, 2, 3])  # anchor 0 cannot form 2nd-order factors
    # Only entries the DP can use: hops j - i <= 0.3 T = 15, anchors i - a <= 15.
    assert np.isfinite(cost[1, 2, 3:18]).all() and np.isinf(cost[1, 2, 18:]).all()
    assert np.isfinite(cost[10, 12, 13:28]).all() and np.isinf(cost[10, 12, 28:]).all()
    assert np.isfinite(cost[40, 45, 46:]).all()  # the sentinel j = T = 50 is within 15 of i = 45
    assert np.isinf(cost[10, 26, 27]) and np.isfinite(cost[11, 26, 27])  # anchors at most 0.3 T = 15 back
    assert np.isinf(cost[:, T, :]).all()  # the sentinel is never a key
    # Costs accumulate along j.
    assert (np.diff(cost[10, 12, 13:28]) >= 0).all()
    # Without the hop cap: the reference's finite pattern (its pre-calibrated wan tensor has 13058
    # finite entries), and the capped tensor is exactly its entries with j - i <= 15.
    full = build_pact(features, order=order, max_hop=T)
    assert np.isfinite(full).sum() == 13058
    i, j = np.arange(T + 1)[None, :, None], np.arange(T + 1)[None, None, :]
    np.testing.assert_array_equal(cost, np.where(j - i <= 15, full, np.inf))


def test_generator_input_and_progress():
    features = smooth_trajectory(12, seed=3)
    seen = []
    from_gen = build_pact((f for f in features), progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(from_gen, build_pact(features))
    assert seen[-1] == (10, 10) and len(seen) == 10


def test_build_pact_rejects_short_or_ragged_trajectories():
    with pytest.raises(ValueError, match="at least 3 evaluations"):
        build_pact([torch.zeros(3)] * 2)
    with pytest.raises(ValueError, match="same number of elements"):
        build_pact([torch.zeros(3), torch.zeros(3), torch.zeros(4)])


def test_build_pact_does_not_touch_its_input():
    features = smooth_trajectory(8)
    before = [f.clone() for f in features]
    build_pact(features)
    assert all(torch.equal(a, b) for a, b in zip(features, before))


def test_accumulator_mean_counts_only_finite_entries():
    acc = PactAccumulator(2)
    a = np.full((2, 3, 3), np.inf)
    b = np.full((2, 3, 3), np.inf)
    a[0, 0, 1], b[0, 0, 1] = 1.0, 3.0
    a[1, 1, 2] = 5.0
    acc.add(a)
    acc.add(b)
    mean = acc.mean()
    assert mean[0, 0, 1] == 2.0 and mean[1, 1, 2] == 5.0 and np.isinf(mean[0, 1, 2])
    assert acc.samples == 2
    with pytest.raises(ValueError, match="T=2 evaluations"):
        acc.add(np.zeros((3, 4, 4)))


def test_accumulator_merge_is_order_independent():
    rng = np.random.default_rng(0)
    samples = [np.where(rng.random((6, 7, 7)) < 0.2, np.inf, rng.random((6, 7, 7))) for _ in range(7)]
    everything = PactAccumulator(6)
    for s in samples:
        everything.add(s)
    parts = [PactAccumulator(6) for _ in range(3)]
    for n, s in enumerate(samples):
        parts[n % 3].add(s)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        merged = PactAccumulator(6)
        for n in order:
            merged.merge(parts[n])
        assert merged.samples == 7
        np.testing.assert_array_equal(merged.counts, everything.counts)
        np.testing.assert_allclose(merged.mean(), everything.mean(), rtol=1e-12)
    with pytest.raises(ValueError, match="cannot merge"):
        everything.merge(PactAccumulator(5))
