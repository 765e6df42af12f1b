"""guided-diffusion 256x256 U-Net: Flax model, converter, reference equivalence, bad files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import convert, models, pretrained
from diffjax.convert import guided as cg
from diffjax.models import guided

RTOL = 1e-5


@pytest.fixture(scope="module")
def ref(reference_dir):
    cfg = json.loads((reference_dir / "guided_diffusion_small_config.json").read_text())
    io = np.load(reference_dir / "guided_diffusion_small_io.npz")
    return {
        "dir": reference_dir,
        "config": cfg,
        "x": jnp.asarray(io["x_nchw"].transpose(0, 2, 3, 1)),  # NCHW -> NHWC
        "t": jnp.asarray(io["t"], jnp.int32),
        "out": io["out_nchw"].transpose(0, 2, 3, 1),
    }


@pytest.fixture(scope="module")
def converted_st(ref):
    return cg.convert(str(ref["dir"] / "guided_diffusion_small.safetensors"), ref["config"])


def _rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


# ------------------------------------------------------------------------ full-size layout


def test_manifest_names_shapes_and_count(reference_dir):
    manifest = json.loads((reference_dir / "guided_diffusion_256_uncond_manifest.json")
                          .read_text())
    want = {k: tuple(s) for k, s in manifest["state_dict"]}
    got = cg.name_table(manifest["create_model_args"])
    assert got == want
    assert sum(int(np.prod(s)) for s in got.values()) == manifest["num_params"] == 552_814_086
    # The preset is the manifest's flag set: the default table is the same.
    assert cg.name_table(guided.imagenet256_uncond_config()) == want
    assert cg.name_table(None) == want
    # The full model runs at 256x256 (abstractly: no weights are built).
    cfg = guided.imagenet256_uncond_config()
    module = guided.build(cfg)
    params = guided.param_shapes(module, cfg)
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    out = jax.eval_shape(lambda p, x, t: guided.make_output_fn(module, cfg, {"params": p})(
        x, t), params, x, t)
    assert out.shape == (1, 256, 256, 6)


def test_small_preset_is_the_reference_config(ref):
    ours = guided.resolve_config(guided.small_config())
    theirs = guided.resolve_config(ref["config"])
    assert ours == theirs


def test_registry_init_matches_name_table():
    cfg = guided.small_config()
    module, variables = models.init("guided_unet", cfg, jax.random.key(0))
    assert models.param_count(variables) == sum(
        int(np.prod(s)) for s in cg.name_table(cfg).values())
    # Same key, same weights; another key, other weights; abstract evaluation works.
    again = guided.init(module, cfg, jax.random.key(0))
    other = guided.init(module, cfg, jax.random.key(1))
    k0 = np.asarray(variables["params"]["input_blocks_1_0"]["in_conv"]["kernel"])
    np.testing.assert_array_equal(k0, again["params"]["input_blocks_1_0"]["in_conv"]["kernel"])
    assert not np.allclose(k0, other["params"]["input_blocks_1_0"]["in_conv"]["kernel"])
    # LeCun-normal kernels (std 1/sqrt(fan_in), fan_in = 3*3*32), unit GroupNorm scales.
    assert abs(k0.std() * np.sqrt(9 * 32) - 1) < 0.05
    np.testing.assert_array_equal(variables["params"]["out_norm"]["scale"], 1.0)
    shapes = jax.eval_shape(lambda k: guided.init(module, cfg, k), jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(jnp.shape, variables)


# ---------------------------------------------------------------------------- equivalence


def test_safetensors_reproduces_reference(ref, converted_st):
    c = converted_st
    assert c.kind == "guided_unet"
    out = guided.make_output_fn(guided.build(c.config), c.config, c.variables)(ref["x"],
                                                                                ref["t"])
    assert out.shape == ref["out"].shape == (2, 32, 32, 6)
    assert _rel_err(out, ref["out"]) < RTOL
    # The eps channels alone (API.md's eps_fn) and the learned variance channels both match.
    assert _rel_err(out[..., 3:], ref["out"][..., 3:]) < RTOL
    # The trained schedule: DDPM linear, 1000 steps.
    assert c.schedule == {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                          "beta_end": 2e-2}


def test_pt_pickle_matches_safetensors(ref, converted_st):
    pytest.importorskip("torch")
    c = cg.convert(str(ref["dir"] / "guided_diffusion_small.pt"), ref["config"])
    assert c.config == converted_st.config
    jax.tree.map(np.testing.assert_array_equal, c.variables, converted_st.variables)
    eps = models.make_fn("guided_unet", c.config, c.variables)(ref["x"], ref["t"])
    assert _rel_err(eps, ref["out"][..., :3]) < RTOL


def test_save_load_eps_fn(ref, tmp_path):
    out_dir = convert.convert_to_dir("guided-diffusion",
                                     ref["dir"] / "guided_diffusion_small.safetensors",
                                     tmp_path / "gd", ref["config"])
    loaded = pretrained.load(out_dir)
    assert loaded.kind == "guided_unet" and loaded.role == "diffusion"
    assert loaded.meta["source"]["sha256"] == pretrained.sha256_file(
        ref["dir"] / "guided_diffusion_small.safetensors")
    eps = loaded.eps_fn(ref["x"], ref["t"])  # compiled once per architecture, shared
    assert eps.shape == ref["x"].shape
    assert _rel_err(eps, ref["out"][..., :3]) < RTOL
    sched = loaded.schedule()
    np.testing.assert_allclose(np.asarray(sched.betas)[[0, -1]], [1e-4, 2e-2], rtol=1e-6)


def test_eps_fn_differentiable_and_checks_inputs(ref, converted_st):
    c = converted_st
    eps_fn = models.make_fn("guided_unet", c.config, c.variables)
    g = jax.jit(jax.grad(lambda x: jnp.sum(eps_fn(x, ref["t"]) ** 2)))(ref["x"])
    assert g.shape == ref["x"].shape and bool(jnp.all(jnp.isfinite(g)))
    with pytest.raises(ValueError, match="channels-first"):
        eps_fn(ref["x"].transpose(0, 3, 1, 2), ref["t"])
    with pytest.raises(ValueError, match="t: expected integer"):
        eps_fn(ref["x"], ref["t"].astype(jnp.float32))
    with pytest.raises(ValueError, match=r"t: expected timestep indices of shape \(2,\)"):
        eps_fn(ref["x"], ref["t"][:1])
    with pytest.raises(ValueError, match="t: expected timestep indices >= 0"):
        eps_fn(ref["x"], -ref["t"])
    with pytest.raises(ValueError, match="divisible by 4"):
        eps_fn(jnp.zeros((2, 30, 30, 3)), ref["t"])


# ------------------------------------------------------------------------ building blocks


def test_timestep_embedding_cos_first():
    t = jnp.array([0, 7], jnp.int32)
    emb = guided.timestep_embedding(t, 8)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    want = np.concatenate([np.cos(np.outer([0, 7], freqs)), np.sin(np.outer([0, 7], freqs))],
                          axis=1)
    np.testing.assert_allclose(emb, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
    assert guided.timestep_embedding(t, 9).shape == (2, 9)


def test_legacy_and_new_attention_orders_are_channel_permutations():
    """The new order equals the legacy one with qkv's output channels permuted."""
    heads, ch = 2, 16
    c = heads * ch
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, c))
    legacy = guided.AttentionBlock(num_heads=heads, legacy=True)
    new = guided.AttentionBlock(num_heads=heads, legacy=False)
    v = jax.jit(legacy.init)(jax.random.key(2), x)
    # legacy channel index h*3*ch + s*ch + c  <->  new index s*heads*ch + h*ch + c
    perm = np.arange(3 * c).reshape(heads, 3, ch).transpose(1, 0, 2).reshape(-1)
    v_new = jax.tree.map(lambda a: a, v)
    v_new["params"]["qkv"] = {"kernel": v["params"]["qkv"]["kernel"][:, perm],
                              "bias": v["params"]["qkv"]["bias"][perm]}
    new_apply, legacy_apply = jax.jit(new.apply), jax.jit(legacy.apply)
    np.testing.assert_allclose(new_apply(v_new, x), legacy_apply(v, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(new_apply(v, x), legacy_apply(v, x), atol=1e-3)


# ------------------------------------------------------------------------------ bad input


def test_wrong_architecture_lists_tensors(ref):
    # Another model's file.
    with pytest.raises(ValueError, match=r"missing \(e\.g\. .*unexpected \(e\.g\. .*all_modules"):
        cg.convert(str(ref["dir"] / "score_sde_ddpmpp_small.safetensors"), ref["config"])
    # The right file under the wrong size (the 256x256 default): shape mismatches named.
    with pytest.raises(ValueError, match=r"shape mismatch.*file \(32, 3, 3, 3\), model "
                                         r"\(256, 3, 3, 3\).*--model_config"):
        cg.convert(str(ref["dir"] / "guided_diffusion_small.safetensors"))


def test_truncated_and_html_files(ref, tmp_path):
    data = (ref["dir"] / "guided_diffusion_small.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        cg.convert(str(bad), ref["config"])
    html = tmp_path / "256x256_diffusion_uncond.pt"
    html.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>")
    with pytest.raises(ValueError, match="HTML page"):
        cg.convert(str(html))


def test_truncated_pickle(ref, tmp_path):
    pytest.importorskip("torch")
    data = (ref["dir"] / "guided_diffusion_small.pt").read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated"):
        cg.convert(str(bad), ref["config"])


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown key.*num_chanels"):
        cg.name_table({"num_chanels": 128})
    with pytest.raises(ValueError, match="class_cond"):
        guided.build({**guided.small_config(), "class_cond": True})
    with pytest.raises(ValueError, match="noise_schedule"):
        cg._schedule({"noise_schedule": "sqrt"})
    sched = cg._schedule({"diffusion_steps": 250})
    assert sched["num_timesteps"] == 250 and sched["beta_end"] == pytest.approx(0.08)
