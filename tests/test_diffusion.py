"""Schedules, the forward process and the purifiers against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import diffusion, randomness
from diffjax.diffusion import samplers

SCHED = diffusion.linear_schedule()
B, H, W, C = 3, 4, 4, 1

# Data x0 ~ N(MU, SIGMA^2) per pixel in model space: the exact noise predictor is known.
MU, SIGMA = 0.2, 0.5


def gaussian_eps_fn(x_t, t):
    """E[eps | x_t] for Gaussian data: sqrt(1-a)(x_t - sqrt(a) mu) / (a sigma^2 + 1 - a)."""
    a = SCHED.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * MU) / (a * SIGMA**2 + 1 - a)


def np_gaussian_eps(x_t, a):
    return np.sqrt(1 - a) * (x_t - np.sqrt(a) * MU) / (a * SIGMA**2 + 1 - a)


def smooth_eps_fn(x_t, t):
    return 0.3 * jnp.tanh(1.5 * x_t + 0.01 * t.reshape(-1, 1, 1, 1))


def images(seed=0, lo=0.25, hi=0.75, shape=(B, H, W, C)):
    return jax.random.uniform(jax.random.key(seed), shape, minval=lo, maxval=hi)


def keys_for(ids, seed=7):
    return randomness.example_keys(jax.random.key(seed), jnp.asarray(ids))


def draws(keys, data, shape):
    """The documented draw: normal(fold_in(keys[b], data)) per example."""
    return np.asarray(jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, data), shape))(keys), np.float64)


# ---------------------------------------------------------------- schedules


def test_linear_schedule_matches_numpy():
    betas = np.linspace(1e-4, 2e-2, 1000)
    np.testing.assert_allclose(SCHED.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(SCHED.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
    assert SCHED.num_timesteps == 1000


def test_vpsde_discretizes_to_ddpm_linear_schedule():
    sde = diffusion.VPSDE()
    disc = sde.discretize()
    np.testing.assert_allclose(disc.betas, SCHED.betas, rtol=1e-6)
    back = diffusion.VPSDE.from_schedule(SCHED)
    assert abs(float(back.beta_min) - 0.1) < 1e-6 and abs(float(back.beta_max) - 20) < 1e-4
    # The continuous marginal tracks the discrete alphas_cumprod: abar(t=(i+1)/N) ~ abar[i].
    i = np.array([0, 99, 499, 899])
    np.testing.assert_allclose(sde.alpha_bar((i + 1) / 1000.0), SCHED.alphas_cumprod[i],
                               rtol=2e-2, atol=1e-4)
    mean, std = sde.marginal(0.3)
    assert abs(float(mean**2 + std**2) - 1.0) < 1e-6


def test_cosine_schedule_closed_form():
    sched = diffusion.cosine_schedule(1000)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(1, 1001)
    expected = f(t) / f(0)
    mask = expected > 1e-3  # where the 0.999 clip on betas does not bite
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod)[mask], expected[mask],
                               rtol=1e-4)
    assert float(sched.betas.max()) <= 0.999 + 1e-6


def test_q_sample_moments():
    n = 20000
    x0 = jnp.full((n, 1), 0.6)
    t = jnp.full((n,), 250, jnp.int32)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    xt = np.asarray(diffusion.q_sample(SCHED, x0, t, noise))
    a = float(SCHED.alphas_cumprod[250])
    assert abs(xt.mean() - np.sqrt(a) * 0.6) < 4 * np.sqrt((1 - a) / n)
    assert abs(xt.var() - (1 - a)) < 0.03 * (1 - a)


def test_q_sample_shape_errors():
    with pytest.raises(ValueError, match="noise"):
        diffusion.q_sample(SCHED, jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), jnp.zeros((3,)))
    with pytest.raises(ValueError, match="t:"):
        diffusion.q_sample(SCHED, jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32),
                           jnp.zeros((2, 3)))


# ---------------------------------------------------------------- reference samplers


def np_discrete_purify(x, keys, t_star, num_steps, method):
    """DDPM/DDIM equations in NumPy float64, with the documented noise draws."""
    abar_all = np.asarray(SCHED.alphas_cumprod, np.float64)
    xm = 2 * np.asarray(x, np.float64) - 1
    if method in ("ddpm", "ddim"):
        a = abar_all[t_star - 1]
        xt = np.sqrt(a) * xm + np.sqrt(1 - a) * draws(keys, 0, x.shape[1:])
    else:
        xt = xm
    taus = samplers.respaced_timesteps(t_star, num_steps)
    for k in range(num_steps - 1, -1, -1):
        a_t = abar_all[taus[k]]
        a_prev = abar_all[taus[k - 1]] if k > 0 else 1.0
        eps = np_gaussian_eps(xt, a_t)
        x0 = np.clip((xt - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)
        if method.endswith("ddim"):
            eps_hat = (xt - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
            xt = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps_hat
        else:
            alpha = a_t / a_prev
            beta = 1 - alpha
            mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(alpha) * (
                1 - a_prev) / (1 - a_t) * xt
            var = beta * (1 - a_prev) / (1 - a_t)
            xt = mean + np.sqrt(var) * draws(keys, int(taus[k]) + 1, x.shape[1:])
    return np.clip((xt + 1) / 2, 0, 1)


def np_sde_purify(x, keys, t_star, num_steps):
    """DiffPure's reverse VP-SDE by Euler-Maruyama in NumPy float64."""
    T = 1000
    bmin, bmax = 0.1, 20.0
    beta = lambda t: bmin + t * (bmax - bmin)
    mean = lambda t: np.exp(-0.25 * t**2 * (bmax - bmin) - 0.5 * t * bmin)
    t0 = t_star / T
    dt = t0 / num_steps
    xm = 2 * np.asarray(x, np.float64) - 1
    xt = mean(t0) * xm + np.sqrt(1 - mean(t0) ** 2) * draws(keys, 0, x.shape[1:])
    for k in range(num_steps):
        t = t0 - k * dt
        idx = int(np.clip(np.round(np.float32(t) * (T - 1)), 0, T - 1))
        eps = np_gaussian_eps(xt, float(SCHED.alphas_cumprod[idx]))
        score = -eps / np.sqrt(1 - mean(t) ** 2)
        drift = 0.5 * beta(t) * xt + beta(t) * score
        noise = draws(keys, k + 1, x.shape[1:]) if k < num_steps - 1 else 0.0
        xt = xt + drift * dt + np.sqrt(beta(t) * dt) * noise
    return np.clip((xt + 1) / 2, 0, 1)


