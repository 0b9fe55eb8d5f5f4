"""Taylor predictor exactness, and the per-run state used by Apply and Calibrate."""
import numpy as np
import pytest
import torch

from dpcache_core import CacheRun, Schedule, ScheduleMismatchError, TaylorPredictor, TrajectoryRecorder, build_pact


def poly(coeffs):
    """A tensor-valued polynomial in the step: coeffs is (degree+1, *shape)."""
    return lambda t: sum(c * float(t) ** n for n, c in enumerate(coeffs))


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_exact_scheme_is_exact_on_polynomials_up_to_its_order(order):
    g = torch.Generator().manual_seed(order)
    f = poly(torch.randn(order + 1, 4, 5, generator=g, dtype=torch.float64).float())
    predictor = TaylorPredictor(order)
    for step in [0, 1, 3, 4, 9, 12][: order + 2]:  # irregular key steps
        predictor.update(step, f(step))
    for t in [13, 15, 20.5]:
        torch.testing.assert_close(predictor.predict(t), f(t), rtol=1e-4, atol=1e-3)


def test_exact_scheme_is_not_exact_beyond_its_order():
    f = poly(torch.tensor([[0.0], [0.0], [0.0], [1.0]]))  # t^3
    predictor = TaylorPredictor(2)
    for step in [0, 2, 5]:
        predictor.update(step, f(step))
    assert not torch.allclose(predictor.predict(9), f(9))


def test_reference_scheme_follows_the_taylorseer_recurrence():
    f = poly(torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.25, 0.1]]))
    predictor = TaylorPredictor(2, scheme="reference")
    for step in [0, 2, 5]:
        predictor.update(step, f(step))
    d1_prev = (f(2) - f(0)) / 2
    d1 = (f(5) - f(2)) / 3
    d2 = (d1 - d1_prev) / 3
    torch.testing.assert_close(predictor.predict(8), f(5) + d1 * 3 + d2 * 9 / 2)
    linear = poly(torch.tensor([[1.0], [3.0]]))
    predictor = TaylorPredictor(2, scheme="reference")
    for step in [0, 1, 4]:
        predictor.update(step, linear(step))
    torch.testing.assert_close(predictor.predict(10), linear(10))  # exact up to degree 1


def test_derivatives_after_rule_and_history():
    predictor = TaylorPredictor(2, scheme="reference", derivatives_after=1)
    for step in [0, 1]:
        predictor.update(step, torch.tensor([float(step)]))
    assert len(predictor.factors) == 1  # no derivative refreshed at steps <= 1
    predictor.update(2, torch.tensor([2.0]))
    assert len(predictor.factors) == 2  # the previous key had no first derivative
    predictor.update(5, torch.tensor([5.0]))
    assert len(predictor.factors) == 3


def test_predictor_never_aliases_or_writes_its_inputs():
    feature = torch.ones(3)
    predictor = TaylorPredictor(1)
    predictor.update(0, feature)
    feature.add_(5)  # the caller (a FLUX block) mutates in place afterwards
    out = predictor.predict(1)
    assert torch.equal(out, torch.ones(3))
    out.add_(1)
    assert torch.equal(predictor.predict(1), torch.ones(3))
    with pytest.raises(ValueError, match="must increase"):
        predictor.update(0, feature)
    with pytest.raises(RuntimeError, match="before any update"):
        TaylorPredictor(1).predict(3)
    with pytest.raises(ValueError, match="unknown predictor scheme"):
        TaylorPredictor(1, scheme="magic")


def test_cache_run_follows_the_schedule_per_stream():
    schedule = Schedule((0, 1, 2, 6), num_evals=8, order=1, scheme="exact", first_full_steps=3)
    run = CacheRun(schedule)
    f = lambda t: torch.full((2, 3), 1.0 + 0.5 * t)  # noqa: E731
    decisions = []
    for t in range(8):
        key = run.start_evaluation()
        decisions.append(key)
        for stream, offset in (("cond", 0.0), ("uncond", 10.0)):
            if key:
                run.update(stream, f(t) + offset)
            else:
                torch.testing.assert_close(run.predict(stream), f(t) + offset)
    assert decisions == [True, True, True, False, False, False, True, False]
    assert (run.computed, run.skipped) == (4, 4)
    assert run.nbytes() == 2 * 2 * 6 * 4  # two streams, two factors of 6 float32 each
    assert "4 key evaluations computed, 4 skipped of 8" in run.summary()
    with pytest.raises(ScheduleMismatchError, match="makes 9 model evaluations but .* T=8: set total_evaluations=9"):
        run.start_evaluation()
    run.close()
    assert run.nbytes() == 0


def test_cache_run_force_key_and_unknown_stream():
    run = CacheRun(Schedule((0, 3), num_evals=5, first_full_steps=1))
    run.start_evaluation()
    run.update("cond", torch.zeros(2))
    assert run.start_evaluation() is False
    run.force_key()
    assert run.is_key and run.forced == 1 and run.computed == 2 and run.skipped == 0
    run.update("cond", torch.ones(2))
    run.start_evaluation()
    with pytest.raises(RuntimeError, match="no key evaluation for stream 'uncond'"):
        run.predict("uncond")
    assert "1 forced" in run.summary()


def test_recorder_builds_the_mean_of_complete_streams():
    g = torch.Generator().manual_seed(0)
    trajectories = {s: [torch.randn(4, generator=g) * 0.1 + t for t in range(10)] for s in ("cond", "uncond")}
    recorder = TrajectoryRecorder(storage_device="cpu")
    for t in range(10):
        recorder.start_evaluation()
        for stream, features in trajectories.items():
            recorder.record(stream, features[t])
        if t != 4:
            recorder.record("late", torch.zeros(4))  # misses an evaluation: left out
    assert recorder.num_evals == 10 and sorted(recorder.complete_streams()) == ["cond", "uncond"]
    progress = []
    sample = recorder.build_sample(progress=lambda d, n: progress.append((d, n)))
    expected = (build_pact(trajectories["cond"]) + build_pact(trajectories["uncond"])) / 2
    np.testing.assert_allclose(sample, expected, rtol=1e-12)
    assert progress[-1] == (16, 16)
    recorder.close()
    with pytest.raises(ValueError, match="no stream was recorded at every evaluation"):
        recorder.build_sample()


def test_16_bit_features_are_kept_in_16_bit_and_derivatives_in_float32():
    f = lambda t: torch.linspace(0, 1, 1000) * (1 + 0.1 * t)  # noqa: E731
    half = TaylorPredictor(1, scheme="reference")
    full = TaylorPredictor(1, scheme="reference")
    for step in (0, 4):
        half.update(step, f(step).bfloat16())
        full.update(step, f(step).bfloat16().float())
    assert half.factors[0].dtype == torch.bfloat16 and half.factors[1].dtype == torch.float32
    assert half.nbytes() == 1000 * (2 + 4)  # vs 1000 * 8 all in float32
    out = half.predict(9)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, full.predict(9))  # keeping the bf16 value loses nothing


def test_recorder_builds_on_the_device_the_features_came_from(monkeypatch):
    import dpcache_core.runtime as runtime

    seen = []
    real = runtime.build_pact
    monkeypatch.setattr(runtime, "build_pact", lambda feats, **kw: real([seen.append(f.device) or f for f in feats], **kw))
    recorder = TrajectoryRecorder(storage_device="cpu")
    for t in range(6):
        recorder.start_evaluation()
        recorder.record("cond", torch.full((3,), float(t)))
    assert recorder.source_device == torch.device("cpu")
    recorder.build_sample()
    assert seen and all(d == torch.device("cpu") for d in seen)
