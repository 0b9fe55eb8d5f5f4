"""The quick-start demo end to end, at a tiny size."""
import os
import re

import pytest

from dpcache_core import load_pact
from dpcache_demo.demo import main


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    result = main(["--steps", "12", "--keys", "6", "--calibration-prompts", "2", "--test-prompts", "2",
                   "--repeats", "1", "--out", str(out)])
    assert result["computed"] == 6 and len(result["key_steps"]) == 6
    assert result["ideal_speedup"] == 2.0 and result["speedup"] > 0
    # At this tiny size (T=12, K=6, hop cap 3) the skip-only plan computes the last step and is
    # 2 dB below the reference-convention plan (34.1 vs 36.1 dB, rel. L1 0.108 vs 0.084); at the
    # demo's T=50, K=13 it is 2.3 dB above (BENCHMARKS.md, planning objective).
    assert result["psnr_db"] > 30 and result["relative_l1"] < 0.15
    acc, meta = load_pact(str(out / "demo_pact.safetensors"))
    assert acc.samples == 2 and meta["num_evals"] == 12 and meta["model_family"] == "flux"
    for name in ("pact_schedule.png", "full_vs_dpcache.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    for line in ("evaluations      6 computed in full, 6 predicted", "speed-up", "PSNR"):
        assert line in printed
    assert sorted(os.listdir(out)) == ["demo_pact.safetensors", "full_vs_dpcache.png", "pact_schedule.png"]


@pytest.mark.parametrize("argv, message", [
    (["--keys", "0"], "--keys must be between 6 and 50"),
    (["--keys", "2"], "--keys must be between 6 and 50"),
    (["--keys", "100"], "--keys must be between 6 and 50"),
    (["--steps", "3", "--order", "3"], "--steps must be between 4 "),
    (["--steps", "500"], "--steps must be between 2 .*and 200"),
    (["--order", "0"], "--order must be 1, 2 or 3"),
    (["--first-full-steps", "0"], "--first-full-steps must be between 1 and"),
    (["--calibration-prompts", "0"], "--calibration-prompts must be at least 1"),
    (["--repeats", "-1"], "--repeats must be at least 1"),
    (["--shift", "nan"], "--shift must be a positive number"),
])
def test_bad_arguments_fail_at_once_with_one_line(argv, message, capsys, monkeypatch):
    import dpcache_demo.demo as demo

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started working before checking its arguments")

    monkeypatch.setattr(demo.toy_model, "load_builtin_model", no_work)
    monkeypatch.setattr(demo, "calibrate", no_work)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert "Traceback" not in err and "last_full_steps" not in err


@pytest.mark.parametrize("steps, first, order", [(12, 3, 1), (12, 1, 2), (20, 3, 2), (7, 1, 1), (50, 3, 1)])
def test_smallest_feasible_keys_matches_the_dp_on_a_real_pact(steps, first, order):
    """The bound the demo checks is the smallest K the exact DP can solve on a PACT built like the demo's."""
    import torch

    from dpcache_core import build_pact, solve_schedule
    from dpcache_demo.demo import smallest_feasible_keys

    features = [torch.randn(8, generator=torch.Generator().manual_seed(t)) for t in range(steps)]
    cost = build_pact(features, order=order)
    low = smallest_feasible_keys(steps, first, order)
    assert len(solve_schedule(cost, low, first)) == low
    if low > max(first, 1):
        with pytest.raises(ValueError, match=f"the smallest K that works is {low}"):
            solve_schedule(cost, low - 1, first)


@pytest.mark.parametrize("steps, keys", [(50, 13), (30, 8), (20, 5), (10, 5), (8, 5), (200, 52)])
def test_the_default_keys_follow_the_step_count(steps, keys, tmp_path):
    """--steps 10 alone used to fail (K stayed 13); K = round(T / 3.85), raised to what the hop cap needs."""
    from dpcache_demo.demo import build_parser, argument_problem

    args = build_parser().parse_args(["--steps", str(steps), "--out", str(tmp_path)])
    assert argument_problem(args) is None and args.keys == keys


def test_every_step_count_has_a_default_k_that_plans():
    from dpcache_demo.demo import default_keys, smallest_feasible_keys

    for order in (1, 2, 3):
        for first in (1, 3, 5):
            for steps in range(max(order + 1, first), 201):
                k = default_keys(steps, first, order)
                assert smallest_feasible_keys(steps, first, order) <= k <= steps and k >= min(first + 1, steps)


def test_help_shows_the_defaults_and_the_hop_cap(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 50)", "(default: 3)", "(default: 4)", "(default: builtin)", "(default: out/demo)", "13 at T = 50"):
        assert default in text, default
    assert "Hop cap: no two consecutive key evaluations may be more than max(int(0.3 T), 1)" in text
    assert "about 20 min on 2 CPU cores" in text


def test_an_interrupted_run_keeps_what_finished_and_says_the_time_first(tmp_path, capsys, monkeypatch):
    import dpcache_demo.demo as demo

    real, calls = demo.accelerated_sample, []

    def interrupted_on_the_second_prompt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "accelerated_sample", interrupted_on_the_second_prompt)
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "12", "--keys", "6", "--calibration-prompts", "1", "--test-prompts", "3", "--repeats", "1",
              "--out", str(out)])
    assert exit_info.value.code == 130
    captured = capsys.readouterr()
    assert captured.out.lstrip().startswith("expected time    about ")
    assert "interrupted; kept " in captured.err and "full_vs_dpcache.png" in captured.err
    assert sorted(os.listdir(out)) == ["demo_pact.safetensors", "full_vs_dpcache.png", "pact_schedule.png"]
    from PIL import Image

    with Image.open(out / "full_vs_dpcache.png") as picture:  # one column: the prompt that finished
        one_column = picture.size
    main(["--steps", "12", "--keys", "6", "--calibration-prompts", "1", "--test-prompts", "2", "--repeats", "1",
          "--out", str(tmp_path / "two")])
    with Image.open(tmp_path / "two" / "full_vs_dpcache.png") as picture:
        assert picture.size[0] > one_column[0]


def test_an_interrupt_during_calibration_ends_with_one_line(tmp_path, capsys, monkeypatch):
    import dpcache_demo.demo as demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "calibrate", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "12", "--out", str(tmp_path)])
    assert exit_info.value.code == 130
    assert "interrupted; kept nothing yet (calibration had not finished)" in capsys.readouterr().err
