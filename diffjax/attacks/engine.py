"""The one jit boundary of every attack, and iterative attacks as init / step / finish.

Every attack in diffjax (`PGDConfig`, `APGDConfig`, `SquareConfig`, ...) is a frozen,
hashable config with three pure methods over a per-example state (a pytree whose every
leaf has the batch as its leading axis):

- ``init(ctx, protocol, x, y) -> state``: the start (iteration 0's point, its gradient...);
- ``step(ctx, protocol, x, y, state, i) -> (state, record)``: iteration `i` (a traced
  uint32), `record` a per-iteration output for the trajectory (or None);
- ``finish(ctx, protocol, x, y, state) -> AttackResult``;

plus ``fooled(state) -> [B] bool`` (a fooling point has been found under the attack's own
randomness), ``total_iterations`` (how many times `step` runs) and
``iterations(ctx)`` (the same, possibly traced). `ctx` (a `Context`) carries the traced
inputs: the defense (its weights are pytree leaves), the example keys, the per-example
`eps` and `step_size` (`[B]`) and the attack's `TRACED` options (e.g. APGD's steps,
restart, target class and loss), so a new budget, new weights, new keys or another
variant of the same attack reuse the compiled program -- on a CPU, compiling a gradient
through a purifier costs as much as running many of its iterations -- and per-example
budgets (e.g. a bisection over eps) work.

Three ways to run an attack, all through this module:

- `run(attack, defense, x, y, example_keys, protocol)`: the whole attack in one `jit`
  (init, one `lax.scan` over the iterations, finish): `pgd_attack` and `apgd_attack` are
  this;
- `init_state` / `advance` / `finish_state`: the same attack in chunks of iterations, so
  that a driver can drop the examples already fooled between chunks and repack the rest
  into full batches (`diffjax.attacks.cascade`: early exit). Iterations past `steps` are
  no-ops, so every chunk of one length is one compiled program, and the state after any
  number of chunks equals the state of the whole run at that iteration: chunked and
  whole runs give the same adversarial examples;
- `advance_shared`: the chunk as a host loop over iterations, each split at its one
  gradient (`attack.query`, the shared `gradients.oracle_program`, `attack.absorb`), so
  that every attack, protocol, EOT count and estimator of a defense -- and the gradient
  correlation and the Jacobians, which call the oracle too -- share one compiled
  gradient program (`Cascade(shared_oracle=True)`; what a CPU study needs, where
  compiling each costs seconds). Agrees with `advance_program` to float32 rounding.

Sharding: inputs that live on an explicit-axis mesh (`jax.make_mesh`'s default) are moved
to the same devices with Auto axes (no data moves) and the outputs back (`to_auto`,
`restore`): per-example code such as `vmap` over EOT draws of a convolution reshapes the
sharded batch axis, which explicit mode refuses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding

from diffjax import _checks, protocols
from diffjax.attacks import gradients

__all__ = [
    "AttackResult", "Context", "validate", "static_and_budget", "run", "init_state",
    "advance", "finish_state", "to_auto", "restore", "auto_mesh", "per_example",
    "make_context", "flat_norm", "bcast", "result_of", "run_program", "init_program",
    "advance_program", "finish_program", "for_init", "for_finish", "shares_oracle",
    "advance_shared",
]


class AttackResult(NamedTuple):
    """Per-example results of an attack (a pytree).

    Attributes:
      x_adv: `[B,H,W,C]` adversarial images in [0, 1], inside the eps-ball around x.
      success: `[B]` bool, fooled under the attack's own randomness (under a protocol
        whose attack sees the realization: fooled under the realization, i.e. exactly what
        the `Fixed` evaluation will find).
      linf: `[B]` the l_inf norm of `x_adv - x`.
      l2: `[B]` the l_2 norm of `x_adv - x`.
      loss_trajectory: `[steps, B]` the attack loss at each iterate, or None.
      key_trajectory: `[steps, K, B, ...]` uint32 key data of the purifier keys of each
        iteration, or None.
    """

    x_adv: jax.Array
    success: jax.Array
    linf: jax.Array
    l2: jax.Array
    loss_trajectory: jax.Array | None = None
    key_trajectory: jax.Array | None = None


class Context(NamedTuple):
    """The traced inputs every attack method sees (a pytree)."""

    defense: Any
    example_keys: jax.Array
    eps: jax.Array  # [B]
    step_size: jax.Array  # [B]
    options: dict  # name -> traced int32 scalar (the attack's TRACED options)


def flat_norm(v, ord_: str):
    """Per-example l_inf or l_2 norm `[B]` of `v` `[B, ...]`."""
    flat = v.reshape(v.shape[0], -1)
    if ord_ == "linf":
        return jnp.max(jnp.abs(flat), axis=-1)
    return jnp.sqrt(jnp.sum(flat * flat, axis=-1))


def bcast(v, like):
    """`[B]` -> `[B, 1, 1, ...]` broadcastable against `like`."""
    return jnp.reshape(v, (-1,) + (1,) * (like.ndim - 1))


def result_of(x, x_adv, success, loss_traj=None, key_traj=None) -> AttackResult:
    """An `AttackResult` with the norms of `x_adv - x`."""
    delta = x_adv - x
    return AttackResult(x_adv, success, flat_norm(delta, "linf"), flat_norm(delta, "l2"),
                        loss_traj, key_traj)


# ------------------------------------------------------------------------ sharding


def _concrete(a) -> bool:
    """A placed array (not a tracer: inside a caller's jit the caller owns the sharding)."""
    return isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)


