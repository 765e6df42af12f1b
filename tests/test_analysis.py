"""Tests of diffjax.analysis: the logistic fit recovers known parameters, its intervals,
prediction and the rank correlation."""

import json

import jax
import numpy as np
import pytest
import scipy.stats

from diffjax import analysis

TRUE = {"upper": 0.9, "lower": 0.1, "slope": 12.0, "midpoint": 0.5}


def _data(n=30, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(0.05, 1.0, n)
    y = analysis.sigmoid(x, **TRUE) + rng.normal(scale=noise, size=n)
    return x, y


def test_noise_free_data_recovered_exactly():
    x, _ = _data()
    fit = analysis.fit_sigmoid(x, analysis.sigmoid(x, **TRUE))
    for k, v in TRUE.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)
    assert fit.fixed == ()


def test_noisy_fit_recovers_parameters_within_intervals():
    x, y = _data()
    fit = analysis.fit_sigmoid(x, y)
    for k, v in TRUE.items():
        lo, hi = fit.ci[k]
        assert lo < fit.params[k] < hi
        assert abs(fit.params[k] - v) <= 4 * fit.stderr[k]
        assert 0 < fit.stderr[k]
    assert fit.r2 > 0.99
    # Intervals shrink with less noise.
    tight = analysis.fit_sigmoid(*_data(noise=0.002))
    assert tight.stderr["slope"] < fit.stderr["slope"]
    # Coverage over repeated experiments is about the nominal level.
    covered = 0
    for seed in range(40):
        f = analysis.fit_sigmoid(*_data(seed=seed + 1))
        covered += f.ci["midpoint"][0] < TRUE["midpoint"] < f.ci["midpoint"][1]
    assert covered >= 33  # 95% nominal; 33/40 is well below the binomial 1% tail


def test_fixed_asymptotes():
    x, y = _data(n=8)
    fit = analysis.fit_sigmoid(x, y, upper=0.9, lower=0.1)
    assert fit.fixed == ("upper", "lower")
    assert fit.params["upper"] == 0.9 and fit.params["lower"] == 0.1
    assert fit.stderr["upper"] == 0.0 and fit.ci["lower"] == (0.1, 0.1)
    assert fit.params["slope"] == pytest.approx(TRUE["slope"], rel=0.2)
    assert fit.params["midpoint"] == pytest.approx(TRUE["midpoint"], abs=0.03)
    # Two points suffice for two free parameters (intervals then undetermined).
    two = analysis.fit_sigmoid([0.3, 0.7], analysis.sigmoid(np.array([0.3, 0.7]), **TRUE),
                               upper=0.9, lower=0.1)
    assert two.params["slope"] == pytest.approx(TRUE["slope"], rel=1e-5)
    assert np.isnan(two.ci["slope"][0])


def test_bootstrap_intervals_agree_with_covariance_and_are_reproducible():
    x, y = _data(n=15)
    key = jax.random.key(3)
    fit = analysis.fit_sigmoid(x, y, ci_method="bootstrap", num_bootstrap=100, key=key)
    cov = analysis.fit_sigmoid(x, y)
    for k in TRUE:
        lo, hi = fit.ci[k]
        assert lo < fit.params[k] < hi, k
        ratio = (hi - lo) / (cov.ci[k][1] - cov.ci[k][0])
        assert 1 / 3 < ratio < 3, (k, ratio)
        assert abs(fit.params[k] - TRUE[k]) < 2 * (hi - lo), k
    again = analysis.fit_sigmoid(x, y, ci_method="bootstrap", num_bootstrap=100, key=key)
    assert again.ci == fit.ci
    other = analysis.fit_sigmoid(x, y, ci_method="bootstrap", num_bootstrap=100,
                                 key=jax.random.key(4))
    assert other.ci != fit.ci


def test_predict_and_to_dict():
    x, y = _data()
    fit = analysis.fit_sigmoid(x, y)
    rates = np.array([0.0, 0.25, 0.5, 0.75, 1.5])
    pred = analysis.predict(fit, rates)
    assert pred.shape == rates.shape
    assert np.all(np.diff(pred) < 0)  # more compression, more robustness
    assert pred[0] == pytest.approx(fit.params["upper"], abs=0.01)
    assert pred[-1] == pytest.approx(fit.params["lower"], abs=0.01)
    np.testing.assert_allclose(fit(rates), pred)
    d = json.loads(json.dumps(fit.to_dict()))
    assert set(d["params"]) == set(analysis.PARAM_NAMES) and "r2" in d
    np.testing.assert_allclose(analysis.predict(d, rates), pred)


def test_rank_correlation_and_ranking():
    x, y = _data(n=12)
    for method, ref in (("spearman", scipy.stats.spearmanr), ("kendall", scipy.stats.kendalltau)):
        res = analysis.rank_correlation(x, y, method=method)
        assert res["statistic"] == pytest.approx(ref(x, y).statistic)
        assert res["statistic"] < -0.9 and res["pvalue"] < 1e-3
    exact = analysis.rank_correlation([0.2, 0.4, 0.8], [0.7, 0.5, 0.2])
    assert exact["statistic"] == pytest.approx(-1.0)
    fit = analysis.fit_sigmoid(x, y)
    ranked = analysis.rank_purifiers([0.6, 0.2, 0.4], ["ddpm", "reverse_only", "ddim"], fit=fit)
    assert [r["name"] for r in ranked] == ["reverse_only", "ddim", "ddpm"]
    preds = [r["predicted_robust_accuracy"] for r in ranked]
    assert preds == sorted(preds, reverse=True)


def test_errors():
    with pytest.raises(ValueError, match="^robust_accuracy: "):
        analysis.fit_sigmoid([0.1, 0.2, 0.3, 0.4], [0.5, 0.4])
    with pytest.raises(ValueError, match="^rates: .*at least 4"):
        analysis.fit_sigmoid([0.1, 0.2, 0.3], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="^rates: "):
        analysis.fit_sigmoid([0.1, np.nan, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="^ci_method: "):
        analysis.fit_sigmoid(*_data(), ci_method="jackknife")
    with pytest.raises(ValueError, match="^method: "):
        analysis.rank_correlation([1, 2, 3], [3, 2, 1], method="pearson")
    with pytest.raises(ValueError, match="^fit: "):
        analysis.predict({"upper": 1.0}, 0.5)
