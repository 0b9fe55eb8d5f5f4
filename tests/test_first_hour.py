"""Issue 20, the rough edges a new user hit: the promised error types, budget-aware target speed-up
messages, (uniform) re-planning with the hop cap and one joint plan across KSamplerAdvanced calls,
ddim_uniform as a whole run, equal-count re-mapping by sigma, the calibration log line, the demo's
output check and speed-up note, skip reasons, and the pictures' labels."""
from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest

import nodes_fakes as F
from dpcache_core import PactAccumulator, PactFileError, ScheduleMismatchError, load_pact, save_pact
from dpcache_core import picture as P
from dpcache_core.replan import Budget, Planner, RunShape, joint_trajectory, plan_run, starts_trajectory, uniform_plan
from dpcache_core.schedule import Schedule, uniform_key_steps
from dpcache_core.transfer import index_positions, positions_from_sigmas
from nodes import dpcache_nodes as nd
from nodes.dpcache_nodes import DPCacheApply, DPCacheCalibrate, make_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = np.arange(1, 1001) / 1000.0  # the fakes' sigma table (a flow model: sigma = timestep)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(nd, "SHIPPED_DIR", str(tmp_path))
    monkeypatch.setattr(nd, "calibration_folder", lambda: str(tmp_path))
    return tmp_path


def random_pact(path, t=10, family="flux", order=1):
    acc = PactAccumulator(t)
    acc.add(np.random.default_rng(0).random((t, t + 1, t + 1)))
    save_pact(str(path), acc, {"model_family": family, "order": order, "scheme": "reference"})


def exact_type(err, cls):
    assert type(err.value) is cls and type(err.value).__module__ == "dpcache" and isinstance(err.value, ValueError)


# ------------------------------------------------------------------ error types


def test_pact_file_problems_raise_pact_file_error(folder):
    (folder / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="DPCache Schedule: .*damaged") as err:
        make_schedule("bad.safetensors", 5)
    exact_type(err, PactFileError)
    with pytest.raises(ValueError, match="not found") as err:
        make_schedule("missing.safetensors", 5)
    exact_type(err, PactFileError)
    save_pact(str(folder / "empty.safetensors"), PactAccumulator(10), {"model_family": "flux", "order": 1})
    with pytest.raises(ValueError, match="holds no samples") as err:
        make_schedule("empty.safetensors", 5)
    exact_type(err, PactFileError)


def test_calibrate_into_a_mismatched_or_damaged_pact_raises_pact_file_error(folder):
    random_pact(folder / "t.safetensors", t=10, family="flux", order=1)
    (calib,) = DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "t", 1, False)
    with pytest.raises(ValueError, match="T=10 evaluations.*this run is flux, T=6") as err:
        F.sample(calib, steps=6)
    exact_type(err, PactFileError)
    (calib_wan,) = DPCacheCalibrate().calibrate(F.FakePatcher(F.WanModel()), "t", 1, False)
    with pytest.raises(ValueError, match="model family flux.*this run is wan") as err:
        F.sample(calib_wan)
    exact_type(err, PactFileError)
    (folder / "t.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged.*reset") as err:
        F.sample(calib)
    exact_type(err, PactFileError)


def test_a_schedule_for_another_family_raises_schedule_mismatch_error(folder):
    random_pact(folder / "f.safetensors", t=10, family="flux")
    sched, _, _ = make_schedule("f.safetensors", 6)
    with pytest.raises(ValueError, match="planned on a flux PACT.*this MODEL is Wan") as err:
        DPCacheApply().apply(F.FakePatcher(F.WanModel()), sched)
    exact_type(err, ScheduleMismatchError)


# ------------------------------------------------------------------ target speed-up


def schedule_text(**kw):
    args = dict(pact="(uniform)", key_steps=13, first_full_steps=3, last_full_steps=0, total_evaluations=50)
    args.update(kw)
    out = nd.DPCacheSchedule().schedule(**args)
    return out["result"][0], out["ui"]["text"][0]


def test_target_speedup_beyond_what_t_allows_raises_k_and_names_the_target(folder):
    sched, text = schedule_text(budget="target speed-up", target_speedup=20.0)
    # 50 / 20 -> K=2, below the 3 mandatory steps; the hop cap 15 needs 3 more keys after them
    assert sched.num_keys == 6 and max(np.diff(list(sched.key_steps) + [50])) <= 15
    assert "target speed-up 20x needs K=2, raised to K=6" in text and "the most T=50 allows is 8.33x" in text
    assert "raise K or lower" not in text
    random_pact(folder / "p.safetensors", t=10)
    sched, text = schedule_text(pact="p.safetensors", budget="target speed-up", target_speedup=3.0)
    assert sched.num_keys == 5 and "target speed-up 3x needs K=3, raised to K=5" in text
    assert "the most T=10 allows is 2x" in text
    sched, text = schedule_text(pact="p.safetensors", budget="target speed-up", target_speedup=2.0)
    assert sched.num_keys == 5 and "raised" not in text  # met as asked: no note