def _explicit(s) -> bool:
    return isinstance(s, NamedSharding) and any(t == AxisType.Explicit
                                                for t in s.mesh.axis_types)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same mesh with every axis `Auto`."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _is_key(a) -> bool:
    return jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


def to_auto(tree):
    """Re-places every array of `tree` that lives on an explicit mesh onto its `Auto` twin."""

    def one(a):
        s = getattr(a, "sharding", None) if _concrete(a) else None
        if not (_concrete(a) and _explicit(s)):
            return a
        if _is_key(a):  # typed keys: move their data (its sharding has one more axis)
            data = jax.random.key_data(a)
            moved = jax.device_put(data, NamedSharding(auto_mesh(s.mesh),
                                                       data.sharding.spec))
            return jax.random.wrap_key_data(moved, impl=jax.random.key_impl(a))
        return jax.device_put(a, NamedSharding(auto_mesh(s.mesh), s.spec))

    return jax.tree.map(one, tree)


def restore(tree, like):
    """Puts the arrays of `tree` back on the explicit mesh of `like` (the caller's input)."""
    s = getattr(like, "sharding", None) if _concrete(like) else None
    if not _explicit(s):
        return tree
    mesh = s.mesh

    def one(a):
        sa = getattr(a, "sharding", None) if _concrete(a) else None
        if isinstance(sa, NamedSharding) and sa.mesh.devices.shape == mesh.devices.shape:
            return jax.device_put(a, NamedSharding(mesh, sa.spec))
        return a

    return jax.tree.map(one, tree)


# ------------------------------------------------------------------------ boundary


def validate(defense, x, y, example_keys, protocol, gradient=None, attack=None):
    """Checks an attack's inputs; returns `(example_keys, protocol)` normalised.

    `protocol` may be a `diffjax.protocols.Protocol` or a name; with a name, a
    `gradient.eot` > 1 (the older way to ask for EOT) makes it `Independent(eot=K)`.
    `attack.check(num_classes)`, where the attack has one, says what the classifier
    cannot support (e.g. a targeted loss with too few classes).
    """
    from diffjax.defense import Defense

    if not isinstance(defense, Defense):
        _checks.fail("defense", "a diffjax.defense.Defense", type(defense).__name__,
                     "wrap a classifier with diffjax.defense.undefended(logits_fn)")
    _checks.check_images(x, "x")
    b = x.shape[0]
    _checks.check_labels(y, b, defense.num_classes(x), "y")
    if attack is not None and hasattr(attack, "check"):
        attack.check(defense.num_classes(x))
    example_keys = _checks.check_keys(example_keys, b, "example_keys")
    eot = getattr(gradient, "eot", 1)
    protocol = protocols.as_protocol(protocol, eot=eot if eot != 1 else None)
    return example_keys, protocol


def per_example(value, batch: int, name: str):
    """A scalar or `[B]` budget as a float32 `[B]` array (values checked when concrete)."""
    v = jnp.asarray(value, jnp.float32)
    if v.ndim == 0:
        v = jnp.broadcast_to(v, (batch,))
    if v.shape != (batch,):
        _checks.fail(name, f"a number or one per example, shape ({batch},)",
                     f"shape {tuple(v.shape)}")
    if _checks.is_concrete(v) and not bool(jnp.all(v >= 0)):
        _checks.fail(name, "non-negative values", f"min {float(jnp.min(v)):.4g}")
    return v


def static_and_budget(attack):
    """`(static config, eps, step_size, options)`: the config with everything traced set
    to a canonical value (one compiled program per structure), the budget, and the traced
    options (`attack.traced_options()`, int32 scalars)."""
    eps = getattr(attack, "eps", 0.0)
    step = getattr(attack, "step_size", 0.0)
    changes = {k: 0.0 for k in ("eps", "step_size") if hasattr(attack, k)}
    grad = getattr(attack, "gradient", None)
    if grad is not None and grad.eot != 1:  # the protocol carries K
        changes["gradient"] = dataclasses.replace(grad, eot=1)
    options = {}
    if hasattr(attack, "traced_options"):
        values, canonical = attack.traced_options()
        options = {k: jnp.asarray(v, jnp.int32) for k, v in values.items()}
        changes.update(canonical)
    return dataclasses.replace(attack, **changes), eps, step, options


