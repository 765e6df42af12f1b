"""Noise schedules, the continuous VP-SDE, and the forward process q(x_t | x_0).

Conventions (Ho et al. 2020, eq. 4): timestep indices `t` in `[0, T-1]`; index `t` has
`alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])`, and

    q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I)

in the model's [-1, 1] space.

The continuous VP-SDE of score_sde (Song et al. 2021, eq. 11),
`dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW` with `beta(t) = beta_min + t (beta_max -
beta_min)` on t in [0, 1], discretises with N steps to
`betas_i = beta_min / N + i (beta_max - beta_min) / (N (N - 1))`: with beta_min 0.1,
beta_max 20 and N = 1000 that is exactly DDPM's `linspace(1e-4, 2e-2, 1000)`
(`VPSDE.discretize`). This is why one checkpoint can serve both the discrete samplers and
DiffPure's SDE solver.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from diffjax import _checks

__all__ = [
    "Schedule",
    "VPSDE",
    "linear_schedule",
    "cosine_schedule",
    "q_sample",
    "to_model_space",
    "from_model_space",
]


class Schedule(NamedTuple):
    """A discrete noise schedule (a pytree of `[T]` float32 arrays).

    Attributes:
      betas: `beta_t`, the per-step noise variances.
      alphas_cumprod: `prod_{s<=t} (1 - beta_s)`.
    """

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        """T, the number of timesteps (static: the arrays' length)."""
        return int(self.betas.shape[0])


def _from_betas(betas: np.ndarray) -> Schedule:
    betas = np.asarray(betas, np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32))


def linear_schedule(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
) -> Schedule:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4): betas linspace(beta_start, beta_end).

    The products are computed in float64 and stored as float32.

    Args:
      num_timesteps: T.
      beta_start: beta of the first step.
      beta_end: beta of the last step.

    Returns:
      A `Schedule` with `[T]` arrays.
    """
    _checks.check_int(num_timesteps, "num_timesteps", 1)
    _checks.check_number(beta_start, "beta_start", lo=0.0, hi=1.0, lo_open=True)
    _checks.check_number(beta_end, "beta_end", lo=0.0, hi=1.0, lo_open=True)
    return _from_betas(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008,
                    max_beta: float = 0.999) -> Schedule:
    """The cosine schedule of Nichol & Dhariwal (2021, eq. 17), betas clipped to `max_beta`.

    `alphas_cumprod(t) = f(t) / f(0)`, `f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2`.
    """
    _checks.check_int(num_timesteps, "num_timesteps", 1)
    _checks.check_number(s, "s", lo=0.0)

    def f(t):
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)]
    return _from_betas(np.array(betas))


class VPSDE(NamedTuple):
    """The variance-preserving SDE of score_sde (Song et al. 2021, eq. 11).

    `beta(t) = beta_min + t (beta_max - beta_min)` for t in [0, 1];
    the marginal is `x_t = mean_coef(t) x_0 + std(t) z` with
    `log mean_coef(t) = -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min`.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000

    def beta(self, t):
        """beta(t) for continuous t in [0, 1]."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coef(self, t):
        """log of the marginal mean coefficient sqrt(alpha_bar(t))."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_bar(self, t):
        """alpha_bar(t) = mean_coef(t)^2 (the continuous `alphas_cumprod`)."""
        return jnp.exp(2.0 * self.log_mean_coef(t))

    def marginal(self, t):
        """(mean coefficient, std) of q(x_t | x_0) at continuous time t."""
        mean = jnp.exp(self.log_mean_coef(t))
        return mean, jnp.sqrt(1.0 - mean**2)

    def discretize(self) -> Schedule:
        """The discrete schedule of this SDE: betas_i = beta(i / (N - 1)) / N.

        With the defaults this equals `linear_schedule(1000, 1e-4, 2e-2)`.
        """
        return linear_schedule(self.N, self.beta_min / self.N, self.beta_max / self.N)

    @classmethod
    def from_schedule(cls, schedule: Schedule) -> VPSDE:
        """The VP-SDE whose discretisation is the given *linear* schedule.

        For a non-linear schedule this is the linear fit through its first and last beta.
        """
        T = schedule.num_timesteps
        # jnp, not float(): the schedule may be traced inside jit.
        return cls(beta_min=schedule.betas[0] * T, beta_max=schedule.betas[-1] * T, N=T)


def to_model_space(x):
    """[0, 1] images -> the diffusion model's [-1, 1] space."""
    return 2.0 * x - 1.0


def from_model_space(x):
    """[-1, 1] model space -> [0, 1] images (no clipping)."""
    return (x + 1.0) / 2.0


def q_sample(schedule: Schedule, x0, t, noise):
    """Samples q(x_t | x_0) (Ho et al. 2020, eq. 4) with the given noise.

    Args:
      schedule: the noise schedule.
      x0: `[B, ...]` clean data in the model's [-1, 1] space.
      t: int32 `[B]` timestep indices in `[0, T-1]`.
      noise: standard normal noise, shape of `x0`.

    Returns:
      `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, shape of `x0`.
    """
    if noise.shape != x0.shape:
        _checks.fail("noise", f"the shape of x0 {tuple(x0.shape)}", tuple(noise.shape))
    if t.shape != x0.shape[:1]:
        _checks.fail("t", f"one timestep per example, shape ({x0.shape[0]},)", tuple(t.shape))
    abar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise
