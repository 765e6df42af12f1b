"""PGD, losses and gradient estimators (diffjax.attacks.pgd / gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffjax import attacks
from diffjax.attacks import Gradient, PGDConfig, engine
from diffjax.defense import Defense, undefended

H = W = 4
D = H * W


def linear_logits(params, x):
    w, b = params
    return x.reshape(x.shape[0], -1) @ w + b


def linear_problem(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, 2)).astype(np.float32)
    b = np.zeros(2, np.float32)
    x = np.full((batch, H, W, 1), 0.5, np.float32)
    logits = linear_logits((w, b), x)
    # Shift the bias so that every example is classified as class 0 with margins 0.5, 1, ...
    b = np.array([0.0, float(logits[0, 0] - logits[0, 1]) - 0.5], np.float32)
    x = x + rng.uniform(-0.05, 0.05, size=x.shape).astype(np.float32)
    params = (jnp.asarray(w), jnp.asarray(b))
    y = np.argmax(linear_logits(params, x), axis=-1).astype(np.int32)
    return params, jnp.asarray(x), jnp.asarray(y)


def uniform(seed, shape, lo=0.0, hi=1.0):
    return jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, size=shape), jnp.float32)


def keys_for(b, seed=0):
    return jax.random.split(jax.random.key(seed), b)


def margin_and_dir(params, x, y):
    w, b = params
    wd = np.where(np.asarray(y)[:, None] == 0, (w[:, 0] - w[:, 1])[None], (w[:, 1] - w[:, 0])[None])
    logits = np.asarray(linear_logits(params, x))
    m = np.take_along_axis(logits, np.asarray(y)[:, None], 1)[:, 0] - logits[
        np.arange(len(y)), 1 - np.asarray(y)]
    return m, wd


def test_linf_reaches_analytic_worst_case():
    params, x, y = linear_problem()
    defense = undefended(Partial(linear_logits, params))
    eps = 0.03
    cfg = PGDConfig(norm="linf", eps=eps, step_size=0.01, steps=12, loss="ce",
                    keep_fooling_point=False)
    res = attacks.pgd_attack(defense, x, y, keys_for(3), config=cfg, protocol="fixed")
    _, wd = margin_and_dir(params, x, y)
    expected = -eps * np.sign(wd).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(res.x_adv - x), expected, atol=1e-6)
    np.testing.assert_allclose(res.linf, eps, atol=1e-6)


@pytest.mark.parametrize("random_start", [False, True])
def test_l2_reaches_analytic_worst_case(random_start):
    params, x, y = linear_problem(1)
    defense = undefended(Partial(linear_logits, params))
    eps = 0.2
    cfg = PGDConfig(norm="l2", eps=eps, step_size=eps, steps=25, loss="ce",
                    random_start=random_start, keep_fooling_point=False)
    res = attacks.pgd_attack(defense, x, y, keys_for(3), config=cfg)
    _, wd = margin_and_dir(params, x, y)
    expected = -eps * wd / np.linalg.norm(wd, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(res.x_adv - x).reshape(3, -1), expected, atol=1e-5)
    np.testing.assert_allclose(res.l2, eps, rtol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_finds_the_minimal_flipping_eps(norm):
    params, x, y = linear_problem(2)
    defense = undefended(Partial(linear_logits, params))
    m, wd = margin_and_dir(params, x, y)
    dual = np.abs(wd).sum(1) if norm == "linf" else np.linalg.norm(wd, axis=1)
    eps_star = m / dual  # the analytic minimal eps at which the label flips
    for factor, flips in ((0.98, False), (1.02, True)):
        for i in range(3):
            eps = float(eps_star[i] * factor)
            cfg = PGDConfig(norm=norm, eps=eps, step_size=eps / 2, steps=8, loss="margin")
            res = attacks.pgd_attack(defense, x[i:i + 1], y[i:i + 1], keys_for(1),
                                     config=cfg)
            assert bool(res.success[0]) == flips, (norm, factor, i)


loss_and_grad = jax.jit(attacks.loss_and_grad, static_argnames=("loss", "gradient"))


def toy_purify(x, keys, *, scale=0.1):
    """A smooth stochastic purifier: blur + per-example Gaussian noise, squashed to (0, 1)."""
    noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
    blur = (jnp.roll(x, 1, 1) + jnp.roll(x, -1, 1) + jnp.roll(x, 1, 2) + jnp.roll(x, -1, 2)) / 4
    return jax.nn.sigmoid(4.0 * (0.7 * x + 0.3 * blur + scale * noise - 0.5))


def mlp_logits(params, x):
    w1, w2 = params
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def toy_defense(seed=0, classes=3):
    rng = np.random.default_rng(seed)
    params = (jnp.asarray(rng.normal(size=(D, 8)) / 2, jnp.float32),
              jnp.asarray(rng.normal(size=(8, classes)), jnp.float32))
    return Defense(Partial(toy_purify), Partial(mlp_logits, params))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("linf", 0.6), ("l2", 0.5), ("l2", 3.0)])
def test_perturbation_stays_in_ball_and_box(norm, eps):
    defense = toy_defense()
    x = uniform(3, (5, H, W, 1))
    x = x.at[0].set(0.0).at[1].set(1.0)  # images on the box's faces
    y = jnp.array([0, 1, 2, 0, 1], jnp.int32)
    cfg = PGDConfig(norm=norm, eps=eps, step_size=eps / 3, steps=4,
                    gradient=Gradient("full", eot=2), return_trajectory=True)
    res = attacks.pgd_attack(defense, x, y, keys_for(5), config=cfg, protocol="independent")
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    delta = np.asarray(res.x_adv - x).reshape(5, -1)
    bound = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert np.all(bound <= eps * (1 + 1e-5))
    np.testing.assert_allclose(res.linf if norm == "linf" else res.l2, bound, rtol=1e-5)
    assert res.loss_trajectory.shape == (4, 5)
    assert res.key_trajectory.shape[:3] == (4, 2, 5)


def test_compiles_once_per_structure():
    params, x, y = linear_problem()
    cfg = PGDConfig(norm="linf", eps=0.03, step_size=0.01, steps=3)
    attacks.pgd_attack(undefended(Partial(linear_logits, params)), x, y, keys_for(3),
                       config=cfg)
    before = engine.run_program._cache_size()
    params2 = jax.tree.map(lambda a: a * 1.5, params)  # other weights, same shapes
    for eps in (0.01, 0.02, 0.05):  # other budgets, other data
        cfg_e = PGDConfig(norm="linf", eps=eps, step_size=eps / 3, steps=3)
        attacks.pgd_attack(undefended(Partial(linear_logits, params2)), x * 0.9, y,
                           keys_for(3, 7), config=cfg_e)
    assert engine.run_program._cache_size() == before


def test_loss_increases_on_linear_model():
    params, x, y = linear_problem()
    cfg = PGDConfig(norm="linf", eps=0.05, step_size=0.01, steps=6, random_start=False,
                    return_trajectory=True, keep_fooling_point=False)
    res = attacks.pgd_attack(undefended(Partial(linear_logits, params)), x, y, keys_for(3),
                             config=cfg)
    traj = np.asarray(res.loss_trajectory)
    assert np.all(np.diff(traj, axis=0) > 0)


def test_losses_by_hand():
    logits = jnp.array([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]])
    y = jnp.array([0, 1], jnp.int32)
    ce = attacks.attack_loss(logits, y, "ce")
    np.testing.assert_allclose(ce, -jax.nn.log_softmax(logits)[jnp.arange(2), y], rtol=1e-6)
    np.testing.assert_allclose(attacks.attack_loss(logits, y, "margin"), [1.0 - 3.0, 5.0 - 2.0])
    # DLR: -(z_y - max_other) / (z_(1) - z_(3)).
    np.testing.assert_allclose(attacks.attack_loss(logits, y, "dlr"),
                               [-(3.0 - 1.0) / (3.0 - 0.0), -(2.0 - 5.0) / (5.0 - 1.0)],
                               rtol=1e-6)


def test_bpda_gradient_is_classifier_gradient_at_purified_point():
    defense = toy_defense()
    x = uniform(1, (4, H, W, 1))
    y = jnp.array([0, 1, 2, 0], jnp.int32)
    keys = keys_for(4, 2)
    _, g, _ = loss_and_grad(defense, x, y, keys[None], loss="ce",
                                    gradient=Gradient("bpda"))
    purified = defense.purify(x, keys)
    g_cls = jax.jit(jax.grad(
        lambda p: attacks.attack_loss(defense.logits_fn(p), y, "ce").sum()))(purified)
    np.testing.assert_allclose(g, g_cls, rtol=1e-5, atol=1e-6)
    _, g_full, _ = loss_and_grad(defense, x, y, keys[None], loss="ce",
                                         gradient=Gradient("full"))
    assert not np.allclose(g, g_full)  # the purifier's Jacobian is not the identity


def test_full_gradient_matches_finite_differences():
    defense = toy_defense()
    x = uniform(4, (2, H, W, 1), 0.2, 0.8)
    y = jnp.array([1, 2], jnp.int32)
    keys = keys_for(2, 3)
    _, g, _ = loss_and_grad(defense, x, y, keys[None], loss="ce",
                                    gradient=Gradient("full"))
    f = jax.jit(lambda z: attacks.attack_loss(defense.logits(z, keys), y, "ce"))
    v = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
    h = 1e-2
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    directional = jnp.sum((g * v).reshape(2, -1), axis=1)
    np.testing.assert_allclose(directional, fd, rtol=2e-2, atol=1e-4)


def test_eot_k1_equals_full_and_chunking_is_exact():
    defense = toy_defense()
    x = uniform(6, (3, H, W, 1))
    y = jnp.array([0, 1, 2], jnp.int32)
    keys = keys_for(3, 4)
    direct = jax.jit(jax.grad(
        lambda z: attacks.attack_loss(defense.logits(z, keys), y, "ce").sum()))(x)
    _, g1, _ = loss_and_grad(defense, x, y, keys[None], loss="ce",
                                     gradient=Gradient("full", eot=1))
    np.testing.assert_allclose(g1, direct, rtol=1e-6, atol=1e-7)
    draws = jax.random.split(jax.random.key(9), (4, 3))
    singles = [loss_and_grad(defense, x, y, draws[i][None], loss="ce",
                                     gradient=Gradient("full"))[1] for i in range(4)]
    _, g_vmap, _ = loss_and_grad(defense, x, y, draws, loss="ce",
                                         gradient=Gradient("full", eot=4))
    _, g_chunk, _ = loss_and_grad(defense, x, y, draws, loss="ce",
                                          gradient=Gradient("full", eot=4, eot_batch_size=2))
    np.testing.assert_allclose(g_vmap, np.mean(singles, axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_chunk, g_vmap, rtol=1e-5, atol=1e-7)


def test_bad_inputs():
    params, x, y = linear_problem()
    defense = undefended(Partial(linear_logits, params))
    k = keys_for(3)
    with pytest.raises(ValueError, match="eps"):
        PGDConfig(eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        PGDConfig(norm="linf", eps=1.5)
    PGDConfig(norm="l2", eps=1.5)  # l2 budgets may exceed 1
    with pytest.raises(ValueError, match="steps"):
        PGDConfig(steps=0)
    with pytest.raises(ValueError, match="eot"):
        Gradient(eot=0)
    with pytest.raises(ValueError, match="norm"):
        PGDConfig(norm="l1")
    with pytest.raises(ValueError, match="loss"):
        PGDConfig(loss="hinge")
    with pytest.raises(ValueError, match="kind"):
        Gradient(kind="spsa")
    cfg = PGDConfig(eps=0.03, step_size=0.01, steps=2)
    with pytest.raises(ValueError, match="y"):
        attacks.pgd_attack(defense, x, jnp.array([0, 1, 2], jnp.int32), k, config=cfg)
    with pytest.raises(ValueError, match="y"):
        attacks.pgd_attack(defense, x, y[:2], k, config=cfg)
    with pytest.raises(ValueError, match="example_keys"):
        attacks.pgd_attack(defense, x, y, k[:2], config=cfg)
    with pytest.raises(ValueError, match="protocol"):
        attacks.pgd_attack(defense, x, y, k, config=cfg, protocol="aligned")
    with pytest.raises(ValueError, match="eot"):
        attacks.pgd_attack(defense, x, y, k, protocol="fixed",
                           config=PGDConfig(eps=0.03, gradient=Gradient(eot=3)))
    with pytest.raises(ValueError, match="x"):
        attacks.pgd_attack(defense, x * 3, y, k, config=cfg)


def tiny_eps_fn(params, x_t, t):
    """An analytic eps-model with weights: eps = tanh(a * x_t + b * blur(x_t))."""
    a, b = params
    blur = (jnp.roll(x_t, 1, 1) + jnp.roll(x_t, -1, 1) + jnp.roll(x_t, 1, 2)
            + jnp.roll(x_t, -1, 2)) / 4
    return 0.5 * jnp.tanh(a * x_t + b * blur)


def test_gradients_through_ddpm_purify():
    from diffjax import diffusion
    from diffjax.defense import make_purifier

    purifier = make_purifier(Partial(tiny_eps_fn, (jnp.float32(0.8), jnp.float32(0.3))),
                             schedule=diffusion.linear_schedule(), t_star=20, method="ddpm",
                             num_steps=3)
    defense = Defense(purifier, toy_defense().logits_fn)
    x = uniform(11, (2, H, W, 1), 0.3, 0.7)
    y = jnp.array([0, 2], jnp.int32)
    keys = keys_for(2, 5)
    f = jax.jit(lambda z: attacks.attack_loss(defense.logits(z, keys), y, "ce"))
    _, g_full, _ = loss_and_grad(defense, x, y, keys[None], loss="ce", gradient=Gradient("full"))
    v = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)
    h = 1e-2
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    np.testing.assert_allclose(jnp.sum((g_full * v).reshape(2, -1), 1), fd, rtol=3e-2, atol=1e-4)
    _, g_bpda, _ = loss_and_grad(defense, x, y, keys[None], loss="ce", gradient=Gradient("bpda"))
    purified = defense.purify(x, keys)
    g_cls = jax.jit(jax.grad(
        lambda p: attacks.attack_loss(defense.logits_fn(p), y, "ce").sum()))(purified)
    np.testing.assert_allclose(g_bpda, g_cls, rtol=1e-5, atol=1e-7)