@pytest.mark.parametrize("method", ["ddpm", "reverse_only", "ddim", "reverse_only_ddim"])
@pytest.mark.parametrize("t_star,num_steps", [(100, 10), (30, 30), (50, 1)])
def test_discrete_purifiers_match_numpy(method, t_star, num_steps):
    x = images()
    keys = keys_for([0, 1, 2])
    got = diffusion.purify(gaussian_eps_fn, x, keys, schedule=SCHED, t_star=t_star,
                           method=method, num_steps=num_steps)
    want = np_discrete_purify(np.asarray(x), keys, t_star, num_steps, method)
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_sde_purifier_matches_numpy():
    x = images()
    keys = keys_for([0, 1, 2])
    got = diffusion.purify(gaussian_eps_fn, x, keys, schedule=SCHED, t_star=100,
                           method="sde", num_steps=20)
    want = np_sde_purify(np.asarray(x), keys, 100, 20)
    np.testing.assert_allclose(got, want, atol=5e-4)


def test_ddpm_last_step_is_the_posterior_mean():
    # One respaced step: the output is the (clipped) x0 prediction, with no noise added.
    x = images()
    keys = keys_for([0, 1, 2])
    out = diffusion.purify(gaussian_eps_fn, x, keys, schedule=SCHED, t_star=1,
                           method="reverse_only")
    xm = 2 * np.asarray(x, np.float64) - 1
    a = float(SCHED.alphas_cumprod[0])
    x0 = (xm - np.sqrt(1 - a) * np_gaussian_eps(xm, a)) / np.sqrt(a)
    np.testing.assert_allclose(out, np.clip((np.clip(x0, -1, 1) + 1) / 2, 0, 1), atol=1e-5)


