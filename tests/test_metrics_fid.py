"""Tests of diffjax.metrics.fid: closed forms, identical sets, feature extraction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffjax import metrics


def _random_cov(rng, f, scale=1.0):
    a = rng.normal(size=(f, f)) * scale
    return a @ a.T / f + 0.1 * np.eye(f)


def test_identical_feature_sets_give_zero():
    feats = np.random.default_rng(0).normal(size=(500, 64))
    assert metrics.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
    # Rank-deficient covariance (N < F): the stable root still gives ~0.
    few = np.random.default_rng(1).normal(size=(20, 64))
    assert metrics.fid_from_features(few, few) == pytest.approx(0.0, abs=1e-5)


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.5, 2.0, size=8), rng.uniform(0.5, 2.0, size=8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(want, rel=1e-10)


def test_dense_gaussians_match_sqrtm_formula():
    rng = np.random.default_rng(3)
    f = 32
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    s1, s2 = _random_cov(rng, f), _random_cov(rng, f, 2.0)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-8)
    assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)


def test_samples_of_known_gaussians_approach_closed_form():
    rng = np.random.default_rng(4)
    f = 4
    mu1, mu2 = np.zeros(f), np.full(f, 0.5)
    s1, s2 = np.eye(f), 4.0 * np.eye(f)
    want = np.sum((mu1 - mu2) ** 2) + f * (1.0 - 2.0) ** 2  # = 5
    x1 = rng.multivariate_normal(mu1, s1, size=20000)
    x2 = rng.multivariate_normal(mu2, s2, size=20000)
    assert metrics.fid_from_features(x1, x2) == pytest.approx(want, rel=0.03)


def test_penultimate_features_of_a_flax_classifier_and_fid():
    from diffjax import models
    from diffjax.models import classifiers

    config = classifiers.digits_cnn_config()
    module = models.build("cnn", config)
    # Random weights of the right shapes without compiling the initialisers (slow on CPU).
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype), shapes)
    logits_fn = models.make_fn("cnn", config, variables, module=module)
    features_fn = metrics.penultimate_features(logits_fn)
    x = jax.random.uniform(jax.random.key(1), (10, 8, 8, 1))
    feats = jax.jit(features_fn)(x)
    assert feats.shape == (10, config["dense"])
    # The logits are the last Dense applied to these features.
    head = variables["params"]["out"]
    np.testing.assert_allclose(feats @ head["kernel"] + head["bias"], jax.jit(logits_fn)(x),
                               rtol=1e-5, atol=1e-5)
    # Batched extraction pads the last batch and drops the padding.
    batched = metrics.compute_features(features_fn, np.asarray(x), batch_size=4)
    np.testing.assert_allclose(batched, feats, rtol=1e-5, atol=1e-6)
    assert metrics.fid(features_fn, x, x, batch_size=4) == pytest.approx(0.0, abs=1e-5)
    y = jnp.clip(x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), 0.0, 1.0)
    assert metrics.fid(features_fn, x, y, batch_size=4) > 0.0


def test_statistics_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = metrics.feature_statistics(rng.normal(size=(50, 3)))
    metrics.save_statistics(tmp_path / "stats.npz", mu, sigma)
    mu2, sigma2 = metrics.load_statistics(tmp_path / "stats.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with pytest.raises(ValueError, match="^features: "):
        metrics.feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="^sigma2: "):
        metrics.frechet_distance(mu, sigma, mu, np.eye(4))
    with pytest.raises(ValueError, match="^features2: "):
        metrics.fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="^logits_fn: "):
        metrics.penultimate_features(lambda x: x.sum(axis=(1, 2, 3))[:, None])(
            jnp.zeros((2, 4, 4, 1)))
