"""Log-likelihood under a diffusion prior (probability-flow ODE) and the score's norm.

Why images move away under purification (paper Sec. 3.1, open question 3; the authors'
hypothesis: clean images do not sit on local peaks of the learned prior) is a question about
the prior's density. This module measures it for any eps-model used through the API.md
convention `eps_fn(x_t, t)`.

**The ODE.** The VP-SDE that discretises to the model's schedule (`VPSDE.from_schedule`:
`beta(t) = beta_min + t (beta_max - beta_min)`, `alpha_bar(t) = exp(-1/2 t^2 (beta_max -
beta_min) - t beta_min)`, `sigma(t) = sqrt(1 - alpha_bar(t))`) has the probability-flow ODE
(Song et al. 2021, eq. 13, with the score `-eps / sigma`)

    dz/dt = F(z, t) = -1/2 beta(t) z + 1/2 beta(t) eps(z, t) / sigma(t),

whose marginals are those of the SDE; the instantaneous change of variables (Chen et al.
2018; Song et al. 2021, App. D.2) gives, along one trajectory from `z_0` (the image in the
model's [-1, 1] space) at `t_min` to `z_1` at `t = 1`,

    log p_{t_min}(z_0) = log N(z_1; 0, I) + int_{t_min}^1 div F(z_t, t) dt,
    div F = -1/2 beta(t) d + 1/2 beta(t) / sigma(t) tr(d eps / d z).

**The time input** (the model knows integer indices only). A likelihood integral wants
`eps(z, t)` smooth in `t`; `round(t (T - 1))` (the SDE purifier's map) is a step function,
and it is also off in noise level: the discrete `alphas_cumprod[i]` is close to
`alpha_bar((i + 1) / T)`, not to `alpha_bar(i / (T - 1))`, so at the small `t` where the
integrand is largest `round(t (T - 1))` feeds the model a noise level up to 50% off (t =
1e-3: sigma 0.015 instead of 0.010). We match the noise level instead: the fractional
index `s(t)` is where the model's own `log alphas_cumprod` (linear in between indices)
equals `log alpha_bar(t)`, and `eps(z, t) = (1 - w) eps_fn(z, floor(s)) + w eps_fn(z,
floor(s) + 1)` with `w = s - floor(s)` (``time_input="interpolate"``: two calls, one batch
of two, any eps_fn honouring the int32 contract). The result is continuous and piecewise
smooth in `t`, exact at the trained noise levels, and the ODE's `sigma(t)` is the noise
level the model is asked about. ``time_input="fractional"`` passes `s(t)` itself as a
float32 timestep (one call; only for models whose time embedding is a smooth function of a
float index, such as the DDPM U-Net's sinusoidal embedding: an untrained interpolation of
the embedding, so check it against "interpolate" first). The noise levels below the first
trained one (`alphas_cumprod[0]`) do not exist for the model; hence the default `t_min =
1e-3`, where `alpha_bar(t_min)` equals `alphas_cumprod[0]` for DDPM's schedule (sigma =
0.01 in [-1, 1] units).

**The solver.** Fixed-step RK4 (or Heun) in one `lax.scan` over a time grid uniform in the
log signal-to-noise ratio `lambda(t) = log(alpha_bar / (1 - alpha_bar))` from
`lambda(t_min)` (9.2 for DDPM) to `lambda(1)` (-10.1). Uniform steps in `t` would be unstable
near `t_min`: the ODE's stiffness there is about `beta / (2 sigma^2)` (500 for a density
with structure at the scale sigma = 0.01), while in `lambda` it is O(1). With the exact
eps-model of a Gaussian the ODE reproduces the closed form to 2e-5 nats per dimension at
32 RK4 steps (1e-4 with "interpolate": the eps interpolation between indices; the
remaining ~1e-3 bits/dim of the reported number is the N(0, I) prior at t = 1, where
alpha_bar = 4e-5; `tests/test_likelihood.py`). On the shipped digits DDPM (8 test images,
Hutchinson with the same probes) 8 / 16 steps are within 0.04 / 0.008 bits/dim of 32, and
``time_input="fractional"`` agrees with "interpolate" to 0.001; the default is 16 RK4 steps
(64 evaluations of the field).

**The divergence.** ``trace="exact"``: `d` Jacobian-vector products of eps against the
standard basis (`vmap`; 64 for 8x8 digits). ``trace="hutchinson"``: `num_probes`
Rademacher probes `v`, `tr J ~ mean v^T J v` (Hutchinson 1989; FFJORD), drawn once per
solve from the example's key (fixed along the trajectory), for large inputs; unbiased.
Cost on the shipped digits DDPM (2 shared CPU cores, compilation excluded): the exact trace
is about 20 s per image at 8 RK4 steps (64 x 2 U-Net jvps per evaluation); Hutchinson with
2 probes about 0.8 s per image.

**Discrete data.** Images are densities on [0, 1]^d: `log p_[0,1](x) = log p(2x - 1) + d
log 2` (the Jacobian of the [0, 1] -> [-1, 1] map). Digits have 17 grey levels (k / 16), and
a model trained down to sigma = 0.01 can place density spikes on that grid, which would
favour on-grid (clean) images over off-grid (adversarial, purified) ones for a reason
unrelated to the question. ``dequantize=w`` evaluates `x + u`, `u ~ U(-w/2, w/2)^d` from
the example's key, and reports `bpd + log2(1 / w)`: for on-grid data with spacing `w`
(1/16 for digits) this is Ho et al.'s / Song et al.'s variational upper bound on the
discrete negative log-likelihood in bits per dimension; for off-grid images it is the
same bin-averaged density, so clean, adversarial and purified images are compared on equal
terms. ``dequantize=None`` reports the continuous density at `x` itself. (Seen on the
digits DDPM, 8 clean test images: about -2.9 bits/dim continuous, i.e. 1.1 on the discrete
scale, against 2.1 dequantised: the grid spikes are real.)

Randomness: per-example keys only (dequantisation `fold_in(key, 0)`, probes
`fold_in(key, 1)`); every example is solved by itself (`vmap`), so its result does not
depend on the rest of the batch. Everything is one `jit`-compiled program per structure
(the weights in a `jax.tree_util.Partial` eps_fn are traced).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffjax import _checks
from diffjax.diffusion.schedules import VPSDE, Schedule, to_model_space

__all__ = ["Likelihood", "log_likelihood", "score_norm", "TRACES", "TIME_INPUTS", "SOLVERS"]

TRACES = ("exact", "hutchinson")
TIME_INPUTS = ("interpolate", "fractional")
SOLVERS = ("rk4", "heun")


class Likelihood(NamedTuple):
    """Per-example results of `log_likelihood` (a pytree of `[B]` arrays, and `[B, ...]`).

    Attributes:
      bpd: bits per dimension, `-log2 p_[0,1](y) / d`, plus `log2(1 / w)` with
        ``dequantize=w`` (the discrete bound); `y` is the evaluated [0, 1] image.
      log_density: `log p_[0,1](y)` in nats, the continuous density of [0, 1] images
        (the model-space density plus `d log 2`).
      prior_log_density: `log N(z_1; 0, I)` at the end of the ODE, in nats.
      delta_log_density: `int div F dt`, in nats (so the model-space log-density is
        `prior_log_density + delta_log_density`).
      latent: `z_1`, the ODE's end point, shape of the input.
    """

    bpd: jax.Array
    log_density: jax.Array
    prior_log_density: jax.Array
    delta_log_density: jax.Array
    latent: jax.Array


def _time_grid(sde: VPSDE, t_min, num_steps: int):
    """`num_steps + 1` times from `t_min` to 1, uniform in log-SNR (module docstring)."""
    log_a = lambda t: 2.0 * sde.log_mean_coef(t)
    lam = lambda la: la - jnp.log(-jnp.expm1(la))  # log(a / (1 - a)) from log a
    lams = jnp.linspace(lam(log_a(t_min)), lam(log_a(jnp.float32(1.0))), num_steps + 1)
    log_abar = -jax.nn.softplus(-lams)  # log sigmoid(lambda)
    bmin, delta = sde.beta_min, sde.beta_max - sde.beta_min
    # Solves 1/2 delta t^2 + bmin t + log a = 0 (rationalised: stable as delta -> 0).
    ts = -2.0 * log_abar / (bmin + jnp.sqrt(bmin**2 - 2.0 * delta * log_abar))
    return ts.at[0].set(t_min).at[-1].set(1.0)


def _fractional_index(schedule: Schedule, sde: VPSDE, t):
    """The fractional timestep index whose discrete noise level is `alpha_bar(t)`."""
    neg_log_abar = -jnp.log(schedule.alphas_cumprod)  # increasing in the index
    idx = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
    return jnp.interp(-2.0 * sde.log_mean_coef(t), neg_log_abar, idx)


def _eps_at(eps_fn, z, s, num_timesteps: int, time_input: str):
    """eps of one example `z` `[H, W, C]` at the fractional index `s` (module docstring)."""
    if time_input == "fractional":
        return eps_fn(z[None], jnp.reshape(s, (1,)).astype(jnp.float32))[0].astype(z.dtype)
    i0 = jnp.clip(jnp.floor(s), 0, num_timesteps - 1)
    w = (s - i0).astype(z.dtype)
    i1 = jnp.minimum(i0 + 1, num_timesteps - 1)
    both = eps_fn(jnp.stack([z, z]), jnp.stack([i0, i1]).astype(jnp.int32)).astype(z.dtype)
    return (1.0 - w) * both[0] + w * both[1]


def _solve_one(eps_fn, schedule, sde, z0, probes, ts, *, trace, time_input, solver):
    """Integrates one example's ODE; returns (z_1, int div F dt)."""
    shape = z0.shape
    d = math.prod(shape)
    T = schedule.num_timesteps

    def eps_flat(zf, s):
        return jnp.ravel(_eps_at(eps_fn, zf.reshape(shape), s, T, time_input))

    def field(zf, t):
        beta = sde.beta(t)
        sigma = jnp.sqrt(-jnp.expm1(2.0 * sde.log_mean_coef(t)))
        s = _fractional_index(schedule, sde, t)
        g = lambda v: eps_flat(v, s)
        if trace == "exact":
            def column(i):
                e_i = jax.nn.one_hot(i, d, dtype=zf.dtype)
                eps, col = jax.jvp(g, (zf,), (e_i,))
                return eps, col[i]
            eps_all, diag = jax.vmap(column)(jnp.arange(d))
            eps, tr = eps_all[0], jnp.sum(diag)
        else:
            def probe(v):
                eps, jv = jax.jvp(g, (zf,), (v,))
                return eps, jnp.vdot(v, jv)
            eps_all, quad = jax.vmap(probe)(probes)
            eps, tr = eps_all[0], jnp.mean(quad)
        dz = -0.5 * beta * zf + 0.5 * beta * eps / sigma
        div = -0.5 * beta * d + 0.5 * beta / sigma * tr
        return dz, div

    def step(carry, t_pair):
        zf, acc = carry
        t0, t1 = t_pair
        h = t1 - t0
        k1, g1 = field(zf, t0)
        if solver == "heun":
            k2, g2 = field(zf + h * k1, t1)
            return (zf + 0.5 * h * (k1 + k2), acc + 0.5 * h * (g1 + g2)), None
        tm = t0 + 0.5 * h
        k2, g2 = field(zf + 0.5 * h * k1, tm)
        k3, g3 = field(zf + 0.5 * h * k2, tm)
        k4, g4 = field(zf + h * k3, t1)
        zf = zf + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        acc = acc + h / 6.0 * (g1 + 2.0 * g2 + 2.0 * g3 + g4)
        return (zf, acc), None

    (z1, delta), _ = jax.lax.scan(step, (jnp.ravel(z0), jnp.zeros((), z0.dtype)),
                                  (ts[:-1], ts[1:]))
    return z1.reshape(shape), delta


