"""The merge command on PACT files written the way the current DPCache Calibrate writes them."""
from __future__ import annotations

import os

import numpy as np
import pytest

import nodes_fakes as F
from dpcache_core import load_pact
from dpcache_core.merge import main as merge_main
from nodes.dpcache_nodes import DPCacheCalibrate


def calibrate(folder, monkeypatch, name, images):
    """A PACT ``name`` in ``folder`` from DPCache Calibrate (order 2, sampled) on the fake FLUX, one run per image size."""
    import nodes.dpcache_nodes as nd
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(folder))
    (calib,) = DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), name, 2, False)
    for img in images:
        F.sample(calib, cfg=2.0, img=img, seed=img)
    return str(folder / f"{name}.safetensors")


def assert_same_samples(merged_path, both_path):
    merged, meta = load_pact(merged_path)
    both, both_meta = load_pact(both_path)
    assert merged.samples == both.samples == 2
    np.testing.assert_array_equal(merged.counts, both.counts)
    np.testing.assert_allclose(merged.sums, both.sums, rtol=1e-12)
    np.testing.assert_array_equal(merged.history_counts, both.history_counts)
    np.testing.assert_allclose(merged.history_sums, both.history_sums, rtol=1e-12)
    for key in ("sample_meta", "resolution", "sample_size", "sample_sizes", "sample_seed", "convention",
                "model_family", "order", "scheme", "sampler", "scheduler", "steps", "sigmas_hash"):
        assert meta.get(key) == both_meta.get(key), key
    return meta


def test_merge_command_merges_files_of_the_current_calibrate_exactly(tmp_path, monkeypatch, capsys):
    a = calibrate(tmp_path, monkeypatch, "a", [6])
    b = calibrate(tmp_path, monkeypatch, "b", [10])
    both = calibrate(tmp_path, monkeypatch, "both", [6, 10])
    assert load_pact(a)[1]["sample_meta"]  # per-sample records, as Calibrate writes them
    out = str(tmp_path / "c.safetensors")
    assert merge_main([a, b, "--output", out]) == 0
    meta = assert_same_samples(out, both)
    assert [m["samples"] for m in meta["merged_from"]] == [1, 1]
    assert "2 samples" in capsys.readouterr().out
    # --force into one of the inputs: the same result, written over it
    assert merge_main([a, b, "--output", a, "--force"]) == 0
    assert_same_samples(a, both)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors", "both.safetensors", "c.safetensors"]


def test_merge_keeps_every_record_of_files_merged_twice(tmp_path, monkeypatch):
    a = calibrate(tmp_path, monkeypatch, "a", [6, 8])
    b = calibrate(tmp_path, monkeypatch, "b", [10])
    out = str(tmp_path / "c.safetensors")
    merge_main([a, b, "-o", out])
    meta = load_pact(out)[1]
    assert len(meta["sample_meta"]) == 3 == meta["samples"]
    assert [r["resolution"] for r in meta["sample_meta"]] == [load_pact(a)[1]["sample_meta"][0]["resolution"],
                                                             load_pact(a)[1]["sample_meta"][1]["resolution"],
                                                             load_pact(b)[1]["sample_meta"][0]["resolution"]]
    with pytest.raises(SystemExit):  # an existing output without --force is refused
        merge_main([a, b, "-o", out])
