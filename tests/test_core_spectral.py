"""The spectral forecaster (exact ridge fit, blend, memory)."""
import numpy as np
import pytest
import torch

from dpcache_core import CacheRun, Schedule, SpectralPredictor
from dpcache_core.spectral import chebyshev_basis


def direct_ridge_prediction(times, features, t, degree, ridge, blend, centred=False):
    """Spectrum's forecast by a direct solve: the Chebyshev coefficients by least squares on the
    ridge-augmented system [X; sqrt(lambda) I] C = [H; 0], blended with the linear extrapolation;
    ``centred``: the same fit of the deviations H - H_newest, added to H_newest."""
    tau = 2 * np.asarray(times) - 1
    design = np.polynomial.chebyshev.chebvander(tau, degree)
    origin = features[-1] if centred else np.zeros_like(features[-1])
    augmented = np.vstack([design, np.sqrt(ridge) * np.eye(degree + 1)])
    targets = np.vstack([features - origin, np.zeros((degree + 1, features.shape[1]))])
    coef = np.linalg.lstsq(augmented, targets, rcond=None)[0]
    spectral = origin + np.polynomial.chebyshev.chebvander(np.array([2 * t - 1]), degree) @ coef
    k = (t - times[-1]) / (times[-1] - times[-2])
    linear = features[-1] + k * (features[-1] - features[-2])
    return blend * spectral[0] + (1 - blend) * linear


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("degree, ridge, blend", [(4, 0.1, 0.5), (3, 1e-3, 1.0), (6, 1.0, 0.25), (2, 0.1, 0.0)])
def test_prediction_matches_a_direct_least_squares_solve(degree, ridge, blend, centred):
    rng = np.random.default_rng(degree)
    times = np.array([0.0, 0.02, 0.04, 0.1, 0.18, 0.3, 0.44])
    features = rng.standard_normal((len(times), 37))
    predictor = SpectralPredictor(degree, ridge, blend, max_history=16, centred=centred)
    for t, f in zip(times, features):
        predictor.update(t, torch.from_numpy(f).float())
    for t in (0.46, 0.6, 0.9):
        want = direct_ridge_prediction(times, features.astype(np.float32).astype(np.float64), t, degree, ridge, blend,
                                       centred)
        np.testing.assert_allclose(predictor.predict(t).double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_ring_keeps_only_the_last_features_and_fits_those():
    rng = np.random.default_rng(1)
    times = np.linspace(0, 0.8, 9)
    features = rng.standard_normal((9, 5))
    predictor = SpectralPredictor(max_history=4)
    for t, f in zip(times, features):
        predictor.update(t, torch.from_numpy(f).float())
    assert list(predictor.times) == list(times[-4:])
    assert predictor.nbytes() == 4 * 5 * 4
    want = direct_ridge_prediction(times[-4:], features[-4:].astype(np.float32).astype(np.float64), 0.9, 4, 0.1, 0.5,
                                   centred=True)
    np.testing.assert_allclose(predictor.predict(0.9).double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_chebyshev_basis_is_the_chebyshev_polynomials():
    tau = np.linspace(-1, 1, 7)
    np.testing.assert_allclose(chebyshev_basis(tau, 5), np.polynomial.chebyshev.chebvander(tau, 5))


def test_linear_part_is_exact_on_lines_and_inputs_are_untouched():
    line = lambda t: torch.tensor([1.0, -2.0]) + t * torch.tensor([3.0, 0.5])  # noqa: E731
    predictor = SpectralPredictor(blend=0.0)
    for t in (0.0, 0.1, 0.3):
        feature = line(t)
        predictor.update(t, feature)
        feature.add_(100)  # a block may write its output afterwards
    torch.testing.assert_close(predictor.predict(0.7), line(0.7))
    with pytest.raises(ValueError, match="must increase"):
        predictor.update(0.3, line(0.3))
    with pytest.raises(RuntimeError, match="before any update"):
        SpectralPredictor().predict(0.5)
    for bad in ({"blend": 1.5}, {"ridge": 0.0}, {"max_history": 1}, {"degree": -1}):
        with pytest.raises(ValueError):
            SpectralPredictor(**bad)


def test_sixteen_bit_features_stay_sixteen_bit():
    predictor = SpectralPredictor()
    predictor.update(0.0, torch.ones(10, dtype=torch.bfloat16))
    predictor.update(0.1, torch.ones(10, dtype=torch.bfloat16))
    assert predictor.nbytes() == 2 * 10 * 2
    assert predictor.predict(0.2).dtype == torch.float32


def test_cache_run_builds_the_spectral_forecaster_on_positions():
    schedule = Schedule((0, 1, 2, 5), num_evals=8, predictor="spectral")
    run = CacheRun(schedule)
    f = lambda t: torch.full((2, 3), 1.0 + 0.5 * t)  # noqa: E731
    seen = []
    for index in range(8):
        if run.start_evaluation():
            run.update("cond", f(index))
        else:
            seen.append(run.predict("cond"))
    predictor = run.predictors["cond"]
    assert isinstance(predictor, SpectralPredictor)
    assert list(predictor.times) == [0.0, 1 / 8, 2 / 8, 5 / 8]
    assert run.computed == 4 and run.skipped == 4
    assert run.nbytes() == 4 * 6 * 4
    with pytest.raises(ValueError, match="unknown forecaster"):
        Schedule((0, 1), num_evals=4, predictor="fourier")


@pytest.mark.parametrize("blend", [1.0, 0.5])
@pytest.mark.parametrize("keys", [[0], [0, 1], [0, 1, 2], [0, 1, 2, 4, 8], [0, 1, 2, 4, 8, 13, 19, 25, 32, 40]])
def test_centred_fit_forecasts_a_constant_exactly(blend, keys):
    """Pure-spectral (blend 1) weights summed to 0.78-0.97 before: a constant 1000 came out as 917 or 791."""
    times = [k / 50 for k in keys]
    constant, paper = SpectralPredictor(blend=blend), SpectralPredictor(blend=blend, centred=False)
    for t in times:
        constant.update(t, torch.full((2,), 1000.0))
        paper.update(t, torch.full((2,), 1000.0))
    for t in (times[-1] + 1 / 50, times[-1] + 7 / 50, 1.0):
        assert constant.weights(t).sum() == pytest.approx(1.0, abs=1e-9)
        torch.testing.assert_close(constant.predict(t), torch.full((2,), 1000.0), rtol=1e-6, atol=1e-3)
        if blend == 1.0:  # the paper's fit shrinks it
            assert float(paper.predict(t)[0]) < 999


@pytest.mark.parametrize("keys", [[0, 1, 2, 4, 8], [0, 1, 2, 4, 8, 13, 19, 25, 32, 40]])
def test_centred_fit_follows_a_linear_ramp_closer_than_the_paper_fit(keys):
    """Lines are not exact (the ridge still shrinks the slope; a fit that made them exact lost 4-7 dB
    on the trained FLUX model), but the error is under a third of the paper fit's."""
    line = lambda t: torch.tensor([1000.0, -3.0]) + t * torch.tensor([-250.0, 40.0])  # noqa: E731
    centred, paper = SpectralPredictor(blend=1.0), SpectralPredictor(blend=1.0, centred=False)
    for k in keys:
        centred.update(k / 50, line(k / 50))
        paper.update(k / 50, line(k / 50))
    for t in (keys[-1] + 1) / 50, (keys[-1] + 7) / 50:
        error, before = (float((p.predict(t) - line(t)).abs().max()) for p in (centred, paper))
        assert error < 0.3 * before