@functools.partial(jax.jit, static_argnames=(
    "num_steps", "trace", "num_probes", "time_input", "solver", "dequantize"))
def _log_likelihood(eps_fn, x, keys, schedule, t_min, *, num_steps, trace, num_probes,
                    time_input, solver, dequantize):
    sde = VPSDE.from_schedule(schedule)
    ts = _time_grid(sde, jnp.float32(t_min), num_steps)
    shape = x.shape[1:]
    d = math.prod(shape)

    def one(xi, key):
        y = xi
        if dequantize is not None:
            u = jax.random.uniform(jax.random.fold_in(key, 0), shape, xi.dtype, -0.5, 0.5)
            y = xi + dequantize * u
        probes = jax.random.rademacher(jax.random.fold_in(key, 1), (num_probes, d), xi.dtype)
        z1, delta = _solve_one(eps_fn, schedule, sde, to_model_space(y), probes, ts,
                               trace=trace, time_input=time_input, solver=solver)
        prior = -0.5 * jnp.sum(jnp.square(z1)) - 0.5 * d * math.log(2.0 * math.pi)
        log_density = prior + delta + d * math.log(2.0)
        bpd = -log_density / (d * math.log(2.0))
        if dequantize is not None:
            bpd = bpd + math.log2(1.0 / dequantize)
        return Likelihood(bpd, log_density, prior, delta, z1)

    return jax.vmap(one)(x, keys)


