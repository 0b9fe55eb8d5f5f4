"""The forecaster chosen by replay on a PACT file's recorded trajectories (dpcache_core.choose, .replay)."""
import numpy as np
import pytest
import torch
from safetensors import safe_open

import dpcache_core as core
from dpcache_core import choose, replay
from dpcache_core.spectral import chebyshev_basis, to_tau

T = 50


def linear(n=3, width=256, seed=0):
    """Trajectories linear in the evaluation index: Taylor (any order) predicts them exactly."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 1, width)), rng.normal(size=(n, 1, width))
    return (a + b * np.arange(T)[None, :, None] / T).astype(np.float32)


def chebyshev(n=3, width=256, seed=0):
    """T_2 and T_3 of the spectral forecaster's own time coordinate: its fit nearly holds them, and
    Taylor's extrapolations over long hops miss them."""
    rng = np.random.default_rng(seed)
    basis = chebyshev_basis(to_tau(np.arange(T) / T), 4)
    a, b = rng.normal(size=(n, 1, width)), rng.normal(size=(n, 1, width))
    return (a * basis[None, :, 3:4] + b * basis[None, :, 2:3]).astype(np.float32)


def test_replay_picks_taylor_where_it_is_exact():
    traj = linear()
    choice = choose.choose(traj, choose.candidate_plans(traj, 13, 3, 0))
    assert choice.best.name == "taylor 1" and choice.best.error < 1e-5  # Taylor 2 ties (exact too): the faster wins
    assert choice.runner_up is not None and choice.runner_up.name != "taylor 1"
    spectral = [c for c in choice.candidates if c.name == "spectral"]
    assert min(c.error for c in spectral) > 1e3 * choice.best.error


def test_replay_picks_spectral_where_it_wins():
    traj = chebyshev()
    choice = choose.choose(traj, choose.candidate_plans(traj, 9, 3, 0))
    assert choice.best.name == "spectral"
    assert choice.runner_up.db > choice.best.db + choose.TIE_DB


def test_replay_errors_are_the_runs_own_prediction_errors():
    traj = chebyshev(n=2, width=64)
    keys = [0, 1, 2, 9, 20, 33, 45]
    weights = np.linspace(1, 2, T) / 75
    for name, (predictor, order) in choose.FORECASTERS.items():
        run = core.CacheRun(core.Schedule(tuple(keys), T, order=order, predictor=predictor))
        errs, summed, norms, pact = [], torch.zeros(64, dtype=torch.float64), 0.0, 0.0
        for t in range(T):
            feature = torch.from_numpy(traj[1, t])
            norms += weights[t] * float(feature.norm())
            if run.start_evaluation():
                run.update("s", feature)
            else:
                diff = run.predict("s") - feature
                errs.append(float(diff.norm() / feature.norm()))
                summed += weights[t] * diff.double()
                pact += float(diff.abs().mean()) / 2
        assert choose.replay_errors(traj, keys, name, measure="relative L2")[1] == pytest.approx(np.mean(errs), rel=1e-5)
        assert choose.replay_errors(traj, keys, name, measure="PACT")[1] == pytest.approx(pact, rel=1e-5)
        got = choose.replay_errors(traj, keys, name, weights=weights)[1]  # the default: integrated
        assert got == pytest.approx(float(summed.norm()) / norms, rel=1e-5), name


def test_ties_go_to_the_faster_forecaster():
    def cand(name, error):
        return choose.Candidate(name, (0,), "x", error)
    best, runner = choose.pick([cand("spectral", 1.0), cand("taylor 2", 1.03), cand("taylor 1", 1.2)])
    assert best.name == "taylor 2" and runner.name == "spectral"  # 0.26 dB apart: level, Taylor 2 is faster
    best, _ = choose.pick([cand("spectral", 1.0), cand("taylor 2", 1.04)])  # 0.34 dB: the spectral one wins
    assert best.name == "spectral"


def test_taylor_2_is_plannable_from_an_order_1_file():
    traj = chebyshev(n=2)
    plans = choose.candidate_plans(traj, 13, 3, 0, cost=core.build_pact(torch.from_numpy(traj[0]), order=1), order=1)
    assert "order-2 costs of the trajectories" in plans and "the PACT's order-1 costs" in plans
    assert "order-1 costs of the trajectories" not in plans  # the file's own order is the file's cost


