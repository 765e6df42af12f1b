"""Tests of diffjax.metrics.compression: spectra of maps with a known spectrum, estimators
within their stated error, the sample rate's limit, jit/compile caching, a fixed-key
purifier, and the input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import metrics
from diffjax.metrics import compression


def _orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@pytest.fixture(scope="module")
def dense_map():
    """f(x) = A x on 4x4x3 examples (d = 48), A = U diag(s) V^T, well conditioned."""
    rng = np.random.default_rng(0)
    d = 48
    s = np.sort(rng.uniform(0.3, 2.0, size=d))[::-1]
    a = (_orthogonal(rng, d) * s) @ _orthogonal(rng, d).T
    a32 = jnp.asarray(a, jnp.float32)
    f = lambda x: (a32 @ x.ravel()).reshape(x.shape)
    x0 = jnp.asarray(rng.uniform(size=(3, 4, 4, 3)), jnp.float32)
    return f, x0, s


def _dct_map(s, shape, seed=0):
    """A matrix-free f(x) = A x with A = D2 C^T diag(s) P C D1 (C the orthonormal DCT, P a
    permutation, D1, D2 random signs): dense, orthogonal factors, singular values exactly s."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    d1 = jnp.asarray(rng.choice([-1.0, 1.0], size=d), jnp.float32)
    d2 = jnp.asarray(rng.choice([-1.0, 1.0], size=d), jnp.float32)
    perm = jnp.asarray(rng.permutation(d))
    s32 = jnp.asarray(s, jnp.float32)

    def f(x):
        z = jax.scipy.fft.dct(d1 * x.ravel(), norm="ortho")[perm]
        return (d2 * jax.scipy.fft.idct(s32 * z, norm="ortho")).reshape(shape)

    return f


# ---------------------------------------------------------------- exact spectrum / rate


def test_exact_singular_values_of_known_linear_map(dense_map):
    f, x0, s = dense_map
    sv = metrics.jacobian_singular_values(f, x0, chunk_size=16)
    assert sv.shape == (3, 48)
    np.testing.assert_allclose(sv, np.broadcast_to(s, sv.shape), atol=1e-5)
    assert np.all(np.diff(np.asarray(sv), axis=1) <= 0)  # descending
    sv_rev = metrics.jacobian_singular_values(f, x0, ad_mode="reverse")
    np.testing.assert_allclose(sv_rev, sv, atol=1e-5)


def test_rms_rate_of_linear_map_is_rms_singular_value(dense_map):
    f, x0, s = dense_map
    want = np.sqrt(np.mean(s**2))
    for kw in ({}, {"estimator": "exact", "chunk_size": 5}, {"ad_mode": "reverse"}):
        rate, se = metrics.compression_rate(f, x0, return_stderr=True, **kw)
        assert rate.shape == (3,)
        np.testing.assert_allclose(rate, want, rtol=1e-5)
        np.testing.assert_array_equal(se, 0.0)


def test_non_square_map_spectrum_length_and_rate():
    rng = np.random.default_rng(1)
    s = np.array([3.0, 2.0, 1.5, 1.0, 0.5])
    a = (_orthogonal(rng, 5) * s) @ _orthogonal(rng, 12)[:5]  # [5, 12], singular values s
    a32 = jnp.asarray(a, jnp.float32)
    f = lambda x: a32 @ x.ravel()
    x0 = jnp.zeros((2, 3, 4), jnp.float32)
    sv = metrics.jacobian_singular_values(f, x0)
    assert sv.shape == (2, 5)
    np.testing.assert_allclose(sv[0], s, atol=1e-5)
    with pytest.raises(ValueError, match="^f: .*same_shape=False"):
        metrics.compression_rate(f, x0)
    rate = metrics.compression_rate(f, x0, same_shape=False)
    np.testing.assert_allclose(rate, np.sqrt(np.sum(s**2) / 12), rtol=1e-5)


def test_fraction_below():
    s = jnp.array([[2.0, 1.0, 0.2, 0.1], [0.9, 0.3, 0.25, 0.0]])
    np.testing.assert_allclose(metrics.fraction_below(s, 0.25), [0.5, 0.25])
    # Top-2 of 10: the rest is <= the smallest given value.
    top = jnp.array([[0.5, 0.2], [2.0, 1.0]])
    frac = metrics.fraction_below(top, 0.25, total=10)
    np.testing.assert_allclose(frac[0], 0.9)
    assert np.isnan(frac[1])


