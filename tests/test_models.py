"""Tests of the Flax models: DDPM U-Net, small CNN, RobustBench WideResNet."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import models
from diffjax.models import classifiers, unet


def random_variables(kind, config, seed=0):
    """Random variables of a model's shapes, drawn with NumPy (cheap: no XLA compile).

    Flax's own initialisers compile one RNG kernel per parameter shape (~15 s of CPU for
    the tiny U-Net); the tests check the architecture, not the initialiser, so they use
    this. `test_registry_init_is_deterministic` covers the real `init` once.
    """
    module = models.build(kind, config)
    shapes = jax.eval_shape(lambda: models.get_spec(kind).init(module, config,
                                                               jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
        if "scale" in name:
            return jnp.asarray(1 + 0.1 * rng.normal(size=s.shape), jnp.float32)
        fan_in = math.prod(s.shape[:-1]) if len(s.shape) > 1 else 10
        return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), jnp.float32)

    return module, jax.tree_util.tree_map_with_path(draw, shapes)


# One jitted caller for every model fn: it is traced once per (architecture, input shape).
call = jax.jit(lambda fn, *args: fn(*args))


def _count(kind, config):
    module = models.build(kind, config)
    shapes = jax.eval_shape(lambda: models.get_spec(kind).init(module, config,
                                                               jax.random.key(0)))
    return models.param_count(shapes)


@pytest.fixture(scope="module")
def tiny():
    cfg = unet.tiny_config()
    module, variables = random_variables("ddpm_unet", cfg)
    return cfg, module, variables


# ----------------------------------------------------------------------------- U-Net


def test_cifar10_unet_param_count_matches_official_manifest(reference_dir):
    manifest = json.loads((reference_dir / "ddpm_cifar10_pytorch_diffusion_manifest.json")
                          .read_text())
    official = sum(math.prod(shape) for _, shape in manifest["state_dict"])
    assert official == manifest["num_params"] == 35_746_307
    assert _count("ddpm_unet", unet.cifar10_config()) == official


def test_digits_unet_size():
    n = _count("ddpm_unet", unet.digits_config())
    assert 200_000 <= n <= 300_000


def test_unet_forward_shapes_and_dtype(tiny):
    cfg, module, variables = tiny
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3), minval=-1, maxval=1)
    eps_fn = models.make_fn("ddpm_unet", cfg, variables)
    out = call(eps_fn, x, jnp.array([0, 10, 999, 3], jnp.int32))
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    # The timestep matters.
    out2 = call(eps_fn, x, jnp.array([500, 10, 999, 3], jnp.int32))
    assert not np.allclose(out[0], out2[0]) and np.allclose(out[1:], out2[1:], atol=1e-6)


def test_unet_examples_are_independent(tiny):
    """GroupNorm normalises per example: one example's output ignores the others."""
    cfg, _, variables = tiny
    eps_fn = models.make_fn("ddpm_unet", cfg, variables)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    t = jnp.array([1, 2, 3, 4])
    full = call(eps_fn, x, t)
    perm = jnp.array([2, 0, 3, 1])
    np.testing.assert_allclose(call(eps_fn, x[perm], t[perm]), full[perm], atol=1e-5)
    np.testing.assert_allclose(call(eps_fn, x[:1], t[:1]), full[:1], atol=1e-5)


