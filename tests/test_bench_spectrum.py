"""Bench helpers (bench/spectrum.py): Spectrum's key-step schedule and the spectral history cost."""
import numpy as np
import pytest

from bench.spectrum import build_spectral_history, spectrum_key_steps
from dpcache_core import Schedule, SpectralPredictor
from replayed_runs import run_cost, smooth_trajectory


@pytest.mark.parametrize("num_keys, keys", [
    (17, [0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 25, 31, 38, 46, 47, 48, 49]),
    (13, [0, 1, 2, 3, 4, 7, 12, 19, 28, 39, 47, 48, 49]),
    (9, [0, 1, 2, 3, 4, 14, 27, 43, 49]),
])
def test_spectrum_key_steps_reproduce_the_published_settings(num_keys, keys):
    assert spectrum_key_steps(50, num_keys) == keys


@pytest.mark.parametrize("num_evals", [8, 20, 30, 50, 100])
def test_spectrum_key_steps_give_k_keys_for_every_k(num_evals):
    for num_keys in range(1, num_evals + 3):
        keys = spectrum_key_steps(num_evals, num_keys)
        assert len(keys) == min(num_keys, num_evals)
        assert keys[0] == 0 and keys == sorted(set(keys)) and keys[-1] < num_evals
        if num_keys >= 3 and num_keys < num_evals:
            assert keys[-1] == num_evals - 1  # the last evaluation is always computed
    with pytest.raises(ValueError):
        spectrum_key_steps(50, 0)


def spectral_run_cost(trajectory, keys, max_history):
    """What a run with the spectral forecaster holding ``max_history`` keys pays, the sentinel term included."""
    from dpcache_core.pact import sentinel_target
    schedule = Schedule(tuple(keys), trajectory.shape[0], predictor="spectral", first_full_steps=1)
    return run_cost(trajectory, schedule, sentinel_target(trajectory, 1, "reference"), 1.0,
                    new_predictor=lambda: SpectralPredictor(max_history=max_history))


@pytest.mark.parametrize("memory", [1, 2, 3])
def test_spectral_history_cost_is_what_a_run_holding_memory_plus_one_keys_pays(memory):
    from dpcache_core.schedule import path_cost_history, solve_schedule_history
    num_evals, cap = 16, 5
    trajectory = smooth_trajectory(num_evals, width=40, seed=memory)
    history = build_spectral_history(trajectory, memory, max_gap=cap, chunk_elements=4096)
    rng = np.random.default_rng(memory)
    for _ in range(20):
        inner = rng.choice(np.arange(1, num_evals), rng.integers(3, num_evals - 1), replace=False)
        keys = sorted({0} | set(inner.tolist()))
        if any(b - a > cap for a, b in zip(keys, keys[1:] + [num_evals])):
            continue
        want = spectral_run_cost(trajectory, keys, memory + 1)
        assert path_cost_history(history, keys, 1, "exact") == pytest.approx(want, rel=1e-4, abs=1e-6)
    keys = solve_schedule_history(history, 7, 1, 0, scheme="exact")
    assert len(keys) == 7 and keys[0] == 0
