"""The probability-flow likelihood against the closed form of a Gaussian under its exact
eps-model; exact trace vs Hutchinson; per-example keys and batch independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import diffusion
from diffjax.diffusion import likelihood

SCHED = diffusion.linear_schedule()
SDE = diffusion.VPSDE.from_schedule(SCHED)
D = 16  # 4x4x1 images
RNG = np.random.default_rng(0)
MU = RNG.uniform(-0.5, 0.5, D)
_Q, _ = np.linalg.qr(RNG.normal(size=(D, D)))
SIGMA = (_Q * RNG.uniform(0.05, 0.6, D) ** 2) @ _Q.T  # a full covariance (model space)


def _cov(a):
    return a * SIGMA + (1.0 - a) * np.eye(D)


def gaussian_eps(z, t):
    """The exact eps-model of x0 ~ N(MU, SIGMA) at the discrete noise levels:
    eps = sqrt(1 - a) (a SIGMA + (1 - a) I)^-1 (z - sqrt(a) MU), a = alphas_cumprod[t];
    at a fractional index t, a is interpolated linearly in log between the levels."""
    log_abar = jnp.log(SCHED.alphas_cumprod)
    a = jnp.exp(jnp.interp(t.astype(jnp.float32), jnp.arange(log_abar.shape[0]), log_abar))
    a = a[:, None]
    cov = a[:, :, None] * jnp.asarray(SIGMA, jnp.float32) + (1.0 - a[:, :, None]) * jnp.eye(D)
    r = z.reshape(z.shape[0], D) - jnp.sqrt(a) * jnp.asarray(MU, jnp.float32)
    return (jnp.sqrt(1.0 - a) * jnp.linalg.solve(cov, r[..., None])[..., 0]).reshape(z.shape)


def _log_normal(z, mean, cov):
    r = z - mean
    return (-0.5 * np.einsum("bi,ij,bj->b", r, np.linalg.inv(cov), r)
            - 0.5 * np.linalg.slogdet(2 * np.pi * cov)[1])


def _abar(t):
    return float(np.exp(2.0 * float(SDE.log_mean_coef(t))))


def _images(n, seed=1):
    z = np.random.default_rng(seed).multivariate_normal(MU, SIGMA, size=n)
    return np.clip((z + 1) / 2, 0, 1).astype(np.float32).reshape(n, 4, 4, 1)


def _closed_form_bpd(x, t_min=1e-3):
    a = _abar(t_min)
    z = 2.0 * x.reshape(len(x), D).astype(np.float64) - 1.0
    log_p = _log_normal(z, np.sqrt(a) * MU, _cov(a)) + D * np.log(2.0)  # [0, 1] density
    return -log_p / (D * np.log(2.0))


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


@pytest.mark.parametrize("time_input", ["interpolate", "fractional"])
def test_gaussian_matches_closed_form(time_input):
    x = _images(6)
    res = likelihood.log_likelihood(gaussian_eps, jnp.asarray(x), _keys(6), schedule=SCHED,
                                    num_steps=32, time_input=time_input)
    # The ODE itself: with the true marginal p_1 instead of N(0, I) at t = 1, the result is
    # the closed form (the solver and the time input).
    z1 = np.asarray(res.latent, np.float64).reshape(6, D)
    a1 = _abar(1.0)
    true_prior = _log_normal(z1, np.sqrt(a1) * MU, _cov(a1))
    a0 = _abar(1e-3)
    z0 = 2.0 * x.reshape(6, D).astype(np.float64) - 1.0
    exact = _log_normal(z0, np.sqrt(a0) * MU, _cov(a0))
    ode = true_prior + np.asarray(res.delta_log_density, np.float64)
    # Interpolating eps between neighbouring indices costs ~1e-4 nats per dimension here.
    tol = {"interpolate": 2e-4, "fractional": 5e-5}[time_input]
    np.testing.assert_allclose(ode / D, exact / D, atol=tol)
    # The reported bpd (prior N(0, I), alpha_bar(1) = 4e-5): within 2e-3 bits/dim.
    np.testing.assert_allclose(np.asarray(res.bpd), _closed_form_bpd(x), atol=2e-3)
    np.testing.assert_allclose(
        np.asarray(res.log_density),
        np.asarray(res.prior_log_density) + np.asarray(res.delta_log_density) + D * np.log(2),
        rtol=1e-6)


@pytest.mark.parametrize("solver,steps,ratio", [("rk4", 8, 10.0), ("heun", 16, 3.0)])
def test_solver_converges_at_its_order(solver, steps, ratio):
    # Doubling the steps divides the error by ~2^4 (RK4) or ~2^2 (Heun); measured against
    # the closed form with the true p_1 and the exact fractional-time model, so the only
    # error left is the solver's (seen: RK4 8 -> 16 steps 15x, Heun 16 -> 32 4.3x).
    x = jnp.asarray(_images(2))
    a1, a0 = _abar(1.0), _abar(1e-3)
    z0 = 2.0 * np.asarray(x, np.float64).reshape(2, D) - 1.0
    exact = _log_normal(z0, np.sqrt(a0) * MU, _cov(a0))
    errs = []
    for n in (steps, 2 * steps):
        res = likelihood.log_likelihood(gaussian_eps, x, _keys(2), schedule=SCHED, num_steps=n,
                                        solver=solver, time_input="fractional")
        z1 = np.asarray(res.latent, np.float64).reshape(2, D)
        ode = _log_normal(z1, np.sqrt(a1) * MU, _cov(a1)) + np.asarray(res.delta_log_density)
        errs.append(np.abs(ode - exact).max())
    assert errs[1] < errs[0] / ratio


def test_hutchinson_agrees_with_exact_trace_statistically():
    n = 64
    x = jnp.asarray(np.repeat(_images(1), n, axis=0))
    kw = dict(schedule=SCHED, num_steps=4)  # the same discretisation on both sides
    exact = likelihood.log_likelihood(gaussian_eps, x[:1], _keys(1), **kw).bpd[0]
    hutch = np.asarray(likelihood.log_likelihood(gaussian_eps, x, _keys(n, 3),
                                                 trace="hutchinson", **kw).bpd)
    se = hutch.std(ddof=1) / np.sqrt(n)
    assert se > 1e-4  # the probes really vary (a full covariance: no exact Rademacher trace)
    assert abs(hutch.mean() - float(exact)) < 4 * se
    # More probes, less variance.
    four = np.asarray(likelihood.log_likelihood(gaussian_eps, x[:16], _keys(16, 3),
                                                trace="hutchinson", num_probes=4, **kw).bpd)
    assert four.std() < hutch.std()


def test_per_example_keys_and_batch_independence():
    x = jnp.asarray(_images(5))
    keys = _keys(5, 7)
    kw = dict(schedule=SCHED, num_steps=4, trace="hutchinson", dequantize=1 / 16)
    full = likelihood.log_likelihood(gaussian_eps, x, keys, **kw)
    again = likelihood.log_likelihood(gaussian_eps, x, keys, **kw)
    np.testing.assert_array_equal(np.asarray(full.bpd), np.asarray(again.bpd))
    for i in (0, 3):
        alone = likelihood.log_likelihood(gaussian_eps, x[i:i + 1], keys[i:i + 1], **kw)
        np.testing.assert_allclose(np.asarray(alone.bpd)[0], np.asarray(full.bpd)[i],
                                   rtol=1e-5)
    other = likelihood.log_likelihood(gaussian_eps, x, _keys(5, 8), **kw)
    assert np.all(np.asarray(other.bpd) != np.asarray(full.bpd))  # dequantisation is keyed


def test_dequantisation_reports_the_discrete_bound():
    # With a tiny bin the dequantised density is the continuous one plus log2(1 / w).
    x = jnp.asarray(_images(3))
    kw = dict(schedule=SCHED, num_steps=8)
    cont = likelihood.log_likelihood(gaussian_eps, x, _keys(3), **kw).bpd
    w = 1e-4
    deq = likelihood.log_likelihood(gaussian_eps, x, _keys(3), dequantize=w, **kw).bpd
    np.testing.assert_allclose(np.asarray(deq) - np.log2(1 / w), np.asarray(cont), atol=1e-3)


def test_likelihood_runs_inside_jit():
    x = jnp.asarray(_images(2))

    @jax.jit
    def f(x, keys):
        return likelihood.log_likelihood(gaussian_eps, x, keys, schedule=SCHED,
                                         num_steps=4).bpd

    eager = likelihood.log_likelihood(gaussian_eps, x, _keys(2), schedule=SCHED,
                                      num_steps=4).bpd
    np.testing.assert_allclose(np.asarray(f(x, _keys(2))), np.asarray(eager), rtol=1e-6)


def test_score_norm_matches_the_gaussian_score():
    x = _images(4)
    t = jnp.array([0, 10, 100, 500], jnp.int32)
    got = np.asarray(likelihood.score_norm(gaussian_eps, jnp.asarray(x), t, schedule=SCHED))
    abar = np.asarray(SCHED.alphas_cumprod, np.float64)[np.asarray(t)]
    z = 2.0 * x.reshape(4, D).astype(np.float64) - 1.0
    want = [np.linalg.norm(np.linalg.solve(_cov(a), zi - np.sqrt(a) * MU))
            for a, zi in zip(abar, z, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-3)
    # Diffused first with per-example keys: same key, same number.
    keys = _keys(4)
    n1 = likelihood.score_norm(gaussian_eps, jnp.asarray(x), 100, schedule=SCHED, keys=keys)
    n2 = likelihood.score_norm(gaussian_eps, jnp.asarray(x), 100, schedule=SCHED, keys=keys)
    np.testing.assert_array_equal(np.asarray(n1), np.asarray(n2))


def test_bad_arguments_fail_with_the_argument_name():
    x = jnp.asarray(_images(2))
    with pytest.raises(ValueError, match="trace"):
        likelihood.log_likelihood(gaussian_eps, x, _keys(2), schedule=SCHED, trace="nope")
    with pytest.raises(ValueError, match="keys"):
        likelihood.log_likelihood(gaussian_eps, x, _keys(3), schedule=SCHED)
    with pytest.raises(ValueError, match="t_min"):
        likelihood.log_likelihood(gaussian_eps, x, _keys(2), schedule=SCHED, t_min=1.0)