# ---------------------------------------------------------------- randomness


@pytest.mark.parametrize("method", diffusion.METHODS)
def test_same_key_same_output_different_key_different(method):
    x = images()
    k1 = keys_for([0, 1, 2])
    k2 = keys_for([0, 1, 2], seed=8)
    kw = dict(schedule=SCHED, t_star=50, method=method, num_steps=5)
    a = np.asarray(diffusion.purify(smooth_eps_fn, x, k1, **kw))
    b = np.asarray(diffusion.purify(smooth_eps_fn, x, k1, **kw))
    c = np.asarray(diffusion.purify(smooth_eps_fn, x, k2, **kw))
    np.testing.assert_array_equal(a, b)
    if method == "reverse_only_ddim":
        np.testing.assert_array_equal(a, c)  # deterministic: keys are not used
    else:
        assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("method", ["ddpm", "reverse_only", "sde"])
def test_per_example_independence(method):
    x = images(shape=(4, H, W, C))
    keys = keys_for([10, 11, 12, 13])
    kw = dict(schedule=SCHED, t_star=50, method=method, num_steps=5)
    full = np.asarray(diffusion.purify(smooth_eps_fn, x, keys, **kw))
    # Change the other examples and reorder the batch: example 10 is unchanged.
    other = images(seed=3, shape=(4, H, W, C)).at[2].set(x[0])
    k_other = keys_for([20, 21, 10, 22])
    out = np.asarray(diffusion.purify(smooth_eps_fn, other, k_other, **kw))
    np.testing.assert_allclose(out[2], full[0], atol=1e-6)
    perm = np.array([3, 1, 0, 2])
    out_p = np.asarray(diffusion.purify(smooth_eps_fn, x[perm], keys[perm], **kw))
    np.testing.assert_allclose(out_p, full[perm], atol=1e-6)
    # A batch of one gives the same result too.
    single = np.asarray(diffusion.purify(smooth_eps_fn, x[1:2], keys[1:2], **kw))
    np.testing.assert_allclose(single[0], full[1], atol=1e-6)


def test_legacy_raw_keys_are_accepted():
    x = images()
    typed = keys_for([0, 1, 2])
    raw = jax.random.key_data(typed)
    kw = dict(schedule=SCHED, t_star=20, method="ddpm", num_steps=4)
    np.testing.assert_array_equal(diffusion.purify(smooth_eps_fn, x, typed, **kw),
                                  diffusion.purify(smooth_eps_fn, x, raw, **kw))


# ---------------------------------------------------------------- gradients and compilation


@pytest.mark.parametrize("method", ["ddpm", "reverse_only_ddim", "sde"])
def test_gradient_matches_finite_differences(method):
    x = images(seed=1, lo=0.4, hi=0.6)
    keys = keys_for([0, 1, 2])
    w = jax.random.normal(jax.random.key(5), x.shape)
    kw = dict(schedule=SCHED, t_star=20, method=method, num_steps=4, clip_denoised=False)
    loss = lambda x: jnp.sum(w * diffusion.purify(smooth_eps_fn, x, keys, **kw))
    out = diffusion.purify(smooth_eps_fn, x, keys, **kw)
    assert 0 < float(out.min()) and float(out.max()) < 1  # no final clipping in play
    g = jax.grad(loss)(x)
    v = jax.random.normal(jax.random.key(6), x.shape)
    h = 1e-2
    fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=2e-2)


