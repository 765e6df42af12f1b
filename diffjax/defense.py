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

    purifier = make_purifier(model.eps_fn, schedule=linear_schedule(), t_star=100,
                             method="ddpm", num_steps=10)
    defense = Defense(purifier, classifier.logits_fn)
    logits = defense.logits(x, keys)          # [B, num_classes]
    plain = undefended(classifier.logits_fn)  # identity purifier, keys ignored
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class _ChainPurify:
    """The static part of a diffusion purifier (hashable, so jit caches by value): `remat`.

    The method, `t_star` and the schedule are in the `Chain`'s arrays (pytree leaves), so
    purifiers that differ only in them share one compiled attack.
    """

    remat: bool

    def __call__(self, eps_fn, chain, x, keys):
        from diffjax.diffusion import samplers  # lazily: `import diffjax.defense` stays cheap

        return samplers._run_chain(eps_fn, x, keys, chain, remat=self.remat)


def make_purifier(
    eps_fn: Callable,
    *,
    schedule,
    t_star: int,
    method: str = "ddpm",
    num_steps: int | None = None,
    remat: bool = True,
    clip_denoised: bool = True,
    length: int | None = None,
) -> Partial:
    """A diffusion purifier `purify_fn(x, keys) -> x'` for `Defense` (DiffPure, Section 3).

    Wraps `diffjax.diffusion.run_chain` so that the eps-model's weights (when `eps_fn` is a
    `Partial` holding them) and the chain's coefficients (`diffjax.diffusion.make_chain`:
    the schedule, `t_star` and the method as arrays) are pytree leaves, traced under jit:
    purifiers with the same number of steps share one compiled program whatever their
    method and `t_star` (only `num_steps`, through the arrays' length, and `remat` are
    static).

    Args:
      eps_fn: `(x_t [B,H,W,C] in [-1, 1], t int32 [B]) -> eps`; a `Partial` holding weights,
        or a plain function (then its closed-over weights are constants under jit).
      schedule: the diffusion schedule pytree (`diffjax.diffusion.linear_schedule()`).
      t_star: the purification timestep k in [1, T] (the paper's t* = 0.1 T).
      method: "ddpm", "reverse_only", "ddim", "reverse_only_ddim" or "sde".
      num_steps: reverse steps over [0, t_star) (respaced); None means `t_star` steps.
      remat: checkpoint each reverse step (memory flat in the step count under `grad`).
      clip_denoised: clip the predicted x0 to [-1, 1] at every step.
      length: pad the chain with identity steps to this many steps (see
        `diffjax.diffusion.make_chain`), so that purifiers with fewer steps share the
        compiled program of the longest.

    Returns:
      A `Partial` `purify_fn(x [B,H,W,C] in [0, 1], keys [B]) -> [B,H,W,C] in [0, 1]`.
    """
    from diffjax.diffusion import samplers

    t_star = _checks.check_int(t_star, "t_star", lo=1)
    if num_steps is not None:
        num_steps = _checks.check_int(num_steps, "num_steps", lo=1, hi=t_star)
    _checks.check_choice(method, "method", samplers.METHODS)
    chain = samplers.make_chain(schedule, t_star=t_star, method=method, num_steps=num_steps,
                                clip_denoised=clip_denoised, length=length)
    return Partial(_ChainPurify(bool(remat)), _as_partial(eps_fn, "eps_fn"), chain)
