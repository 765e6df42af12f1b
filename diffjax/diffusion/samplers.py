"""Diffusion purification as a pure function of (eps_fn, x, per-example keys).

`purify` diffuses [0, 1] images to timestep `t_star` and runs a reverse chain back to 0
(DiffPure, Nie et al. 2022; the discrete variants of Lee & Kim 2023 and of the paper,
arXiv 2505.22839 sec. 2). The reverse steps are one `lax.scan` whose body is wrapped in
`jax.checkpoint` (`remat=True`), so the gradient through 100 steps keeps only the scan
carries (one image batch per step) and recomputes each U-Net call on the backward pass:
activation memory does not grow with the number of steps.

Randomness: each example `b` owns a key `keys[b]`; every draw is a function of it alone:

    forward noise (x_0 -> x_{t*})          normal(fold_in(keys[b], 0))
    ancestral step at timestep index tau   normal(fold_in(keys[b], tau + 1))
    SDE (Euler-Maruyama) step k            normal(fold_in(keys[b], k + 1))

so the same key reproduces a purification bit for bit, an example's result does not depend
on the rest of its batch, and an attack can re-run the exact purification the evaluation
will use.

Respacing (`num_steps < t_star`): the reverse chain visits the timesteps
`tau_k = round(linspace(0, t_star - 1, num_steps))[k]` (`[t_star - 1]` for one step) and
uses the respaced schedule `abar'_k = abar[tau_k]`, `beta'_k = 1 - abar'_k / abar'_{k-1}`
(Nichol & Dhariwal 2021, sec. 4), the discrete analogue of a coarser solver.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks
from diffjax.diffusion.schedules import VPSDE, Schedule, from_model_space, to_model_space

__all__ = ["METHODS", "purify", "respaced_timesteps"]

METHODS = ("ddpm", "reverse_only", "ddim", "reverse_only_ddim", "sde")


def respaced_timesteps(t_star: int, num_steps: int) -> np.ndarray:
    """The timestep indices the reverse chain visits, ascending, `[num_steps]` int32.

    Always ends at `t_star - 1` (where the forward process stopped); starts at 0 when
    `num_steps > 1`.
    """
    if num_steps == 1:
        return np.array([t_star - 1], np.int32)
    taus = np.round(np.linspace(0, t_star - 1, num_steps)).astype(np.int32)
    assert len(np.unique(taus)) == num_steps, (t_star, num_steps)
    return taus


def _per_example_normal(keys, data, shape, dtype):
    """One standard normal draw per example from fold_in(keys[b], data)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, data), shape, dtype))(keys)


def _call_eps(eps_fn, x, t):
    eps = eps_fn(x, t)
    if getattr(eps, "shape", None) != x.shape:  # static: raised once, at trace time
        _checks.fail("eps_fn", f"an output of the input's shape {tuple(x.shape)}",
                     f"shape {tuple(getattr(eps, 'shape', ()))}",
                     "does the model take this many channels / this image size?")
    return eps.astype(x.dtype)


def _discrete_chain(eps_fn, x_t, keys, schedule, t_star, num_steps, ddim, remat, clip):
    """The reverse chain from x_{tau_{S-1}} to x_0 (ancestral or DDIM eta=0)."""
    taus = respaced_timesteps(t_star, num_steps)
    abar = schedule.alphas_cumprod[taus]
    abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
    batch = x_t.shape[0]

    def step(x, per_step):
        tau, a_t, a_prev = per_step
        t = jnp.full((batch,), tau, jnp.int32)
        eps = _call_eps(eps_fn, x, t)
        x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
        if clip:
            x0 = jnp.clip(x0, -1.0, 1.0)
        if ddim:
            # DDIM, eta = 0 (Song et al. 2021a, eq. 12), with eps consistent with clipped x0.
            eps_hat = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
            return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps_hat, None
        # Ancestral step: the posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eqs. 6-7).
        alpha = a_t / a_prev
        beta = 1.0 - alpha
        mean = (jnp.sqrt(a_prev) * beta / (1.0 - a_t)) * x0 + (
            jnp.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)) * x
        var = beta * (1.0 - a_prev) / (1.0 - a_t)  # 0 on the last step: the mean is returned
        noise = _per_example_normal(keys, tau + 1, x.shape[1:], x.dtype)
        return mean + jnp.sqrt(var) * noise, None

    if remat:
        step = jax.checkpoint(step)
    per_step = (jnp.asarray(taus[::-1]), abar[::-1], abar_prev[::-1])
    x0, _ = jax.lax.scan(step, x_t, per_step)
    return x0


