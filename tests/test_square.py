"""Square Attack (diffjax.attacks.square) against a NumPy port of the reference loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffjax import attacks, protocols, randomness
from diffjax.attacks import SquareConfig, engine, square
from diffjax.defense import Defense, undefended

ROOT = jax.random.key(0)


def mlp_logits(params, x):
    w1, w2 = params
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def problem(n=4, hw=4, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    d = hw * hw
    params = (jnp.asarray(rng.normal(size=(d, 12)), jnp.float32),
              jnp.asarray(rng.normal(size=(12, classes)), jnp.float32))
    x = jnp.asarray(rng.uniform(0.1, 0.9, size=(n, hw, hw, 1)), jnp.float32)
    y = jnp.asarray(np.argmax(mlp_logits(params, x), -1).astype(np.int32))
    return params, x, y


def reference_square(logits1, x, y, x_start, eps, sizes, draws, norm):
    """A line-by-line NumPy port of the reference `attack_single_run` for ONE example.

    `logits1(x [H,W,C]) -> [C]`; the random draws of query i are `draws(i)` (the same
    values diffjax draws), the start is given. Returns the best point and its margin.
    """
    f32 = np.float32
    eps = f32(eps)
    h, w, c = x.shape

    def margin_and_loss(z):
        logits = logits1(z)
        other = np.max(np.delete(logits, y))
        return logits[y] - other, logits[y] - other

    x_best = x_start.copy()
    margin_min, loss_min = margin_and_loss(x_best)
    for i in range(len(sizes)):
        if not margin_min > 0.0:
            break
        s = int(sizes[i])
        if norm == "linf":
            vh, vw, sign = draws(i)
            new_deltas = np.zeros((h, w, c), f32)
            new_deltas[vh:vh + s, vw:vw + s, :] = f32(2.0) * eps * sign
            x_new = x_best + new_deltas
            x_new = np.minimum(np.maximum(x_new, x - eps), x + eps)
            x_new = np.clip(x_new, f32(0.0), f32(1.0))
        else:
            vh, vw, vh2, vw2, sign, transpose = draws(i)
            delta_curr = x_best - x
            norms_window_1 = np.sqrt((delta_curr[vh:vh + s, vw:vw + s] ** 2).sum((0, 1)))
            mask1 = np.zeros((h, w, c), f32)
            mask1[vh:vh + s, vw:vw + s] = 1.0
            mask2 = np.zeros((h, w, c), f32)
            mask2[vh2:vh2 + s, vw2:vw2 + s] = 1.0
            norms_image = np.sqrt((delta_curr ** 2).sum())
            norms_windows = np.sqrt(((delta_curr * np.maximum(mask1, mask2)) ** 2).sum())
            pattern = square.eta(s).astype(f32)
            if transpose:
                pattern = pattern.T
            new_deltas = pattern[:, :, None] * sign
            new_deltas = new_deltas + delta_curr[vh:vh + s, vw:vw + s] / (
                f32(1e-12) + norms_window_1)
            new_deltas = new_deltas / (f32(1e-12) + np.sqrt((new_deltas ** 2).sum((0, 1)))) \
                * np.sqrt(np.maximum(eps ** 2 - norms_image ** 2, 0.0) / c + norms_windows ** 2)
            delta_curr[vh2:vh2 + s, vw2:vw2 + s] = 0.0
            delta_curr[vh:vh + s, vw:vw + s] = new_deltas
            x_new = np.clip(x + delta_curr / (np.sqrt((delta_curr ** 2).sum()) + f32(1e-12))
                            * eps, 0.0, 1.0).astype(f32)
        margin, loss = margin_and_loss(x_new)
        improved = loss < loss_min
        loss_min = loss if improved else loss_min
        improved = improved or margin <= 0.0
        if improved:
            margin_min, x_best = margin, x_new
    return x_best, margin_min


@pytest.mark.parametrize("norm,eps,hw,steps", [("linf", 0.15, 4, 60), ("l2", 0.6, 6, 40)])
def test_matches_reference_loop(norm, eps, hw, steps):
    params, x, y = problem(n=3, hw=hw, seed=1)
    ek = randomness.example_keys(ROOT, jnp.arange(3))
    cfg = SquareConfig(norm=norm, eps=eps, steps=steps)
    res = attacks.square_attack(undefended(Partial(mlp_logits, params)), x, y, ek, config=cfg)

    logits1 = jax.jit(lambda z: mlp_logits(params, z[None])[0])
    sizes = square.square_sizes(steps, x.shape[1:], norm)
    base = protocols.start_keys(ek)
    start_fn = square._linf_start if norm == "linf" else square._l2_start
    draw_fn = square.linf_draws if norm == "linf" else square.l2_draws
    moved = []
    for b in range(3):
        start = np.asarray(start_fn(base[b], x[b], jnp.float32(eps)))

        def draws(i, b=b):
            out = draw_fn(jax.random.fold_in(base[b], i), int(sizes[i]), hw, hw, 1)
            return tuple(int(v) if np.ndim(v) == 0 else np.asarray(v) for v in out)

        x_best, margin = reference_square(lambda z: np.asarray(logits1(z)), np.asarray(x[b]),
                                          int(y[b]), start, eps, sizes, draws, norm)
        # l_inf: the same float32 operations, equal up to one rounding (XLA may fuse the
        # ball projection differently under the suite's XLA flags); l_2: sums in another
        # order.
        np.testing.assert_allclose(res.x_adv[b], x_best, atol=1e-6 if norm == "linf" else 1e-5)
        assert bool(res.success[b]) == bool(margin <= 0)
        moved.append(not np.allclose(x_best, start))
    assert sum(moved) >= 2  # the search moved (not just the start compared)
    assert np.any(np.asarray(res.success))  # the budget fools some of them


def test_schedule_of_the_reference():
    ps = [square.p_selection(i, 10000) for i in (0, 10, 11, 50, 51, 200, 201, 9999)]
    assert ps == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 512])
    # Rescaled to 100 queries: query 1 is "100 of 10,000".
    assert square.p_selection(1, 100) == pytest.approx(0.2)
    # 8x8x1 at p = 0.8: side round(sqrt(51.2)) = 7; late queries are single pixels.
    sizes = square.square_sizes(1000, (8, 8, 1), "linf")
    assert sizes[0] == 7 and sizes[-1] == 1 and np.all(np.diff(sizes) <= 0)
    l2 = square.square_sizes(1000, (8, 8, 3), "l2")
    assert np.all(l2 % 2 == 1) and l2.min() == 3
    e = square.eta(5)
    assert np.sum(e ** 2) == pytest.approx(1.0)
    assert np.all(e[:2] > 0) and np.all(e[2:] < 0)


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_stays_in_the_ball_and_is_deterministic(norm, eps):
    params, x, y = problem(n=4, hw=6, seed=2)
    x = x.at[0].set(0.0).at[1].set(1.0)  # boxes that clip
    y = jnp.asarray(np.argmax(mlp_logits(params, x), -1).astype(np.int32))
    d = undefended(Partial(mlp_logits, params))
    ek = randomness.example_keys(ROOT, jnp.arange(4))
    cfg = SquareConfig(norm=norm, eps=eps, steps=30)
    a = attacks.square_attack(d, x, y, ek, config=cfg)
    b = attacks.square_attack(d, x, y, ek, config=cfg)
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    bound = a.linf if norm == "linf" else a.l2
    assert float(jnp.max(bound)) <= eps * (1 + 1e-5)
    assert 0.0 <= float(a.x_adv.min()) and float(a.x_adv.max()) <= 1.0
    other = attacks.square_attack(d, x, y, randomness.example_keys(jax.random.key(1),
                                                                   jnp.arange(4)), config=cfg)
    assert not np.array_equal(other.x_adv, a.x_adv)
    # success is exactly what the undefended classifier says at the returned point.
    wrong = np.argmax(mlp_logits(params, a.x_adv), -1) != np.asarray(y)
    np.testing.assert_array_equal(a.success, wrong)


def linear_logits(params, x):
    w, b = params
    return x.reshape(x.shape[0], -1) @ w + b


def test_flips_a_linear_model_exactly_above_its_critical_distance():
    # Two classes: the margin is linear in x, so the l_inf optimum is the vertex
    # x - eps sign(w0 - w1), at critical distance eps* = margin / ||w0 - w1||_1; the
    # search ends with single-pixel squares, which reach that vertex.
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 2)).astype(np.float32)
    x = np.full((2, 4, 4, 1), 0.5, np.float32)
    z = (x[0].reshape(-1) @ w)
    margins = np.array([0.3, 0.6], np.float32)
    wd = np.abs(w[:, 0] - w[:, 1]).sum()
    # Example 0's margin m0 comes from the bias; example 1 is moved along w0 - w1 so that
    # its margin is m1.
    b = np.array([margins[0] - (z[0] - z[1]), 0.0], np.float32)
    x[1] += (margins[1] - margins[0]) / ((w[:, 0] - w[:, 1]) @ (w[:, 0] - w[:, 1])) * \
        (w[:, 0] - w[:, 1]).reshape(4, 4, 1)
    params = (jnp.asarray(w), jnp.asarray(b))
    got = np.asarray(linear_logits(params, jnp.asarray(x)))
    np.testing.assert_allclose(got[:, 0] - got[:, 1], margins, atol=1e-5)
    crit = margins / wd
    eps = float(np.mean(crit))  # above example 0's critical distance, below example 1's
    assert crit[0] < 0.95 * eps and crit[1] > 1.05 * eps
    d = undefended(Partial(linear_logits, params))
    ek = randomness.example_keys(ROOT, jnp.arange(2))
    res = attacks.square_attack(d, jnp.asarray(x), jnp.zeros(2, jnp.int32), ek,
                                config=SquareConfig(eps=eps, steps=300))
    np.testing.assert_array_equal(res.success, [True, False])
    # Example 1 is not fooled, but the search reached the optimal vertex: its margin is
    # exactly margin - eps ||w0 - w1||_1.
    adv = np.asarray(linear_logits(params, res.x_adv))
    assert adv[1, 0] - adv[1, 1] == pytest.approx(margins[1] - eps * wd, abs=1e-4)


def test_rows_are_independent_and_compiles_once():
    params, x, y = problem(n=4, hw=4, seed=4)
    _, x2, _ = problem(n=4, hw=4, seed=5)
    d = undefended(Partial(mlp_logits, params))
    ids = jnp.arange(4)
    ek = randomness.example_keys(ROOT, ids)
    cfg = SquareConfig(eps=0.05, steps=25)
    before = engine.run_program._cache_size()
    a = attacks.square_attack(d, x, y, ek, config=cfg)
    # Row 0 among other rows (same batch size, its own key and image): the same result.
    xb = x2.at[0].set(x[0])
    yb = jnp.asarray(np.argmax(mlp_logits(params, xb), -1).astype(np.int32))
    ekb = randomness.example_keys(ROOT, jnp.array([0, 7, 8, 9]))
    b = attacks.square_attack(d, xb, yb, ekb, config=cfg)
    np.testing.assert_array_equal(a.x_adv[0], b.x_adv[0])
    # New eps (scalar and per example) and new weights: no recompilation.
    attacks.square_attack(d, x, y, ek, config=SquareConfig(eps=0.02, steps=25))
    attacks.square_attack(d, x, y, ek, config=cfg, eps=jnp.array([0.01, 0.02, 0.03, 0.04]))
    d2 = undefended(Partial(mlp_logits, jax.tree.map(lambda p: 2 * p, params)))
    attacks.square_attack(d2, x, y, ek, config=cfg)
    assert engine.run_program._cache_size() - before == 1


def test_protocol_keys_and_fixed_success():
    params, x, y = problem(n=3, hw=4, classes=3, seed=6)

    def noisy(z, keys):
        n = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:]))(keys)
        return jnp.clip(z + 0.05 * n, 0.0, 1.0)

    d = Defense(Partial(noisy), Partial(mlp_logits, params))
    ek = randomness.example_keys(ROOT, jnp.arange(3))
    cfg = SquareConfig(eps=0.08, steps=12, return_trajectory=True)
    fixed = attacks.square_attack(d, x, y, ek, config=cfg, protocol="fixed")
    real = protocols.realization(ek)
    kt = np.asarray(fixed.key_trajectory)
    assert kt.shape[:3] == (12, 1, 3)
    np.testing.assert_array_equal(kt, np.broadcast_to(jax.random.key_data(real), kt.shape))
    # Under the realization, success is what the Fixed evaluation will find.
    wrong = np.argmax(d.logits(fixed.x_adv, real), -1) != np.asarray(y)
    np.testing.assert_array_equal(fixed.success, wrong)
    # The best objective never increases under the realization.
    assert np.all(np.diff(np.asarray(fixed.loss_trajectory), axis=0) <= 0)

    ind = protocols.Independent(eot=3)
    res = attacks.square_attack(d, x, y, ek, config=cfg, protocol=ind)
    kt = np.asarray(res.key_trajectory)
    assert kt.shape[:3] == (12, 3, 3)
    for i in (0, 11):
        np.testing.assert_array_equal(kt[i], jax.random.key_data(ind.attack_keys(ek, i + 1)))
    assert float(jnp.max(res.linf)) <= 0.08 * (1 + 1e-5)
    again = attacks.square_attack(d, x, y, ek, config=cfg, protocol=ind)
    np.testing.assert_array_equal(res.x_adv, again.x_adv)


def test_bad_inputs():
    with pytest.raises(ValueError, match="loss"):
        SquareConfig(loss="dlr")
    with pytest.raises(ValueError, match="p_init"):
        SquareConfig(p_init=0.0)
    with pytest.raises(ValueError, match="steps"):
        SquareConfig(steps=0)
    params, x, y = problem(n=2, hw=4)
    ek = randomness.example_keys(ROOT, jnp.arange(2))
    with pytest.raises(ValueError, match="5x5"):
        attacks.square_attack(undefended(Partial(mlp_logits, params)), x, y, ek,
                              config=SquareConfig(norm="l2", eps=0.5, steps=2))
    with pytest.raises(ValueError, match="SquareConfig"):
        attacks.square_attack(undefended(Partial(mlp_logits, params)), x, y, ek,
                              config=attacks.PGDConfig())


def test_chunked_runs_equal_the_whole_run():
    # The engine's early-exit path (init_state / advance / finish_state) gives the same
    # adversarial examples as one run: the square of query i depends on (key, i) only.
    params, x, y = problem(n=3, hw=4, seed=7)
    d = undefended(Partial(mlp_logits, params))
    ek = randomness.example_keys(ROOT, jnp.arange(3))
    cfg = SquareConfig(eps=0.1, steps=20)
    whole = attacks.square_attack(d, x, y, ek, config=cfg)
    ctx, prot, state = engine.init_state(cfg, d, x, y, ek, "fixed")
    for start in range(0, 21, 7):  # the last chunk runs past `steps`: no-ops
        state, fooled = engine.advance(cfg, prot, ctx, x, y, state, start, 7)
    chunked = engine.finish_state(cfg, prot, ctx, x, y, state)
    np.testing.assert_array_equal(chunked.x_adv, whole.x_adv)
    np.testing.assert_array_equal(chunked.success, whole.success)
    np.testing.assert_array_equal(fooled, whole.success)
