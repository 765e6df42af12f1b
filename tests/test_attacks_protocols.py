"""Randomness protocols: key flow by construction, fixed <= transfer, gradient correlation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffjax import attacks, diffusion, randomness
from diffjax.attacks import Gradient, PGDConfig, streams
from diffjax.defense import Defense, make_purifier, undefended

H = W = 4
D = H * W


def linear_logits(params, x):
    w, b = params
    return x.reshape(x.shape[0], -1) @ w + b


def mask_purify(x, keys):
    """Keeps a random half of the pixels (the rest set to 0.5): randomness that changes
    which input directions matter, so an attack tailored to one mask transfers badly."""
    m = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, x.shape[1:]))(keys)
    return jnp.where(m, x, 0.5)


def masked_problem(n=16, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.choice([-1.0, 1.0], size=D).astype(np.float32)
    # Logits +-w.(x - 0.5): the masked-out pixels (0.5) carry no evidence.
    params = (jnp.asarray(np.stack([w, -w], 1)), jnp.asarray([-0.5, 0.5]) * w.sum())
    y = rng.integers(0, 2, size=n).astype(np.int32)
    sign = np.where(y == 0, 1.0, -1.0)[:, None]
    # Clean evidence 0.03 per kept pixel: an l_inf shift of 0.045 against the kept pixels
    # flips it; the same shift on only the half of them that another mask keeps does not.
    x = 0.5 + sign * 0.03 * w[None] + rng.uniform(-0.005, 0.005, size=(n, D))
    return (Defense(Partial(mask_purify), Partial(linear_logits, params)),
            jnp.asarray(x.reshape(n, H, W, 1), jnp.float32), jnp.asarray(y))


CFG = PGDConfig(norm="linf", eps=0.05, step_size=0.02, steps=4, return_trajectory=True)
ROOT = jax.random.key(42)


def key_set(data):
    data = np.asarray(data)
    return {tuple(r) for r in data.reshape(-1, data.shape[-1])}


def test_fixed_evaluates_with_exactly_the_attacks_keys():
    defense, x, y = masked_problem(8)
    out = attacks.attack_and_evaluate(defense, x, y, jnp.arange(8), config=CFG,
                                      protocol="fixed", key=ROOT, eval_draws=4)
    fixed = np.asarray(out["fixed_keys"])
    attack = np.asarray(out["attack_keys"])  # [steps, K, B, 2]
    np.testing.assert_array_equal(attack, np.broadcast_to(fixed, attack.shape))
    # Under Fixed every evaluation draw is the realization: one draw.
    np.testing.assert_array_equal(out["eval_keys"], fixed[None])
    # The evaluation is exactly the attack's own verdict at its final point ...
    np.testing.assert_array_equal(out["adv_correct"], ~np.asarray(out["success"]))
    # ... and recomputing it under the recorded key gives the same.
    logits = defense.logits(out["x_adv"], jax.random.wrap_key_data(out["fixed_keys"]))
    np.testing.assert_array_equal(np.argmax(logits, -1) == y, out["adv_correct"])
    np.testing.assert_array_equal(out["adv_correct_mean"], out["adv_correct"].astype(float))
    np.testing.assert_array_equal(out["adv_correct_worst"], out["adv_correct"])
    # The example keys are example_keys(key, ids) of the ids.
    np.testing.assert_array_equal(
        out["example_keys"], jax.random.key_data(randomness.example_keys(ROOT, jnp.arange(8))))


def test_transfer_attacks_with_fixed_keys_and_evaluates_with_others():
    defense, x, y = masked_problem(8)
    out = attacks.attack_and_evaluate(defense, x, y, jnp.arange(8), config=CFG,
                                      protocol="transfer", key=ROOT, eval_draws=4)
    fixed = np.asarray(out["fixed_keys"])
    attack = np.asarray(out["attack_keys"])
    np.testing.assert_array_equal(attack, np.broadcast_to(fixed, attack.shape))
    ev = np.asarray(out["eval_keys"])
    assert len(key_set(ev)) == 4 * 8  # every draw of every example distinct
    assert not key_set(ev) & key_set(fixed)
    # adv_correct is evaluation draw 0; the mean and the worst case cover all 4 draws.
    per_draw = np.stack([
        np.argmax(defense.logits(out["x_adv"], jax.random.wrap_key_data(ev[m])), -1) == y
        for m in range(4)])
    np.testing.assert_array_equal(out["adv_correct"], per_draw[0])
    np.testing.assert_allclose(out["adv_correct_mean"], per_draw.mean(0))
    np.testing.assert_array_equal(out["adv_correct_worst"], per_draw.all(0))


def test_independent_draws_fresh_keys_everywhere():
    defense, x, y = masked_problem(4)
    cfg = PGDConfig(norm="linf", eps=0.05, step_size=0.02, steps=3,
                    gradient=Gradient("full", eot=2), return_trajectory=True)
    out = attacks.attack_and_evaluate(defense, x, y, jnp.arange(4), config=cfg,
                                      protocol="independent", key=ROOT, eval_draws=2)
    attack, ev = key_set(out["attack_keys"]), key_set(out["eval_keys"])
    assert len(attack) == 3 * 2 * 4 and len(ev) == 2 * 4
    assert not attack & ev and not (attack | ev) & key_set(out["fixed_keys"])
    # Iteration keys are a function of (example key, iteration) only.
    np.testing.assert_array_equal(
        out["attack_keys"][1],
        jax.random.key_data(streams.attack_draw_keys(
            "independent", jax.random.wrap_key_data(out["example_keys"]), 1, 2)))


def test_results_depend_on_example_identity_only():
    defense, x, y = masked_problem(6)
    cfg = PGDConfig(norm="linf", eps=0.05, step_size=0.02, steps=2)
    full = attacks.attack_and_evaluate(defense, x, y, jnp.arange(6), config=cfg,
                                       protocol="transfer", key=ROOT, eval_draws=2)
    perm = np.array([5, 3, 4])  # another batch size and order
    part = attacks.attack_and_evaluate(defense, x[perm], y[perm], jnp.asarray(perm), config=cfg,
                                       protocol="transfer", key=ROOT, eval_draws=2)
    for k in ("x_adv", "adv_correct", "adv_correct_mean", "l2", "eval_keys"):
        a, b = np.asarray(full[k]), np.asarray(part[k])
        if k == "eval_keys":
            a, b = a[:, perm], b
        else:
            a = a[perm]
        np.testing.assert_array_equal(a, b)


def test_content_keys_come_from_the_clean_images():
    defense, x, y = masked_problem(8)  # the shapes of the `fixed` test: no new compile
    out = attacks.attack_and_evaluate(defense, x, y, "content", config=CFG, protocol="fixed",
                                      key=ROOT, eval_draws=4)
    np.testing.assert_array_equal(out["example_keys"],
                                  jax.random.key_data(randomness.content_keys(ROOT, x)))
    assert not key_set(out["example_keys"]) & key_set(
        jax.random.key_data(randomness.content_keys(ROOT, out["x_adv"])))


def test_fixed_is_stronger_than_transfer_on_a_random_mask_purifier():
    defense, x, y = masked_problem(32)
    cfg = PGDConfig(norm="linf", eps=0.045, step_size=0.02, steps=5)
    res = {p: attacks.attack_and_evaluate(defense, x, y, jnp.arange(32), config=cfg,
                                          protocol=p, key=ROOT, eval_draws=4)
           for p in ("fixed", "transfer")}
    clean = float(np.mean(res["fixed"]["clean_correct"]))
    fixed = float(np.mean(res["fixed"]["adv_correct"]))
    transfer = float(np.mean(res["transfer"]["adv_correct_mean"]))
    assert clean > 0.9
    assert fixed < transfer, (fixed, transfer)
    assert fixed < 0.2 and transfer > 0.5, (fixed, transfer)


def tiny_eps_fn(params, x_t, t):
    """An analytic eps-model with weights: eps = tanh(a * x_t + b * blur(x_t))."""
    a, b = params
    blur = (jnp.roll(x_t, 1, 1) + jnp.roll(x_t, -1, 1) + jnp.roll(x_t, 1, 2)
            + jnp.roll(x_t, -1, 2)) / 4
    return jnp.tanh(a * x_t + b * blur)


def test_fixed_is_stronger_than_transfer_through_ddpm_purify():
    n = 24
    rng = np.random.default_rng(3)
    w = rng.normal(size=(D, 3)).astype(np.float32)
    params = (jnp.asarray(w), jnp.zeros(3, jnp.float32))
    x = jnp.asarray(rng.uniform(0.2, 0.8, size=(n, H, W, 1)), jnp.float32)
    y = jnp.asarray(np.argmax(linear_logits(params, x), -1).astype(np.int32))
    purifier = make_purifier(Partial(tiny_eps_fn, (jnp.float32(0.8), jnp.float32(0.3))),
                             schedule=diffusion.linear_schedule(), t_star=60, method="ddpm",
                             num_steps=3)
    defense = Defense(purifier, Partial(linear_logits, params))
    cfg = PGDConfig(norm="linf", eps=0.04, step_size=0.015, steps=5)
    res = {p: attacks.attack_and_evaluate(defense, x, y, jnp.arange(n), config=cfg,
                                          protocol=p, key=ROOT, eval_draws=4)
           for p in ("fixed", "transfer")}
    np.testing.assert_array_equal(res["fixed"]["adv_correct"], ~res["fixed"]["success"])
    fixed = float(np.mean(res["fixed"]["adv_correct"]))
    transfer = float(np.mean(res["transfer"]["adv_correct_mean"]))
    assert fixed <= transfer, (fixed, transfer)
    # The purifier's randomness matters: the M evaluation draws do not all agree.
    assert np.any((res["transfer"]["adv_correct_mean"] > 0)
                  & (res["transfer"]["adv_correct_mean"] < 1))


def test_gradient_correlation():
    rng = np.random.default_rng(0)
    params = (jnp.asarray(rng.normal(size=(D, 3)), jnp.float32), jnp.zeros(3, jnp.float32))
    x = jnp.asarray(rng.uniform(0.2, 0.8, size=(6, H, W, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=6), jnp.int32)
    keys = randomness.example_keys(ROOT, jnp.arange(6))
    nonlinear = lambda p, z: jnp.tanh(linear_logits(p, z))
    plain = undefended(Partial(nonlinear, params))
    c = attacks.gradient_correlation(plain, x, y, keys, eot=3, key=jax.random.key(1))
    np.testing.assert_allclose(c, 1.0, rtol=1e-5)  # no randomness: the same gradient
    masked = Defense(Partial(mask_purify), Partial(nonlinear, params))
    c = np.asarray(attacks.gradient_correlation(masked, x, y, keys, eot=8,
                                                key=jax.random.key(1)))
    assert c.shape == (6,) and np.all(c <= 1.0) and np.all(c >= -1.0)
    assert c.mean() < 0.95  # fresh masks give a different gradient
    c2 = attacks.gradient_correlation(masked, x, y, keys, eot=8, key=jax.random.key(1),
                                      eot_batch_size=3)
    np.testing.assert_allclose(c2, c, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    defense, x, y = masked_problem(4)
    with pytest.raises(ValueError, match="protocol"):
        attacks.attack_and_evaluate(defense, x, y, jnp.arange(4), config=CFG,
                                    protocol="aligned", key=ROOT)
    with pytest.raises(ValueError, match="eval_draws"):
        attacks.attack_and_evaluate(defense, x, y, jnp.arange(4), config=CFG, key=ROOT,
                                    eval_draws=0)
    with pytest.raises(ValueError, match="example_ids_or_keys"):
        attacks.attack_and_evaluate(defense, x, y, jnp.arange(3), config=CFG, key=ROOT)
    with pytest.raises(ValueError, match="key"):
        attacks.attack_and_evaluate(defense, x, y, jnp.arange(4), config=CFG)
    with pytest.raises(ValueError, match="y"):
        attacks.attack_and_evaluate(defense, x, y + 5, jnp.arange(4), config=CFG, key=ROOT)
    with pytest.raises(ValueError, match="config"):
        attacks.attack_and_evaluate(defense, x, y, jnp.arange(4), config={"eps": 0.1},
                                    key=ROOT)
    with pytest.raises(ValueError, match="eot"):
        attacks.gradient_correlation(defense, x, y, randomness.example_keys(ROOT, jnp.arange(4)),
                                     eot=0, key=ROOT)


def test_attack_and_evaluate_inside_a_callers_jit():
    defense, x, y = masked_problem(8)
    keys = randomness.example_keys(ROOT, jnp.arange(8))
    outside = attacks.attack_and_evaluate(defense, x, y, keys, config=CFG, protocol="transfer",
                                          eval_draws=4)
    inside = jax.jit(lambda d, a, b, k: attacks.attack_and_evaluate(
        d, a, b, k, config=CFG, protocol="transfer", eval_draws=4))(defense, x, y, keys)
    for k in ("x_adv", "adv_correct_mean", "eval_keys", "attack_keys"):
        np.testing.assert_array_equal(inside[k], outside[k])