def test_remat_switch_gives_the_same_gradient():
    x = images(seed=2)
    keys = keys_for([0, 1, 2])
    grads = []
    for remat in (True, False):
        f = lambda x, remat=remat: jnp.sum(diffusion.purify(
            smooth_eps_fn, x, keys, schedule=SCHED, t_star=30, num_steps=6, remat=remat) ** 2)
        grads.append(np.asarray(jax.jit(jax.grad(f))(x)))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_remat_modes_give_the_same_gradient_and_keep_what_they_say():
    """remat True ("steps"), "save_conv" and False ("none") differentiate the same function;
    their compiled gradients keep increasing amounts of the steps' activations: "save_conv"
    keeps the outputs of the eps-model's `layers.Conv`s (named
    `layers.CONV_CHECKPOINT_NAME`), which "steps" recomputes."""
    import flax.linen as nn

    from diffjax.models import layers

    class ConvEps(nn.Module):
        @nn.compact
        def __call__(self, x, t):
            h = nn.silu(layers.Conv(32, (3, 3), padding=1)(x))
            h = h + 0.01 * t.reshape(-1, 1, 1, 1)
            return 0.1 * layers.Conv(x.shape[-1], (3, 3), padding=1)(h)

    x = images(seed=3, shape=(4, 8, 8, 1))
    keys = keys_for([0, 1, 2, 3])
    model = ConvEps()
    params = model.init(jax.random.key(0), x, jnp.zeros((4,), jnp.int32))
    eps_fn = jax.tree_util.Partial(model.apply, params)
    grads, growth = {}, {}
    for remat in (True, "save_conv", False):
        temp = []
        for steps in (6, 12):
            f = lambda x, remat=remat, steps=steps: jnp.sum(diffusion.purify(
                eps_fn, x, keys, schedule=SCHED, t_star=30, num_steps=steps, remat=remat) ** 2)
            g = jax.jit(jax.grad(f))
            if steps == 6:
                grads[remat] = np.asarray(g(x))
            temp.append(g.lower(x).compile().memory_analysis().temp_size_in_bytes)
        growth[remat] = (temp[1] - temp[0]) / 6  # bytes per added step
    assert np.abs(grads[True]).max() > 1e-3
    for remat in ("save_conv", False):
        np.testing.assert_allclose(grads[remat], grads[True], rtol=1e-5, atol=1e-7)
    conv_out = 4 * 8 * 8 * 32 * 4  # the first conv's float32 output, per step
    assert growth[True] < conv_out / 8  # about one image batch per step
    assert conv_out <= growth["save_conv"] < growth[False]
    assert diffusion.ChainPurifier(True) == diffusion.ChainPurifier("steps")
    assert diffusion.ChainPurifier(False).remat == "none"


@pytest.mark.parametrize("remat", ["conv", None, 1.0])
def test_a_bad_remat_is_one_line_naming_the_choices(remat):
    with pytest.raises(ValueError, match=r"remat: expected True, False or one of 'steps', "
                                         r"'save_conv', 'none'") as e:
        diffusion.purify(smooth_eps_fn, images(), keys_for([0, 1, 2]), schedule=SCHED,
                         t_star=10, num_steps=2, remat=remat)
    assert "\n" not in str(e.value)


def test_compiles_once_per_configuration():
    def eps_fn(x, t):  # a fresh function: its own cache entries
        return 0.1 * x

    kw = dict(schedule=SCHED, t_star=40, method="ddpm", num_steps=4)
    before = samplers.run_chain_program._cache_size()
    for seed in range(3):
        diffusion.purify(eps_fn, images(seed), keys_for([seed, 1, 2]), **kw)
    assert samplers.run_chain_program._cache_size() == before + 1
    diffusion.purify(eps_fn, images(0), keys_for([0, 1, 2]), **{**kw, "num_steps": 5})
    assert samplers.run_chain_program._cache_size() == before + 2


