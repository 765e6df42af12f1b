"""Evaluating adversarial examples under randomness protocols, and the gradient correlation.

`evaluate` classifies a batch of adversarial examples under one or several protocols
(`diffjax.protocols`) in one program, and always under the example's realization: the
purified clean and adversarial images under the realization come back with the
accuracies, so that the distances, the FID and the figures use exactly the images the
`Fixed` evaluation classified (no purification is run twice). Because `Fixed` and
`Transfer` share their attack (both attack the realization), ONE attack evaluated under
``(Fixed(), Transfer(eval_draws=M))`` gives both numbers.

`attack_and_evaluate` is an attack plus `evaluate` in one compiled program.

Multi-draw evaluation: under a protocol with M evaluation draws the adversarial example is
classified under each; ``adv_correct_mean`` is the fraction of draws under which it is
still correct (the "fuzzy" robustness), ``adv_correct_worst`` whether it is correct under
all M, ``adv_correct`` under draw 0. The clean image is classified under the realization
(``clean_correct_fixed``) and under the protocol's draw 0 (``clean_correct``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks, protocols
from diffjax.attacks import engine, gradients

__all__ = ["evaluate", "attack_and_evaluate", "gradient_correlation", "resolve_example_keys",
           "evaluate_program", "attack_and_evaluate_program", "EVAL_FIELDS"]

# Per-example fields of every protocol's evaluation.
EVAL_FIELDS = ("clean_correct", "adv_correct", "adv_correct_mean", "adv_correct_worst")


def resolve_example_keys(example_ids_or_keys, x, key=None):
    """Per-example keys `[B]` from example ids, ready keys, or the clean images' content.

    Args:
      example_ids_or_keys: int `[B]` example ids (keys `example_keys(key, ids)`), a typed
        key array `[B]` (used as is), or the string "content" (`content_keys(key, x)`).
      x: `[B,H,W,C]` the CLEAN images.
      key: the root key, needed for ids and "content".

    Returns:
      `[B]` typed keys.
    """
    from diffjax import randomness

    b = x.shape[0]
    if isinstance(example_ids_or_keys, str):
        _checks.check_choice(example_ids_or_keys, "example_ids_or_keys", ("content",))
        if key is None:
            _checks.fail("key", "a jax.random.key for content keys", None)
        return randomness.content_keys(key, x)
    arr = example_ids_or_keys
    if not hasattr(arr, "dtype"):
        arr = np.asarray(arr)
    if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key) or (
            arr.dtype == jnp.uint32 and arr.ndim == 2):
        return _checks.check_keys(arr, b, "example_ids_or_keys")
    if not jnp.issubdtype(arr.dtype, jnp.integer) or arr.shape != (b,):
        _checks.fail("example_ids_or_keys", f"int example ids of shape ({b},), typed keys "
                     f"of shape ({b},), or 'content'", f"dtype {arr.dtype} shape {arr.shape}")
    if key is None:
        _checks.fail("key", "a jax.random.key to derive keys from example ids", None)
    return randomness.example_keys(key, jnp.asarray(arr))


def _evaluate_impl(defense, x, x_adv, y, example_keys, evals):
    real = protocols.realization(example_keys)
    pur_clean = defense.purify(x, real)
    pur_adv = defense.purify(x_adv, real)
    clean_fixed = jnp.argmax(defense.logits_fn(pur_clean), axis=-1) == y
    adv_fixed = jnp.argmax(defense.logits_fn(pur_adv), axis=-1) == y
    out = {"clean_correct_fixed": clean_fixed, "purified_clean": pur_clean,
           "purified_adv": pur_adv, "protocols": {}}
    for p in evals:
        if isinstance(p, protocols.Fixed):
            draws, clean = adv_fixed[None], clean_fixed
        else:
            keys = p.eval_keys(example_keys)

            def correct(k):
                return jnp.argmax(defense.logits(x_adv, k), axis=-1) == y

            draws = jax.lax.map(correct, keys)  # [M, B], sequential: memory of one draw
            clean = jnp.argmax(defense.logits(x, keys[0]), axis=-1) == y
        out["protocols"][p.name] = {
            "clean_correct": clean, "adv_correct": draws[0],
            "adv_correct_mean": jnp.mean(draws.astype(jnp.float32), axis=0),
            "adv_correct_worst": jnp.all(draws, axis=0), "adv_draws": draws}
    return out


@functools.partial(jax.jit, static_argnames=("evals",))
def evaluate_program(defense, x, x_adv, y, example_keys, *, evals):
    """`evaluate`'s compiled program (one per structure and tuple of protocols)."""
    return _evaluate_impl(defense, x, x_adv, y, example_keys, evals)