def _as_eps_partial(eps_fn):
    if isinstance(eps_fn, jax.tree_util.Partial):
        return eps_fn
    if not callable(eps_fn):
        _checks.fail("eps_fn", "a callable eps_fn(x_t, t)", type(eps_fn).__name__)
    return jax.tree_util.Partial(eps_fn)


def log_likelihood(
    eps_fn,
    x,
    keys,
    *,
    schedule: Schedule,
    num_steps: int = 16,
    t_min: float = 1e-3,
    trace: str = "exact",
    num_probes: int = 1,
    dequantize: float | None = None,
    time_input: str = "interpolate",
    solver: str = "rk4",
) -> Likelihood:
    """Log-likelihood of [0, 1] images under a diffusion prior, by the probability-flow ODE.

    See the module docstring for the ODE, the time input, the solver and the handling of
    discrete data (Song et al. 2021, Sec. 4.3 and App. D.2; the paper's open question 3).

    Args:
      eps_fn: `eps_fn(x_t, t) -> eps` (API.md), x_t NHWC in [-1, 1], t int32 `[B]` indices
        (float32 fractional indices with ``time_input="fractional"``). A
        `jax.tree_util.Partial` holding the weights is traced, not baked in.
      x: `[B, H, W, C]` float32 images in [0, 1].
      keys: `[B]` typed keys, one per example (dequantisation noise and Hutchinson probes;
        unused, but still required, with ``trace="exact"`` and no dequantisation).
      schedule: the model's discrete schedule (linear: `VPSDE.from_schedule` is exact).
      num_steps: solver steps on the log-SNR grid (RK4: 4 evaluations each).
      t_min: the ODE's start time in (0, 1) (1e-3: the first trained noise level of DDPM's
        schedule).
      trace: ``"exact"`` (d jvps per evaluation) or ``"hutchinson"`` (`num_probes`).
      num_probes: Rademacher probes per example for ``"hutchinson"``.
      dequantize: None (the continuous density at `x`) or a bin width `w` (1/16 for the
        17-level digits): uniform dequantisation and the discrete bound.
      time_input: ``"interpolate"`` or ``"fractional"`` (module docstring).
      solver: ``"rk4"`` or ``"heun"``.

    Returns:
      A `Likelihood` of `[B]` arrays (`bpd`, `log_density`, ...) and the latent `z_1`.
    """
    _checks.check_images(x, "x")
    keys = _checks.check_keys(keys, x.shape[0])
    if not isinstance(schedule, Schedule):
        _checks.fail("schedule", "a diffjax.diffusion.Schedule (e.g. linear_schedule())",
                     type(schedule).__name__)
    num_steps = _checks.check_int(num_steps, "num_steps", lo=1)
    t_min = _checks.check_number(t_min, "t_min", lo=0.0, hi=1.0, lo_open=True)
    if t_min >= 1.0:
        _checks.fail("t_min", "a start time in (0, 1)", t_min)
    _checks.check_choice(trace, "trace", TRACES)
    _checks.check_choice(time_input, "time_input", TIME_INPUTS)
    _checks.check_choice(solver, "solver", SOLVERS)
    num_probes = _checks.check_int(num_probes, "num_probes", lo=1)
    if dequantize is not None:
        dequantize = _checks.check_number(dequantize, "dequantize", lo=0.0, hi=1.0,
                                          lo_open=True)
    return _log_likelihood(_as_eps_partial(eps_fn), x, keys, schedule, t_min,
                           num_steps=num_steps, trace=trace, num_probes=num_probes,
                           time_input=time_input, solver=solver, dequantize=dequantize)


