"""APGD-CE, APGD-DLR and APGD-T (Croce & Hein, ICML 2020), with explicit keys.

Auto-PGD is AutoAttack's workhorse: PGD with momentum (alpha = 0.75) whose step size
starts at 2 eps and is halved at checkpoints when the loss stalls. This is our JAX version
of the schedule of the reference implementation (`fra31/auto-attack`,
`autoattack/autopgd_base.py`, `attack_single_run`, l_inf and l_2), one restart per config
(`restart` picks which random start; a cascade runs several, `diffjax.attacks.cascade`):

- start: `x + eps * t / ||t||` (l_inf: t uniform in [-1, 1]^d, normalised by its max;
  l_2: t Gaussian), clipped to [0, 1]; key ``fold_in(k, START)`` (restart 0), else
  ``fold_in(fold_in(k, START), restart)``.
- step i (a = 1 at i = 0, else 0.75): `z = P(x_i + eta * s(g_i))`,
  `x_{i+1} = P(x_i + a (z - x_i) + (1 - a)(x_i - x_{i-1}))`, `s` = sign (l_inf) or the
  unit l_2 direction, `P` the projection onto the ball and [0, 1].
- checkpoints: the first after `max(int(0.22 N), 1)` iterations, then the interval shrinks
  by `max(int(0.03 N), 1)` down to `max(int(0.06 N), 1)`. At a checkpoint the step size of
  an example is halved, and it restarts from its best point (and that point's gradient),
  when (1) the loss increased in at most `rho * k` of the last k iterations, or (2) its
  step was not reduced at the previous checkpoint and its best loss has not improved since.
- the result: a point misclassified under the attack's randomness where there is one
  (AutoAttack's `x_best_adv`), else the point of highest loss (`x_best`). When the protocol
  attacks the realization (`Fixed`, `Transfer`), success is deterministic and a fooled
  example keeps its first fooling point and stops (AutoAttack keeps updating it with later
  fooling points: either fools); so a run in chunks with early exit
  (`diffjax.attacks.cascade`) equals the whole run.
- APGD-T (`loss="dlr_targeted"`, `target_rank=r`): the targeted DLR loss towards the
  class ranked `r` (2 = the runner-up) by the classifier's logits at the clean image, as
  AutoAttack's `apgd-t` does for r = 2 .. 10. Against a purified model AutoAttack would
  rank the defended model's logits; we rank the classifier's own (no purification in
  `init`: one compiled purifier program fewer per attack), a choice of which classes to
  try, not of how hard to attack them.

Randomness: the gradient at iteration i (i = 0 is the start, i = 1..N the iterates) uses
`protocol.attack_keys(k, i)`: under ``Fixed``/``Transfer`` the example's realization
throughout; under ``Independent`` fresh draws with EOT over K. Under fresh draws the loss
comparisons of the schedule are noisy: AutoAttack's handling of randomized defenses is a
known open problem, and this implementation does not hide it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffjax import _checks, protocols
from diffjax.attacks import engine, gradients
from diffjax.attacks.engine import AttackResult, bcast, flat_norm
from diffjax.attacks.pgd import NORMS, project

__all__ = ["APGDConfig", "apgd_attack", "checkpoint_schedule", "start_point", "APGD_LOSSES"]

APGD_LOSSES = ("ce", "dlr", "dlr_targeted")


@dataclasses.dataclass(frozen=True)
class APGDConfig:
    """An APGD attack (static structure; `eps` is traced at run time).

    Attributes:
      norm: "linf" or "l2".
      eps: the radius of the eps-ball (l_inf: in [0, 1]).
      steps: N >= 1 iterations (AutoAttack: 100).
      loss: "ce" (APGD-CE), "dlr" (APGD-DLR) or "dlr_targeted" (APGD-T).
      gradient: the gradient estimator (`Gradient(kind)`; EOT is the protocol's).
      rho: the oscillation threshold of the step-size schedule (0.75).
      restart: which random start (0, 1, ...; module docstring).
      target_rank: APGD-T's target: the class ranked this by the clean logits (2 = the
        runner-up); ignored by the untargeted losses.
      keep_fooling_point: under a protocol that attacks the realization, a fooled example
        keeps its first fooling point and stops (module docstring); False continues as
        AutoAttack does.
      return_trajectory: also return the loss `[N, B]` and the purifier keys of each
        gradient `[N + 1, K, B, ...]`.
    """

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 100
    loss: str = "ce"
    gradient: gradients.Gradient = gradients.Gradient()
    rho: float = 0.75
    restart: int = 0
    target_rank: int = 2
    keep_fooling_point: bool = True
    return_trajectory: bool = False
    # `init` and `finish` use neither the protocol nor the estimator (`engine.for_init`).
    init_uses_protocol = False
    finish_uses_protocol = False

    def __post_init__(self):
        _checks.check_choice(self.norm, "norm", NORMS)
        _checks.check_number(self.eps, "eps", lo=0.0, hi=1.0 if self.norm == "linf" else None,
                             hint="l_inf budgets are fractions of the [0, 1] pixel range")
        _checks.check_int(self.steps, "steps", lo=1)
        _checks.check_choice(self.loss, "loss", APGD_LOSSES)
        _checks.check_number(self.rho, "rho", lo=0.0, hi=1.0)
        _checks.check_int(self.restart, "restart", lo=0)
        _checks.check_int(self.target_rank, "target_rank", lo=2)
        if not isinstance(self.gradient, gradients.Gradient):
            _checks.fail("gradient", "a diffjax.attacks.Gradient", repr(self.gradient))

    # -- the engine's interface (diffjax.attacks.engine) ----------------------------
    #
    # One engine step evaluates the current candidate (the gradient AutoAttack takes after
    # its update) and proposes the next: step 0 evaluates the random start, step j >= 1
    # finishes AutoAttack's iteration j - 1 (best points, step-size checkpoint) and
    # proposes iteration j's point, so `steps` iterations are `steps + 1` engine steps and
    # `init` calls the model only for APGD-T's target. The steps, the restart, the target
    # rank and the loss are traced (`traced_options`): every APGD variant of a cascade
    # (APGD-CE, APGD-T over its targets, any number of steps) runs one compiled program.
    # The oscillation test counts loss increases since the last checkpoint, which is the
    # reference's window of the last k iterations.

    @property
    def total_iterations(self) -> int:
        return self.steps + 1

    def iterations(self, ctx):
        return ctx.options["steps"] + 1

    def traced_options(self):
        values = {"steps": self.steps, "restart": self.restart,
                  "target_rank": self.target_rank, "loss": APGD_LOSSES.index(self.loss)}
        canonical = {"steps": 1, "restart": 0, "target_rank": 2, "loss": "ce"}
        if self.return_trajectory:  # the trajectory's shape needs the steps
            del values["steps"], canonical["steps"]
        return values, canonical

    def check(self, num_classes: int) -> None:
        """One-line errors for a loss or a target that this classifier cannot have."""
        need = {"ce": 2, "dlr": 3, "dlr_targeted": 4}[self.loss]
        if num_classes < need:
            _checks.fail("loss", f"a loss defined for {num_classes} classes ('ce'"
                         + (", 'dlr'" if num_classes >= 3 else "") + ")",
                         f"{self.loss!r}, which needs {need} classes")
        if self.loss == "dlr_targeted" and self.target_rank > num_classes:
            _checks.fail("target_rank", f"a rank in [2, {num_classes}]", self.target_rank)

    def _steps(self, ctx):
        return ctx.options["steps"] if "steps" in ctx.options else jnp.int32(self.steps)

    def init(self, ctx, protocol, x, y):
        del protocol, y
        b = x.shape[0]
        n = self._steps(ctx)
        keys = protocols.start_keys(ctx.example_keys)
        restart = ctx.options.get("restart", jnp.int32(self.restart))
        again = jax.random.key_data(jax.vmap(lambda k: jax.random.fold_in(k, restart))(keys))
        keys = jax.random.wrap_key_data(jnp.where(restart > 0, again,
                                                  jax.random.key_data(keys)))
        x0 = start_point(keys, x, ctx.eps, self.norm)
        rank = ctx.options.get("target_rank", jnp.int32(self.target_rank))
        order = jnp.argsort(ctx.defense.logits_fn(x), axis=-1)  # the classifier's ranking
        target = jnp.take(order, order.shape[-1] - rank, axis=-1).astype(jnp.int32)
        zeros = jnp.zeros((b,), jnp.float32)
        state = dict(
            x_cand=x0, x_adv=x0, x_old=x0, grad=jnp.zeros_like(x0), x_best=x0, x_best_adv=x0,
            grad_best=jnp.zeros_like(x0), loss_best=zeros, acc=jnp.ones((b,), bool),
            step=2.0 * ctx.eps, loss_prev=zeros, n_incr=jnp.zeros((b,), jnp.int32),
            loss_best_last=zeros, reduced_last=jnp.ones((b,), bool),
            k=jnp.broadcast_to(jnp.maximum((22 * n) // 100, 1), (b,)).astype(jnp.int32),
            counter=jnp.zeros((b,), jnp.int32), target=target)
        return state

    def _loss_index(self, ctx):
        return ctx.options.get("loss", jnp.int32(APGD_LOSSES.index(self.loss)))

    def query(self, ctx, protocol, x, y, s, i):
        """What iteration `i` asks the gradient oracle (`engine.advance_shared`): the point,
        the purifier keys `[K, B]`, the index of the loss in `gradients.LOSSES` and the
        target classes."""
        del x, y
        index = jnp.asarray([gradients.LOSSES.index(v) for v in APGD_LOSSES],
                            jnp.int32)[self._loss_index(ctx)]
        return s["x_cand"], protocol.attack_keys(ctx.example_keys, i), index, s["target"]

    def step(self, ctx, protocol, x, y, s, i):
        keys = protocol.attack_keys(ctx.example_keys, i)
        loss, grad, logits = gradients.loss_and_grad(
            ctx.defense, s["x_cand"], y, keys, loss=APGD_LOSSES, gradient=self.gradient,
            target=s["target"], loss_index=self._loss_index(ctx))
        return self.absorb(ctx, protocol, x, y, s, i, keys, loss, grad, logits)

    def absorb(self, ctx, protocol, x, y, s, i, keys, loss, grad, logits):
        """The rest of `step`, given the oracle's answer at `query`'s point."""
        n = self._steps(ctx)
        n_iter_min, size_decr = jnp.maximum((6 * n) // 100, 1), jnp.maximum((3 * n) // 100, 1)
        j = i.astype(jnp.int32)
        first = j == 0
        xc = s["x_cand"]
        pred = jnp.argmax(logits, axis=-1) == y

        # A: AutoAttack's update after evaluating iteration j - 1's point (j = 0: the start).
        acc = jnp.where(first, pred, s["acc"] & pred)
        x_best_adv = jnp.where(bcast(~pred & ~first, xc), xc, s["x_best_adv"])
        improve = first | (loss > s["loss_best"])
        x_best = jnp.where(bcast(improve, xc), xc, s["x_best"])
        grad_best = jnp.where(bcast(improve, xc), grad, s["grad_best"])
        loss_best = jnp.where(improve, loss, s["loss_best"])
        # Increases since the last checkpoint (the reference compares iteration 0 with the
        # zero-initialised end of its loss history: loss_prev starts at 0).
        n_incr = s["n_incr"] + (~first & (loss > s["loss_prev"])).astype(jnp.int32)
        counter = jnp.where(first, 0, s["counter"] + 1)
        k = s["k"]
        check = ~first & (counter == k)
        fl_osc = n_incr <= k * self.rho
        fl_noimpr = ~s["reduced_last"] & (s["loss_best_last"] >= loss_best)
        fl = fl_osc | fl_noimpr
        reduce = check & fl
        x_adv = jnp.where(bcast(reduce, xc), x_best, xc)
        g_next = jnp.where(bcast(reduce, xc), grad_best, grad)
        new = dict(
            s, acc=acc, x_best_adv=x_best_adv, x_best=x_best, grad_best=grad_best,
            loss_best=loss_best, x_adv=x_adv, grad=g_next,
            step=jnp.where(reduce, s["step"] / 2.0, s["step"]),
            reduced_last=jnp.where(check, fl, s["reduced_last"]),
            loss_best_last=jnp.where(first | check, loss_best, s["loss_best_last"]),
            k=jnp.where(check, jnp.maximum(k - size_decr, n_iter_min), k),
            counter=jnp.where(check, 0, counter), n_incr=jnp.where(check, 0, n_incr),
            loss_prev=jnp.where(first, 0.0, loss))

        # B: propose iteration j's point (momentum 0.75 except at j = 0).
        a = jnp.where(first, 1.0, 0.75)
        grad2 = x_adv - new["x_old"]
        z = project(x_adv + bcast(new["step"], x_adv) * _direction(g_next, self.norm), x,
                    ctx.eps, self.norm)
        new["x_cand"] = project(x_adv + (z - x_adv) * a + grad2 * (1.0 - a), x, ctx.eps,
                                self.norm)
        new["x_old"] = x_adv
        if self.keep_fooling_point and protocol.attack_stream == "realization":
            # Success is deterministic: a fooled example keeps its first fooling point and
            # its state (so chunked runs with early exit equal the whole run).
            done = ~s["acc"] & ~first
            new = {key: jnp.where(bcast(done, v), s[key], v) for key, v in new.items()}
        record = (loss, jax.random.key_data(keys)) if self.return_trajectory else None
        return new, record

    def finish(self, ctx, protocol, x, y, s, records):
        del ctx, protocol, y
        fooled = ~s["acc"]
        x_out = jnp.where(bcast(fooled, x), s["x_best_adv"], s["x_best"])
        loss_traj = key_traj = None
        if self.return_trajectory and records is not None:
            loss_traj, key_traj = records[0][1:], records[1]
        return engine.result_of(x, x_out, fooled, loss_traj, key_traj)

    def fooled(self, state):
        return ~state["acc"]


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


def start_point(keys, x, eps, norm):
    """APGD's random start `x + eps t / ||t||`, clipped to [0, 1] (`eps` scalar or `[B]`)."""
    eps_b = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (x.shape[0],))

    def one(key, xi):
        if norm == "linf":
            t = jax.random.uniform(key, xi.shape, minval=-1.0, maxval=1.0)
            return t / (jnp.max(jnp.abs(t)) + 1e-12)
        t = jax.random.normal(key, xi.shape)
        return t / (jnp.sqrt(jnp.sum(t * t)) + 1e-12)

    t = jax.vmap(one)(keys, x)
    return jnp.clip(x + bcast(eps_b, x) * t, 0.0, 1.0)


def _direction(g, norm):
    if norm == "linf":
        return jnp.sign(g)
    return g / bcast(flat_norm(g, "l2") + 1e-12, g)


def apgd_attack(defense, x, y, example_keys, *, config: APGDConfig, protocol="fixed",
                eps=None) -> AttackResult:
    """Runs APGD (one restart) against `defense` under a randomness protocol.

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` float32 clean images in [0, 1].
      y: `[B]` int32 labels.
      example_keys: `[B]` typed per-example keys.
      config: an `APGDConfig`.
      protocol: a `diffjax.protocols.Protocol` or its name (the attack side; module doc).
      eps: overrides `config.eps`: a number or one budget per example `[B]` (traced).

    Returns:
      An `AttackResult`; `success` is True where some iterate was misclassified under the
      attack's randomness of that iteration.
    """
    if not isinstance(config, APGDConfig):
        _checks.fail("config", "an APGDConfig", type(config).__name__)
    return engine.run(config, defense, x, y, example_keys, protocol, eps=eps)
