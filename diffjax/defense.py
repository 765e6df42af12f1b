"""A defended model: a purifier followed by a classifier, as one pure function.

The paper's object of study (Liu & Wei, arXiv 2505.22839, Sections 3-4) is the composition
``logits(x, keys) = logits_fn(purify_fn(x, keys))``: a diffusion purifier whose randomness
comes only from the per-example keys, then a classifier on [0, 1] images. Making the keys
an explicit argument is what lets the attacks in `diffjax.attacks` control the randomness
(the `fixed`, `independent` and `transfer` protocols).

`Defense` is a pytree whose two children are `jax.tree_util.Partial`s. A `Partial` holding
weights (e.g. ``Partial(apply_fn, params)``) keeps the weights as pytree leaves, so a
`Defense` passed as an argument to a jitted function has its weights *traced*, not baked
into the compiled program as constants: swapping weights of the same shapes reuses the
compiled attack. Plain Python callables are wrapped in a `Partial` with no arguments (the
function itself is then static, compared by identity).

Example::

    from diffjax.diffusion import linear_schedule, make_purifier

    purifier = make_purifier(model.eps_fn, schedule=linear_schedule(), t_star=100,
                             method="ddpm", num_steps=10)
    defense = Defense(purifier, classifier.logits_fn)
    logits = defense.logits(x, keys)          # [B, num_classes]
    plain = undefended(classifier.logits_fn)  # identity purifier, keys ignored
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from diffjax import _checks

__all__ = ["Defense", "make_purifier", "undefended", "identity_purifier"]


def _as_partial(fn, name: str) -> Partial:
    if isinstance(fn, Partial):
        return fn
    if not callable(fn):
        _checks.fail(name, "a callable (or a jax.tree_util.Partial holding weights)",
                     type(fn).__name__)
    return Partial(fn)


def _identity(x, keys):
    del keys
    return x


_NUM_CLASSES: dict = {}

identity_purifier = Partial(_identity)
"""The purifier of an undefended model: returns `x` unchanged and ignores the keys."""


@jax.tree_util.register_pytree_node_class
class Defense:
    """A purifier and a classifier; `logits(x, keys) = logits_fn(purify_fn(x, keys))`.

    Attributes:
      purify_fn: `(x [B,H,W,C] in [0, 1], keys [B]) -> x' [B,H,W,C] in [0, 1]`, pure, all its
        randomness from the per-example typed keys.
      logits_fn: `(x [B,H,W,C] in [0, 1]) -> [B, num_classes]`, pure and deterministic.
    """

    def __init__(self, purify_fn: Callable, logits_fn: Callable):
        self.purify_fn = _as_partial(purify_fn, "purify_fn")
        self.logits_fn = _as_partial(logits_fn, "logits_fn")

    def tree_flatten(self):
        return (self.purify_fn, self.logits_fn), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        obj = object.__new__(cls)
        obj.purify_fn, obj.logits_fn = children
        return obj

    def purify(self, x, keys):
        """Purified images `[B,H,W,C]` in [0, 1]; the randomness comes from `keys` `[B]`."""
        return self.purify_fn(x, keys)

    def logits(self, x, keys):
        """Logits `[B, num_classes]` of the classifier on the purified images."""
        return self.logits_fn(self.purify_fn(x, keys))

    def __call__(self, x, keys):
        return self.logits(x, keys)

    def num_classes(self, x) -> int:
        """The number of classes, from the classifier's output shape (`eval_shape`, cached).

        The purifier preserves shapes, so only the classifier is traced, once per
        classifier structure, weight shapes and input shape.
        """
        leaves, treedef = jax.tree.flatten(self.logits_fn)
        sig = (treedef, tuple((jnp.shape(v), jnp.result_type(v)) for v in leaves),
               tuple(x.shape), jnp.dtype(x.dtype))
        if sig not in _NUM_CLASSES:
            out = jax.eval_shape(self.logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
            _NUM_CLASSES[sig] = int(out.shape[-1])
        return _NUM_CLASSES[sig]

    @property
    def is_undefended(self) -> bool:
        """True when the purifier is the identity (keys have no effect)."""
        return self.purify_fn.func is _identity

    def __repr__(self):
        return f"Defense(purify_fn={self.purify_fn!r}, logits_fn={self.logits_fn!r})"


def undefended(logits_fn: Callable) -> Defense:
    """The classifier alone, as a `Defense` with the identity purifier.

    Args:
      logits_fn: `(x [B,H,W,C] in [0, 1]) -> [B, num_classes]`.

    Returns:
      A `Defense` whose `logits(x, keys)` is `logits_fn(x)` for any keys.
    """
    return Defense(identity_purifier, logits_fn)


def make_purifier(eps_fn: Callable, **kwargs) -> Partial:
    """`diffjax.diffusion.make_purifier` (the one purifier constructor), kept here too."""
    from diffjax.diffusion import purifier  # lazily: `import diffjax.defense` stays cheap

    return purifier.make_purifier(eps_fn, **kwargs)
