"""Randomness protocols: who draws which purifier randomness, during the attack and the test.

The paper's third claim (Section 4): with the purifier's randomness aligned between the
attack and the evaluation, the robustness gain of diffusion purification falls from ~70%
to ~24% on CIFAR-10; attacking under one randomness and testing under another recovers
the high figure. Every example has one key `k` (`diffjax.randomness.example_keys(key, ids)`
or `content_keys(key, clean_images)`, computed from the CLEAN image, never from the
perturbed input); all randomness is a `fold_in` of it (`diffjax.attacks.streams`):

``independent`` (what earlier reports did)
    attack iteration i, EOT draw d: ``fold_in(fold_in(fold_in(k, ATTACK), i), d)``;
    evaluation draw m (m = 0..M-1): ``fold_in(fold_in(k, EVAL), m)``.
``fixed`` (the paper's protocol)
    every attack iteration: ``fold_in(k, FIXED)``; the evaluation: the same key. EOT must
    be 1 (every draw would be the same key).
``transfer``
    every attack iteration: ``fold_in(k, FIXED)``; evaluation draw m:
    ``fold_in(fold_in(k, EVAL), m)``, independent of the attack's key.
multi-draw evaluation (``eval_draws=M``)
    the adversarial example is classified under M evaluation draws: ``adv_correct_mean``
    is the fraction of draws under which it is still correct (the "fuzzy" robustness: the
    probability over the purifier's randomness that the example fails to fool it) and
    ``adv_correct_worst`` is whether it is correct under all M. Under ``fixed`` every draw
    is the fixed key, so both equal ``adv_correct``.
random start: ``fold_in(k, START)`` under every protocol.

The clean image is classified under evaluation draw 0 of the protocol (the fixed key
under ``fixed``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks
from diffjax.attacks import _sharding, apgd, gradients, pgd, streams

__all__ = ["attack_and_evaluate", "gradient_correlation", "resolve_example_keys"]

_TRACES = {"evaluate": 0}


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
    b = x.shape[0]
    if isinstance(example_ids_or_keys, str):
        _checks.check_choice(example_ids_or_keys, "example_ids_or_keys", ("content",))
        if key is None:
            _checks.fail("key", "a jax.random.key for content keys", None)
        from diffjax import randomness

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
    return _example_keys(key, jnp.asarray(arr))


def _example_keys(key, ids):
    from diffjax import randomness

    return randomness.example_keys(key, ids)


def _attack_impl(config):
    if isinstance(config, pgd.PGDConfig):
        return pgd._pgd_impl
    if isinstance(config, apgd.APGDConfig):
        return apgd._apgd_impl
    _checks.fail("config", "a PGDConfig or an APGDConfig", type(config).__name__)


def _static_config(config):
    if isinstance(config, pgd.PGDConfig):
        return dataclasses.replace(config, eps=0.0, step_size=0.0), config.step_size
    return dataclasses.replace(config, eps=0.0), 0.0


def _core(defense, x, y, example_keys, eps, step_size, *, static, protocol, eval_draws):
    """Attack + evaluation of one batch (jitted; traced once per structure)."""
    _TRACES["evaluate"] += 1
    res = _attack_impl(static)(defense, x, y, example_keys, eps, step_size,
                               static=static, protocol=protocol)
    m = 1 if protocol == "fixed" else eval_draws
    ekeys = streams.eval_draw_keys(protocol, example_keys, m)

    def correct(keys):
        return jnp.argmax(defense.logits(res.x_adv, keys), axis=-1) == y

    adv = jax.lax.map(correct, ekeys)  # [M, B], sequential: memory of one draw
    clean = jnp.argmax(defense.logits(x, ekeys[0]), axis=-1) == y
    if protocol == "fixed":
        adv = jnp.broadcast_to(adv, (eval_draws,) + adv.shape[1:])
        ekeys = jnp.broadcast_to(ekeys, (eval_draws,) + ekeys.shape[1:])
    out = {
        "clean_correct": clean,
        "adv_correct": adv[0],
        "adv_correct_mean": jnp.mean(adv.astype(jnp.float32), axis=0),
        "adv_correct_worst": jnp.all(adv, axis=0),
        "success": res.success,
        "linf": res.linf,
        "l2": res.l2,
        "x_adv": res.x_adv,
        "example_keys": jax.random.key_data(example_keys),
        "fixed_keys": jax.random.key_data(streams.fixed_keys(example_keys)),
        "eval_keys": jax.random.key_data(ekeys),
    }
    if res.loss_trajectory is not None:
        out["loss_trajectory"] = res.loss_trajectory
        out["attack_keys"] = res.key_trajectory
    return out


_core_jit = jax.jit(_core, static_argnames=("static", "protocol", "eval_draws"))


def attack_and_evaluate(defense, x, y, example_ids_or_keys, *, config, protocol: str = "fixed",
                        key=None, eval_draws: int = 1):
    """Attacks a batch and evaluates the adversarial examples under a randomness protocol.

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` float32 clean images in [0, 1].
      y: `[B]` int32 labels.
      example_ids_or_keys: int example ids `[B]`, typed per-example keys `[B]`, or
        "content" (keys from the clean images' bytes); see `resolve_example_keys`.
      config: a `PGDConfig` or an `APGDConfig`.
      protocol: "fixed", "independent" or "transfer" (module docstring).
      key: the root key for ids / "content" (unused when keys are given).
      eval_draws: M >= 1, the number of evaluation draws (multi-draw accuracy).

    Returns:
      A dict of per-example arrays: ``clean_correct`` `[B]` bool, ``adv_correct`` `[B]` bool
      (evaluation draw 0), ``adv_correct_mean`` `[B]` float (fraction of the M draws),
      ``adv_correct_worst`` `[B]` bool (correct under all M), ``success`` `[B]` (fooled
      under the attack's own randomness), ``linf``/``l2`` `[B]` perturbation norms,
      ``x_adv`` `[B,H,W,C]`, the key data ``example_keys`` `[B, ...]`, ``fixed_keys``
      `[B, ...]` and ``eval_keys`` `[M, B, ...]`, and with ``config.return_trajectory``
      ``loss_trajectory`` `[steps, B]` and ``attack_keys`` `[steps, K, B, ...]`.
    """
    _checks.check_choice(protocol, "protocol", streams.PROTOCOLS)
    eval_draws = _checks.check_int(eval_draws, "eval_draws", lo=1)
    _checks.check_images(x, "x")
    ek = resolve_example_keys(example_ids_or_keys, x, key)
    _attack_impl(config)
    ek = pgd._validate(defense, x, y, ek, protocol, config.gradient)
    static, step = _static_config(config)
    like = x
    defense, x, y, ek = _sharding.to_auto((defense, x, y, ek))
    out = _core_jit(defense, x, jnp.asarray(y, jnp.int32), ek, jnp.float32(config.eps),
                    jnp.float32(step), static=static, protocol=protocol,
                    eval_draws=eval_draws)
    return _sharding.restore(out, like)


def _correlation(defense, x, y, example_keys, salt, *, eot, loss, kind, eot_batch_size):
    fixed = streams.fixed_keys(example_keys)[None]
    fresh = streams.correlation_keys(example_keys, salt, eot)
    # One batch of K + 1 gradients (the fixed draw first): one gradient program to
    # compile, not two.
    _, g, _ = gradients.per_draw_loss_and_grad(
        defense, x, y, jnp.concatenate([fixed, fresh], axis=0), loss=loss, kind=kind,
        eot_batch_size=eot_batch_size)
    a = jnp.mean(g[1:], axis=0).reshape(x.shape[0], -1)
    b = g[0].reshape(x.shape[0], -1)
    num = jnp.sum(a * b, axis=-1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return num / jnp.maximum(den, 1e-30)


_correlation_jit = jax.jit(_correlation,
                           static_argnames=("eot", "loss", "kind", "eot_batch_size"))


def gradient_correlation(defense, x, y, keys, *, eot: int, key, loss: str = "ce",
                         kind: str = "full", eot_batch_size: int | None = None):
    """Per-example cosine between the EOT-K gradient and the fixed-randomness gradient.

    The paper (Section 4) reports ~0.17 on CIFAR-10: the EOT gradient, averaged over fresh
    draws, points far from the gradient that the attack needs under the randomness that
    the evaluation will actually use.

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` points in [0, 1] at which both gradients are taken.
      y: `[B]` int32 labels.
      keys: `[B]` per-example keys (as in `attack_and_evaluate`); the fixed-randomness
        gradient uses the `fixed` protocol's key `fold_in(k, FIXED)`.
      eot: K >= 1 fresh draws, `fold_in(fold_in(fold_in(k, CORRELATION), salt), d)` with
        `salt` a uint32 drawn from `key`.
      key: a typed key choosing the fresh draws.
      loss: the attack loss ("ce", "margin", "dlr").
      kind: "full" or "bpda" for both gradients.
      eot_batch_size: chunk size of the K draws (None: all at once).

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
    _checks.check_choice(loss, "loss", gradients.LOSSES)
    _checks.check_choice(kind, "kind", gradients.KINDS)
    salt = jax.random.bits(key, dtype=jnp.uint32)
    like = x
    defense, x, y, keys = _sharding.to_auto((defense, x, y, keys))
    out = _correlation_jit(defense, x, jnp.asarray(y, jnp.int32), keys, salt, eot=eot,
                           loss=loss, kind=kind, eot_batch_size=eot_batch_size)
    return _sharding.restore(out, like)