def _check_evals(evals) -> tuple:
    if isinstance(evals, (protocols.Protocol, str)):
        evals = (evals,)
    out = tuple(protocols.as_protocol(p) for p in evals)
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        _checks.fail("protocols", "at most one protocol of each kind", names)
    if not out:
        _checks.fail("protocols", "at least one protocol", "none")
    return out


def evaluate(defense, x, y, example_keys, x_adv, *, under=(protocols.Fixed(),)):
    """Classifies adversarial examples under randomness protocols (module docstring).

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` the clean images in [0, 1].
      y: `[B]` int32 labels.
      example_keys: `[B]` typed per-example keys (the ones the attack used).
      x_adv: `[B,H,W,C]` the adversarial examples.
      under: the protocols (objects or names) to evaluate under.

    Returns:
      ``{"clean_correct_fixed" [B], "purified_clean", "purified_adv" [B,H,W,C] (under the
      realization), "protocols": {name: {"clean_correct", "adv_correct",
      "adv_correct_mean", "adv_correct_worst" [B], "adv_draws" [M, B]}}}``.
    """
    evals = _check_evals(under)
    example_keys, _ = engine.validate(defense, x, y, example_keys, evals[0])
    _checks.check_images(x_adv, "x_adv")
    if x_adv.shape != x.shape:
        _checks.fail("x_adv", f"the shape of x {tuple(x.shape)}", tuple(x_adv.shape))
    like = x
    args = engine.to_auto((defense, x, x_adv, jnp.asarray(y, jnp.int32), example_keys))
    return engine.restore(evaluate_program(*args, evals=evals), like)


@functools.partial(jax.jit, static_argnames=("attack", "protocol", "evals", "length"))
def attack_and_evaluate_program(ctx, x, y, *, attack, protocol, evals, length):
    """An attack and its evaluation under `evals` in one program."""
    res = engine.run_program(ctx, x, y, attack=attack, protocol=protocol, length=length)
    out = _evaluate_impl(ctx.defense, x, res.x_adv, y, ctx.example_keys, evals)
    return res, out