def test_timestep_embedding_formula():
    t = jnp.array([0.0, 3.0, 611.0])
    emb = np.asarray(unet.timestep_embedding(t, 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    ref = np.concatenate([np.sin(np.outer([0, 3, 611], freqs)),
                          np.cos(np.outer([0, 3, 611], freqs))], axis=1)
    np.testing.assert_allclose(emb, ref, atol=2e-5)
    assert unet.timestep_embedding(t, 7).shape == (3, 7)


def test_unet_dropout_only_in_training(tiny):
    cfg = dict(unet.tiny_config(), dropout=0.5)
    module, variables = random_variables("ddpm_unet", cfg)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    t = jnp.array([5, 6])
    apply = jax.jit(lambda key, train: module.apply(variables, x, t, train=train,
                                                    rngs={"dropout": key}),
                    static_argnums=1)
    a, b, c = (apply(jax.random.key(k), True) for k in (1, 2, 1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(apply(jax.random.key(1), False),
                                  apply(jax.random.key(2), False))


def test_unet_avgpool_and_nearest_variant():
    cfg = dict(unet.tiny_config(), resamp_with_conv=False, attn_resolutions=[])
    module, variables = random_variables("ddpm_unet", cfg)
    assert not any("sample" in k for k in variables["params"])
    out = jax.eval_shape(module.apply, variables, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))
    assert out.shape == (1, 8, 8, 3)


def test_make_fn_treedefs_equal_and_jit_compiles_once(tiny):
    cfg, _, variables = tiny
    f1 = models.make_fn("ddpm_unet", cfg, variables)
    other = jax.tree.map(lambda a: a + 1.0, variables)
    f2 = models.make_fn("ddpm_unet", dict(cfg), other)
    assert jax.tree.structure(f1) == jax.tree.structure(f2)
    traces = []

    @jax.jit
    def run(fn, x, t):
        traces.append(1)
        return fn(x, t)

    x, t = jnp.zeros((2, 8, 8, 3)), jnp.array([1, 2], jnp.int32)
    a, b = run(f1, x, t), run(f2, x, t)
    assert len(traces) == 1
    assert not np.allclose(a, b)  # the weights are arguments, not baked-in constants


def test_unet_gradient_wrt_input_is_finite(tiny):
    cfg, _, variables = tiny
    eps_fn = models.make_fn("ddpm_unet", cfg, variables)
    grad = jax.jit(jax.grad(lambda x, f: f(x, jnp.array([7])).sum()))
    g = grad(jnp.zeros((1, 8, 8, 3)), eps_fn)
    assert g.shape == (1, 8, 8, 3) and np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("bad, match", [
    ({"num_groups": 5}, "num_groups"),
    ({"resolution": 6, "ch_mult": [1, 2, 2]}, "resolution"),
    ({"chmult": [1]}, "unknown keys"),
    ({"dtype": "float16"}, "dtype"),
])
def test_unet_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        unet.build(dict(unet.tiny_config(), **bad))


def test_unet_input_errors(tiny):
    cfg, _, variables = tiny
    eps_fn = models.make_fn("ddpm_unet", cfg, variables)
    with pytest.raises(ValueError, match="x: expected NHWC"):
        eps_fn(jnp.zeros((1, 3, 8, 8)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="t: expected one timestep per example"):
        eps_fn(jnp.zeros((2, 8, 8, 3)), jnp.zeros((1,), jnp.int32))


def test_registry_init_is_deterministic():
    cfg = dict(classifiers.digits_cnn_config(), widths=[4], dense=8)
    _, v1 = models.init("cnn", cfg, jax.random.key(0))
    _, v2 = models.init("cnn", cfg, jax.random.key(0))
    v3 = models.get_spec("cnn").init(models.build("cnn", cfg), cfg, jax.random.key(1))
    assert jax.tree.all(jax.tree.map(np.array_equal, v1, v2))
    assert not np.array_equal(v1["params"]["dense"]["kernel"], v3["params"]["dense"]["kernel"])


def test_registry_roles():
    assert models.get_spec("ddpm_unet").role == "diffusion"
    assert models.get_spec("cnn").role == "classifier"
    assert models.get_spec("wrn").role == "classifier"
    assert models.get_spec("wrn").default_config() == classifiers.wrn_28_10_config()


# ----------------------------------------------------------------------------- classifiers


def test_wrn_28_10_param_count_matches_robustbench_manifest(reference_dir):
    manifest = json.loads((reference_dir / "robustbench_wrn_28_10_manifest.json").read_text())
    trainable = sum(math.prod(s) for n, s in manifest["state_dict"]
                    if not n.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert trainable == manifest["num_params"] == 36_479_194
    assert _count("wrn", classifiers.wrn_28_10_config()) == trainable


def test_cnn_size_and_logits():
    cfg = classifiers.digits_cnn_config()
    assert 50_000 <= _count("cnn", cfg) <= 150_000
    module, variables = random_variables("cnn", cfg)
    logits_fn = models.make_fn("cnn", cfg, variables)
    x = jax.random.uniform(jax.random.key(1), (5, 8, 8, 1))
    out = call(logits_fn, x)
    assert out.shape == (5, 10) and np.all(np.isfinite(out))
    # Normalisation is inside: logits_fn(x) is the unnormalised net on (x - 0.5) / 0.5.
    plain = classifiers.CNN(norm=None)
    np.testing.assert_allclose(jax.jit(plain.apply)(variables, (x - 0.5) / 0.5), out,
                               atol=1e-5)
    with pytest.raises(ValueError, match="x: expected NHWC"):
        logits_fn(jnp.zeros((1, 8, 8, 3)))


def test_wrn_batchnorm_inference_and_training():
    cfg = dict(classifiers.wrn_small_config(), widen_factor=1)
    module, variables = random_variables("wrn", cfg)
    assert set(variables) == {"params", "batch_stats"}
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
    logits_fn = models.make_fn("wrn", cfg, variables)
    out = call(logits_fn, x)
    assert out.shape == (4, 10)
    # Inference mode: per-example (no batch statistics), uses batch_stats.
    np.testing.assert_allclose(call(logits_fn, x[:1]), out[:1], atol=1e-5)
    shifted = dict(variables)
    shifted["batch_stats"] = jax.tree.map(lambda a: a + 0.5, variables["batch_stats"])
    assert not np.allclose(call(models.make_fn("wrn", cfg, shifted), x), out)
    # Training mode updates the running statistics with momentum 0.1 (PyTorch's).
    _, updates = jax.jit(lambda v: module.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables)
    old = variables["batch_stats"]["bn1"]["mean"]
    new = updates["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(old, new)
    h_mean = (new - 0.9 * old) / 0.1  # the batch mean implied by the update
    assert np.all(np.isfinite(h_mean))


def test_wrn_config_errors():
    with pytest.raises(ValueError, match="6n"):
        classifiers.build_wrn(dict(classifiers.wrn_28_10_config(), depth=27))
    with pytest.raises(ValueError, match="both set"):
        classifiers.build_wrn(dict(classifiers.wrn_28_10_config(), mean=0.5))
