"""One randomness contract: which purifier randomness the attack and the test draw.

The paper's third claim (arXiv 2505.22839, Sec. 4): diffusion purification looks ~70%
robust on CIFAR-10 when the attack and the evaluation draw the purifier's randomness
independently, and ~24% more robust than the classifier alone once the randomness is the
same in both. Every number diffjax reports is therefore taken under a stated protocol,
and the protocols below own every key derivation, so that no caller can mix them up.

Each example has ONE key `k` (`diffjax.randomness.example_keys(key, ids)`, or
`content_keys(key, clean_images)`: from its identity, never from a perturbed input).
Everything else is a `fold_in` of it with a distinct stream constant:

=====================  ===========================================================
stream                 key
=====================  ===========================================================
the realization        ``fold_in(k, FIXED)``: THE purifier randomness of the example
random start           ``fold_in(k, START)``
fresh attack draw      ``fold_in(fold_in(fold_in(k, ATTACK), iteration), draw)``
evaluation draw m      ``fold_in(fold_in(k, EVAL), m)``
correlation draw       ``fold_in(fold_in(fold_in(k, CORRELATION), salt), draw)``
=====================  ===========================================================

**One realization per example.** `realization(k)` is the purifier key that the `Fixed`
protocol attacks and evaluates. Every measurement "under fixed randomness" (clean accuracy,
the fixed attack and its evaluation, distances to the clean image, Jacobian spectra and
compression rates, figures, the fixed gradient of the gradient correlation) uses it, so
two numbers about one example under fixed randomness never come from two random maps.

The protocols (frozen dataclasses: hashable, static under `jit`):

``Fixed()`` (the paper's protocol)
    every attack iteration and the evaluation use the realization; no EOT (every draw
    would be the same key).
``Transfer(eval_draws=M)``
    the attack is `Fixed`'s (it attacks the realization); the evaluation uses evaluation
    draws 0..M-1, independent of it: an attack under one randomness, tested under another.
    One attack serves both (`attack_stream == "realization"` for both).
``Independent(eot=K, eval_draws=M)`` (what earlier reports did)
    attack iteration i averages the gradient over K fresh draws (EOT); the evaluation uses
    evaluation draws 0..M-1.

Multi-draw evaluation (M > 1): the adversarial example is classified under each of the M
evaluation draws; the fraction still correct is the "fuzzy" robustness (the probability
over the purifier's randomness that the example fails to fool it), and "worst" needs all
M correct. Under `Fixed` every draw is the realization, so M = 1.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax import _checks

__all__ = [
    "START", "FIXED", "ATTACK", "EVAL", "CORRELATION", "PROTOCOLS",
    "Protocol", "Fixed", "Transfer", "Independent", "as_protocol",
    "realization", "start_keys", "fresh_attack_keys", "eval_draw_keys", "correlation_keys",
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


def _draws(base, num_draws: int):
    """`[num_draws, B]` keys `fold_in(base, d)`."""
    return jax.vmap(lambda d: _fold(base, d))(jnp.arange(num_draws, dtype=jnp.uint32))


def realization(example_keys):
    """THE purifier key of each example, `[B]`: what `Fixed` attacks and evaluates.

    Every measurement under fixed randomness (clean accuracy, distances, compression
    rates, figures, the fixed gradient) passes these keys to the purifier.
    """
    return _fold(example_keys, FIXED)


def start_keys(example_keys):
    """Keys `[B]` of an attack's random start (every protocol)."""
    return _fold(example_keys, START)


def fresh_attack_keys(example_keys, iteration, num_draws: int):
    """Fresh purifier keys `[num_draws, B]` of attack iteration `iteration` (may be traced)."""
    return _draws(_fold(_fold(example_keys, ATTACK), iteration), num_draws)


def eval_draw_keys(example_keys, num_draws: int):
    """Evaluation draws `[num_draws, B]`, independent of every attack key."""
    return _draws(_fold(example_keys, EVAL), num_draws)


