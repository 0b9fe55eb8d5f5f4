"""Check runs (dpcache_core.check_runs): the K checked, how results accumulate in a PACT's metadata,
and how they decide DPCache Schedule's forecaster "auto" (choose.replay_choice)."""
import math

import pytest
import torch

import dpcache_core as core
from dpcache_core import check_runs, choose
from test_core_choose import T, chebyshev, linear


def test_checked_ks_are_the_speedups_of_the_schedule_node():
    assert check_runs.check_ks(50) == [25, 17, 13, 10, 9]
    assert check_runs.check_ks(30) == [15, 10, 8, 6, 5]
    assert check_runs.check_ks(8) == [4]  # 8/3, 8/5 and 8/5.5 round to 3, 2 and 1: not above the 3 first full steps
    assert check_runs.check_ks(4) == []


def test_latent_psnr():
    ref = torch.linspace(0, 2, 100)
    assert check_runs.latent_psnr(ref.clone(), ref) == check_runs.MAX_DB
    noisy = ref + 0.02
    assert check_runs.latent_psnr(noisy, ref) == pytest.approx(10 * math.log10(4 / 0.0004))
    assert check_runs.latent_psnr(ref * float("nan"), ref) == -check_runs.MAX_DB


def test_results_accumulate_run_by_run():
    one = check_runs.with_check(None, {13: {"taylor 1": 40.0, "spectral": 42.0}}, {13: {"taylor 1": [0, 1, 2, 5]}})
    two = check_runs.with_check(one, {13: {"taylor 1": 44.0, "spectral": 41.0}, 25: {"taylor 1": 50.0}},
                                {13: {"taylor 1": [0, 1, 2, 6]}})
    assert one == {"runs": 1, "ks": {"13": {"taylor 1": [40.0], "spectral": [42.0]}}, "keys": {"13": {"taylor 1": [0, 1, 2, 5]}}}
    assert two["keys"] == {"13": {"taylor 1": [0, 1, 2, 6]}}  # the last run's key sets
    assert two["runs"] == 2 and two["ks"]["13"] == {"taylor 1": [40.0, 44.0], "spectral": [42.0, 41.0]}
    assert check_runs.runs_of({"forecaster_checks": two}) == 2 and check_runs.runs_of({}) == 0
    k, means = check_runs.checked_ranking({"forecaster_checks": two}, 14)
    assert k == 13 and means == {"taylor 1": 42.0, "spectral": 41.5}


@pytest.mark.parametrize("asked, checked", [(13, 13), (11, 10), (12, 13), (16, 17), (21, 25), (9, 10), (8, 10), (7, None), (40, None)])
def test_the_nearest_checked_k_decides_within_reach(asked, checked):
    meta = {"forecaster_checks": check_runs.with_check(None, {k: {"taylor 1": 1.0} for k in (25, 17, 13, 10)})}
    found = check_runs.checked_ranking(meta, asked)
    assert (found[0] if found else None) == checked


def test_checks_in_reach_nearest_first():
    meta = {"forecaster_checks": check_runs.with_check(None, {k: {"taylor 1": float(k)} for k in (25, 17, 13, 10, 9)})}
    assert [k for k, _ in check_runs.checks_in_reach(meta, 9)] == [9, 10]  # 13 is beyond the reach
    assert [k for k, _ in check_runs.checks_in_reach(meta, 8)] == [9, 10]  # 10 / 8 is the reach itself
    assert [k for k, _ in check_runs.checks_in_reach(meta, 15)] == [17, 13]  # 17 / 15 < 15 / 13
    assert check_runs.checks_in_reach(meta, 40) == [] and check_runs.checks_in_reach({}, 9) == []


def test_a_level_pair_of_one_forecaster_goes_to_the_next_check():
    level = {"spectral": 40.50, "spectral (history-exact plan)": 40.56, "taylor 1": 36.7}
    assert choose.fastest_level(level) == "spectral (history-exact plan)"  # no other check: the better scored
    assert choose.fastest_level(level, next_check={"spectral": 42.3, "spectral (history-exact plan)": 41.4}) == "spectral"
    # a next check that measured only one of them does not decide: the better scored here
    assert choose.fastest_level(level, next_check={"spectral": 42.3}) == "spectral (history-exact plan)"
    # the next check never overrides the band or the speed order: Taylor 1 within 0.5 dB wins over both
    near = dict(level, **{"taylor 1": 40.1})
    assert choose.fastest_level(near, next_check={"spectral": 99.0, "taylor 1": 0.0}) == "taylor 1"


def file_with_checks(results, trajectories):
    acc = core.PactAccumulator(T)
    for traj in trajectories:
        acc.add(core.build_pact(torch.from_numpy(traj), order=1), trajectories=traj[None])
    meta = {"order": 1, "scheme": "reference", "convention": "skip", "model_family": "flux"}
    if results is not None:
        meta["forecaster_checks"] = check_runs.with_check(None, results)
    return acc, meta


def test_checks_override_the_replay_and_keep_its_key_set():
    acc, meta = file_with_checks({13: {"taylor 1": 30.0, "taylor 2": 31.0, "spectral": 45.0}}, linear())
    alone = choose.replay_choice(acc, meta, 13, checks=False)
    assert alone.best.name == "taylor 1" and alone.checked is None  # the replay: Taylor is exact on lines
    choice = choose.replay_choice(acc, meta, 13)
    spectral = min((c for c in alone.candidates if c.name == "spectral"), key=lambda c: c.error)
    assert choice.best == spectral and choice.runner_up.name == "taylor 2"
    assert choice.checked == (13, {"taylor 1": 30.0, "taylor 2": 31.0, "spectral": 45.0}, "spectral", "taylor 2")
    text = choice.describe()
    assert "check runs at K=13: spectral (45.0 dB" in text and "runner-up Taylor 2 (31.0 dB)" in text


