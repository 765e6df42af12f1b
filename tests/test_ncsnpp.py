"""NCSN++/DDPM++ (score_sde) Flax model: layout, shapes, eps_fn contract, config checks.

The equivalence with score_sde's own outputs is in test_convert_score_sde.py.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import models
from diffjax.models import ncsnpp

# Tiny: 2 resolutions, attention at 8x8, 1 block per level, dropout on (for the train test).
TINY = {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
        "image_size": 16, "dropout": 0.1}


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with random normal weights.

    Built from `jax.eval_shape` of `init` (compiling the initialisers' RNG is slow on CPU)
    and not the DDPM init, whose zero-scaled output layers leave eps ~1e-6.
    """
    module = ncsnpp.build(TINY)
    shapes = jax.eval_shape(lambda: ncsnpp.init(module, TINY, jax.random.key(0)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32), shapes)
    return module, variables


@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply(module, variables, x, labels, train, key):
    return module.apply(variables, x, labels, train=train, rngs={"dropout": key})


def _paths(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_paths(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_registry_and_presets():
    spec = models.get_spec("ncsnpp")
    assert spec.kind == "ncsnpp" and spec.role == "diffusion"
    deep = spec.default_config()
    assert deep == ncsnpp.cifar10_deep_config()
    assert (deep["nf"], deep["num_res_blocks"], deep["ch_mult"]) == (128, 8, [1, 2, 2, 2])
    assert deep["attn_resolutions"] == [16] and deep["resblock_type"] == "biggan"
    json.dumps(deep)  # JSON-able
    small = ncsnpp.small_config()
    assert (small["nf"], small["num_res_blocks"]) == (16, 2)
    # Presets are fresh copies: editing one does not change the next.
    deep["ch_mult"].append(4)
    assert ncsnpp.cifar10_deep_config()["ch_mult"] == [1, 2, 2, 2]


def test_layout_small_matches_reference_flax_names(reference_dir):
    """The layout (PyTorch all_modules order) names every top-level Flax module once."""
    cfg = json.loads((reference_dir / "score_sde_ddpmpp_small_config.json").read_text())
    names = json.loads((reference_dir / "score_sde_ddpmpp_small_flax_params.json").read_text())
    tops = {n.split("/")[0] for n, _ in names}
    layout = ncsnpp.module_layout(cfg)
    assert [n for n, _ in layout].count("Conv_0") == 1
    assert {n for n, _ in layout} == tops
    assert len({n for n, _ in layout}) == len(layout)
    # 2 Dense + in conv + (levels * blocks + attn + downs) + mid 3 + up + norm + out conv.
    levels, blocks = len(cfg["ch_mult"]), cfg["num_res_blocks"]
    n_res = levels * blocks + (levels - 1) + 2 + levels * (blocks + 1) + (levels - 1)
    assert sum(k == "resblock" for _, k in layout) == n_res
    assert layout[0] == ("Dense_0", "dense") and layout[-1] == ("Conv_1", "conv")


@pytest.mark.parametrize("which", ["small", "deep_cifar10"])
def test_param_shapes_match_score_sde_flax(reference_dir, which):
    """Every Flax parameter name and shape equals the original score_sde Flax model's."""
    ref = json.loads((reference_dir / f"score_sde_ddpmpp_{which}_flax_params.json").read_text())
    if which == "small":
        cfg = json.loads((reference_dir / "score_sde_ddpmpp_small_config.json").read_text())
    else:
        cfg = ncsnpp.cifar10_deep_config()
    module = ncsnpp.build(cfg)
    shapes = jax.eval_shape(lambda: ncsnpp.init(module, cfg, jax.random.key(0)))["params"]
    got = {k: tuple(v.shape) for k, v in _paths(shapes).items()}
    assert got == {n: tuple(s) for n, s in ref}


def test_deep_param_count_matches_manifest(reference_dir):
    manifest = json.loads(
        (reference_dir / "score_sde_ddpmpp_deep_cifar10_manifest.json").read_text())
    cfg = ncsnpp.cifar10_deep_config()
    module = ncsnpp.build(cfg)
    shapes = jax.eval_shape(lambda: ncsnpp.init(module, cfg, jax.random.key(0)))
    assert models.param_count(shapes) == manifest["num_params"] == 106_632_579
    # Our defaults are the manifest's config.model fields, value for value.
    for k, v in manifest["config"].items():
        assert cfg[k] == v, k
    assert len(ncsnpp.module_layout(cfg)) == 1 + max(
        int(n.split(".")[1]) for n, _, _ in manifest["state_dict"] if n.startswith("all_"))


def test_timestep_embedding_hand_values():
    emb = ncsnpp.timestep_embedding(jnp.array([0.0, 1.0, 731.0]), 4)
    # half = 2: frequencies 1 and 10000^-1.
    f = np.array([1.0, 1e-4])
    want = np.stack([np.concatenate([np.sin(t * f), np.cos(t * f)]) for t in (0.0, 1.0, 731.0)])
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)
    assert ncsnpp.timestep_embedding(jnp.ones(2), 5).shape == (2, 5)  # odd: zero pad
    assert float(ncsnpp.timestep_embedding(jnp.ones(2), 5)[0, -1]) == 0.0


def test_eps_fn_contract(tiny):
    module, variables = tiny
    eps_fn = models.make_fn("ncsnpp", TINY, variables, module=module)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    t = jnp.array([0, 999], jnp.int32)
    out = eps_fn(x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 1e-3
    # The timestep matters, per example (the embedding reaches every block).
    out2 = eps_fn(x, jnp.array([1, 999], jnp.int32))
    assert not np.allclose(out[0], out2[0], atol=1e-5)
    np.testing.assert_allclose(out[1], out2[1], rtol=1e-5, atol=1e-6)
    # Examples are independent (no batch statistics): a batch of one gives the same.
    np.testing.assert_allclose(eps_fn(x[1:], t[1:])[0], out[1], rtol=1e-5, atol=1e-5)
    # Differentiable with respect to the images.
    g = jax.jit(jax.grad(lambda z: jnp.sum(eps_fn(z, t) ** 2)))(x)
    assert g.shape == x.shape and np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


def test_eps_fn_jit_traces_weights_not_constants(tiny):
    """Two weight sets of one architecture share one compilation (weights are arguments)."""
    module, variables = tiny
    other = jax.tree.map(lambda a: a * 0.5, variables)
    traces = []

    @jax.jit
    def run(fn, x, t):
        traces.append(1)
        return fn(x, t)

    x = jnp.ones((2, 16, 16, 3))
    t = jnp.array([3, 4], jnp.int32)
    a = run(ncsnpp.make_fn(module, TINY, variables), x, t)
    b = run(ncsnpp.make_fn(ncsnpp.build(TINY), TINY, other), x, t)
    assert len(traces) == 1
    assert not np.allclose(a, b)


def test_dropout_only_in_training(tiny):
    module, variables = tiny
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    eps_fn = ncsnpp.make_fn(module, TINY, variables)
    t = jnp.array([10, 20], jnp.int32)
    np.testing.assert_array_equal(eps_fn(x, t), eps_fn(x, t))  # inference: no dropout
    labels = t.astype(jnp.float32)
    t1 = _apply(module, variables, x, labels, True, jax.random.key(4))
    t2 = _apply(module, variables, x, labels, True, jax.random.key(5))
    t3 = _apply(module, variables, x, labels, True, jax.random.key(4))
    assert not np.allclose(t1, t2)
    np.testing.assert_array_equal(t1, t3)
    assert not np.allclose(t1, eps_fn(x, t))


def test_skip_rescale_attention_block_is_residual():
    """AttnBlockpp with its output NIN zeroed is the identity scaled by 1/sqrt(2)."""
    block = ncsnpp.AttnBlockpp(skip_rescale=True, init_scale=0.0)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
    params = block.init(jax.random.key(1), x)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if "NIN_3" in jax.tree_util.keystr(p) else a, params)
    np.testing.assert_allclose(block.apply(params, x), x / math.sqrt(2.0), rtol=1e-6)


def test_eps_fn_input_errors(tiny):
    module, variables = tiny
    eps_fn = ncsnpp.make_fn(module, TINY, variables)
    x = jnp.zeros((2, 16, 16, 3))
    t = jnp.array([0, 1], jnp.int32)
    with pytest.raises(ValueError, match=r"t: expected timestep indices in \[0, 999\]"):
        eps_fn(x, jnp.array([0, 1000], jnp.int32))
    with pytest.raises(ValueError, match="t: expected int32"):
        eps_fn(x, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="t: expected int32"):
        eps_fn(x, jnp.array([0, 1, 2], jnp.int32))
    with pytest.raises(ValueError, match="channels-first"):
        eps_fn(jnp.zeros((2, 3, 16, 16)), t)
    with pytest.raises(ValueError, match="16x16"):
        eps_fn(jnp.zeros((2, 32, 32, 3)), t)
    with pytest.raises(ValueError, match="x_t: expected a rank-4"):
        eps_fn(jnp.zeros((16, 16, 3)), t)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown field"):
        ncsnpp.validate_config({"nff": 3})
    with pytest.raises(ValueError, match=r"config\['fir'\]"):
        ncsnpp.validate_config({"fir": True})
    with pytest.raises(ValueError, match=r"config\['progressive'\]"):
        ncsnpp.validate_config({"progressive": "output_skip"})
    with pytest.raises(ValueError, match=r"config\['embedding_type'\]"):
        ncsnpp.validate_config({"embedding_type": "fourier"})
    with pytest.raises(ValueError, match=r"config\['image_size'\]"):
        ncsnpp.validate_config({"image_size": 30})
    with pytest.raises(ValueError, match=r"config\['centered'\]"):
        ncsnpp.make_fn(ncsnpp.build({"centered": False}), {"centered": False}, {})
    # Case of string fields does not matter (score_sde lower-cases them too).
    assert ncsnpp.validate_config({"resblock_type": "BigGAN"})["resblock_type"] == "biggan"
