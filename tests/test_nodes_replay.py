"""DPCache Schedule's forecaster "auto" on a PACT file: chosen by replay when the file keeps trajectories."""
import numpy as np
import pytest
import torch

import dpcache_core as core
from dpcache_core import choose
from nodes import dpcache_nodes as nd
from test_core_choose import T, chebyshev, linear


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(nd, "pact_path", lambda name: str(tmp_path / name))
    return tmp_path


def write_pact(folder, name, trajectories, keep=True):
    acc = core.PactAccumulator(T)
    for traj in trajectories:
        acc.add(core.build_pact(torch.from_numpy(traj), order=1), trajectories=traj[None] if keep else None)
    core.save_pact(str(folder / name), acc, {"order": 1, "scheme": "reference", "convention": "skip",
                                               "model_family": "flux"})
    return name


def run_schedule(pact, k, **kw):
    out = nd.DPCacheSchedule().schedule(pact, k, 3, 0, T, **kw)
    return out["result"][0], out["ui"]["text"][0]


@pytest.mark.parametrize("make, k, name", [(linear, 13, "taylor 1"), (chebyshev, 9, "spectral")])
def test_schedule_text_names_the_replay_choice_and_runner_up(folder, make, k, name):
    pact = write_pact(folder, "cal.safetensors", make())
    sched, text = run_schedule(pact, k)
    acc, meta = core.load_pact(str(folder / pact))
    choice = choose.replay_choice(acc, meta, k, 3, 0)
    assert choice.best.name == name
    assert sched.key_steps == choice.best.keys and sched.predictor == choice.best.predictor
    assert sched.predictor == "spectral" or sched.order == choice.best.order
    assert f"forecaster chosen by replay on 3 recorded trajectories: {choose.label(name)}" in text, text
    assert f"runner-up {choose.label(choice.runner_up.name)} ({choice.runner_up.db:.1f} dB)" in text
    taylor, text = run_schedule(pact, k, forecaster="taylor")  # an explicit forecaster is not replayed
    assert taylor.predictor == "taylor" and taylor.order == 1 and "by replay" not in text


def test_taylor_2_from_an_order_1_file(folder):
    quadratic = [(np.random.default_rng(s).normal(size=(1, 64)) * (1 + (np.arange(T)[:, None] / T) ** 2)
                  ).astype(np.float32) for s in range(3)]
    sched, text = run_schedule(write_pact(folder, "q.safetensors", quadratic), 17)
    assert sched.predictor == "taylor" and sched.order == 2, text
    assert "Taylor order 2 (chosen by replay" in text


def test_a_file_without_trajectories_plans_exactly_as_before(folder):
    pact = write_pact(folder, "old.safetensors", chebyshev(), keep=False)
    acc, _ = core.load_pact(str(folder / pact))
    for k in (9, 25):
        sched, text = run_schedule(pact, k)
        assert list(sched.key_steps) == core.solve_schedule(acc.mean(), k, 3, 0, convention="skip")
        assert sched.predictor == core.spectral.auto_forecaster(T / k) and sched.order == 1
        assert "by replay" not in text


def test_calibrate_keeps_trajectories_and_schedule_replays_them(tmp_path, monkeypatch):
    import nodes_fakes as F
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    monkeypatch.setattr(nd, "pact_path", lambda name: str(tmp_path / name))
    (calib,) = nd.DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "cal", 1, False)
    F.sample(calib, steps=20, cfg=1.0)
    F.sample(calib, steps=20, cfg=1.0, seed=5)
    acc, meta = core.load_pact(str(tmp_path / "cal.safetensors"))
    assert acc.samples == 2 and acc.trajectories is not None and acc.trajectories.shape[:2] == (2, 20)
    out = nd.DPCacheSchedule().schedule("cal.safetensors", 6, 3, 0, 20)
    assert "forecaster chosen by replay on 2 recorded trajectories" in out["ui"]["text"][0]
