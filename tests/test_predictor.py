"""Robustness predicted from compression (the hyperspherical cap), on a linear model where
everything is known in closed form: critical distances margin / ||w||_1 (l_inf) or
margin / ||w||_2 (l_2), and a linear purifier with a known compression rate."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import analysis, metrics
from diffjax.attacks import PGDConfig, pgd_attack
from diffjax.defense import Defense

D = 16  # 4x4x1 images
RNG = np.random.default_rng(0)
_A = RNG.uniform(0.8, 1.2, D // 2)
V = RNG.permutation(np.concatenate([_A, -_A]))  # w0 - w1 of a 2-class model (sums to 0)
W = jnp.asarray(np.stack([V / 2, -V / 2], axis=1), jnp.float32)  # [D, 2]


def logits_fn(x):
    return x.reshape(x.shape[0], D) @ W


def _data(crit_linf, wrong=()):
    """Images at 0.5 + noise moved along V to the given l_inf critical distances (class 0);
    the examples in `wrong` get the opposite margin (misclassified)."""
    crit = np.asarray(crit_linf, np.float64)
    margin = crit * np.abs(V).sum()
    margin[list(wrong)] *= -1.0
    base = 0.5 + RNG.uniform(-0.05, 0.05, (crit.size, D))
    x = base + (margin - base @ V)[:, None] * V[None] / (V @ V)
    assert np.all((x > 0.0) & (x < 1.0))
    # The attacks move towards 0.5 (along -sign(V)): the [0, 1] box never binds them.
    right = margin > 0
    assert np.all(np.abs(x[right] - 0.3 * np.sign(V) - 0.5) < 0.5)
    y = np.zeros(crit.size, np.int32)
    return jnp.asarray(x.reshape(-1, 4, 4, 1), jnp.float32), jnp.asarray(y), margin


def _keys(n):
    return jax.random.split(jax.random.key(0), n)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_critical_distances_of_a_linear_model(norm):
    crit_linf = np.array([0.013, 0.05, 0.11, 0.2, 0.27, 0.29, 0.1, 0.33])
    x, y, margin = _data(crit_linf, wrong=(6,))
    want = np.abs(margin) / (np.abs(V).sum() if norm == "linf" else np.linalg.norm(V))
    eps_max = 0.3 if norm == "linf" else 0.3 * np.abs(V).sum() / np.linalg.norm(V)
    # l_2: no random start, whose component orthogonal to the gradient the 20 steps would
    # not fully remove (then the distance is a hair, ~1e-3 relative, above the analytic one).
    attack = None if norm == "linf" else PGDConfig(norm="l2", eps=0.0, step_size=0.0,
                                                   steps=20, random_start=False)
    got = analysis.critical_distances(logits_fn, x, y, _keys(8), norm=norm, eps_max=eps_max,
                                      num_rounds=12, attack=attack)
    assert got[6] == 0.0  # misclassified clean
    assert np.isinf(got[7])  # beyond eps_max
    ok = np.arange(6)
    # An upper bound (a real adversarial example sits there) within the bisection's width.
    assert np.all(got[ok] >= want[ok] - 1e-5)
    np.testing.assert_allclose(got[ok], want[ok], atol=eps_max / 2**12 + 1e-5)


def _anchor_purifier(anchors, c):
    """x -> c x + (1 - c) m with m the example's clean image: compression rate c around
    an anchor that keeps the clean image's margin (the cap model's assumption)."""
    def purify(m, x, keys):
        del keys
        return c * x + (1.0 - c) * m
    return jax.tree_util.Partial(purify, anchors)


def test_predictor_recovers_the_robust_accuracy_of_a_linear_purifier():
    n = 40
    crit_linf = np.linspace(0.0071, 0.2937, n)  # avoids the radii c eps exactly
    x, y, _ = _data(crit_linf, wrong=(3, 17, 30))
    eps = 0.2
    d = analysis.critical_distances(logits_fn, x, y, _keys(n), eps_max=0.3)
    cs = [0.0, 0.25, 0.5, 0.75, 1.0]
    measured, anchors, rates = [], [], []
    for c in cs:
        purifier = _anchor_purifier(x, c)
        defense = Defense(purifier, logits_fn)
        # The rate the metric measures is c (a linear map c I).
        f = lambda xi, m, c=c: c * xi + (1.0 - c) * m
        rate = metrics.compression_rate(f, x, args=(x,))
        rates.append(float(np.mean(np.asarray(rate))))
        anchors.append(float(np.mean(np.asarray(
            jnp.argmax(defense.logits(x, _keys(n)), -1) == y))))
        res = pgd_attack(defense, x, y, _keys(n), protocol="fixed",
                         config=PGDConfig(norm="linf", eps=eps, step_size=eps / 4, steps=20))
        measured.append(1.0 - float(np.mean(np.asarray(res.success))))
    np.testing.assert_allclose(rates, cs, atol=1e-6)
    pred = analysis.predict_from_compression(d, rates, eps, anchor_accuracy=anchors)
    np.testing.assert_allclose(pred, measured, atol=1e-12)  # example by example
    # The analytic answer: correct and margin / ||w||_1 > c eps.
    analytic = [np.mean((crit_linf > c * eps) & ~np.isin(np.arange(n), [3, 17, 30]))
                for c in cs]
    np.testing.assert_allclose(measured, analytic)
    report = analysis.compare_predictions(pred, measured, labels=[f"c={c}" for c in cs])
    assert report["mae"] == 0.0 and report["r2"] == 1.0
    json.dumps(report)


def test_prediction_limits_and_per_example_rates():
    d = np.array([0.0, 0.05, 0.1, 0.2, np.inf])
    # c = 0: the anchor accuracy; c = 1, anchors = the classifier: undefended P(d > eps).
    np.testing.assert_allclose(
        analysis.predict_from_compression(d, [0.0, 1.0], 0.1), [0.8, 0.4])
    np.testing.assert_allclose(
        analysis.predict_from_compression(d, [0.0, 0.4], 0.1, anchor_accuracy=[0.6, 0.5]),
        [0.6, 0.5])  # radius 0.04: every correct example survives
    per_example = np.array([[1.0, 1.0, 0.5, 1.0, 1.0]])  # example 2 compressed by half
    np.testing.assert_allclose(analysis.predict_from_compression(d, per_example, 0.15),
                               [0.6])  # survivors: 0.1 > 0.075, 0.2 and inf
    with pytest.raises(ValueError, match="rates"):
        analysis.predict_from_compression(d, np.ones((1, 3)), 0.1)
    with pytest.raises(ValueError, match="critical_distance"):
        analysis.predict_from_compression([-1.0], [0.5], 0.1)


def test_compare_predictions_by_hand():
    out = analysis.compare_predictions([0.5, 0.7, 0.9], [0.6, 0.7, 0.8])
    assert out["mae"] == pytest.approx(0.2 / 3)
    assert out["max_abs_error"] == pytest.approx(0.1)
    # SS_res = 0.02, SS_tot = 0.02: R^2 = 0.
    assert out["r2"] == pytest.approx(0.0, abs=1e-12)
    assert out["n"] == 3 and isinstance(out["mae"], float)
    assert np.isnan(analysis.compare_predictions([0.1, 0.2], [0.5, 0.5])["r2"])