# ---------------------------------------------------------------- matrix-free (d = 3072)


def test_hutchinson_within_stated_error_on_3072_dims():
    rng = np.random.default_rng(2)
    shape = (32, 32, 3)
    s = rng.uniform(0.05, 1.0, size=int(np.prod(shape)))
    f = _dct_map(s, shape)
    want = np.sqrt(np.mean(s**2))
    x0 = jnp.zeros((16, *shape), jnp.float32)  # f is linear: 16 independent estimates of J
    rate, se = metrics.compression_rate(f, x0, key=jax.random.key(3), return_stderr=True)
    rate, se = np.asarray(rate), np.asarray(se)
    assert compression.EXACT_MAX_DIM < 3072  # "auto" took the matrix-free path
    assert np.all(se > 0) and np.all(se < 0.02 * want)
    assert np.all(np.abs(rate - want) <= 3.5 * se)
    # The stated error is honest: the spread of independent estimates matches it.
    assert 0.5 < np.std(rate, ddof=1) / np.mean(se) < 2.0
    assert abs(np.mean(rate) - want) <= 3 * np.mean(se) / np.sqrt(len(rate))


def test_lanczos_top_k_match_true_top_k_on_3072_dims():
    rng = np.random.default_rng(4)
    shape = (32, 32, 3)
    top = np.array([3.0, 2.5, 2.0, 1.6, 1.3])
    s = np.concatenate([top, rng.uniform(0.0, 0.8, size=3072 - 5)])
    f = _dct_map(s, shape, seed=5)
    x0 = jnp.zeros((2, *shape), jnp.float32)
    got, bounds = metrics.jacobian_top_singular_values(f, x0, 5, key=jax.random.key(0),
                                                       return_error_bounds=True)
    assert got.shape == bounds.shape == (2, 5)
    np.testing.assert_allclose(got, np.broadcast_to(top, got.shape), rtol=1e-4)
    assert np.all(np.asarray(bounds) < 1e-2)


def test_lanczos_error_bounds_hold_before_convergence(dense_map):
    f, x0, s = dense_map  # a flat-ish spectrum: few steps leave the values unconverged
    got, bounds = metrics.jacobian_top_singular_values(f, x0, 6, num_iterations=8,
                                                       return_error_bounds=True)
    dist = np.min(np.abs(np.asarray(got)[..., None] - s), axis=-1)  # to the nearest true value
    assert np.all(dist <= np.asarray(bounds) + 1e-4)
    assert np.max(bounds) > 1e-3  # not converged, and the bounds say so


def test_lanczos_matches_exact_spectrum_top(dense_map):
    f, x0, s = dense_map
    got = metrics.jacobian_top_singular_values(f, x0[:1], 4, num_iterations=48)
    np.testing.assert_allclose(got[0], s[:4], atol=1e-4)


# ---------------------------------------------------------------- sample-based rate


def _smooth_map():
    rng = np.random.default_rng(6)
    d = 192
    w = jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32)
    b = jnp.asarray(rng.normal(size=d) * 0.3, jnp.float32)
    f = lambda x: 0.8 * jnp.tanh(w @ x.ravel() + b).reshape(x.shape)
    x0 = jnp.asarray(rng.uniform(size=(3, 8, 8, 3)), jnp.float32)
    return f, x0


def test_sample_rate_at_small_radius_approaches_jacobian_rate():
    f, x0 = _smooth_map()
    jac = np.asarray(metrics.compression_rate(f, x0))
    key = jax.random.key(7)
    rms, se = metrics.compression_rate(f, x0, method="sample", key=key, radius=1e-2,
                                       num_samples=400, reduction="rms", return_stderr=True)
    assert np.all(np.abs(np.asarray(rms) - jac) <= 4 * np.asarray(se) + 1e-3 * jac)
    mean = np.asarray(metrics.compression_rate(f, x0, method="sample", key=key, radius=1e-2,
                                               num_samples=400))
    assert np.all(mean <= np.asarray(rms) + 1e-6)  # Jensen
    np.testing.assert_allclose(mean, jac, rtol=0.03)
    # At a large radius the tanh saturates: the rate differs from the local one.
    far = np.asarray(metrics.compression_rate(f, x0, method="sample", key=key, radius=30.0,
                                              num_samples=400))  # same compiled program
    assert np.all(far < 0.8 * jac)