def attack_and_evaluate(defense, x, y, example_ids_or_keys, *, config, protocol="fixed",
                        key=None, eval_draws: int | None = None, also=()):
    """Attacks a batch and evaluates the adversarial examples under a randomness protocol.

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` float32 clean images in [0, 1].
      y: `[B]` int32 labels.
      example_ids_or_keys: int example ids `[B]`, typed per-example keys `[B]`, or
        "content" (keys from the clean images' bytes); see `resolve_example_keys`.
      config: the attack (`PGDConfig`, `APGDConfig`, `SquareConfig`, ...).
      protocol: a `diffjax.protocols.Protocol` (`Fixed()`, `Transfer(eval_draws=M)`,
        `Independent(eot=K, eval_draws=M)`) or its name.
      key: the root key for ids / "content" (unused when keys are given).
      eval_draws: M >= 1 for a protocol given by name (or to override the object's).
      also: more protocols that share the attack with `protocol` (e.g. `Transfer(M)` for
        `Fixed()`), evaluated on the same adversarial examples.

    Returns:
      A dict of per-example arrays: ``clean_correct`` `[B]` bool (the protocol's draw 0),
      ``clean_correct_fixed`` (the realization), ``adv_correct`` `[B]` bool (evaluation
      draw 0), ``adv_correct_mean`` `[B]` float (fraction of the M draws),
      ``adv_correct_worst`` `[B]` bool (correct under all M), ``success`` `[B]` (fooled
      under the attack's own randomness), ``linf``/``l2`` `[B]`, ``x_adv``,
      ``purified_adv``/``purified_clean`` (under the realization), the key data
      ``example_keys`` `[B, ...]`, ``fixed_keys`` (the realization) and ``eval_keys``
      `[M, B, ...]`, ``protocols`` (`{name: {...}}` for `protocol` and every one of
      `also`, the fields of `evaluate`), and with ``config.return_trajectory``
      ``loss_trajectory`` `[steps, B]` and ``attack_keys`` `[steps, K, B, ...]`.
    """
    _checks.check_images(x, "x")
    ek = resolve_example_keys(example_ids_or_keys, x, key)
    grad = getattr(config, "gradient", None)
    if not hasattr(config, "init") or not hasattr(config, "step"):
        _checks.fail("config", "an attack config (PGDConfig, APGDConfig, SquareConfig)",
                     type(config).__name__)
    ek, protocol = engine.validate(defense, x, y, ek, protocol, grad, config)
    protocol = protocols.as_protocol(protocol, eval_draws=eval_draws)
    evals = (protocol,) + _check_evals(also) if also else (protocol,)
    for p in evals[1:]:
        if not protocol.shares_attack_with(p):
            _checks.fail("also", f"protocols that share the attack of {protocol!r} (the same "
                         "keys during the attack, e.g. Fixed and Transfer)", repr(p))
    evals = _check_evals(evals)
    static, eps, step, options = engine.static_and_budget(config)
    like = x
    ctx = engine.make_context(defense, ek, eps, step, x.shape[0], options)
    ctx, xs, ys = engine.to_auto((ctx, x, jnp.asarray(y, jnp.int32)))
    res, ev = attack_and_evaluate_program(ctx, xs, ys, attack=static, protocol=protocol,
                                          evals=evals, length=config.total_iterations)
    main = ev["protocols"][protocol.name]
    out = {
        "clean_correct": main["clean_correct"],
        "clean_correct_fixed": ev["clean_correct_fixed"],
        "adv_correct": main["adv_correct"],
        "adv_correct_mean": main["adv_correct_mean"],
        "adv_correct_worst": main["adv_correct_worst"],
        "success": res.success, "linf": res.linf, "l2": res.l2, "x_adv": res.x_adv,
        "purified_adv": ev["purified_adv"], "purified_clean": ev["purified_clean"],
        "example_keys": jax.random.key_data(ek),
        "fixed_keys": jax.random.key_data(protocols.realization(ek)),
        "eval_keys": jax.random.key_data(protocol.eval_keys(ek)),
        "protocols": ev["protocols"],
    }
    if res.loss_trajectory is not None:
        out["loss_trajectory"] = res.loss_trajectory
        out["attack_keys"] = res.key_trajectory
    return engine.restore(out, like)


def _correlation(defense, x, y, example_keys, salt, *, eot, loss, kind, eot_batch_size):
    fixed = protocols.realization(example_keys)[None]
    fresh = protocols.correlation_keys(example_keys, salt, eot)
    # One batch of K + 1 gradients (the realization first): one gradient program.
    _, g, _ = gradients.per_draw_loss_and_grad(
        defense, x, y, jnp.concatenate([fixed, fresh], axis=0), loss=loss, kind=kind,
        eot_batch_size=eot_batch_size)
    return _cosine(g[0], jnp.mean(g[1:], axis=0))