def test_trajectories_are_capped_in_bytes(tmp_path):
    per = replay.capacity(T, replay.REPLAY_ELEMENTS)
    assert per == 10  # 800 KiB each at T = 50 under 8 MiB
    acc = core.PactAccumulator(T)
    run = np.random.default_rng(0).normal(size=(2, T, replay.REPLAY_ELEMENTS)).astype(np.float32)
    for _ in range(8):
        acc.add(np.zeros(acc.shape), trajectories=run)
    assert acc.trajectories.shape == (per, T, replay.REPLAY_ELEMENTS)
    assert acc.trajectories.nbytes <= replay.REPLAY_BYTE_CAP
    assert np.array_equal(acc.trajectories[:2], run)  # the first ones are kept
    long = replay.combine(None, np.ones((1, 1000, 4096), np.float32), 1000)
    assert long.shape == (1, 1000, replay.REPLAY_BYTE_CAP // 4000) and long.nbytes <= replay.REPLAY_BYTE_CAP
    narrow = replay.combine(run[:1], run[:1, :, :100], T)  # another width: both cut to the narrower
    assert narrow.shape == (2, T, 100)
    path = str(tmp_path / "p.safetensors")
    core.save_pact(path, acc, {"order": 1})
    loaded, _ = core.load_pact(path)
    assert np.array_equal(loaded.trajectories, acc.trajectories)
    other = core.PactAccumulator(T)
    other.add(np.zeros(acc.shape), trajectories=run[:1])
    other.merge(loaded)  # merged files keep them, under the cap
    assert other.trajectories.shape[0] == per and np.array_equal(other.trajectories[0], run[0])


def test_files_without_trajectories_are_unchanged(tmp_path):
    acc = core.PactAccumulator(T)
    acc.add(core.build_pact(torch.from_numpy(linear(n=1)[0]), order=1))
    path = str(tmp_path / "old.safetensors")
    core.save_pact(path, acc, {"order": 1, "convention": "skip"})
    with safe_open(path, framework="np") as f:
        assert sorted(f.keys()) == ["counts", "sums"]
    loaded, meta = core.load_pact(path)
    assert loaded.trajectories is None and choose.replay_choice(loaded, meta, 13) is None
    sched = core.Schedule((0, 1, 2, 20), T)
    assert choose.replayed_schedule(sched, loaded, meta) == (sched, None)


def test_broken_trajectories_are_refused(tmp_path):
    from safetensors.numpy import save_file
    acc = core.PactAccumulator(T)
    acc.add(np.zeros(acc.shape), trajectories=linear(n=1))
    path = str(tmp_path / "p.safetensors")
    core.save_pact(path, acc, {"order": 1})
    with safe_open(path, framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata()
    tensors["trajectories"] = tensors["trajectories"][:, :10]
    save_file(tensors, path, metadata=header)
    with pytest.raises(core.PactFileError, match="replay trajectories"):
        core.load_pact(path)


def test_replay_sample_takes_a_fixed_pick_of_each_complete_stream():
    rec = core.TrajectoryRecorder(sample_size=0)
    feats = torch.randn(T, 2, 300)
    for t in range(T):
        rec.start_evaluation()
        rec.record("cond", feats[t])
        rec.record("uncond", -feats[t])
    sample = replay.replay_sample(rec, elements=100)
    cols = replay.replay_columns(600, 100)
    assert sample.shape == (2, T, 100) and sample.dtype == np.float32
    assert np.array_equal(sample[0], feats.reshape(T, -1)[:, cols].numpy())
    assert np.array_equal(sample[1], -sample[0])


def test_step_weights_follow_the_files_sigmas():
    sigmas = list(np.linspace(1, 0, T + 1) ** 2)
    w = choose.step_weights({"eval_sigmas": sigmas}, T)
    assert w == pytest.approx(-np.diff(sigmas)) and w[0] > w[-1]
    assert choose.step_weights({}, T) == pytest.approx(np.full(T, 1 / T))
    assert choose.step_weights({"eval_sigmas": sigmas[:10]}, T) == pytest.approx(np.full(T, 1 / T))
