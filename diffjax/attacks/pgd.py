"""Projected gradient descent (Madry et al. 2018) against a randomized defense.

The whole attack is one `lax.scan` over iterations inside one `jit`
(`diffjax.attacks.engine`). The program depends only on the *structure* of the attack
(norm, steps, loss, gradient estimator, protocol, shapes); `eps` and `step_size` are traced
(scalars or one per example), so sweeping the budget reuses one compiled program, and so
does swapping the defense's weights (a `Defense` is a pytree whose weights are leaves).

The purifier randomness at iteration i is `protocol.attack_keys(k, i)`
(`diffjax.protocols`): a function of (protocol, example key, iteration) only.

What is returned: Madry et al.'s PGD returns its last iterate, which can even un-fool an
example the attack had fooled along the way. When the protocol attacks the example's
realization (`Fixed`, `Transfer`), success is deterministic, so by default
(`keep_fooling_point=True`) an example keeps the first iterate that fooled it and moves no
further: the attack is at least as strong as the last-iterate one on every example (an
example fooled by the last iterate was either never fooled before, and then followed the
same path, or was fooled earlier and kept that point), and a driver may stop attacking it
(`diffjax.attacks.cascade`). Under fresh draws (`Independent`) "fooled once" is not
deterministic, and the last iterate is returned.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffjax import _checks, protocols
from diffjax.attacks import engine, gradients
from diffjax.attacks.engine import AttackResult, bcast, flat_norm

__all__ = ["PGDConfig", "PGDResult", "pgd_attack", "NORMS", "project", "normalize",
           "random_start"]

NORMS = ("linf", "l2")

PGDResult = AttackResult  # the name before every attack shared one result type


@dataclasses.dataclass(frozen=True)
class PGDConfig:
    """A PGD attack (static structure; `eps` and `step_size` are traced at run time).

    Attributes:
      norm: "linf" or "l2", the threat model.
      eps: the radius of the eps-ball (l_inf: in [0, 1]; images live in [0, 1]).
      step_size: the step length (l_inf: per-pixel sign step; l2: along the unit gradient).
      steps: the number of iterations, >= 1.
      random_start: start at a uniform point of the eps-ball (else at x).
      loss: "ce", "margin" (CW), "dlr" or "dlr_targeted" (see `gradients.attack_loss`).
      gradient: the gradient estimator (`Gradient(kind="full"|"bpda")`; EOT is the
        protocol's: `Independent(eot=K)`).
      keep_fooling_point: under a protocol that attacks the realization, keep the first
        iterate that fools an example (module docstring); False returns the last iterate
        (as torchattacks and Madry et al. do).
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
    keep_fooling_point: bool = True
    return_trajectory: bool = False
    # `init` uses neither the protocol nor the estimator (`engine.for_init`).
    init_uses_protocol = False

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

    # -- the engine's interface (diffjax.attacks.engine) ----------------------------

    @property
    def total_iterations(self) -> int:
        return self.steps

    def iterations(self, ctx):
        return ctx.options["steps"] if "steps" in ctx.options else jnp.int32(self.steps)

    def traced_options(self):
        if self.return_trajectory:  # the trajectory's shape needs the steps
            return {}, {}
        return {"steps": self.steps}, {"steps": 1}

    def _freezes(self, protocol) -> bool:
        return self.keep_fooling_point and protocol.attack_stream == "realization"

    def init(self, ctx, protocol, x, y):
        del protocol, y
        if self.random_start:
            x0 = random_start(protocols.start_keys(ctx.example_keys), x, ctx.eps, self.norm)
        else:
            x0 = x
        return {"x": x0, "fooled": jnp.zeros(x.shape[0], bool)}

    def query(self, ctx, protocol, x, y, state, i):
        """What iteration `i` asks the gradient oracle (`engine.advance_shared`): the point,
        the purifier keys `[K, B]`, the index of the loss in `gradients.LOSSES` and the
        target classes (unused)."""
        del x
        return (state["x"], protocol.attack_keys(ctx.example_keys, i),
                jnp.int32(gradients.LOSSES.index(self.loss)), jnp.zeros_like(y))

    def step(self, ctx, protocol, x, y, state, i):
        keys = protocol.attack_keys(ctx.example_keys, i)
        losses, g, logits = gradients.loss_and_grad(ctx.defense, state["x"], y, keys,
                                                    loss=self.loss, gradient=self.gradient)
        return self.absorb(ctx, protocol, x, y, state, i, keys, losses, g, logits)

    def absorb(self, ctx, protocol, x, y, state, i, keys, losses, g, logits):
        """The rest of `step`, given the oracle's answer at `query`'s point."""
        moved = project(state["x"] + bcast(ctx.step_size, g) * normalize(g, self.norm), x,
                        ctx.eps, self.norm)
        if self._freezes(protocol):
            # logits are draw 0's at the current iterate: the realization's.
            fooled = state["fooled"] | (jnp.argmax(logits, axis=-1) != y)
            x_new = jnp.where(bcast(fooled, x), state["x"], moved)
        else:
            fooled, x_new = state["fooled"], moved
        record = (losses, jax.random.key_data(keys)) if self.return_trajectory else None
        return {"x": x_new, "fooled": fooled}, record

    def finish(self, ctx, protocol, x, y, state, records):
        final = self.iterations(ctx).astype(jnp.uint32)
        final_keys = protocol.attack_keys(ctx.example_keys, final)[0]
        wrong = jnp.argmax(ctx.defense.logits(state["x"], final_keys), axis=-1) != y
        success = wrong | state["fooled"] if self._freezes(protocol) else wrong
        loss_traj, key_traj = records if records is not None else (None, None)
        return engine.result_of(x, state["x"], success, loss_traj, key_traj)

    def fooled(self, state):
        return state["fooled"]


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
    eps = jnp.asarray(eps, delta.dtype)
    if eps.ndim == 1:
        eps = bcast(eps, delta)
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        n = bcast(flat_norm(delta, "l2"), delta)
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
    return jnp.clip(x + delta, 0.0, 1.0)


def normalize(g, norm: str):
    """The steepest-ascent direction of unit `norm`: sign(g) (l_inf) or g / ||g||_2 (l2)."""
    if norm == "linf":
        return jnp.sign(g)
    return g / bcast(flat_norm(g, "l2") + 1e-12, g)


def random_start(keys, x, eps, norm: str):
    """A uniform point of the eps-ball around each `x`, clipped to [0, 1] (per-example keys;
    `eps` a scalar or `[B]`)."""
    eps_b = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (x.shape[0],))

    def one(k, xi, e):
        if norm == "linf":
            return jax.random.uniform(k, xi.shape, minval=-1.0, maxval=1.0) * e
        k1, k2 = jax.random.split(k)
        g = jax.random.normal(k1, xi.shape)
        r = jax.random.uniform(k2) ** (1.0 / xi.size)
        return g / (jnp.linalg.norm(g.ravel()) + 1e-12) * r * e

    delta = jax.vmap(one)(keys, x, eps_b)
    return project(x + delta, x, eps_b, norm)


def pgd_attack(defense, x, y, example_keys, *, config: PGDConfig, protocol="fixed",
               eps=None, step_size=None):
    """Runs PGD against `defense` under a randomness protocol.

    Args:
      defense: a `diffjax.defense.Defense` (`undefended(logits_fn)` for a bare classifier).
      x: `[B,H,W,C]` float32 clean images in [0, 1].
      y: `[B]` int32 labels.
      example_keys: `[B]` typed keys, one per example (from its id or clean content).
      config: the attack (`PGDConfig`).
      protocol: a `diffjax.protocols.Protocol` (`Fixed()`, `Transfer(M)`,
        `Independent(eot=K)`) or its name; `Transfer` attacks like `Fixed`.
      eps: overrides `config.eps`: a number or one budget per example `[B]` (traced).
      step_size: overrides `config.step_size` likewise.

    Returns:
      An `AttackResult` (alias `PGDResult`).
    """
    if not isinstance(config, PGDConfig):
        _checks.fail("config", "a PGDConfig", type(config).__name__)
    return engine.run(config, defense, x, y, example_keys, protocol, eps=eps,
                      step_size=step_size)