def correlation_keys(example_keys, salt, num_draws: int):
    """Fresh EOT keys `[num_draws, B]` of the gradient correlation (`salt`: a uint32)."""
    return _draws(_fold(_fold(example_keys, CORRELATION), salt), num_draws)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Who draws which purifier randomness during the attack and the test (module doc).

    Every protocol has `name`, `attack_stream` ("realization": the attack sees the
    example's one realization, so its success is deterministic and an attack may stop at
    its first fooling point; "fresh": new draws every iteration), `eot` (K, the purifier
    draws averaged per attack gradient) and `eval_draws` (M, the evaluation draws each
    adversarial example is classified under).
    """

    name: ClassVar[str] = ""
    attack_stream: ClassVar[str] = ""
    eot: ClassVar[int] = 1
    eval_draws: ClassVar[int] = 1

    @staticmethod
    def realization(example_keys):
        """THE realization `[B]` (the same for every protocol; module docstring)."""
        return realization(example_keys)

    def attack_keys(self, example_keys, iteration):
        """Purifier keys `[eot, B]` of attack iteration `iteration` (a traced uint32 is fine)."""
        raise NotImplementedError

    def eval_keys(self, example_keys):
        """Purifier keys `[eval_draws, B]` of the evaluation."""
        raise NotImplementedError

    def shares_attack_with(self, other: Protocol) -> bool:
        """Whether one attack serves both protocols (the same keys during the attack)."""
        return self.attack_stream == other.attack_stream and self.eot == other.eot

    def replace(self, **changes) -> Protocol:
        """A copy with some fields changed (e.g. `eval_draws=8`)."""
        return dataclasses.replace(self, **changes)


def _check_count(value, name: str) -> int:
    return _checks.check_int(value, name, lo=1)


@dataclasses.dataclass(frozen=True)
class Fixed(Protocol):
    """The attack and the test both use the example's realization (the paper's protocol)."""

    name: ClassVar[str] = "fixed"
    attack_stream: ClassVar[str] = "realization"

    def attack_keys(self, example_keys, iteration):
        del iteration
        return realization(example_keys)[None]

    def eval_keys(self, example_keys):
        return realization(example_keys)[None]


@dataclasses.dataclass(frozen=True)
class Transfer(Protocol):
    """Attacks the realization, tests under `eval_draws` independent evaluation draws."""

    name: ClassVar[str] = "transfer"
    attack_stream: ClassVar[str] = "realization"
    eval_draws: int = 1

    def __post_init__(self):
        _check_count(self.eval_draws, "Transfer.eval_draws")

    def attack_keys(self, example_keys, iteration):
        del iteration
        return realization(example_keys)[None]

    def eval_keys(self, example_keys):
        return eval_draw_keys(example_keys, self.eval_draws)


@dataclasses.dataclass(frozen=True)
class Independent(Protocol):
    """Fresh draws at every attack iteration (EOT over `eot`), fresh evaluation draws."""

    name: ClassVar[str] = "independent"
    attack_stream: ClassVar[str] = "fresh"
    eot: int = 1
    eval_draws: int = 1

    def __post_init__(self):
        _check_count(self.eot, "Independent.eot")
        _check_count(self.eval_draws, "Independent.eval_draws")

    def attack_keys(self, example_keys, iteration):
        return fresh_attack_keys(example_keys, iteration, self.eot)

    def eval_keys(self, example_keys):
        return eval_draw_keys(example_keys, self.eval_draws)


def as_protocol(protocol, *, eot: int | None = None, eval_draws: int | None = None) -> Protocol:
    """A `Protocol` from an object or a name ("fixed", "transfer", "independent").

    Args:
      protocol: a `Protocol`, or its name.
      eot: for a name: the EOT draws of "independent" (default 1). For an object: fills
        in `Independent()`'s default K; any other disagreement with the object is an
        error (None skips it).
      eval_draws: for a name: the evaluation draws of "transfer"/"independent" (default 1;
        "fixed" has one). For an object: None keeps it, a value replaces it.

    Returns:
      The protocol.
    """
    if isinstance(protocol, str):
        _checks.check_choice(protocol, "protocol", PROTOCOLS)
        m = 1 if eval_draws is None else _check_count(eval_draws, "eval_draws")
        k = 1 if eot is None else _check_count(eot, "eot")
        if protocol != "independent" and k != 1:
            _checks.fail("eot", f"1 under protocol {protocol!r} (one realization per "
                         "example: every EOT draw would be the same key)", k,
                         "use protocol Independent(eot=K) for EOT over fresh draws")
        if protocol == "fixed":
            return Fixed()
        if protocol == "transfer":
            return Transfer(eval_draws=m)
        return Independent(eot=k, eval_draws=m)
    if eval_draws is not None:
        eval_draws = _check_count(eval_draws, "eval_draws")
    if not isinstance(protocol, Protocol):
        _checks.fail("protocol", "a diffjax.protocols.Protocol (Fixed(), Transfer(M), "
                     "Independent(eot=K)) or one of " + ", ".join(PROTOCOLS),
                     type(protocol).__name__)
    if eot is not None and int(eot) not in (1, protocol.eot) and not (
            isinstance(protocol, Independent) and protocol.eot == 1):
        _checks.fail("eot", f"the protocol's own EOT ({protocol.eot}) under {protocol!r}",
                     eot, "set the EOT draws on the protocol: Independent(eot=K)")
    changes = {}
    if eval_draws is not None and eval_draws != protocol.eval_draws and not isinstance(
            protocol, Fixed):
        changes["eval_draws"] = eval_draws
    if eot is not None and int(eot) != protocol.eot and isinstance(protocol, Independent) \
            and protocol.eot == 1:
        changes["eot"] = int(eot)  # Independent() + the older Gradient(eot=K) spelling
    return protocol.replace(**changes) if changes else protocol