def _sde_chain(eps_fn, x, keys, schedule, t_star, num_steps, remat):
    """DiffPure: VP-SDE forward to t*/T, reverse Euler-Maruyama back to 0."""
    sde = VPSDE.from_schedule(schedule)
    T = schedule.num_timesteps
    t0 = t_star / T
    dt = t0 / num_steps
    mean, std = sde.marginal(t0)
    x_t = mean * x + std * _per_example_normal(keys, 0, x.shape[1:], x.dtype)
    batch = x.shape[0]
    ks = np.arange(num_steps, dtype=np.int32)
    times = (t0 - ks * dt).astype(np.float32)
    last = ks == num_steps - 1

    def step(x, per_step):
        k, t, is_last = per_step
        # The eps-model's time input: index round(t (T - 1)) (API.md: index i <-> t = i/(T-1)).
        idx = jnp.clip(jnp.round(t * (T - 1)), 0, T - 1).astype(jnp.int32)
        eps = _call_eps(eps_fn, x, jnp.full((batch,), idx, jnp.int32))
        _, std_t = sde.marginal(t)
        score = -eps / std_t
        beta_t = sde.beta(t)
        drift = 0.5 * beta_t * x + beta_t * score  # reverse-time drift, time running back
        noise = _per_example_normal(keys, k + 1, x.shape[1:], x.dtype)
        diffusion = jnp.where(is_last, 0.0, jnp.sqrt(beta_t * dt))
        return x + drift * dt + diffusion * noise, None

    if remat:
        step = jax.checkpoint(step)
    out, _ = jax.lax.scan(step, x_t, (jnp.asarray(ks), jnp.asarray(times), jnp.asarray(last)))
    return out


@functools.partial(
    jax.jit, static_argnames=("t_star", "method", "num_steps", "remat", "clip_denoised"))
def _purify(eps_fn, x, keys, schedule, *, t_star, method, num_steps, remat, clip_denoised):
    xm = to_model_space(x)
    if method == "sde":
        out = _sde_chain(eps_fn, xm, keys, schedule, t_star, num_steps, remat)
    else:
        if method in ("ddpm", "ddim"):
            abar = schedule.alphas_cumprod[t_star - 1]
            noise = _per_example_normal(keys, 0, xm.shape[1:], xm.dtype)
            x_t = jnp.sqrt(abar) * xm + jnp.sqrt(1.0 - abar) * noise
        else:  # reverse_only, reverse_only_ddim: the input itself is taken as x_t.
            x_t = xm
        ddim = method in ("ddim", "reverse_only_ddim")
        out = _discrete_chain(eps_fn, x_t, keys, schedule, t_star, num_steps, ddim, remat,
                              clip_denoised)
    return jnp.clip(from_model_space(out), 0.0, 1.0)


def purify(
    eps_fn,
    x,
    keys,
    *,
    schedule: Schedule,
    t_star: int,
    method: str = "ddpm",
    num_steps: int | None = None,
    remat: bool = True,
    clip_denoised: bool = True,
):
    """Purifies a batch of images with a diffusion model (API.md, `diffjax.diffusion`).

    `t_star = k` diffuses `x` (mapped to [-1, 1]) with `alphas_cumprod[k - 1]`, then runs the
    reverse chain over timesteps `k-1, ..., 0`, calling `eps_fn(x_t, t)`; the last step
    returns the denoised mean with no added noise; the result is mapped back to [0, 1]
    (and clipped to it).

    Args:
      eps_fn: `eps_fn(x_t, t) -> eps`, x_t NHWC in [-1, 1], t int32 `[B]`. Pass a
        `jax.tree_util.Partial` holding the weights (as `diffjax.pretrained` models do) so
        they are traced, not baked into the compiled code; any callable works, and the
        compiled code is cached per callable.
      x: `[B, H, W, C]` float images in [0, 1].
      keys: `[B]` typed PRNG keys, one per example (see `diffjax.randomness`).
      schedule: the model's discrete noise schedule (`linear_schedule()`).
      t_star: the purification timestep, in `[1, T]` (the paper: 100 on CIFAR-10).
      method: `"ddpm"` (forward noise, ancestral reverse), `"reverse_only"` (no forward
        noise, ancestral reverse from x itself), `"ddim"` (forward noise, DDIM eta=0),
        `"reverse_only_ddim"` (deterministic), `"sde"` (DiffPure: VP-SDE, Euler-Maruyama
        from `t_star / T`, `num_steps` steps of size `t_star / (T num_steps)`).
      num_steps: reverse steps over `[0, t_star)`; None means `t_star`.
      remat: wrap each step in `jax.checkpoint` (memory flat in the step count when
        differentiating; costs one extra forward per step on the backward pass).
      clip_denoised: clip the predicted x0 to [-1, 1] at each discrete step (Ho et al.'s
        sampler); not used by `"sde"`.

    Returns:
      The purified images, `[B, H, W, C]` in [0, 1].
    """
    _checks.check_images(x, "x")
    batch = x.shape[0]
    keys = _checks.check_keys(keys, batch)
    _checks.check_choice(method, "method", METHODS)
    if not isinstance(schedule, Schedule):
        _checks.fail("schedule", "a diffjax.diffusion.Schedule (e.g. linear_schedule())",
                     type(schedule).__name__)
    T = schedule.num_timesteps
    t_star = _checks.check_int(t_star, "t_star", 1, T)
    if num_steps is None:
        num_steps = t_star
    num_steps = _checks.check_int(num_steps, "num_steps", 1, t_star)
    if not isinstance(eps_fn, jax.tree_util.Partial):
        if not callable(eps_fn):
            _checks.fail("eps_fn", "a callable eps_fn(x_t, t)", type(eps_fn).__name__)
        eps_fn = jax.tree_util.Partial(eps_fn)
    return _purify(eps_fn, x, keys, schedule, t_star=t_star, method=method,
                   num_steps=num_steps, remat=bool(remat), clip_denoised=bool(clip_denoised))
