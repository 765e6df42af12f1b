"""APGD-CE and APGD-DLR (Croce & Hein, ICML 2020), with explicit keys, as one `lax.scan`.

Auto-PGD is AutoAttack's workhorse: PGD with momentum (alpha = 0.75) whose step size
starts at 2 eps and is halved at checkpoints when the loss stalls. This is our JAX version
of the schedule of the reference implementation (`fra31/auto-attack`,
`autoattack/autopgd_base.py`, `attack_single_run`, l_inf and l_2), one restart:

- start: `x + eps * t / ||t||` (l_inf: t uniform in [-1, 1]^d, normalised by its max;
  l_2: t Gaussian), clipped to [0, 1]; key ``fold_in(k, START)``.
- step i (a = 1 at i = 0, else 0.75): `z = P(x_i + eta * s(g_i))`,
  `x_{i+1} = P(x_i + a (z - x_i) + (1 - a)(x_i - x_{i-1}))`, `s` = sign (l_inf) or the
  unit l_2 direction, `P` the projection onto the ball and [0, 1].
- checkpoints: the first after `max(int(0.22 N), 1)` iterations, then the interval shrinks
  by `max(int(0.03 N), 1)` down to `max(int(0.06 N), 1)`. At a checkpoint the step size of
  an example is halved, and it restarts from its best point (and that point's gradient),
  when (1) the loss increased in at most `rho * k` of the last k iterations, or (2) its
  step was not reduced at the previous checkpoint and its best loss has not improved since.
- the result: the last point misclassified under the attack's randomness where there is
  one (AutoAttack's `x_best_adv`), else the point of highest loss (`x_best`).

Randomness: the gradient at iteration i (i = 0 is the start, i = 1..N the iterates) uses
`streams.attack_draw_keys(protocol, k, i, K)`: under ``fixed``/``transfer`` the example's
fixed key throughout; under ``independent`` fresh draws with EOT over K. Under fresh
draws the loss comparisons of the schedule are noisy: AutoAttack's handling of randomized
defenses is a known open problem, and this implementation does not hide it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffjax import _checks
from diffjax.attacks import _sharding, gradients, streams
from diffjax.attacks.pgd import NORMS, PGDResult, _bcast, _flat_norm, project

__all__ = ["APGDConfig", "apgd_attack", "checkpoint_schedule"]

APGD_LOSSES = ("ce", "dlr")
_TRACES = {"apgd": 0}


@dataclasses.dataclass(frozen=True)
class APGDConfig:
    """An APGD attack (static structure; `eps` is traced at run time).

    Attributes:
      norm: "linf" or "l2".
      eps: the radius of the eps-ball (l_inf: in [0, 1]).
      steps: N >= 1 iterations (AutoAttack: 100).
      loss: "ce" (APGD-CE) or "dlr" (APGD-DLR).
      gradient: the gradient estimator (`Gradient(kind, eot)`).
      rho: the oscillation threshold of the step-size schedule (0.75).
      return_trajectory: also return the loss `[N, B]` and the purifier keys of each
        gradient `[N + 1, K, B, ...]`.
    """

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 100
    loss: str = "ce"
    gradient: gradients.Gradient = gradients.Gradient()
    rho: float = 0.75
    return_trajectory: bool = False

    def __post_init__(self):
        _checks.check_choice(self.norm, "norm", NORMS)
        _checks.check_number(self.eps, "eps", lo=0.0, hi=1.0 if self.norm == "linf" else None,
                             hint="l_inf budgets are fractions of the [0, 1] pixel range")
        _checks.check_int(self.steps, "steps", lo=1)
        _checks.check_choice(self.loss, "loss", APGD_LOSSES)
        _checks.check_number(self.rho, "rho", lo=0.0, hi=1.0)
        if not isinstance(self.gradient, gradients.Gradient):
            _checks.fail("gradient", "a diffjax.attacks.Gradient", repr(self.gradient))


def checkpoint_schedule(steps: int) -> list[int]:
    """The iterations (0-based) after which APGD checks its step size, for N = `steps`."""
    k = max(int(0.22 * steps), 1)
    n_min, decr = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, i = [], k - 1
    while i < steps:
        out.append(i)
        k = max(k - decr, n_min)
        i += k
    return out


def _start(keys, x, eps, norm):
    def one(key, xi):
        if norm == "linf":
            t = jax.random.uniform(key, xi.shape, minval=-1.0, maxval=1.0)
            return t / (jnp.max(jnp.abs(t)) + 1e-12)
        t = jax.random.normal(key, xi.shape)
        return t / (jnp.sqrt(jnp.sum(t * t)) + 1e-12)

    t = jax.vmap(one)(keys, x)
    return jnp.clip(x + eps * t, 0.0, 1.0)


def _direction(g, norm):
    if norm == "linf":
        return jnp.sign(g)
    return g / _bcast(_flat_norm(g, "l2") + 1e-12, g)


def apgd_attack(defense, x, y, example_keys, *, config: APGDConfig, protocol: str = "fixed"):
    """Runs APGD (one restart) against `defense` under a randomness protocol.

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` float32 clean images in [0, 1].
      y: `[B]` int32 labels.
      example_keys: `[B]` typed per-example keys.
      config: an `APGDConfig`.
      protocol: "fixed", "independent" or "transfer" (the attack side; module docstring).

    Returns:
      A `diffjax.attacks.PGDResult`; `success` is True where some iterate was misclassified
      under the attack's randomness of that iteration.
    """
    from diffjax.attacks.pgd import _validate

    if not isinstance(config, APGDConfig):
        _checks.fail("config", "an APGDConfig", type(config).__name__)
    example_keys = _validate(defense, x, y, example_keys, protocol, config.gradient)
    static = dataclasses.replace(config, eps=0.0)
    like = x
    defense, x, y, example_keys = _sharding.to_auto((defense, x, y, example_keys))
    out = _apgd_jit(defense, x, jnp.asarray(y, jnp.int32), example_keys,
                    jnp.float32(config.eps), jnp.float32(0.0), static=static,
                    protocol=protocol)
    return _sharding.restore(out, like)


def _apgd_impl(defense, x, y, example_keys, eps, step_size, *, static: APGDConfig, protocol):
    del step_size  # APGD sets its own (2 eps, then halved at checkpoints)
    _TRACES["apgd"] += 1
    cfg = static
    n, b = cfg.steps, x.shape[0]
    n_iter_2 = max(int(0.22 * n), 1)
    n_iter_min = max(int(0.06 * n), 1)
    size_decr = max(int(0.03 * n), 1)
    num_draws = cfg.gradient.eot

    def grad_at(xa, it):
        keys = streams.attack_draw_keys(protocol, example_keys, it, num_draws)
        loss, g, logits = gradients.loss_and_grad(defense, xa, y, keys, loss=cfg.loss,
                                                  gradient=cfg.gradient)
        return loss, g, logits, jax.random.key_data(keys)

    x_adv = _start(streams.start_keys(example_keys), x, eps, cfg.norm)
    loss0, g0, logits0, keys0 = grad_at(x_adv, jnp.uint32(0))
    state = dict(
        x_adv=x_adv, x_old=x_adv, grad=g0, x_best=x_adv, x_best_adv=x_adv, grad_best=g0,
        loss_best=loss0, acc=jnp.argmax(logits0, axis=-1) == y,
        step=jnp.full((b,), 2.0, jnp.float32) * eps, loss_steps=jnp.zeros((n, b), jnp.float32),
        loss_best_last=loss0, reduced_last=jnp.ones((b,), bool),
        k=jnp.int32(n_iter_2), counter=jnp.int32(0))
    idx = jnp.arange(n)

    def body(s, i):
        grad2 = s["x_adv"] - s["x_old"]
        x_old = s["x_adv"]
        a = jnp.where(i > 0, 0.75, 1.0)
        xa = s["x_adv"]
        z = project(xa + _bcast(s["step"], xa) * _direction(s["grad"], cfg.norm), x, eps,
                    cfg.norm)
        x1 = project(xa + (z - xa) * a + grad2 * (1.0 - a), x, eps, cfg.norm)

        loss, grad, logits, keys = grad_at(x1, (i + 1).astype(jnp.uint32))
        pred = jnp.argmax(logits, axis=-1) == y
        acc = s["acc"] & pred
        x_best_adv = jnp.where(_bcast(~pred, x1), x1, s["x_best_adv"])
        loss_steps = s["loss_steps"].at[i].set(loss)
        improve = loss > s["loss_best"]
        x_best = jnp.where(_bcast(improve, x1), x1, s["x_best"])
        grad_best = jnp.where(_bcast(improve, x1), grad, s["grad_best"])
        loss_best = jnp.where(improve, loss, s["loss_best"])

        counter = s["counter"] + 1
        k = s["k"]
        check = counter == k
        # Loss increases over the last k iterations (index -1 wraps, as in the reference).
        prev = jnp.roll(loss_steps, 1, axis=0)
        window = (idx <= i) & (idx > i - k)
        n_incr = jnp.sum(window[:, None] & (loss_steps > prev), axis=0)
        fl_osc = n_incr <= k * cfg.rho
        fl_noimpr = ~s["reduced_last"] & (s["loss_best_last"] >= loss_best)
        fl = fl_osc | fl_noimpr
        reduce = check & fl
        new = dict(
            x_old=x_old, x_best=x_best, x_best_adv=x_best_adv, grad_best=grad_best,
            loss_best=loss_best, acc=acc, loss_steps=loss_steps,
            x_adv=jnp.where(_bcast(reduce, x1), x_best, x1),
            grad=jnp.where(_bcast(reduce, x1), grad_best, grad),
            step=jnp.where(reduce, s["step"] / 2.0, s["step"]),
            reduced_last=jnp.where(check, fl, s["reduced_last"]),
            loss_best_last=jnp.where(check, loss_best, s["loss_best_last"]),
            k=jnp.where(check, jnp.maximum(k - size_decr, n_iter_min), k),
            counter=jnp.where(check, 0, counter))
        return new, (keys if cfg.return_trajectory else None)

    s, key_traj = jax.lax.scan(body, state, jnp.arange(n, dtype=jnp.int32))
    fooled = ~s["acc"]
    x_out = jnp.where(_bcast(fooled, x), s["x_best_adv"], s["x_best"])
    delta = x_out - x
    loss_traj = None
    if cfg.return_trajectory:
        loss_traj = s["loss_steps"]
        key_traj = jnp.concatenate([keys0[None], key_traj], axis=0)
    return PGDResult(x_out, fooled, _flat_norm(delta, "linf"), _flat_norm(delta, "l2"),
                     loss_traj, key_traj)


_apgd_jit = jax.jit(_apgd_impl, static_argnames=("static", "protocol"))