def test_sample_rate_of_linear_map_and_keys(dense_map):
    f, x0, s = dense_map
    key = jax.random.key(1)
    r1 = metrics.compression_rate(f, x0, method="sample", key=key, radius=0.5)
    r2 = metrics.compression_rate(f, x0, method="sample", key=key, radius=0.5)
    np.testing.assert_array_equal(r1, r2)  # same key, same numbers
    assert np.all((r1 >= s.min()) & (r1 <= s.max()))
    # Per-example keys: each example's rate depends only on its own key.
    keys = jax.random.split(jax.random.key(2), 3)
    full = metrics.compression_rate(f, x0, method="sample", key=keys, radius=0.5)
    one = metrics.compression_rate(f, x0[1:2], method="sample", key=keys[1:2], radius=0.5)
    np.testing.assert_allclose(full[1], one[0], rtol=1e-6)
    # Linear map: the ratio does not depend on the radius.
    r3 = metrics.compression_rate(f, x0, method="sample", key=key, radius=5.0)
    np.testing.assert_allclose(r3, r1, rtol=1e-4)


def test_sample_clip_to_unit_divides_by_distance_travelled():
    f = lambda x: 0.5 * x
    x0 = jnp.full((2, 4, 4, 1), 0.99, jnp.float32)
    rate = metrics.compression_rate(f, x0, method="sample", key=jax.random.key(0), radius=1.0,
                                    clip_to_unit=True, num_samples=5)
    np.testing.assert_allclose(rate, 0.5, rtol=1e-5)


# ---------------------------------------------------------------- jit and compile caching


def test_works_under_jit_and_compiles_once(dense_map):
    f, x0, s = dense_map
    eager = metrics.compression_rate(f, x0)
    jitted = jax.jit(lambda x: metrics.compression_rate(f, x))(x0)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    sample = jax.jit(lambda x, k: metrics.compression_rate(
        f, x, method="sample", key=k, radius=0.1, num_samples=4))(x0, jax.random.key(0))
    assert sample.shape == (3,) and np.all(np.isfinite(sample))

    # Weights held by a Partial are traced: one program for two different matrices.
    def apply(m, x):
        return (m @ x.ravel()).reshape(x.shape)

    rng = np.random.default_rng(9)
    m1 = jnp.asarray(rng.normal(size=(48, 48)), jnp.float32)
    metrics.compression_rate(jax.tree_util.Partial(apply, m1), x0)
    n_compiled = compression._jitted_core._cache_size()
    r2 = metrics.compression_rate(jax.tree_util.Partial(apply, 2 * m1), x0)
    assert compression._jitted_core._cache_size() == n_compiled
    np.testing.assert_allclose(r2, 2 * np.linalg.norm(m1) / np.sqrt(48), rtol=1e-5)


def test_purifier_closing_over_a_fixed_key():
    diffusion = pytest.importorskip("diffjax.diffusion")
    schedule = diffusion.linear_schedule()
    # An analytic eps-model: the optimal denoiser of a Gaussian prior N(0, c^2 I) in [-1, 1].
    c2 = 0.25

    def eps_fn(x_t, t):
        abar = schedule.alphas_cumprod[t][:, None, None, None]
        return jnp.sqrt(1.0 - abar) * x_t / (abar * c2 + 1.0 - abar)

    x0 = jnp.asarray(np.random.default_rng(0).uniform(0.3, 0.7, size=(2, 4, 4, 1)),
                     jnp.float32)
    key = jax.random.key(11)

    def make(method):
        return lambda x: diffusion.purify(eps_fn, x[None], key[None], schedule=schedule,
                                          t_star=10, method=method, num_steps=2)[0]

    purifier = make("ddpm")
    r1 = metrics.compression_rate(purifier, x0)
    r2 = jax.jit(lambda x: metrics.compression_rate(purifier, x))(x0)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    assert np.all((np.asarray(r1) > 0) & (np.asarray(r1) < 1))  # purification compresses
    sv = metrics.jacobian_singular_values(purifier, x0)
    np.testing.assert_allclose(r1, np.sqrt(np.mean(np.asarray(sv) ** 2, axis=1)), rtol=1e-4)
    # A different fixed key gives a different (deterministic) function.
    other = lambda x: diffusion.purify(eps_fn, x[None], jax.random.key(12)[None],
                                       schedule=schedule, t_star=10, num_steps=2)[0]
    assert not np.allclose(purifier(x0[0]), other(x0[0]))


