"""Training a deterministic purifier for compression (the paper's open question 1).

The objective trades compression of the input space against the anchor (paper Sec. 5-6:
robustness under fixed randomness follows the compression rate around anchors the
classifier gets right). For a batch of [0, 1] images `x` with labels `y`, a frozen
classifier `f`, the purifier's pre-clip map `o` (`diffjax.models.purifier`) and
`P = clip(o, 0, 1)`:

    x~   = clip(x + u, 0, 1),  u ~ U(-r, r)^d,  r ~ U(0, noise_radius) per example
    L    = CE(f(P(z)), y)                                                (the anchor)
         + jacobian_weight * mean_b ||J_o(z_b) v_b||^2 / d              (compression)
         + spectral_weight * mean_b ||J_o(z_b) u_b||^2                  (top direction)
         + ball_weight * mean_b ||o(x^_b) - o(x_b)||^2 / ||x^_b - x_b||^2  (worst secant)

over `z = [x; x~]` (and `x^` below when `ball_weight > 0`). The compression term is
Hutchinson's estimator of the squared RMS singular value `||J||_F^2 / d` (the quantity
`diffjax.metrics.compression_rate` reports), with Rademacher probes `v` (`num_probes` of
them) drawn from the step's key: one `jvp` each. The two optional terms (off by default)
look at the directions an adversary would use, which the RMS singular value averages
away: the spectral term estimates the top singular value by `power_iterations` rounds of
`u <- J^T J u / ||J^T J u||` (one `jvp` and one `vjp` each, `u` held constant for the
gradient); the worst-secant term finds, by `ball_steps` sign-ascent steps on the purifier
alone (no classifier involved), the point `x^` of the l_inf ball of radius `ball_radius`
that the purifier moves farthest from its anchor, and penalises that secant ratio (the
paper's sample-based compression rate, taken at the ball's worst point instead of its
average one); `x^` also joins the anchor term. All are taken on the pre-clip map `o`,
which bounds the clipped one's (module docstring of `diffjax.models.purifier`), and at
clean and perturbed points, so that the compression holds across the eps-ball rather than
at the anchor only.

The pieces follow `diffjax.train`: the step's randomness is `fold_in(key, state.step)`
(a resumed run draws the same numbers), the state is a `train.TrainState` (EMA weights are
the ones exported), and `train.fit` / `train.checkpoint_manager` run and checkpoint it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from diffjax import _checks, train

__all__ = ["purifier_loss", "make_purifier_step", "noisy_copies", "worst_secant_points",
           "evaluate_purifier"]


def noisy_copies(images, key, noise_radius: float):
    """`clip(x + u, 0, 1)`, `u ~ U(-r, r)^d` with `r ~ U(0, noise_radius)` per example.

    Args:
      images: `[B, H, W, C]` in [0, 1].
      key: one key for the batch.
      noise_radius: the largest l_inf radius of the noise.

    Returns:
      `[B, H, W, C]` noisy images in [0, 1].
    """
    k_r, k_u = jax.random.split(key)
    r = jax.random.uniform(k_r, (images.shape[0],) + (1,) * (images.ndim - 1),
                           maxval=noise_radius)
    u = jax.random.uniform(k_u, images.shape, minval=-1.0, maxval=1.0)
    return jnp.clip(images + r * u, 0.0, 1.0)


def worst_secant_points(o_fn: Callable, images, key, *, radius: float, steps: int):
    """Points of the l_inf ball where the map moves most: `x + delta` maximising
    `||o(x + delta) - o(x)||^2` by `steps` sign-ascent steps of size `radius / 2` from a
    uniform start (projected onto the ball and [0, 1]). The worst secant of the ball, the
    adversary's view of compression (no classifier involved).

    Args:
      o_fn: the batched map (its parameters held constant by the caller).
      images: `[B, H, W, C]` in [0, 1].
      key: one key for the batch (the start).
      radius: the ball's l_inf radius.
      steps: ascent steps.

    Returns:
      `[B, H, W, C]` points in the ball around `images`, in [0, 1].
    """
    o0 = jax.lax.stop_gradient(o_fn(images))
    start = images + jax.random.uniform(key, images.shape, minval=-radius, maxval=radius)
    start = jnp.clip(start, 0.0, 1.0)
    disp = lambda v: jnp.sum(jnp.square(o_fn(v) - o0))

    def ascend(v, _):
        g = jax.grad(disp)(v)
        v = jnp.clip(v + 0.5 * radius * jnp.sign(g), images - radius, images + radius)
        return jnp.clip(v, 0.0, 1.0), None

    v, _ = jax.lax.scan(ascend, start, None, length=steps)
    return jax.lax.stop_gradient(v)


def _per_example_sq(v):
    return jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=-1)


def purifier_loss(
    apply_fn: Callable,
    params,
    logits_fn: Callable,
    images,
    labels,
    key,
    *,
    noise_radius: float,
    jacobian_weight: float,
    spectral_weight: float = 0.0,
    num_probes: int = 1,
    power_iterations: int = 3,
    ball_weight: float = 0.0,
    ball_radius: float = 0.1,
    ball_steps: int = 5,
):
    """The purifier's training loss (module docstring) and its parts.

    Args:
      apply_fn: `apply_fn(params, x) -> o`, the purifier's pre-clip output on [0, 1]
        images (`diffjax.models.purifier.apply_logits`).
      params: its parameters.
      logits_fn: the frozen classifier, `logits_fn(x [B,H,W,C] in [0, 1]) -> [B, K]`.
      images: `[B, H, W, C]` clean images in [0, 1].
      labels: int32 `[B]`.
      key: one key for the batch (noise, probes).
      noise_radius: the largest l_inf radius of the training noise.
      jacobian_weight: the weight of the squared-RMS-singular-value term.
      spectral_weight: the weight of the top-singular-value term (0: not computed).
      num_probes: Hutchinson probes per example.
      power_iterations: power-iteration rounds of the spectral term.
      ball_weight: the weight of the worst-case secant term (0: not computed).
      ball_radius: the l_inf radius of its ball.
      ball_steps: sign-ascent steps of its search.

    Returns:
      `(loss, metrics)`: metrics `{ce, rate2, top2, ball2, accuracy_clean,
      accuracy_noisy}`, `rate2` the Hutchinson estimate of the squared compression rate of
      `o`, `top2` the squared top singular value estimate, `ball2` the squared worst
      secant ratio found (0 for the terms that are off).
    """
    k_noise, k_probe, k_power, k_ball = jax.random.split(key, 4)
    b = images.shape[0]
    parts = [images, noisy_copies(images, k_noise, noise_radius)]
    if ball_weight:
        parts.append(worst_secant_points(lambda v: apply_fn(jax.lax.stop_gradient(params), v),
                                         images, k_ball, radius=ball_radius,
                                         steps=ball_steps))
    z = jnp.concatenate(parts)
    y2 = jnp.concatenate([labels] * len(parts))
    o_fn = lambda v: apply_fn(params, v)
    o = o_fn(z)
    logits = logits_fn(jnp.clip(o, 0.0, 1.0))
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y2))
    d = z[0].size

    def probe(i):
        v = jax.random.rademacher(jax.random.fold_in(k_probe, i), z.shape, z.dtype)
        return _per_example_sq(jax.jvp(o_fn, (z,), (v,))[1]) / d

    rate2 = jnp.mean(jax.vmap(probe)(jnp.arange(num_probes)), axis=0)  # [2B]
    loss = ce + jacobian_weight * jnp.mean(rate2)
    top2 = jnp.zeros_like(rate2)
    if spectral_weight:
        _, vjp_fn = jax.vjp(o_fn, z)
        u = jax.random.normal(k_power, z.shape, z.dtype)

        def power(u, _):
            u = u / jnp.sqrt(_per_example_sq(u) + 1e-12).reshape((-1,) + (1,) * (z.ndim - 1))
            ju = jax.jvp(o_fn, (z,), (u,))[1]
            return vjp_fn(ju)[0], None

        u, _ = jax.lax.scan(power, u, None, length=power_iterations)
        u = jax.lax.stop_gradient(
            u / jnp.sqrt(_per_example_sq(u) + 1e-12).reshape((-1,) + (1,) * (z.ndim - 1)))
        top2 = _per_example_sq(jax.jvp(o_fn, (z,), (u,))[1])
        loss = loss + spectral_weight * jnp.mean(top2)
    ball2 = jnp.zeros(())
    if ball_weight:
        ball2 = jnp.mean(_per_example_sq(o[2 * b:] - o[:b])
                         / jnp.maximum(_per_example_sq(z[2 * b:] - images), 1e-12))
        loss = loss + ball_weight * ball2
    correct = (jnp.argmax(logits, -1) == y2).astype(jnp.float32)
    metrics = {"ce": ce, "rate2": jnp.mean(rate2), "top2": jnp.mean(top2), "ball2": ball2,
               "accuracy_clean": jnp.mean(correct[:b]),
               "accuracy_noisy": jnp.mean(correct[b:2 * b])}
    return loss, metrics


def make_purifier_step(
    module,
    tx: optax.GradientTransformation,
    logits_fn: Callable,
    *,
    key,
    ema_decay: float,
    noise_radius: float,
    jacobian_weight: float,
    spectral_weight: float = 0.0,
    num_probes: int = 1,
    power_iterations: int = 3,
    ball_weight: float = 0.0,
    ball_radius: float = 0.1,
    ball_steps: int = 5,
) -> Callable:
    """A jitted purifier training step `step(state, batch) -> (state, metrics)`.

    The state (`diffjax.train.TrainState`) is donated; the step's key is
    `fold_in(key, state.step)`; the classifier is frozen (its weights, held by the
    `logits_fn` Partial, are an argument of the step, not trained).

    Args:
      module: the purifier (`diffjax.models.build("purifier_net", config)`).
      tx: the optimiser (`diffjax.train.make_optimizer`).
      logits_fn: the frozen classifier on [0, 1] images (`pretrained.load(...).logits_fn`).
      key: the run's base key (noise, probes).
      ema_decay: the EMA decay of the weights.
      noise_radius, jacobian_weight, spectral_weight, num_probes, power_iterations,
        ball_weight, ball_radius, ball_steps: the objective (`purifier_loss`).

    Returns:
      `step(state, batch)` with `batch.images` `[B, H, W, C]` in [0, 1] and `batch.labels`
      int32 `[B]`; metrics `{loss, ce, rate2, top2, ball2, accuracy_clean,
      accuracy_noisy}`.
    """
    ema_decay = _checks.check_number(ema_decay, "ema_decay", lo=0.0, hi=1.0)
    noise_radius = _checks.check_number(noise_radius, "noise_radius", lo=0.0)
    jacobian_weight = _checks.check_number(jacobian_weight, "jacobian_weight", lo=0.0)
    spectral_weight = _checks.check_number(spectral_weight, "spectral_weight", lo=0.0)
    num_probes = _checks.check_int(num_probes, "num_probes", lo=1)
    power_iterations = _checks.check_int(power_iterations, "power_iterations", lo=1)
    ball_weight = _checks.check_number(ball_weight, "ball_weight", lo=0.0)
    ball_radius = _checks.check_number(ball_radius, "ball_radius", lo=0.0)
    ball_steps = _checks.check_int(ball_steps, "ball_steps", lo=1)
    if not isinstance(logits_fn, jax.tree_util.Partial):
        logits_fn = jax.tree_util.Partial(logits_fn)

    def apply_fn(params, x):
        return module.apply({"params": params}, x)

    def step(state: train.TrainState, batch, logits_fn):
        k = jax.random.fold_in(key, state.step)
        (loss, metrics), grads = jax.value_and_grad(purifier_loss, argnums=1, has_aux=True)(
            apply_fn, state.params, logits_fn, batch.images, batch.labels, k,
            noise_radius=noise_radius, jacobian_weight=jacobian_weight,
            spectral_weight=spectral_weight, num_probes=num_probes,
            power_iterations=power_iterations, ball_weight=ball_weight,
            ball_radius=ball_radius, ball_steps=ball_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params,
                            ema_params=train.ema_update(state.ema_params, params, ema_decay),
                            opt_state=opt_state)
        return new, {"loss": loss, **metrics}

    jitted = jax.jit(step, donate_argnums=0)
    return lambda state, batch: jitted(state, batch, logits_fn)


def evaluate_purifier(
    purify_fn: Callable,
    logits_fn: Callable,
    x,
    y,
    example_keys,
    *,
    eps: float = 0.1,
    norm: str = "linf",
    pgd_steps: int = 50,
    apgd_steps: int = 50,
) -> dict:
    """Clean accuracy, white-box robust accuracy and compression rate of a purifier.

    Every attack differentiates through the whole purifier (full gradient) under the
    `Fixed` protocol (for a deterministic purifier every protocol is the same): PGD
    (`pgd_steps`, step eps / 4, random start) and APGD-CE and APGD-DLR (`apgd_steps`, one
    restart). An example counts as robust when it is classified correctly clean and
    under none of the three attacks is it fooled (the per-example worst case). The
    compression rate is `diffjax.metrics.compression_rate` (exact Jacobian, RMS singular
    value) at the clean images, averaged; `top_singular_value` the mean largest singular
    value there.

    Args:
      purify_fn: `purify_fn(x, keys) -> x'` on [0, 1] images.
      logits_fn: the classifier on [0, 1] images.
      x: `[N, H, W, C]` clean images in [0, 1].
      y: int32 `[N]` labels.
      example_keys: `[N]` typed keys (attack starts; passed to `purify_fn`).
      eps: the attack budget.
      norm: "linf" or "l2".
      pgd_steps: PGD iterations.
      apgd_steps: APGD iterations.

    Returns:
      A JSON-ready dict: `clean_accuracy`, `robust_accuracy` `{pgd, apgd_ce, apgd_dlr,
      worst}`, `compression_rate`, `top_singular_value`, `eps`, `norm`, `num_examples`.
    """
    import numpy as np

    from diffjax import metrics
    from diffjax.attacks import APGDConfig, PGDConfig, apgd_attack, pgd_attack
    from diffjax.defense import Defense

    defense = Defense(purify_fn, logits_fn)
    y = jnp.asarray(y, jnp.int32)
    correct = np.asarray(jnp.argmax(defense.logits(x, example_keys), -1) == y)
    fooled = {
        "pgd": pgd_attack(defense, x, y, example_keys, config=PGDConfig(
            norm=norm, eps=eps, step_size=eps / 4, steps=pgd_steps)).success,
        "apgd_ce": apgd_attack(defense, x, y, example_keys, config=APGDConfig(
            norm=norm, eps=eps, steps=apgd_steps, loss="ce")).success,
        "apgd_dlr": apgd_attack(defense, x, y, example_keys, config=APGDConfig(
            norm=norm, eps=eps, steps=apgd_steps, loss="dlr")).success,
    }
    fooled = {k: np.asarray(v) for k, v in fooled.items()}
    robust = {k: float(np.mean(correct & ~v)) for k, v in fooled.items()}
    robust["worst"] = float(np.mean(correct & ~np.any(np.stack(list(fooled.values())), 0)))
    rates = metrics.compression_rate(purify_fn, x, keys=example_keys)
    top = metrics.jacobian_singular_values(purify_fn, x, keys=example_keys)[:, 0]
    return {"clean_accuracy": float(np.mean(correct)), "robust_accuracy": robust,
            "compression_rate": float(np.mean(np.asarray(rates))),
            "top_singular_value": float(np.mean(np.asarray(top))), "eps": float(eps),
            "norm": norm, "num_examples": int(x.shape[0])}