# ------------------------------------------------------------------------ programs


def _scan(attack, protocol, ctx, x, y, state, start, length: int, masked: bool):
    def body(s, j):
        i = start + j
        new, record = attack.step(ctx, protocol, x, y, s, i)
        if masked:  # iterations past the end are no-ops
            live = i < attack.iterations(ctx)
            new = jax.tree.map(lambda a, b: jnp.where(live, a, b), new, s)
        return new, record

    return jax.lax.scan(body, state, jnp.arange(length, dtype=jnp.uint32))


@functools.partial(jax.jit, static_argnames=("attack", "protocol", "length"))
def run_program(ctx, x, y, *, attack, protocol, length):
    """The whole attack in one program (init, scan over `length` iterations, finish)."""
    state = attack.init(ctx, protocol, x, y)
    state, records = _scan(attack, protocol, ctx, x, y, state, jnp.uint32(0), length,
                           masked=False)
    return attack.finish(ctx, protocol, x, y, state, records)


@functools.partial(jax.jit, static_argnames=("attack", "protocol"))
def init_program(ctx, x, y, *, attack, protocol):
    """The state before the first iteration (`attack` static: `static_and_budget`'s)."""
    return attack.init(ctx, protocol, x, y)


@functools.partial(jax.jit, static_argnames=("attack", "protocol", "length"))
def advance_program(ctx, x, y, state, start, *, attack, protocol, length):
    """`length` iterations from `start` (traced); those past the attack's last are no-ops."""
    state, _ = _scan(attack, protocol, ctx, x, y, state, start, length, masked=True)
    return state, attack.fooled(state)


def for_init(attack, protocol):
    """`(attack, protocol)` as `init_program` is keyed: an attack whose start depends on
    neither the protocol nor the gradient estimator (`init_uses_protocol = False`: PGD,
    APGD) gets canonical ones, so its variants (realization, fresh draws, BPDA) share one
    compiled init program."""
    if getattr(attack, "init_uses_protocol", True):
        return attack, protocol
    return _plain(attack), protocols.Fixed()


def for_finish(attack, protocol):
    """`(attack, protocol)` as `finish_program` is keyed (`for_init`'s rule, with the
    attack's `finish_uses_protocol`: APGD's result is its state's)."""
    if getattr(attack, "finish_uses_protocol", True):
        return attack, protocol
    return _plain(attack), protocols.Fixed()


def _plain(attack):
    """`attack` with the default gradient estimator (for programs that do not use it)."""
    if hasattr(attack, "gradient"):
        return dataclasses.replace(attack, gradient=gradients.Gradient())
    return attack


def shares_oracle(attack) -> bool:
    """True when `attack` can run on the shared gradient oracle (`advance_shared`): it splits
    its step into `query` and `absorb` around one `gradients.loss_and_grad` (neither may
    depend on the attack's gradient estimator, which the oracle takes as data)."""
    return hasattr(attack, "query") and hasattr(attack, "absorb")


@functools.partial(jax.jit, static_argnames=("attack", "protocol"))
def _query_program(ctx, x, y, state, i, *, attack, protocol):
    xq, keys, loss_index, target = attack.query(ctx, protocol, x, y, state, i)
    return xq, tuple(jax.random.key_data(keys)), loss_index, target


@functools.partial(jax.jit, static_argnames=("attack", "protocol"))
def _absorb_program(ctx, x, y, state, i, key_data, answers, *, attack, protocol):
    losses, grads, logits = gradients.combine_draws(answers)
    keys = jax.random.wrap_key_data(jnp.stack(key_data))
    state, _ = attack.absorb(ctx, protocol, x, y, state, i, keys, losses, grads, logits)
    return state, attack.fooled(state)


