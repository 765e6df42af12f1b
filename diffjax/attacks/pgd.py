"""Projected gradient descent (Madry et al. 2018) against a randomized defense.

The whole attack is one `lax.scan` over iterations inside one `jit`. The jitted program
depends only on the *structure* of the attack (norm, steps, loss, gradient estimator,
protocol, shapes); `eps` and `step_size` are traced arguments, so sweeping the budget
reuses one compiled program, and so does swapping the defense's weights (a `Defense` is a
pytree whose weights are leaves).

The purifier randomness at iteration i is `streams.attack_draw_keys(protocol, k, i, K)`:
a function of (protocol, example key, iteration) only. The attack returns its last
iterate (Madry et al.'s PGD; for the paper's PGD-EOT, Lee & Kim 2023, likewise).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffjax import _checks
from diffjax.attacks import _sharding, gradients, streams

__all__ = ["PGDConfig", "PGDResult", "pgd_attack", "NORMS", "project", "trace_count"]

NORMS = ("linf", "l2")
_TRACES = {"pgd": 0}


def trace_count() -> int:
    """How many times the jitted PGD program has been traced (compiled) in this process."""
    return _TRACES["pgd"]


@dataclasses.dataclass(frozen=True)
class PGDConfig:
    """A PGD attack (static structure; `eps` and `step_size` are traced at run time).

    Attributes:
      norm: "linf" or "l2", the threat model.
      eps: the radius of the eps-ball (l_inf: in [0, 1]; images live in [0, 1]).
      step_size: the step length (l_inf: per-pixel sign step; l2: along the unit gradient).
      steps: the number of iterations, >= 1.
      random_start: start at a uniform point of the eps-ball (else at x).
      loss: "ce", "margin" (CW) or "dlr".
      gradient: the gradient estimator (`Gradient(kind="full"|"bpda", eot=K)`).
      return_trajectory: also return the loss `[steps, B]` and the purifier keys used at
        each iteration (`[steps, K, B]` key data).
    """

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    loss: str = "ce"
    gradient: gradients.Gradient = gradients.Gradient()
    return_trajectory: bool = False

    def __post_init__(self):
        _checks.check_choice(self.norm, "norm", NORMS)
        _checks.check_number(self.eps, "eps", lo=0.0, hi=1.0 if self.norm == "linf" else None,
                             hint="l_inf budgets are fractions of the [0, 1] pixel range, "
                                  "e.g. 8/255")
        _checks.check_number(self.step_size, "step_size", lo=0.0)
        _checks.check_int(self.steps, "steps", lo=1)
        _checks.check_choice(self.loss, "loss", gradients.LOSSES)
        if not isinstance(self.gradient, gradients.Gradient):
            _checks.fail("gradient", "a diffjax.attacks.Gradient", repr(self.gradient))


class PGDResult(NamedTuple):
    """Per-example PGD results (a pytree).

    Attributes:
      x_adv: `[B,H,W,C]` adversarial images in [0, 1], inside the eps-ball around x.
      success: `[B]` bool, misclassified at `x_adv` under the attack's own randomness
        (the key of iteration `steps`; under `fixed`, the example's fixed key).
      linf: `[B]` the l_inf norm of `x_adv - x`.
      l2: `[B]` the l_2 norm of `x_adv - x`.
      loss_trajectory: `[steps, B]` the attack loss at each iterate (EOT mean), or None.
      key_trajectory: `[steps, K, B, ...]` uint32 key data of the purifier keys of each
        iteration, or None.
    """

    x_adv: jax.Array
    success: jax.Array
    linf: jax.Array
    l2: jax.Array
    loss_trajectory: jax.Array | None = None
    key_trajectory: jax.Array | None = None


def _flat_norm(v, ord_):
    flat = v.reshape(v.shape[0], -1)
    if ord_ == "linf":
        return jnp.max(jnp.abs(flat), axis=-1)
    return jnp.sqrt(jnp.sum(flat * flat, axis=-1))


def _bcast(v, like):
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def project(x_adv, x, eps, norm: str):
    """Projects `x_adv` onto the `norm` eps-ball around `x`, then onto [0, 1].

    Clipping to [0, 1] after the ball projection moves every coordinate towards `x` (which
    is in [0, 1]), so the result stays inside the ball.

    Args:
      x_adv: `[B,H,W,C]` candidate points.
      x: `[B,H,W,C]` centres in [0, 1].
      eps: scalar or `[B]` radius.
      norm: "linf" or "l2".

    Returns:
      `[B,H,W,C]` projected points.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        n = _flat_norm(delta, "l2")
        scale = jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
        delta = delta * _bcast(scale, delta)
    return jnp.clip(x + delta, 0.0, 1.0)


def normalize(g, norm: str):
    """The steepest-ascent direction of unit `norm`: sign(g) (l_inf) or g / ||g||_2 (l2)."""
    if norm == "linf":
        return jnp.sign(g)
    return g / _bcast(_flat_norm(g, "l2") + 1e-12, g)


def random_start(keys, x, eps, norm: str):
    """A uniform point of the eps-ball around each `x`, clipped to [0, 1] (per-example keys)."""

    def one(k, xi):
        if norm == "linf":
            return jax.random.uniform(k, xi.shape, minval=-1.0, maxval=1.0) * eps
        k1, k2 = jax.random.split(k)
        g = jax.random.normal(k1, xi.shape)
        r = jax.random.uniform(k2) ** (1.0 / xi.size)
        return g / (jnp.linalg.norm(g.ravel()) + 1e-12) * r * eps

    delta = jax.vmap(one)(keys, x)
    return project(x + delta, x, eps, norm)


def _validate(defense, x, y, example_keys, protocol, gradient):
    from diffjax.defense import Defense

    if not isinstance(defense, Defense):
        _checks.fail("defense", "a diffjax.defense.Defense", type(defense).__name__,
                     "wrap a classifier with diffjax.defense.undefended(logits_fn)")
    _checks.check_images(x, "x")
    b = x.shape[0]
    _checks.check_labels(y, b, defense.num_classes(x), "y")
    example_keys = _checks.check_keys(example_keys, b, "example_keys")
    _checks.check_choice(protocol, "protocol", streams.PROTOCOLS)
    if protocol != "independent" and gradient.eot != 1:
        _checks.fail("gradient.eot", f"1 under protocol {protocol!r} (one fixed randomness "
                     "per example: every EOT draw would be the same)", gradient.eot,
                     "use protocol='independent' for EOT over fresh draws")
    return example_keys


def pgd_attack(defense, x, y, example_keys, *, config: PGDConfig, protocol: str = "fixed"):
    """Runs PGD against `defense` under a randomness protocol.

    Args:
      defense: a `diffjax.defense.Defense` (`undefended(logits_fn)` for a bare classifier).
      x: `[B,H,W,C]` float32 clean images in [0, 1].
      y: `[B]` int32 labels.
      example_keys: `[B]` typed keys, one per example (from its id or clean content).
      config: the attack (`PGDConfig`).
      protocol: "fixed", "independent" or "transfer" (the attack side of it: `transfer`
        attacks like `fixed`); see `diffjax.attacks.streams` for the key flow.

    Returns:
      A `PGDResult`.
    """
    if not isinstance(config, PGDConfig):
        _checks.fail("config", "a PGDConfig", type(config).__name__)
    example_keys = _validate(defense, x, y, example_keys, protocol, config.gradient)
    static = dataclasses.replace(config, eps=0.0, step_size=0.0)
    like = x
    defense, x, y, example_keys = _sharding.to_auto((defense, x, y, example_keys))
    out = _pgd_jit(defense, x, jnp.asarray(y, jnp.int32), example_keys,
                   jnp.float32(config.eps), jnp.float32(config.step_size),
                   static=static, protocol=protocol)
    return _sharding.restore(out, like)


def _pgd_impl(defense, x, y, example_keys, eps, step_size, *, static: PGDConfig, protocol):
    _TRACES["pgd"] += 1
    cfg = static
    num_draws = cfg.gradient.eot
    if cfg.random_start:
        x0 = random_start(streams.start_keys(example_keys), x, eps, cfg.norm)
    else:
        x0 = x

    def body(x_adv, i):
        draw_keys = streams.attack_draw_keys(protocol, example_keys, i, num_draws)
        losses, g, _ = gradients.loss_and_grad(defense, x_adv, y, draw_keys, loss=cfg.loss,
                                               gradient=cfg.gradient)
        x_new = project(x_adv + step_size * normalize(g, cfg.norm), x, eps, cfg.norm)
        out = (losses, jax.random.key_data(draw_keys)) if cfg.return_trajectory else None
        return x_new, out

    x_adv, traj = jax.lax.scan(body, x0, jnp.arange(cfg.steps, dtype=jnp.uint32))
    final_keys = streams.attack_draw_keys(protocol, example_keys, jnp.uint32(cfg.steps), 1)[0]
    logits = defense.logits(x_adv, final_keys)
    success = jnp.argmax(logits, axis=-1) != y
    delta = x_adv - x
    loss_traj, key_traj = traj if cfg.return_trajectory else (None, None)
    return PGDResult(x_adv, success, _flat_norm(delta, "linf"), _flat_norm(delta, "l2"),
                     loss_traj, key_traj)


_pgd_jit = jax.jit(_pgd_impl, static_argnames=("static", "protocol"))
