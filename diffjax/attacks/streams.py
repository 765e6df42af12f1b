"""The key streams of the attacks, by protocol name (kept for code written before
`diffjax.protocols`, which owns every key derivation: use its `Protocol` objects).

`fixed_keys` is `diffjax.protocols.realization`; `attack_draw_keys` and `eval_draw_keys`
take a protocol name and return what `as_protocol(name).attack_keys` / `.eval_keys` do.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffjax import protocols
from diffjax.protocols import (
    ATTACK,
    CORRELATION,
    EVAL,
    FIXED,
    PROTOCOLS,
    START,
    correlation_keys,
    start_keys,
)

__all__ = [
    "START", "FIXED", "ATTACK", "EVAL", "CORRELATION", "PROTOCOLS",
    "start_keys", "fixed_keys", "attack_draw_keys", "eval_draw_keys", "correlation_keys",
]

fixed_keys = protocols.realization


def attack_draw_keys(protocol: str, example_keys, iteration, num_draws: int):
    """Purifier keys `[num_draws, B]` of attack iteration `iteration` under `protocol`."""
    if protocols.as_protocol(protocol).attack_stream == "realization":
        fk = protocols.realization(example_keys)
        return jnp.broadcast_to(fk, (num_draws, *fk.shape))
    return protocols.fresh_attack_keys(example_keys, iteration, num_draws)


def eval_draw_keys(protocol: str, example_keys, num_draws: int):
    """Purifier keys `[num_draws, B]` of the evaluation under `protocol`."""
    if protocol == "fixed":
        fk = protocols.realization(example_keys)
        return jnp.broadcast_to(fk, (num_draws, *fk.shape))
    return protocols.eval_draw_keys(example_keys, num_draws)