# ------------------------------------------------------------------ (uniform) re-planning


def uniform_schedule(k, t):
    sched, _, _ = make_schedule("(uniform)", k, total_evaluations=t)
    return sched


def test_uniform_replan_keeps_the_hop_cap_and_reports_the_raise():
    plan = plan_run(uniform_schedule(8, 50), RunShape(20))  # round(8 * 20 / 50) = 3: [0, 1, 2] alone breaks the cap 6
    assert list(plan.schedule.key_steps) == [0, 1, 2, 8, 14]
    assert max(np.diff(list(plan.schedule.key_steps) + [20])) <= 6
    assert "(raised from 3: the fewest the mandatory steps and the hop cap 6 allow at T=20)" in plan.text
    plan = plan_run(uniform_schedule(5, 50), RunShape(20))  # round(2.0) = 2
    assert plan.schedule.num_keys == 5 and "(raised from 2:" in plan.text
    plan = plan_run(uniform_schedule(13, 50), RunShape(30))  # nothing to raise: evenly spaced as before
    assert list(plan.schedule.key_steps) == uniform_key_steps(30, 8) and "raised" not in plan.text


def expert_calls(t=20, split=10):
    high = RunShape(split, tuple(k / t for k in range(split)), split / t)
    low = RunShape(t - split, tuple(k / t for k in range(split, t)), 1.0)
    return high, low


@pytest.mark.parametrize("k, share", [(9, 4), (7, 4), (12, 6)])
def test_uniform_plans_a_joint_schedule_for_each_of_two_expert_calls(k, share):
    """Each call computes the budget's share of its 10 evaluations (round(K x 10 / 20)), its part of
    a joint plan of the whole trajectory in which every call starts afresh."""
    sched = uniform_schedule(k, 20)
    plans = [plan_run(sched, call) for call in expert_calls()]
    assert [p.schedule.num_keys for p in plans] == [share, share]
    for p in plans:
        assert {0, 1, 2, 10, 11, 12} <= set(p.joint_keys)  # each call starts afresh
        assert list(p.schedule.key_steps) == [x - p.offset for x in p.joint_keys if p.offset <= x < p.offset + 10]
        assert "this call computes" in p.text and "budget's share" in p.text


def test_uniform_plan_without_raise_is_uniform_key_steps():
    for t, k, first, last in [(50, 13, 3, 0), (30, 9, 2, 2), (20, 7, 3, 0)]:
        keys, used = uniform_plan(t, k, first, last)
        assert used == k and keys == uniform_key_steps(t, k, first, last)


# ------------------------------------------------------------------ ddim_uniform


def ddim_uniform_sigmas(table, steps):
    """ComfyUI's ddim_uniform rule: every stride-th entry of the sigma table from its second entry
    upwards, highest first, then 0 (written here from its description, for a table without a 0)."""
    stride = max(len(table) // steps, 1)
    picked = [float(table[x]) for x in range(1, len(table), stride)]
    return picked[::-1] + [0.0]


def test_ddim_uniform_is_a_whole_run():
    sigmas = ddim_uniform_sigmas(TABLE, 50)
    assert len(sigmas) == 51
    positions = positions_from_sigmas(sigmas, TABLE)
    assert 0.01 < positions[0] < 0.02  # below sigma_max by less than one stride
    run = RunShape(50, tuple(positions[:-1]), float(positions[-1]))
    assert starts_trajectory(run.positions) and not run.partial
    assert joint_trajectory(run, 3).total == 50 and joint_trajectory(run, 3).offset == 0
    # a window from step 1 of an evenly spaced run, or of ddim_uniform itself, is still partial
    simple = index_positions(50)
    assert RunShape(49, tuple(simple[1:-1]), 1.0).partial
    assert RunShape(49, tuple(positions[1:-1]), float(positions[-1])).partial


def test_ddim_uniform_calibration_writes_a_whole_run_pact(folder, caplog):
    (calib,) = DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "", 1, False)
    F.sample(calib, sigmas=ddim_uniform_sigmas(TABLE, 20))
    (name,) = os.listdir(folder)  # named family_sampler_scheduler_T: 20 evaluations, not a window of 21
    assert name.startswith("flux_euler_") and name.endswith("_20.safetensors")
    acc, meta = load_pact(str(folder / name))
    assert acc.num_evals == 20 and "windows" not in meta and meta["convention"] == "skip"
    sched, _, _ = make_schedule(name, 8, first_full_steps=2)
    patched = DPCacheApply().apply(F.FakePatcher(F.Flux()), sched)["result"][0]
    caplog.set_level(logging.INFO, logger="dpcache")
    F.sample(patched, sigmas=ddim_uniform_sigmas(TABLE, 20))  # the same run: the plan as it is
    assert "8 key evaluations computed, 12 skipped of 20" in caplog.text
    assert "planned for" not in caplog.text and "this call is" not in caplog.text


# ------------------------------------------------------------------ equal count, other sigmas


def test_equal_count_at_other_sigmas_is_remapped():
    t = 20
    cost = np.random.default_rng(1).random((t, t + 1, t + 1))
    even = tuple(index_positions(t))
    planner = Planner(t, Budget(keys=8), 3, cost=cost, positions=even, order=1, label="PACT")
    sched = Schedule(tuple(uniform_key_steps(t, 8)), t, planner=planner, convention="reference")
    same = plan_run(sched, RunShape(t, even[:-1], 1.0))
    assert same.schedule is sched and same.text == ""
    karras_like = tuple(float(p) for p in np.asarray(even) ** 0.6)  # other sigmas, the same count
    plan = plan_run(sched, RunShape(t, karras_like[:-1], 1.0))
    assert "re-mapped by sigma" in plan.text and plan.schedule.num_keys == 8
    unknown = plan_run(sched, RunShape(t))  # no sigmas known: nothing to re-map by
    assert unknown.schedule is sched


# ------------------------------------------------------------------ the calibration log line


@pytest.mark.parametrize("sample_size, kept", [(65536, "every cache-point element"), (16, "16 sampled cache-point elements per stream")])
def test_calibration_logs_what_it_really_keeps(folder, caplog, sample_size, kept):
    caplog.set_level(logging.INFO, logger="dpcache")
    (calib,) = DPCacheCalibrate().calibrate(F.FakePatcher(F.Flux()), "s", 1, False, sample_size)
    F.sample(calib)
    text = caplog.text
    assert f"keeping {kept}" in text and f"({10} evaluations, {kept})" in text
    assert "65536 sampled" not in text or sample_size != 65536


# ------------------------------------------------------------------ the demo and the test script


def test_demo_checks_its_output_folder_before_any_work(capsys, monkeypatch, tmp_path):
    import dpcache_demo.demo as demo

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started working before checking --out")

    monkeypatch.setattr(demo.toy_model, "load_builtin_model", no_work)
    monkeypatch.setattr(demo, "calibrate", no_work)
    for out in ("/proc/x", "/proc/x/y"):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--out", out])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--out {out} cannot be created" in err, err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "file")])
    assert "is a file" in capsys.readouterr().err


def test_demo_notes_a_speedup_above_the_ideal():
    from dpcache_demo.demo import speedup_note

    assert "noisy" in speedup_note(3.21, 2.86) and speedup_note(2.50, 2.86) == ""


def test_the_test_script_prints_skip_reasons():
    with open(os.path.join(ROOT, "scripts", "test.sh"), encoding="utf-8") as f:
        calls = [line for line in f if "-m pytest" in line]
    assert len(calls) == 2 and all(re.search(r"-m pytest .*-rs\b", line) for line in calls)


# ------------------------------------------------------------------ pictures


def test_comparison_picture_has_column_labels_and_a_caption_under_each_image():
    img = np.full((8, 8, 3), 255, dtype=np.uint8)
    plain = P.render_image_rows([("full", [img, img]), ("DPCache", [img, img])], scale=4)
    labelled = P.render_image_rows([("full", [img, img]), ("DPCache", [img, img])], scale=4,
                                   columns=["prompt 1", "prompt 2"], captions={1: ["PSNR 40.0 dB", "PSNR 41.0 dB"]})
    assert labelled.shape[0] > plain.shape[0]
    background = np.all(labelled == np.array(P.BACKGROUND, dtype=np.uint8), axis=-1)
    white = np.all(labelled == 255, axis=-1)
    rows = np.nonzero(white.any(axis=1))[0]
    top, bottom = rows.min(), rows.max()
    assert (~background[:top]).any()  # column labels above the images
    assert (~background[bottom + 1:] & ~white[bottom + 1:]).any()  # captions under the last row
    with pytest.raises(ValueError, match="captions"):
        P.render_image_rows([("full", [img])], captions={1: ["x"]})


def test_pact_picture_states_the_unit_of_cost():
    assert "mean |error|" in P.COST_UNIT
    c = np.where(np.random.default_rng(0).random((12, 13, 13)) > 0, 1.0, np.inf)
    with_unit = P.render_pact_path(c, [0, 1, 2, 5, 8])
    muted = np.all(with_unit == np.array(P.MUTED, dtype=np.uint8), axis=-1)
    assert muted[-3 * round(14 * 1.3):].any()  # the unit line at the bottom, under the legend