def _cosine(fixed, eot):
    """Per-example cosine `[B]` between two gradients `[B, ...]`."""
    a = eot.reshape(eot.shape[0], -1)
    b = fixed.reshape(fixed.shape[0], -1)
    num = jnp.sum(a * b, axis=-1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return num / jnp.maximum(den, 1e-30)


_correlation_jit = jax.jit(_correlation,
                           static_argnames=("eot", "loss", "kind", "eot_batch_size"))


@functools.partial(jax.jit, static_argnames=("eot",))
def _correlation_keys(example_keys, salt, *, eot):
    fixed = protocols.realization(example_keys)[None]
    fresh = protocols.correlation_keys(example_keys, salt, eot)
    return jax.random.key_data(jnp.concatenate([fixed, fresh], axis=0))


@jax.jit
def _cosine_of_draws(grads):
    return _cosine(grads[0], jnp.mean(jnp.stack(grads[1:]), axis=0))


def _correlation_shared(defense, x, y, example_keys, salt, *, eot, loss, kind):
    """`_correlation` on the shared gradient oracle (`gradients.oracle_program`): the K + 1
    gradients one draw at a time, in the program the shared attacks use."""
    key_data = _correlation_keys(example_keys, salt, eot=eot)
    index = jnp.int32(gradients.LOSSES.index(loss))
    zero, one = jnp.zeros_like(x), jnp.float32(1.0)
    target = jnp.zeros_like(y)
    grads = tuple(gradients.oracle_call(defense, x, y, jax.random.wrap_key_data(k), target,
                                           index, zero, one, kind=kind)[1]
                  for k in key_data)
    return _cosine_of_draws(grads)


def gradient_correlation(defense, x, y, keys, *, eot: int, key, loss: str = "ce",
                         kind: str = "full", eot_batch_size: int | None = None,
                         shared_oracle: bool = False):
    """Per-example cosine between the EOT-K gradient and the fixed-randomness gradient.

    The paper (Section 4) reports ~0.17 on CIFAR-10: the EOT gradient, averaged over fresh
    draws, points far from the gradient that the attack needs under the randomness that
    the evaluation will actually use.

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` points in [0, 1] at which both gradients are taken.
      y: `[B]` int32 labels.
      keys: `[B]` per-example keys; the fixed-randomness gradient is taken under the
        realization (`diffjax.protocols.realization`), as the `Fixed` attack's.
      eot: K >= 1 fresh draws (`protocols.correlation_keys` with a uint32 `salt` drawn
        from `key`).
      key: a typed key choosing the fresh draws.
      loss: the attack loss ("ce", "margin", "dlr").
      kind: "full" or "bpda" for both gradients.
      eot_batch_size: chunk size of the K draws (None: all at once).
      shared_oracle: take the K + 1 gradients one draw at a time from the shared gradient
        oracle (`gradients.oracle_program`, the program of attacks run with
        `Cascade(shared_oracle=True)`) instead of compiling a program of their own;
        `eot_batch_size` does not apply. Agrees to float32 rounding.

    Returns:
      `[B]` cosines in [-1, 1].
    """
    from diffjax.defense import Defense

    if not isinstance(defense, Defense):
        _checks.fail("defense", "a diffjax.defense.Defense", type(defense).__name__)
    _checks.check_images(x, "x")
    b = x.shape[0]
    _checks.check_labels(y, b, defense.num_classes(x), "y")
    keys = _checks.check_keys(keys, b, "keys")
    eot = _checks.check_int(eot, "eot", lo=1)
    _checks.check_choice(loss, "loss", gradients.LOSSES[:3])
    _checks.check_choice(kind, "kind", gradients.KINDS)
    salt = jax.random.bits(key, dtype=jnp.uint32)
    like = x
    defense, x, y, keys = engine.to_auto((defense, x, y, keys))
    if shared_oracle:
        out = _correlation_shared(defense, x, jnp.asarray(y, jnp.int32), keys, salt, eot=eot,
                                  loss=loss, kind=kind)
    else:
        out = _correlation_jit(defense, x, jnp.asarray(y, jnp.int32), keys, salt, eot=eot,
                               loss=loss, kind=kind, eot_batch_size=eot_batch_size)
    return engine.restore(out, like)