@jax.jit
def _score_norm(eps_fn, x, t, keys, schedule):
    z = to_model_space(x)
    if keys is not None:
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), z.shape[1:],
                                                     z.dtype))(keys)
        a = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (z.ndim - 1))
        z = jnp.sqrt(a) * z + jnp.sqrt(1.0 - a) * noise
    eps = eps_fn(z, t).astype(z.dtype)
    sigma = jnp.sqrt(1.0 - schedule.alphas_cumprod[t])
    return jnp.sqrt(jnp.sum(jnp.square(eps.reshape(eps.shape[0], -1)), axis=-1)) / sigma


def score_norm(eps_fn, x, t, *, schedule: Schedule, keys=None):
    """The l2 norm of the model's score `||eps_fn(z, t)|| / sqrt(1 - abar_t)` at images.

    The score `grad log p_t(z) = -eps(z, t) / sigma_t` (in the model's [-1, 1] space) is
    zero at a local peak of the noisy prior `p_t`; its norm at clean images measures how far
    they are from one (open question 3).

    Args:
      eps_fn: `eps_fn(x_t, t) -> eps` (API.md).
      x: `[B, H, W, C]` images in [0, 1].
      t: int timestep indices in `[0, T-1]`, a scalar or `[B]`.
      schedule: the model's discrete schedule.
      keys: None: the image itself is taken as `x_t` (as the reverse-only purifier does);
        `[B]` keys: `x` is first diffused to `t` with noise `normal(fold_in(key, 0))`.

    Returns:
      `[B]` score norms (model space; divide by `sqrt(d)` for a per-dimension RMS).
    """
    _checks.check_images(x, "x")
    if not isinstance(schedule, Schedule):
        _checks.fail("schedule", "a diffjax.diffusion.Schedule", type(schedule).__name__)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    if keys is not None:
        keys = _checks.check_keys(keys, x.shape[0])
    return _score_norm(_as_eps_partial(eps_fn), x, t, keys, schedule)
