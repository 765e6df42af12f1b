"""Key streams: every random number an attack or an evaluation draws, from one example key.

Each example has one key `k` (from `diffjax.randomness.example_keys(key, ids)` or
`content_keys(key, clean_images)`; never from the perturbed input). Everything else is a
`fold_in` of `k` with a distinct stream constant, so results depend only on the example's
identity, never on the batch size, the batch order or the device count:

=====================  ===========================================================
stream                 key
=====================  ===========================================================
random start           ``fold_in(k, START)``
fixed randomness       ``fold_in(k, FIXED)``: the example's one purifier key
fresh attack draw      ``fold_in(fold_in(fold_in(k, ATTACK), iteration), draw)``
evaluation draw m      ``fold_in(fold_in(k, EVAL), m)``
correlation draw       ``fold_in(fold_in(fold_in(k, CORRELATION), salt), draw)``
=====================  ===========================================================

How the protocols use them (`diffjax.attacks.protocols` documents the whole flow):

- ``fixed``: every attack iteration (and every EOT draw, so EOT must be 1) uses the fixed
  key; the evaluation uses the fixed key too.
- ``independent``: attack iteration i, EOT draw d uses the fresh attack draw (i, d); the
  evaluation uses evaluation draws 0..M-1.
- ``transfer``: the attack uses the fixed key; the evaluation uses evaluation draws
  0..M-1, which are independent of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "START", "FIXED", "ATTACK", "EVAL", "CORRELATION", "PROTOCOLS",
    "start_keys", "fixed_keys", "attack_draw_keys", "eval_draw_keys", "correlation_keys",
]

# Distinct stream constants (arbitrary, fixed forever: changing them changes every result).
START = 0x5EED_0001
FIXED = 0x5EED_0002
ATTACK = 0x5EED_0003
EVAL = 0x5EED_0004
CORRELATION = 0x5EED_0005

PROTOCOLS = ("fixed", "independent", "transfer")


def _fold(keys, data):
    """`fold_in` of each key `[B]` with one integer (Python or traced scalar)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def start_keys(example_keys):
    """Keys `[B]` for the attack's random start."""
    return _fold(example_keys, START)


def fixed_keys(example_keys):
    """The example's one fixed purifier key `[B]` (protocols `fixed` and `transfer`)."""
    return _fold(example_keys, FIXED)


def attack_draw_keys(protocol: str, example_keys, iteration, num_draws: int):
    """Purifier keys `[num_draws, B]` for attack iteration `iteration` (may be traced).

    `fixed` and `transfer` return the fixed key for every draw; `independent` returns fresh
    draws, a function of (example key, iteration, draw) only.
    """
    if protocol in ("fixed", "transfer"):
        fk = fixed_keys(example_keys)
        return jnp.broadcast_to(fk, (num_draws,) + fk.shape)
    base = _fold(_fold(example_keys, ATTACK), iteration)
    return jax.vmap(lambda d: _fold(base, d))(jnp.arange(num_draws, dtype=jnp.uint32))


def eval_draw_keys(protocol: str, example_keys, num_draws: int):
    """Purifier keys `[num_draws, B]` for the evaluation.

    `fixed`: the fixed key (the attack's own) for every draw; `independent` and
    `transfer`: evaluation draws 0..num_draws-1, independent of every attack key.
    """
    if protocol == "fixed":
        fk = fixed_keys(example_keys)
        return jnp.broadcast_to(fk, (num_draws,) + fk.shape)
    base = _fold(example_keys, EVAL)
    return jax.vmap(lambda m: _fold(base, m))(jnp.arange(num_draws, dtype=jnp.uint32))


def correlation_keys(example_keys, salt, num_draws: int):
    """Fresh EOT keys `[num_draws, B]` for `gradient_correlation` (`salt`: a uint32)."""
    base = _fold(_fold(example_keys, CORRELATION), salt)
    return jax.vmap(lambda d: _fold(base, d))(jnp.arange(num_draws, dtype=jnp.uint32))
