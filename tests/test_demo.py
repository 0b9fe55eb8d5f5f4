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
