"""The diffjax programs both benchmark suites time (CPU `cases`, GPU `gpu`).

The DDPM purifier of the paper's CIFAR-10 setting with its static settings bound, and the
"full-gradient attack step": the gradient of the summed cross-entropy of a fixed random
linear classifier on the purified images (negligible next to the purifier), plain or
averaged over EOT draws by `vmap`. Imports only JAX and `diffjax.diffusion`, so the GPU
machine (no dm-pix, no ml_collections) can load it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax import diffusion

__all__ = ["Purifier", "PurifyOne", "ce_sum", "make_grad", "make_eot_grad"]


@dataclasses.dataclass(frozen=True)
class Purifier:
    """``purify(eps_fn, x, keys)`` with the static settings bound (hashable)."""

    t_star: int
    num_steps: int
    remat: bool | str = True  # diffusion.REMAT_MODES

    def __call__(self, eps_fn, schedule, x, keys):
        return diffusion.purify(eps_fn, x, keys, schedule=schedule, t_star=self.t_star,
                                method="ddpm", num_steps=self.num_steps, remat=self.remat)


@dataclasses.dataclass(frozen=True)
class PurifyOne:
    """One example under a fixed key: ``f(x) = purify(x[None], key[None])[0]``."""

    pur: Purifier

    def __call__(self, eps_fn, schedule, key, x):
        return self.pur(eps_fn, schedule, x[None], key[None])[0]


def ce_sum(out, w, labels):
    """Summed cross-entropy of the linear classifier `w` on the flattened images `out`."""
    logits = out.reshape(out.shape[0], -1) @ w
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def make_grad(pur: Purifier) -> Callable:
    """`grad(x, eps_fn, schedule, keys, w, labels)`: the full gradient through `pur`."""
    def loss(x, eps_fn, schedule, keys, w, labels):
        return ce_sum(pur(eps_fn, schedule, x, keys), w, labels)

    return jax.grad(loss)


def make_eot_grad(pur: Purifier) -> Callable:
    """The mean of `make_grad(pur)` over draw keys `[K, B]` (`vmap` over the K draws)."""
    grad = make_grad(pur)

    def eot(x, eps_fn, schedule, draw_keys, w, labels):
        g = jax.vmap(grad, in_axes=(None, None, None, 0, None, None))(
            x, eps_fn, schedule, draw_keys, w, labels)
        return jnp.mean(g, axis=0)

    return eot