def test_level_checks_go_to_the_faster_forecaster():
    acc, meta = file_with_checks({13: {"taylor 1": 40.0, "taylor 2": 40.2, "spectral": 40.45}}, chebyshev())
    assert choose.replay_choice(acc, meta, 13).best.name == "taylor 1"  # within CHECK_TIE_DB of the best
    acc, meta = file_with_checks({13: {"taylor 1": 40.0, "taylor 2": 40.2, "spectral": 40.65}}, chebyshev())
    assert choose.replay_choice(acc, meta, 13).best.name == "taylor 2"  # Taylor 1 is not level any more


def test_out_of_reach_or_no_checks_the_replay_decides():
    acc, meta = file_with_checks({25: {"taylor 1": 30.0, "spectral": 45.0}}, linear())
    assert choose.replay_choice(acc, meta, 13) == choose.replay_choice(acc, meta, 13, checks=False)
    acc, meta = file_with_checks(None, linear())
    assert choose.replay_choice(acc, meta, 13).checked is None


@pytest.mark.parametrize("k", [13, 12])
def test_a_history_plan_label_plans_its_keys_on_the_file_now(k):
    label = "taylor 2" + check_runs.HISTORY_PLAN
    results = {13: {"taylor 1": 30.0, "taylor 2": 31.0, label: 40.0, "spectral": 39.9}}
    acc, meta = file_with_checks(results, chebyshev())
    meta["forecaster_checks"]["keys"] = {"13": {label: [0, 1, 2, 4, 7, 11, 16, 22, 30, 38, 44, 47, 49]}}  # not used
    history = tuple(choose.trajectory_history_plan(acc.trajectories, k, 3))
    choice = choose.replay_choice(acc, meta, k)
    assert choice.best.name == "taylor 2" and choice.best.keys == history  # level with spectral: the faster
    assert choice.best.plan == "history-exact costs of the trajectories"
    assert choice.checked[2] == label and choice.runner_up.name == "spectral"
    assert "check runs at K=13: Taylor 2 (history-exact plan) (40.0 dB" in choice.describe()
    assert check_runs.forecaster_of(label) == "taylor 2" and check_runs.forecaster_of("spectral") == "spectral"
    plain = choose.replay_choice(acc, {**meta, "forecaster_checks": check_runs.with_check(None, {13: {"taylor 2": 40.0}})}, k)
    replayed = min((c for c in plain.candidates if c.name == "taylor 2"), key=lambda c: c.error)
    assert plain.best == replayed  # the plain label: the forecaster's replay-best keys


def test_the_next_check_in_reach_decides_between_level_plans_of_one_forecaster():
    label = "taylor 2" + check_runs.HISTORY_PLAN
    level = {"taylor 2": 40.0, label: 40.1, "spectral": 30.0}
    history = tuple(choose.trajectory_history_plan(file_with_checks(None, chebyshev())[0].trajectories, 12, 3))
    acc, meta = file_with_checks({13: level}, chebyshev())
    assert choose.replay_choice(acc, meta, 12).best.keys == history  # one check in reach: the better measured
    for after, wins_history in (({"taylor 2": 45.0, label: 41.0}, False), ({"taylor 2": 41.0, label: 45.0}, True)):
        acc, meta = file_with_checks({13: level, 10: after}, chebyshev())
        choice = choose.replay_choice(acc, meta, 12)  # 13 is nearest, 10 the next in reach
        assert choice.checked[0] == 13 and choice.checked[2] == (label if wins_history else "taylor 2")
        assert (choice.best.keys == history) == wins_history
        assert choice.next_check == (None if wins_history else (10, label))  # by score alone: the history plan
        text = choice.describe()
        assert ("the check at K=10 measured it better" in text) != wins_history, text
        if not wins_history:
            assert "K=13: Taylor 2 (40.0 dB" in text and "level with Taylor 2 (history-exact plan) (40.1 dB)" in text


def test_a_plain_label_never_takes_the_history_plan_added_for_another():
    label = "taylor 2" + check_runs.HISTORY_PLAN
    acc, meta = file_with_checks({13: {"taylor 2": 45.0, label: 30.0, "spectral": 20.0}}, chebyshev())
    choice = choose.replay_choice(acc, meta, 13)
    alone = choose.replay_choice(acc, meta, 13, checks=False)
    replayed = min((c for c in alone.candidates if c.name == "taylor 2"), key=lambda c: c.error)
    assert choice.best == replayed and choice.checked[2] == "taylor 2"


def test_merged_files_keep_every_check_run(tmp_path):
    from dpcache_core import merge
    for i, name in enumerate(("a", "b")):
        acc, meta = file_with_checks({10: {"taylor 1": 40.0 + i, "spectral": 30.0}}, linear(seed=i))
        core.save_pact(str(tmp_path / f"{name}.safetensors"), acc, meta)
    _, meta = merge.merge_pacts([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    assert meta["forecaster_checks"]["runs"] == 2
    assert meta["forecaster_checks"]["ks"] == {"10": {"taylor 1": [40.0, 41.0], "spectral": [30.0, 30.0]}}