def test_methods_and_t_stars_share_one_program():
    # The method and t* are data (the chain's coefficients): a sweep compiles once.
    def eps_fn(x, t):
        return 0.1 * x

    before = samplers.run_chain_program._cache_size()
    outs = [diffusion.purify(eps_fn, images(), keys_for([0, 1, 2]), schedule=SCHED,
                             t_star=t, method=m, num_steps=4)
            for m in diffusion.METHODS for t in (10, 60)]
    assert samplers.run_chain_program._cache_size() == before + 1
    flat = [np.asarray(o).ravel() for o in outs]
    assert min(np.abs(a - b).max() for i, a in enumerate(flat) for b in flat[i + 1:]) > 1e-4


def test_identity_padded_chain_equals_the_short_chain():
    # Padding with identity steps changes nothing but the compiled program's length.
    x = images()
    keys = keys_for([0, 1, 2])
    for method in diffusion.METHODS:
        short = diffusion.make_chain(SCHED, t_star=5, method=method, num_steps=3)
        long = diffusion.make_chain(SCHED, t_star=5, method=method, num_steps=3, length=7)
        assert long.num_steps == 7
        a = diffusion.run_chain(smooth_eps_fn, x, keys, short)
        b = diffusion.run_chain(smooth_eps_fn, x, keys, long)
        np.testing.assert_allclose(b, a, atol=1e-6, err_msg=method)
        traced = jax.jit(lambda s, m=method: diffusion.make_chain(
            s, t_star=5, method=m, num_steps=3, length=7))(SCHED)
        # float32 coefficients (traced) vs float64-made ones: 1 - abar ~ 5e-4 at t* = 5.
        np.testing.assert_allclose(diffusion.run_chain(smooth_eps_fn, x, keys, traced), b,
                                   atol=1e-4)
    with pytest.raises(ValueError, match="length"):
        diffusion.make_chain(SCHED, t_star=5, num_steps=3, length=2)


def test_make_chain_traced_schedule_matches_concrete():
    # Inside jit the schedule is traced: the float32 jnp path gives the float64 one's chain.
    for method in diffusion.METHODS:
        want = diffusion.make_chain(SCHED, t_star=100, method=method, num_steps=10)
        got = jax.jit(lambda s, m=method: diffusion.make_chain(
            s, t_star=100, method=m, num_steps=10))(SCHED)
        for name, a, b in zip(want._fields, want, got, strict=True):
            np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64),
                                       rtol=2e-5, atol=1e-6, err_msg=f"{method}.{name}")


def test_usable_under_jit_vmap_and_grad():
    x = images()
    keys = keys_for([0, 1, 2])
    kw = dict(schedule=SCHED, t_star=20, num_steps=4)
    eager = diffusion.purify(smooth_eps_fn, x, keys, **kw)
    jitted = jax.jit(lambda x, k: diffusion.purify(smooth_eps_fn, x, k, **kw))(x, keys)
    np.testing.assert_allclose(eager, jitted, atol=1e-6)
    per = jax.vmap(lambda xi, ki: diffusion.purify(smooth_eps_fn, xi[None], ki[None], **kw)[0])(
        x, keys)
    np.testing.assert_allclose(per, eager, atol=1e-6)