def advance_shared(ctx, x, y, state, start: int, stop: int, *, attack, protocol):
    """`advance_program`'s iterations `start .. stop - 1` on the shared gradient oracle.

    The same attack as `advance_program`, split at its one gradient: per iteration a small
    program asks (`attack.query`: the point, the purifier keys `[K, B]`, the loss, the
    target), `gradients.oracle_program` answers once per draw, and a small program takes
    the answer (`attack.absorb`, after `gradients.combine_draws`). Every attack, protocol,
    EOT count and measurement of one defense structure and batch shape then shares ONE
    compiled program through the purifier's gradient; on a CPU, where compiling one
    costs seconds, that is most of a study's compile time (BENCHMARKS.md). The arithmetic
    is the in-program step's, compiled in other programs: results agree with
    `advance_program` to float32 rounding, not bit for bit. `attack` is the static config
    (`static_and_budget`); iterations are run up to `stop` (the caller's count: no masked
    no-ops); per-iteration records (trajectories) are not kept.

    Returns:
      `(state, fooled [B])`.
    """
    fooled = attack.fooled(state)
    kind = attack.gradient.kind
    plain = _plain(attack)  # the query and the answer do not depend on the estimator
    zero, one = jnp.zeros_like(x), jnp.float32(1.0)
    for i in range(int(start), int(stop)):
        it = jnp.uint32(i)
        xq, key_data, loss_index, target = _query_program(ctx, x, y, state, it,
                                                          attack=plain, protocol=protocol)
        answers = tuple(
            gradients.oracle_call(ctx.defense, xq, y, jax.random.wrap_key_data(k), target,
                                  loss_index, zero, one, kind=kind)
            for k in key_data)
        state, fooled = _absorb_program(ctx, x, y, state, it, key_data, answers,
                                        attack=plain, protocol=protocol)
    return state, fooled


@functools.partial(jax.jit, static_argnames=("attack", "protocol"))
def finish_program(ctx, x, y, state, *, attack, protocol):
    """The `AttackResult` of a state (no trajectory)."""
    return attack.finish(ctx, protocol, x, y, state, None)


def make_context(defense, example_keys, eps, step_size, batch: int,
                 options: dict | None = None) -> Context:
    """A `Context` with per-example budgets (`eps`/`step_size`: numbers or `[batch]`) and
    the attack's traced options (`static_and_budget`)."""
    return Context(defense, example_keys, per_example(eps, batch, "eps"),
                   per_example(step_size, batch, "step_size"), dict(options or {}))


def run(attack, defense, x, y, example_keys, protocol="fixed", *, eps=None,
        step_size=None) -> AttackResult:
    """Runs `attack` against `defense` under a randomness protocol, in one program.

    Args:
      attack: an attack config (`PGDConfig`, `APGDConfig`, ...).
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` float32 clean images in [0, 1].
      y: `[B]` int32 labels.
      example_keys: `[B]` typed per-example keys.
      protocol: a `diffjax.protocols.Protocol` (or its name).
      eps: None (the config's), a number, or one budget per example `[B]` (traced: a
        bisection over eps compiles once).
      step_size: likewise, for attacks with a step size.

    Returns:
      An `AttackResult`.
    """
    example_keys, protocol = validate(defense, x, y, example_keys, protocol,
                                      getattr(attack, "gradient", None), attack)
    static, eps0, step0, options = static_and_budget(attack)
    eps = eps0 if eps is None else eps
    step = step0 if step_size is None else step_size
    like = x
    ctx = make_context(defense, example_keys, eps, step, x.shape[0], options)
    ctx, x, y = to_auto((ctx, x, y))
    out = run_program(ctx, x, jnp.asarray(y, jnp.int32), attack=static, protocol=protocol,
                      length=attack.total_iterations)
    return restore(out, like)


def init_state(attack, defense, x, y, example_keys, protocol):
    """The state of `attack` before its first iteration (inputs as in `run`).

    Returns:
      `(ctx, protocol, state)`: pass them to `advance` and `finish_state` (`protocol`
      normalised to a `Protocol`). The state's leaves all have the batch as leading axis,
      so rows can be gathered and scattered freely.
    """
    example_keys, protocol = validate(defense, x, y, example_keys, protocol,
                                      getattr(attack, "gradient", None), attack)
    static, eps, step, options = static_and_budget(attack)
    ctx = make_context(defense, example_keys, eps, step, x.shape[0], options)
    a, p = for_init(static, protocol)
    return ctx, protocol, init_program(ctx, x, jnp.asarray(y, jnp.int32), attack=a,
                                       protocol=p)


def advance(attack, protocol, ctx, x, y, state, start: int, length: int):
    """Runs iterations `start .. start + length - 1` (those past `attack.steps` do nothing).

    Returns:
      `(state, fooled [B])`.
    """
    static = static_and_budget(attack)[0]
    protocol = protocols.as_protocol(protocol)
    return advance_program(ctx, x, jnp.asarray(y, jnp.int32), state, jnp.uint32(start),
                           attack=static, protocol=protocol, length=int(length))


def finish_state(attack, protocol, ctx, x, y, state) -> AttackResult:
    """The `AttackResult` of a state (no trajectory in chunked runs)."""
    static = static_and_budget(attack)[0]
    protocol = protocols.as_protocol(protocol)
    a, p = for_finish(static, protocol)
    return finish_program(ctx, x, jnp.asarray(y, jnp.int32), state, attack=a, protocol=p)
