"""Attack losses and gradient estimators through a randomized purifier.

Three estimators of the gradient of a per-example loss `L(logits(x, keys), y)` with
respect to the input `x` (Athalye et al. 2018; the paper, Section 4):

- ``full``: the exact gradient, back-propagated through every purification step. The
  purifier's reverse steps are a `lax.scan` over a `jax.checkpoint`ed body, so memory does
  not grow with the number of steps.
- ``bpda``: Backward Pass Differentiable Approximation with the identity: the forward pass
  runs the purifier, the backward pass treats it as the identity (a straight-through
  `custom_vjp`), so the gradient is the classifier's gradient at the purified point.
- ``eot=K``: Expectation over Transformation: the mean of K gradients, each under its own
  purifier key (`vmap` over the K keys, chunked with `lax.map(..., batch_size=...)` so
  memory stays bounded when K is large). Combines with either kind.

Losses (all to be *maximised* by the attack, per example):

- ``ce``: cross-entropy `-log softmax(z)_y`, computed as
  `m + log1p(expm1(-m) + sum_{j != y} exp(z_j - z_y - m))` with `m = max(0, max_j z_j - z_y)`:
  for a confident example the naive `logsumexp(z) - z_y` rounds to exactly 0 in float32
  (200 of the 277 correctly classified digits), so every comparison of losses (APGD's
  checkpoints) ties; this form keeps the tiny value;
- ``margin``: the Carlini-Wagner margin `max_{j != y} z_j - z_y` (> 0 iff misclassified);
- ``dlr``: Croce & Hein's Difference of Logits Ratio
  `-(z_y - max_{j != y} z_j) / (z_(1) - z_(3))` (needs at least 3 classes);
- ``dlr_targeted``: the targeted DLR of APGD-T, `-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)`
  for a target class `t` per example (needs at least 4 classes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import _checks

__all__ = ["Gradient", "LOSSES", "attack_loss", "select_loss", "straight_through",
           "loss_and_grad", "per_draw_loss_and_grad", "oracle", "oracle_program",
           "oracle_call", "combine_draws"]

LOSSES = ("ce", "margin", "dlr", "dlr_targeted")
KINDS = ("full", "bpda")


@dataclasses.dataclass(frozen=True)
class Gradient:
    """How the attack differentiates through the purifier (static under jit).

    Attributes:
      kind: "full" (exact, through every purification step) or "bpda" (identity backward).
      eot: K >= 1, the number of purifier-randomness draws averaged per gradient. The
        protocol owns K (`diffjax.protocols.Independent(eot=K)`); a K > 1 here together
        with the protocol's name "independent" is the older spelling of the same thing.
      eot_batch_size: how many of the K draws run at once (`lax.map` batch size); None
        runs all K in one `vmap`. Bounds memory when K is large.
    """

    kind: str = "full"
    eot: int = 1
    eot_batch_size: int | None = None

    def __post_init__(self):
        _checks.check_choice(self.kind, "gradient.kind", KINDS)
        _checks.check_int(self.eot, "gradient.eot", lo=1)
        if self.eot_batch_size is not None:
            _checks.check_int(self.eot_batch_size, "gradient.eot_batch_size", lo=1)


def attack_loss(logits, labels, loss: str = "ce", target=None):
    """Per-example attack loss `[B]` (to maximise) from logits `[B, C]` and labels `[B]`.

    Args:
      logits: `[B, C]` float logits.
      labels: `[B]` int32 class indices.
      loss: "ce", "margin" (CW), "dlr" (Croce & Hein 2020, Eq. 6) or "dlr_targeted"
        (their targeted version, used by APGD-T).
      target: `[B]` int32 target classes, for "dlr_targeted" only.

    Returns:
      `[B]` float32 losses.
    """
    _checks.check_choice(loss, "loss", LOSSES)
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    if loss == "ce":
        d = jnp.where(onehot, -jnp.inf, logits - z_y[:, None])  # z_j - z_y, j != y
        m = jnp.maximum(jnp.max(d, axis=-1), 0.0)
        rest = jnp.sum(jnp.exp(d - m[:, None]), axis=-1)
        return m + jnp.log1p(jnp.expm1(-m) + rest)
    top = jnp.sort(logits, axis=-1)
    if loss == "dlr_targeted":
        if num_classes < 4:
            _checks.fail("loss", "'ce', 'margin' or 'dlr' for fewer than 4 classes "
                         "(targeted DLR needs 4)", f"'dlr_targeted' with {num_classes} classes")
        if target is None:
            _checks.fail("target", "one target class per example for 'dlr_targeted'", None)
        z_t = jnp.take_along_axis(logits, target[:, None].astype(jnp.int32), axis=-1)[:, 0]
        return -(z_y - z_t) / (top[:, -1] - 0.5 * (top[:, -3] + top[:, -4]) + 1e-12)
    z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    if loss == "margin":
        return z_other - z_y
    if num_classes < 3:
        _checks.fail("loss", "'ce' or 'margin' for fewer than 3 classes (DLR needs 3)",
                     f"'dlr' with {num_classes} classes")
    return -(z_y - z_other) / (top[:, -1] - top[:, -3] + 1e-12)


@jax.custom_vjp
def straight_through(purify_fn, x, keys):
    """`purify_fn(x, keys)` forward; the identity backward (BPDA). Gradients flow to `x` only."""
    return purify_fn(x, keys)


def _st_fwd(purify_fn, x, keys):
    return purify_fn(x, keys), None


def _st_bwd(_, g):
    return (None, g, None)


straight_through.defvjp(_st_fwd, _st_bwd)


_MIN_CLASSES = {"ce": 2, "margin": 2, "dlr": 3, "dlr_targeted": 4}


def select_loss(logits, labels, names: tuple, index, target=None):
    """`attack_loss` with the loss picked at run time: `names[index]`, `index` traced.

    Every loss of `names` that the number of classes admits is computed (they cost nothing
    beside the model) and one is selected, so attacks that differ only in their loss share
    a compiled program. A loss the classes do not admit is never selected (its attack's
    config is checked before it runs) and contributes zeros.
    """
    num_classes = logits.shape[-1]
    stack = [attack_loss(logits, labels, n, target) if num_classes >= _MIN_CLASSES[n]
             else jnp.zeros(logits.shape[:1], jnp.float32) for n in names]
    return jnp.stack(stack)[index]


def _single_loss(defense, x, y, keys, loss, kind, target, loss_index=None):
    if kind == "bpda":
        purified = straight_through(defense.purify_fn, x, keys)
    else:
        purified = defense.purify_fn(x, keys)
    logits = defense.logits_fn(purified)
    if isinstance(loss, tuple):
        losses = select_loss(logits, y, loss, loss_index, target)
    else:
        losses = attack_loss(logits, y, loss, target)
    return jnp.sum(losses), (losses, logits)


def loss_and_grad(defense, x, y, draw_keys, *, loss, gradient: Gradient, target=None,
                  loss_index=None):
    """The attack loss and its estimated input gradient, averaged over randomness draws.

    Examples are independent (the purifier and the classifier act per example), so the
    gradient of the summed loss gives each example's own gradient.

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` images in [0, 1].
      y: `[B]` int32 labels.
      draw_keys: `[K, B]` purifier keys, one row per EOT draw (K = `gradient.eot`).
      loss: one of `LOSSES`, or a tuple of them with `loss_index` (`select_loss`).
      gradient: the estimator (`Gradient(kind)`; K is the number of rows of `draw_keys`).
      target: `[B]` target classes for "dlr_targeted".
      loss_index: the (traced) index into a tuple `loss`.

    Returns:
      `(losses [B], grads [B,H,W,C], logits [B, C])`: the loss and gradient averaged over
      the K draws, and the logits of draw 0.
    """
    if draw_keys.shape[0] == 1:
        grad_fn = jax.grad(_single_loss, argnums=1, has_aux=True)
        g, (losses, logits) = grad_fn(defense, x, y, draw_keys[0], loss, gradient.kind,
                                      target, loss_index)
        return losses, g, logits
    losses, g, logits = per_draw_loss_and_grad(defense, x, y, draw_keys, loss=loss,
                                               kind=gradient.kind,
                                               eot_batch_size=gradient.eot_batch_size,
                                               target=target, loss_index=loss_index)
    return jnp.mean(losses, axis=0), jnp.mean(g, axis=0), logits[0]


def per_draw_loss_and_grad(defense, x, y, draw_keys, *, loss, kind: str,
                           eot_batch_size: int | None = None, target=None, loss_index=None):
    """The loss and input gradient under each of K randomness draws, not averaged.

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[B,H,W,C]` images in [0, 1].
      y: `[B]` int32 labels.
      draw_keys: `[K, B]` purifier keys, one row per draw.
      loss: one of `LOSSES`.
      kind: "full" or "bpda".
      eot_batch_size: draws computed at once (`lax.map` batch size); None: all K in one
        `vmap`.
      target: `[B]` target classes for "dlr_targeted".

    Returns:
      `(losses [K, B], grads [K, B, H, W, C], logits [K, B, C])`.
    """
    grad_fn = jax.grad(_single_loss, argnums=1, has_aux=True)

    def one(keys):
        g, (losses, logits) = grad_fn(defense, x, y, keys, loss, kind, target, loss_index)
        return losses, g, logits

    if eot_batch_size is None:
        return jax.vmap(one)(draw_keys)
    return jax.lax.map(one, draw_keys, batch_size=eot_batch_size)


# ------------------------------------------------------------------ the shared oracle
#
# On a CPU most of a study's time is XLA compiling, and every program that differentiates
# through the purifier costs seconds to build. The oracle is the one program that does:
# the loss and input gradient of ONE draw of the purifier for a batch, with everything
# that varies between its callers as data -- the keys (the realization, a fresh EOT draw,
# a correlation draw), the loss (`loss_index` into `LOSSES`) and APGD-T's target, the
# estimator (full or BPDA), and a cotangent on the purified images with a weight on the
# loss, so that the rows of the purifier's Jacobian come from the same program
# (`weight=0`, `cotangent` a basis vector). Attacks run on it through
# `diffjax.attacks.engine.advance_shared` (a host loop of iterations); the gradient
# correlation and the study's Jacobians call it directly: one gradient program per
# defense structure and batch shape, where the in-program attacks compile one per
# attack, EOT count and estimator, and each measurement one of its own.


def oracle(defense, x, y, keys, target, loss_index, cotangent, weight, bpda):
    """`(losses [B], grad [B,H,W,C], logits [B, C])` of one draw (`keys` `[B]`): the
    gradient of `weight * sum(losses) + sum(cotangent * purified)` with respect to `x`,
    `losses = LOSSES[loss_index]` (traced), `target` APGD-T's classes `[B]` (any for the
    other losses), through the purifier (`bpda` False) or through the identity in its
    place (`bpda` True, traced: BPDA's gradient; the forward value is the purified image
    either way, bit for bit)."""

    def objective(xx):
        purified = defense.purify_fn(xx, keys)
        # BPDA: the purifier's own gradient stopped, the identity's added (its value is an
        # exact zero, so the forward value is untouched).
        purified = (jnp.where(bpda, jax.lax.stop_gradient(purified), purified)
                    + jnp.where(bpda, xx - jax.lax.stop_gradient(xx), 0.0))
        logits = defense.logits_fn(purified)
        losses = select_loss(logits, y, LOSSES, loss_index, target)
        total = weight * jnp.sum(losses) + jnp.sum(cotangent * purified)
        return total, (losses, logits)

    g, (losses, logits) = jax.grad(objective, has_aux=True)(x)
    return losses, g, logits


oracle_program = jax.jit(oracle)
"""`oracle` compiled: one program per defense structure, shapes and shardings."""


def oracle_call(defense, x, y, keys, target, loss_index, cotangent, weight, *,
                kind: str = "full"):
    """`oracle_program` with the estimator named (`kind`: "full" or "bpda") and its inputs
    placed one way whoever calls: the per-example arrays split over the batch axes of
    `y`'s sharding (none if `y` is not on a mesh) and the scalars replicated, so that
    callers whose arrays come from different programs (an attack's query, the study's
    batches) reuse one compiled program."""
    _checks.check_choice(kind, "kind", KINDS)
    bpda = jnp.asarray(kind == "bpda")
    s = getattr(y, "sharding", None)
    if isinstance(s, NamedSharding) and not isinstance(y, jax.core.Tracer):
        axes = s.spec[0] if len(s.spec) else None

        def put(a):
            a = jnp.asarray(a)
            spec = P(axes, *([None] * (a.ndim - 1))) if a.ndim else P()
            return jax.device_put(a, NamedSharding(s.mesh, spec))

        x, y, keys, target, cotangent = map(put, (x, y, keys, target, cotangent))
        loss_index, weight, bpda = put(loss_index), put(weight), put(bpda)
    return oracle_program(defense, x, y, keys, target, loss_index, cotangent, weight, bpda)


def combine_draws(outputs):
    """`loss_and_grad`'s EOT average of K oracle outputs `[(losses, grad, logits)]`: the mean
    loss and gradient over the draws and the logits of draw 0."""
    if len(outputs) == 1:
        return outputs[0]
    losses = jnp.mean(jnp.stack([o[0] for o in outputs]), axis=0)
    grads = jnp.mean(jnp.stack([o[1] for o in outputs]), axis=0)
    return losses, grads, outputs[0][2]