def test_per_example_args_equal_one_call_per_example():
    # f(x, key) with args=(keys,): each example under its own key, in one batched call,
    # equals closing over each key in turn.
    diffusion = pytest.importorskip("diffjax.diffusion")
    schedule = diffusion.linear_schedule()

    def eps_fn(x_t, t):
        return 0.3 * jnp.tanh(x_t) + 0.01 * t[:, None, None, None]

    x0 = jnp.asarray(np.random.default_rng(1).uniform(0.2, 0.8, size=(3, 3, 3, 1)),
                     jnp.float32)
    keys = jax.random.split(jax.random.key(5), 3)
    kw = dict(schedule=schedule, t_star=20, method="ddpm", num_steps=3)
    f = lambda x, k: diffusion.purify(eps_fn, x[None], k[None], **kw)[0]
    sv = np.asarray(metrics.jacobian_singular_values(f, x0, args=(keys,)))
    rate = np.asarray(metrics.compression_rate(f, x0, args=(keys,)))
    for i in range(3):
        fi = lambda x, k=keys[i]: f(x, k)
        np.testing.assert_allclose(sv[i], metrics.jacobian_singular_values(fi, x0[i:i + 1])[0],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(rate[i], metrics.compression_rate(fi, x0[i:i + 1])[0],
                                   rtol=1e-4)
    assert np.abs(sv[0] - sv[1]).max() > 1e-4  # the keys matter
    with pytest.raises(ValueError, match="args: expected arrays with one row per example"):
        metrics.jacobian_singular_values(f, x0, args=(keys[:2],))
    with pytest.raises(ValueError, match="args: expected a tuple"):
        metrics.compression_rate(f, x0, args=keys)


# ---------------------------------------------------------------- errors


def test_input_errors(dense_map):
    f, x0, _ = dense_map
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="^radius: "):
        metrics.compression_rate(f, x0, method="sample", key=key, radius=0.0)
    with pytest.raises(ValueError, match="^radius: "):
        metrics.compression_rate(f, x0, method="sample", key=key, radius=-1.0)
    with pytest.raises(ValueError, match="^radius: "):
        metrics.compression_rate(f, x0, method="sample", key=key)
    with pytest.raises(ValueError, match="^num_samples: "):
        metrics.compression_rate(f, x0, method="sample", key=key, radius=1.0, num_samples=0)
    with pytest.raises(ValueError, match="^key: "):
        metrics.compression_rate(f, x0, method="sample", radius=1.0)
    with pytest.raises(ValueError, match="^method: "):
        metrics.compression_rate(f, x0, method="svd")
    with pytest.raises(ValueError, match="^x0: .*rank"):
        metrics.compression_rate(f, x0[0, 0, 0])
    with pytest.raises(ValueError, match="^x0: .*floating"):
        metrics.compression_rate(f, x0.astype(jnp.int32))
    with pytest.raises(ValueError, match="^f: .*shape"):
        metrics.compression_rate(lambda x: x[:2], x0)
    with pytest.raises(ValueError, match="^f: .*batch of one"):
        metrics.compression_rate(lambda x: x[None], x0)
    with pytest.raises(ValueError, match="^f: .*ONE example"):
        metrics.compression_rate(lambda x: x.reshape(4, 4, 4), x0)
    with pytest.raises(ValueError, match="^f: .*NaN"):
        metrics.compression_rate(lambda x: jnp.log(x - 2.0), x0)
    with pytest.raises(ValueError, match="^f: .*NaN"):
        metrics.compression_rate(lambda x: jnp.sqrt(x), x0.at[1].set(0.0))  # inf derivative
    with pytest.raises(ValueError, match="^f: .*NaN"):
        metrics.jacobian_singular_values(lambda x: x / 0.0, x0)
    with pytest.raises(ValueError, match="^k: "):
        metrics.jacobian_top_singular_values(f, x0, 49)


