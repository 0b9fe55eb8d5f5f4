"""Sampled calibration (issue 9): the recorder's fixed element sample, the (T, S) build, the PACT
metadata, merging PACT files, and files written before sampling existed."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import nodes_fakes as F
from dpcache_core import PactAccumulator, build_pact, load_pact, path_cost, save_pact, solve_schedule
from dpcache_core.merge import main as merge_main
from dpcache_core.merge import merge_pacts
from dpcache_core.runtime import TrajectoryRecorder, sample_positions
from dpcache_core.store import PactFileError, combine_sampling

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def smooth(T, shape, seed=0, noise=0.02):
    g = torch.Generator().manual_seed(seed)
    base, drift, curve = (torch.randn(shape, generator=g) for _ in range(3))
    scale = torch.rand(shape, generator=g) * 3  # elements differ in how fast they move
    return [base + scale * (drift * t / T + curve * (t / T) ** 2) + noise * torch.randn(shape, generator=g) for t in range(T)]


def record(features_by_stream, **kw):
    recorder = TrajectoryRecorder(**kw)
    for t in range(len(next(iter(features_by_stream.values())))):
        recorder.start_evaluation()
        for stream, features in features_by_stream.items():
            recorder.record(stream, features[t])
    return recorder


def test_sample_positions_are_seeded_sorted_and_in_range():
    a = sample_positions(10_000, 500, seed=3)
    assert a.shape == (500,) and a.dtype == torch.int64
    assert torch.equal(a, sample_positions(10_000, 500, seed=3))
    assert not torch.equal(a, sample_positions(10_000, 500, seed=4))
    assert (a[1:] > a[:-1]).all() and a.min() >= 0 and a.max() < 10_000  # sorted, distinct
    near_all = sample_positions(1000, 900, seed=0)  # S close to N: a permutation's first S
    assert near_all.shape == (900,) and near_all.unique().numel() == 900
    # uniform: every position about equally often over many seeds
    counts = torch.bincount(torch.cat([sample_positions(200, 20, seed=s) for s in range(2000)]), minlength=200)
    assert counts.min() > 130 and counts.max() < 270  # expected 200 each
    assert sample_positions(100, 0, 0) is None and sample_positions(100, 100, 0) is None  # all elements


def test_recorder_keeps_the_same_sampled_elements_at_every_evaluation():
    T, shape = 8, (2, 40, 16)  # 1280 elements
    features = smooth(T, shape)
    recorder = record({"cond": features, "uncond": [f * 2 for f in features]}, sample_size=100, seed=7, expected_evals=T)
    traj = recorder.trajectory("cond")
    assert traj.shape == (T, 100) and traj.dtype == torch.float32
    flat = sample_positions(features[0].numel(), 100, seed=7)  # the first stream gets seed + 0
    for t in range(T):
        torch.testing.assert_close(traj[t], features[t].reshape(-1)[flat], rtol=0, atol=0)
    # the second stream has its own positions (seed + 1)
    flat2 = sample_positions(features[0].numel(), 100, seed=8)
    torch.testing.assert_close(recorder.trajectory("uncond")[3], 2 * features[3].reshape(-1)[flat2], rtol=0, atol=0)
    assert recorder.nbytes() == 2 * T * 100 * 4  # T x S float32 per stream, whatever N is
    # a run longer than expected grows the buffer and keeps every row
    grown = record({"cond": features}, sample_size=100, seed=7, expected_evals=3)
    assert torch.equal(grown.trajectory("cond"), traj) and grown.buffers["cond"].shape[0] >= T
    assert recorder.sample_description() == 100
    sample = recorder.build_sample()
    expected = (build_pact(traj) + build_pact(recorder.trajectory("uncond"))) / 2
    np.testing.assert_allclose(sample, expected, rtol=1e-12)


def test_recorder_gathers_from_non_contiguous_16_bit_features_without_touching_them():
    T = 6
    big = [f.bfloat16() for f in smooth(T, (1, 50, 24))]
    views = [f[:, 10:, ::2] for f in big]  # e.g. FLUX image tokens of the last block's output
    before = [f.clone() for f in big]
    recorder = record({"s": views}, sample_size=64, seed=1)
    flat = sample_positions(views[0].numel(), 64, seed=1)
    for t in range(T):
        torch.testing.assert_close(recorder.trajectory("s")[t], views[t].reshape(-1)[flat].float(), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(big, before))


def test_sample_size_zero_or_at_least_n_is_the_exact_pact():
    features = smooth(10, (3, 20))
    exact = build_pact(features)
    for size in (0, 60, 10_000):
        recorder = record({"c": features}, sample_size=size)
        assert recorder.trajectory("c").shape == (10, 60) and recorder.sample_description() == "all"
        np.testing.assert_array_equal(recorder.build_sample(), exact)
    with pytest.raises(ValueError, match="sample_size must be >= 0"):
        TrajectoryRecorder(sample_size=-1)


def test_a_stream_that_changes_shape_is_left_out():
    recorder = TrajectoryRecorder(sample_size=4)
    for t in range(5):
        recorder.start_evaluation()
        recorder.record("a", torch.full((3, 4), float(t)))
        recorder.record("b", torch.zeros((3, 4) if t < 3 else (3, 5)))
    assert recorder.complete_streams() == ["a"]


def test_sampled_pact_estimates_the_full_one():
    """Each entry is a mean over the elements; a uniform sample estimates it without bias."""
    T, shape = 20, (64, 64)  # N = 4096
    features = smooth(T, shape, seed=5)
    full = build_pact(features)
    finite = np.isfinite(full) & (full > 0)
    one = record({"c": features}, sample_size=1024, seed=0).build_sample()
    rel = np.abs(one[finite] - full[finite]) / full[finite]
    assert np.median(rel) < 0.05
    # the mean over many seeds converges on the full PACT (no bias)
    acc = PactAccumulator(T)
    for seed in range(24):
        acc.add(record({"c": features}, sample_size=256, seed=seed).build_sample())
    rel_mean = np.abs(acc.mean()[finite] - full[finite]) / full[finite]
    assert np.median(rel_mean) < 0.02 and np.median(rel_mean) < np.median(rel)
    assert np.array_equal(np.isfinite(acc.mean()), np.isfinite(full))
    for k in (8, 10):
        assert path_cost(full, solve_schedule(one, k)) <= path_cost(full, solve_schedule(full, k)) * 1.05


def test_build_pact_takes_a_tensor_or_a_sequence():
    features = smooth(9, (5, 6))
    stacked = torch.stack([f.reshape(-1) for f in features])
    np.testing.assert_array_equal(build_pact(stacked), build_pact(features))
    np.testing.assert_array_equal(build_pact(torch.stack(features)), build_pact(features))  # (T, ...) is flattened
    with pytest.raises(ValueError, match=r"\(T, S\)"):
        build_pact(torch.zeros(9))


def test_block_size_does_not_change_the_result():
    stacked = torch.stack([f.reshape(-1) for f in smooth(12, (1000,))])
    np.testing.assert_allclose(build_pact(stacked, block_elements=1), build_pact(stacked), rtol=1e-6)


# -- metadata ---------------------------------------------------------------------------------


def test_combine_sampling():
    old = {"samples": 3}  # written before sampling existed: every element
    new = {"samples": 1, "sample_size": 65536, "sample_seed": 0}
    assert combine_sampling([new]) == {"sample_size": 65536, "sample_sizes": {"65536": 1}, "sample_seed": 0}
    both = combine_sampling([old, new, {"samples": 2, "sample_size": 4096, "sample_seed": 5}])
    assert both == {"sample_size": "mixed", "sample_sizes": {"4096": 2, "65536": 1, "all": 3}, "sample_seed": [0, 5]}
    assert combine_sampling([both, new])["sample_sizes"] == {"4096": 2, "65536": 2, "all": 3}
    assert combine_sampling([old]) == {"sample_size": "all", "sample_sizes": {"all": 3}, "sample_seed": None}


def test_calibrate_node_writes_the_sample_size_and_seed(tmp_path, monkeypatch):
    import nodes.dpcache_nodes as nd
    from nodes.dpcache_nodes import DPCacheCalibrate

    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    path = os.path.join(tmp_path, "s.safetensors")
    (calib,) = DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "s", 2, False, sample_size=16)
    F.sample(calib, cfg=2.0)
    acc, meta = load_pact(path)
    assert acc.samples == 1 and meta["sample_size"] == 16 and meta["sample_seed"] == 0
    assert meta["sample_sizes"] == {"16": 1}
    (exact,) = DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "s", 2, False, sample_size=0)
    F.sample(exact, cfg=2.0)
    acc, meta = load_pact(path)
    assert acc.samples == 2 and meta["sample_size"] == "mixed" and meta["sample_sizes"] == {"16": 1, "all": 1}
    with pytest.raises(ValueError, match="sample_size must be >= 0"):
        DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "s", 2, False, sample_size=-5)


# -- merging ----------------------------------------------------------------------------------


def random_pact(T, seed, samples=1):
    rng = np.random.default_rng(seed)
    acc = PactAccumulator(T)
    for _ in range(samples):
        acc.add(np.where(rng.random((T, T + 1, T + 1)) < 0.3, np.inf, rng.random((T, T + 1, T + 1))))
    return acc


def write(tmp_path, name, acc, **meta):
    path = str(tmp_path / name)
    save_pact(path, acc, {"model_family": "flux", "order": 2, "scheme": "reference", **meta})
    return path


def test_merge_adds_sums_and_counts_exactly(tmp_path, capsys):
    parts = [random_pact(8, s, samples=s + 1) for s in range(3)]
    paths = [write(tmp_path, "a.safetensors", parts[0], sample_size=65536, sample_seed=0, resolution="1024x1024"),
             write(tmp_path, "b.safetensors", parts[1], sample_size=4096, sample_seed=0, resolution="512x512"),
             write(tmp_path, "c.safetensors", parts[2], resolution="1024x1024")]  # pre-sampling file: all elements
    out = str(tmp_path / "all.safetensors")
    assert merge_main(paths + ["-o", out]) == 0
    assert "6 samples" in capsys.readouterr().out
    merged, meta = load_pact(out)
    expected = PactAccumulator(8)
    for p in parts:
        expected.merge(p)
    np.testing.assert_array_equal(merged.sums, expected.sums)
    np.testing.assert_array_equal(merged.counts, expected.counts)
    assert merged.samples == meta["samples"] == 6
    assert meta["sample_sizes"] == {"4096": 2, "65536": 1, "all": 3} and meta["sample_size"] == "mixed"
    assert meta["resolution"] == ["1024x1024", "512x512"] and meta["model_family"] == "flux"
    assert [m["samples"] for m in meta["merged_from"]] == [1, 2, 3]
    # merging is associative: ((a + b) + c) == (a + (b + c))
    ab = merge_pacts(paths[:2])[0]
    ab.merge(parts[2])
    np.testing.assert_array_equal(ab.sums, merged.sums)


def test_merge_refuses_what_does_not_fit(tmp_path, capsys):
    a = write(tmp_path, "a.safetensors", random_pact(8, 0))
    cases = {
        "model family 'wan' vs 'flux'": write(tmp_path, "w.safetensors", random_pact(8, 1), model_family="wan"),
        "num_evals 9 vs 8": write(tmp_path, "t.safetensors", random_pact(9, 1)),
        "order 1 vs 2": write(tmp_path, "o.safetensors", random_pact(8, 1), order=1),
        "scheme 'exact' vs 'reference'": write(tmp_path, "s.safetensors", random_pact(8, 1), scheme="exact"),
    }
    for message, other in cases.items():
        with pytest.raises(SystemExit) as exc:
            merge_main([a, other, "-o", str(tmp_path / "out.safetensors")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message.replace("model family", "model_family") in err and "can be merged" in err
    assert not os.path.exists(tmp_path / "out.safetensors")
    with pytest.raises(PactFileError, match="same file"):
        merge_pacts([a, os.path.join(str(tmp_path), ".", "a.safetensors")])
    with pytest.raises(PactFileError, match="same file"):
        merge_pacts([a, a])
    with pytest.raises(PactFileError, match="not found"):
        merge_pacts([a, str(tmp_path / "missing.safetensors")])


def test_merge_replaces_an_existing_file_only_with_force(tmp_path, capsys):
    a = write(tmp_path, "a.safetensors", random_pact(6, 0))
    b = write(tmp_path, "b.safetensors", random_pact(6, 1, samples=2))
    before = open(a, "rb").read()
    with pytest.raises(SystemExit):
        merge_main([a, b, "-o", a])
    assert "exists" in capsys.readouterr().err and open(a, "rb").read() == before
    done = subprocess.run([sys.executable, "-m", "dpcache_core.merge", a, b, "-o", a], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(DATA)))
    assert done.returncode == 2 and "add --force" in done.stderr and "Traceback" not in done.stderr
    assert merge_main([a, b, "-o", a, "--force"]) == 0  # merge b into a
    assert load_pact(a)[0].samples == 3
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]  # no temporary file left


# -- files written before sampled calibration ------------------------------------------------

# Schedules the code of commit fbfa3d0 chose on tests/data/pre_sampling_T16.safetensors
# (first_full_steps 3); see tests/data/make_pre_sampling_pact.py.
PRE_SAMPLING_SCHEDULES = {6: [0, 1, 2, 4, 8, 12], 7: [0, 1, 2, 4, 7, 10, 13], 8: [0, 1, 2, 4, 6, 8, 11, 14],
                          10: [0, 1, 2, 4, 6, 8, 10, 12, 14, 15]}


def pre_sampling_trajectory(seed, T=16):
    g = torch.Generator().manual_seed(seed)
    base, drift, curve = (torch.randn(2, 3, 16, generator=g) for _ in range(3))
    return [base + drift * t / T + curve * (t / T) ** 2 + 0.02 * torch.randn(2, 3, 16, generator=g) for t in range(T)]


def test_a_file_written_before_sampling_loads_and_schedules_the_same(tmp_path):
    acc, meta = load_pact(os.path.join(DATA, "pre_sampling_T16.safetensors"))
    assert acc.samples == 2 and meta["num_evals"] == 16 and "sample_size" not in meta
    old = acc.mean()
    for k, keys in PRE_SAMPLING_SCHEDULES.items():
        assert solve_schedule(old, k, 3) == keys
    # the same trajectories through today's build: only the entries beyond the hop cap differ
    # (+inf now), and the DP never uses those, so the schedules and their costs are the same
    new = PactAccumulator(16)
    for seed in (1, 2):
        new.add(build_pact(pre_sampling_trajectory(seed), order=2))
    new = new.mean()
    usable = np.isfinite(new)
    assert usable.sum() < np.isfinite(old).sum()
    np.testing.assert_allclose(new[usable], old[usable], rtol=1e-5, atol=1e-7)
    for k, keys in PRE_SAMPLING_SCHEDULES.items():
        assert solve_schedule(new, k, 3) == keys
        assert path_cost(new, keys) == pytest.approx(path_cost(old, keys), rel=1e-5)
    # and it merges with a sampled file (its samples count as "all")
    sampled = write(tmp_path, "new.safetensors", PactAccumulator(16), sample_size=4096, sample_seed=0)
    merged, meta = merge_pacts([os.path.join(DATA, "pre_sampling_T16.safetensors"), sampled])
    assert meta["sample_sizes"] == {"all": 2}  # the empty file adds no samples


def test_merge_keeps_one_trajectory_and_refuses_windows(tmp_path):
    sigmas_a, sigmas_b = [1 - k / 6 for k in range(7)], [(1 - k / 6) ** 2 for k in range(7)]
    a = write(tmp_path, "a.safetensors", random_pact(6, 0), eval_sigmas=sigmas_a, positions=[k / 6 for k in range(7)])
    b = write(tmp_path, "b.safetensors", random_pact(6, 1), eval_sigmas=sigmas_b, positions=[k / 7 for k in range(7)])
    _, meta = merge_pacts([a, b])
    assert meta["eval_sigmas"] == sigmas_a and meta["positions"] == [k / 6 for k in range(7)]  # lists stay lists
    w = write(tmp_path, "w.safetensors", random_pact(6, 2), windows=[[0, 3, 1]])
    with pytest.raises(PactFileError, match="partial sampling runs"):
        merge_pacts([a, w])
