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
    (calib,) = nd.DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "cal", 1, False, check_runs=0)
    F.sample(calib, steps=20, cfg=1.0)
    F.sample(calib, steps=20, cfg=1.0, seed=5)
    acc, meta = core.load_pact(str(tmp_path / "cal.safetensors"))
    assert acc.samples == 2 and acc.trajectories is not None and acc.trajectories.shape[:2] == (2, 20)
    assert "forecaster_checks" not in meta
    out = nd.DPCacheSchedule().schedule("cal.safetensors", 6, 3, 0, 20)
    assert "forecaster chosen by replay on 2 recorded trajectories" in out["ui"]["text"][0]


@pytest.fixture
def calibration(tmp_path, monkeypatch):
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    monkeypatch.setattr(nd, "pact_path", lambda name: str(tmp_path / name))
    seen = []
    from nodes import ui
    monkeypatch.setattr(ui, "send_text", lambda text, node: seen.append(text))
    return tmp_path, seen


def test_check_runs_follow_the_first_recorded_run_and_decide_the_forecaster(calibration):
    import nodes_fakes as F
    folder, seen = calibration
    model = F.FakePatcher(F.Flux())
    F.sample(model, steps=20, cfg=2.0)
    plain = F.sample.last_output
    (calib,) = nd.DPCacheCalibrate().calibrate(model, "cal", 1, False, check_runs=1, unique_id="4")
    F.reset_calls(model)
    F.sample(calib, steps=20, cfg=2.0)
    assert torch.equal(F.sample.last_output, plain)  # the recorded run's output is returned
    acc, meta = core.load_pact(str(folder / "cal.safetensors"))
    checks = meta["forecaster_checks"]
    ks = sorted(int(k) for k in checks["ks"])
    assert checks["runs"] == 1 and ks == [5, 7, 10]  # K=4 of 20 has no plan under the hop cap: not checked
    assert all(set(choose.SPEED_ORDER) <= set(row) for row in checks["ks"].values())
    checked = sum(int(k) for k, row in checks["keys"].items()  # each distinct plan is sampled once
                  for _ in {(core.check_runs.forecaster_of(label), tuple(keys)) for label, keys in row.items()})
    assert F.block_calls(model)["single_blocks.0"] == 20 + checked  # recorded run + each check at its K keys
    assert "check run 1 of 1" in seen[-1] and "K=10: Taylor 1" in seen[-1]

    F.reset_calls(model)
    F.sample(calib, steps=20, cfg=2.0, seed=3)  # the file has its check run: this run only records
    assert F.block_calls(model)["single_blocks.0"] == 20
    acc, meta = core.load_pact(str(folder / "cal.safetensors"))
    assert acc.samples == 2 and meta["forecaster_checks"] == checks  # kept when a sample is added

    out = nd.DPCacheSchedule().schedule("cal.safetensors", 6, 3, 0, 20)
    sched, text = out["result"][0], out["ui"]["text"][0]
    k, means = core.check_runs.checked_ranking(meta, 6)
    assert k == 7 and "chosen by the calibration's check runs at K=7" in text
    name = next(n for n, (p, o) in choose.FORECASTERS.items() if p == sched.predictor and (p == "spectral" or o == sched.order))
    of_name = max(v for label, v in means.items() if core.check_runs.forecaster_of(label) == name)
    assert of_name >= max(means.values()) - choose.CHECK_TIE_DB

    (again,) = nd.DPCacheCalibrate().calibrate(model, "cal", 1, True, check_runs=1)  # reset: the file and its checks start afresh
    F.reset_calls(model)
    F.sample(again, steps=20, cfg=2.0, seed=9)
    _, meta = core.load_pact(str(folder / "cal.safetensors"))
    assert meta["samples"] == 1 and meta["forecaster_checks"]["runs"] == 1
    assert F.block_calls(model)["single_blocks.0"] == 20 + checked  # checked again


def test_a_failed_check_is_reported_and_the_output_returned(calibration, monkeypatch):
    import nodes_fakes as F
    from nodes import check_hook
    folder, seen = calibration

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in a check run")

    monkeypatch.setattr(check_hook, "sample_checks", broken)
    model = F.FakePatcher(F.Flux())
    F.sample(model, steps=20, cfg=1.0)
    plain = F.sample.last_output
    (calib,) = nd.DPCacheCalibrate().calibrate(model, "cal", 1, False, unique_id="4")
    F.sample(calib, steps=20, cfg=1.0)
    assert torch.equal(F.sample.last_output, plain)
    acc, meta = core.load_pact(str(folder / "cal.safetensors"))
    assert acc.samples == 1 and "forecaster_checks" not in meta
    assert "check runs not kept: RuntimeError: out of memory in a check run" in seen[-1]
    assert "the sampler's output is returned" in seen[-1]


def test_check_runs_is_checked(calibration):
    import nodes_fakes as F
    with pytest.raises(ValueError, match="check_runs must be >= 0"):
        nd.DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "cal", 1, False, check_runs=-1)


def test_each_check_run_plans_on_the_file_as_it_is(calibration, monkeypatch):
    import nodes_fakes as F
    from nodes import check_hook
    folder, seen = calibration
    samples_seen = []
    original = check_hook.planned_checks
    monkeypatch.setattr(check_hook, "planned_checks", lambda acc, meta: samples_seen.append(acc.samples) or original(acc, meta))
    model = F.FakePatcher(F.Flux())
    (calib,) = nd.DPCacheCalibrate().calibrate(model, "cal", 1, False, check_runs=2)
    for seed in (2, 3, 4):  # the first two runs are checked, each on the file with its own sample in; the third is not
        F.sample(calib, steps=20, cfg=2.0, seed=seed)
    checks = core.load_pact(str(folder / "cal.safetensors"))[1]["forecaster_checks"]
    assert samples_seen == [1, 2] and checks["runs"] == 2
    assert all(len(v) == 2 for row in checks["ks"].values() for v in row.values())
    assert "check run 2 of 2" in " ".join(seen)


def test_a_forecaster_whose_cache_does_not_fit_is_left_out_of_the_checks(calibration, monkeypatch):
    import dataclasses
    import nodes_fakes as F
    from nodes import memory
    folder, seen = calibration

    def no_room_for_spectral(schedule, guider, shape):  # as memory.fit_run downgrades on a small GPU
        if schedule.predictor == "spectral":
            return dataclasses.replace(schedule, predictor="taylor", order=1), None
        return schedule, None

    monkeypatch.setattr(memory, "fit_run", no_room_for_spectral)
    model = F.FakePatcher(F.Flux())
    (calib,) = nd.DPCacheCalibrate().calibrate(model, "cal", 1, False, check_runs=1)
    F.reset_calls(model)
    F.sample(calib, steps=20, cfg=2.0)
    checks = core.load_pact(str(folder / "cal.safetensors"))[1]["forecaster_checks"]
    assert all(set(row) == {"taylor 1", "taylor 2", "taylor 2 (history-exact plan)"} for row in checks["ks"].values())
    assert checks["keys"].keys() == checks["ks"].keys() and all(set(checks["keys"][k]) == set(checks["ks"][k]) for k in checks["ks"])
    assert "left out, their cache would not fit the free GPU memory: spectral, spectral (history-exact plan)" in seen[-1]
    sampled = sum(int(k) for k, row in checks["keys"].items()
                  for _ in {(core.check_runs.forecaster_of(label), tuple(keys)) for label, keys in row.items()})
    assert F.block_calls(model)["single_blocks.0"] == 20 + sampled