def _conv_eps(w, x_t, t):
    del t
    return jnp.tanh(jax.lax.conv_general_dilated(
        x_t, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))


def _linear_head(h, x):
    return x.reshape(x.shape[0], -1) @ h


def _tiny_defense(scale):
    """A DDPM purifier over a tiny conv eps-model (weights in a Partial) + a linear head."""
    from jax.tree_util import Partial

    from diffjax import diffusion
    from diffjax.defense import Defense

    w = scale * jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 1, 1)), jnp.float32)
    pur = diffusion.make_purifier(Partial(_conv_eps, w), schedule=diffusion.linear_schedule(),
                                  t_star=40, method="ddpm", num_steps=3)
    head = jnp.asarray(np.random.default_rng(2).normal(size=(16, 3)), jnp.float32)
    return Defense(pur, Partial(_linear_head, head))


def test_batched_purifier_with_keys_is_the_jacobian_of_the_fixed_realization():
    """The README's one-liner equals the RMS singular value of the Jacobian of exactly the
    random map the Fixed attack differentiates (its keys at every iteration)."""
    from diffjax import protocols, randomness

    defense = _tiny_defense(0.5)
    x = jnp.asarray(np.random.default_rng(3).uniform(0.2, 0.8, (3, 4, 4, 1)), jnp.float32)
    ek = randomness.example_keys(jax.random.key(5), jnp.arange(3))
    rate = metrics.compression_rate(defense.purify_fn, x, keys=protocols.realization(ek))
    attacked = protocols.Fixed().attack_keys(ek, jnp.uint32(7))[0]  # any iteration's keys
    for b in range(3):
        jac = jax.jacfwd(lambda v, b=b: defense.purify(v[None], attacked[b:b + 1])[0])(x[b])
        jac = np.asarray(jac).reshape(16, 16)
        np.testing.assert_allclose(rate[b], np.linalg.norm(jac) / 4.0, rtol=1e-5)
        sv = metrics.jacobian_singular_values(defense, x[b:b + 1], keys=attacked[b:b + 1])
        np.testing.assert_allclose(sv[0], np.linalg.svd(jac, compute_uv=False), rtol=1e-4,
                                   atol=1e-6)
    top = metrics.jacobian_top_singular_values(defense.purify_fn, x, 2,
                                               keys=protocols.realization(ek))
    full = metrics.jacobian_singular_values(defense.purify_fn, x,
                                            keys=protocols.realization(ek))
    np.testing.assert_allclose(top, full[:, :2], rtol=1e-3)
    # Another realization is another map.
    other = metrics.compression_rate(defense.purify_fn, x, keys=protocols.start_keys(ek))
    assert not np.allclose(other, rate)


def test_batched_purifier_new_keys_and_weights_do_not_recompile():
    from diffjax import randomness

    x = jnp.asarray(np.random.default_rng(4).uniform(0.2, 0.8, (2, 4, 4, 1)), jnp.float32)
    k1 = randomness.example_keys(jax.random.key(1), jnp.arange(2))
    k2 = randomness.example_keys(jax.random.key(2), jnp.arange(2))
    metrics.compression_rate(_tiny_defense(0.5).purify_fn, x, keys=k1)
    n = compression._jitted_core._cache_size()
    r = metrics.compression_rate(_tiny_defense(0.9).purify_fn, x * 0.9, keys=k2)
    assert compression._jitted_core._cache_size() == n and np.all(np.isfinite(r))


def test_stochastic_estimators_need_an_explicit_key():
    f = lambda x: 0.5 * x
    x0 = jnp.ones((2, 4, 4, 1))
    with pytest.raises(ValueError, match="key: expected a jax.random.key.*Hutchinson"):
        metrics.compression_rate(f, x0, estimator="hutchinson")
    with pytest.raises(ValueError, match="keys: expected"):
        metrics.compression_rate(lambda x, k: x, x0, keys=jnp.arange(2))
    exact = metrics.compression_rate(f, x0)  # the exact path draws nothing
    np.testing.assert_allclose(exact, 0.5, rtol=1e-6)