def test_pretrained_style_partial_eps_fn_traces_weights():
    def apply(w, x, t):
        return jnp.tanh(w * x)

    x = images()
    keys = keys_for([0, 1, 2])
    kw = dict(schedule=SCHED, t_star=20, num_steps=4, method="reverse_only_ddim")
    before = samplers.run_chain_program._cache_size()
    outs = [diffusion.purify(jax.tree_util.Partial(apply, jnp.float32(w)), x, keys, **kw)
            for w in (0.1, 0.5)]
    assert samplers.run_chain_program._cache_size() == before + 1  # new weights, no recompile
    assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-4


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=jnp.zeros((4, 4, 1))), "x: expected a rank-4"),
        (dict(x=jnp.zeros((B, 1, 4, 4))), "channels-first"),
        (dict(x=jnp.zeros((B, 4, 4, 1), jnp.int32)), "floating-point"),
        (dict(x=jnp.full((B, 4, 4, 1), 1.5)), r"values in \[0, 1\]"),
        (dict(x=jnp.full((B, 4, 4, 1), jnp.nan)), "NaN"),
        (dict(t_star=0), r"t_star: expected an integer in \[1, 1000\]; got 0"),
        (dict(t_star=1001), "t_star"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=51), r"num_steps: expected an integer in \[1, 50\]"),
        (dict(method="ddpm++"), "method: expected one of"),
        (dict(keys="k"), "keys"),
        (dict(keys=None), "keys"),
        (dict(schedule=np.ones(3)), "schedule"),
        (dict(eps_fn=3), "eps_fn"),
    ],
)
def test_bad_input_raises_clear_errors(change, match):
    args = dict(eps_fn=smooth_eps_fn, x=jnp.full((B, 4, 4, 1), 0.5), keys=keys_for([0, 1, 2]),
                schedule=SCHED, t_star=50, method="ddpm", num_steps=5)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        diffusion.purify(args.pop("eps_fn"), args.pop("x"), args.pop("keys"), **args)


def test_key_count_mismatch():
    with pytest.raises(ValueError, match=r"keys: expected one key per example, shape \(3,\)"):
        diffusion.purify(smooth_eps_fn, images(), keys_for([0, 1]), schedule=SCHED, t_star=5)


def test_straight_through_clips_keep_the_forward_pass_and_pass_gradients():
    # A strong eps-model saturates the x0 clip and the output clip: the hard clips zero
    # those pixels' gradients, straight-through clips pass them; the images are equal.
    x = jnp.asarray(np.random.default_rng(5).uniform(0, 1, (3, 4, 4, 1)), jnp.float32)
    keys = randomness.example_keys(jax.random.key(0), jnp.arange(3))
    strong = lambda x_t, t: -4.0 * x_t
    kw = dict(schedule=diffusion.linear_schedule(), t_star=50, method="ddpm", num_steps=3)
    hard = diffusion.make_purifier(strong, **kw)
    st = diffusion.make_purifier(strong, clip_gradient="straight_through", **kw)
    np.testing.assert_array_equal(hard(x, keys), st(x, keys))
    g = lambda p: jax.grad(lambda v: jnp.sum(p(v, keys)))(x)
    g_hard, g_st = np.asarray(g(hard)), np.asarray(g(st))
    assert np.all(np.isfinite(g_st))
    assert np.sum(g_hard == 0) > np.sum(g_st == 0)
    # The choice is data (a bool leaf of the purifier): one compiled program for both.
    grad_sum = jax.jit(lambda p, v: jax.grad(lambda u: jnp.sum(p(u, keys)))(v))
    np.testing.assert_array_equal(grad_sum(hard, x), g_hard)
    np.testing.assert_array_equal(grad_sum(st, x), g_st)
    assert grad_sum._cache_size() == 1
    with pytest.raises(ValueError, match="clip_gradient"):
        diffusion.make_purifier(strong, clip_gradient="soft", **kw)


def test_purifier_at_another_resolution_resizes_in_and_out():
    x = jnp.asarray(np.random.default_rng(6).uniform(0, 1, (2, 4, 4, 1)), jnp.float32)
    keys = randomness.example_keys(jax.random.key(1), jnp.arange(2))
    kw = dict(schedule=diffusion.linear_schedule(), t_star=20, method="ddim", num_steps=2)
    pur = diffusion.make_purifier(smooth_eps_fn, resolution=8, **kw)
    out = pur(x, keys)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    up = jnp.clip(jax.image.resize(x, (2, 8, 8, 1), "bilinear"), 0, 1)
    inner = diffusion.purify(smooth_eps_fn, up, keys, **kw)
    np.testing.assert_allclose(out, jnp.clip(jax.image.resize(inner, x.shape, "bilinear"), 0, 1),
                               atol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(pur(v, keys) ** 2))(x)
    assert grad.shape == x.shape and np.all(np.isfinite(grad))
