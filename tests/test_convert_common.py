"""Tests of the converters' shared pieces: safe loading, errors, name maps, layouts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.convert import common

torch = pytest.importorskip("torch")


def _state():
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "conv.bias": rng.normal(size=(4,)).astype(np.float32)}


def test_load_safetensors_and_pickle_agree(tmp_path):
    from safetensors.numpy import save_file

    state = _state()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "w.pt")
    a = common.load_state_dict(str(tmp_path / "w.safetensors"))
    b = common.load_state_dict(str(tmp_path / "w.pt"))
    assert set(a) == set(b) == set(state)
    for k in state:
        np.testing.assert_array_equal(a[k], state[k])
        np.testing.assert_array_equal(b[k], state[k])


def test_load_flattens_nested_dicts_lists_and_scalars(tmp_path):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    obj = {"state_dict": {"module.a": t},
           "ema": {"decay": 0.9999, "shadow_params": [t, t + 1]}, "step": 7,
           "half": t.to(torch.bfloat16)}
    torch.save(obj, tmp_path / "c.pth")
    got = common.load_state_dict(str(tmp_path / "c.pth"))
    assert set(got) == {"state_dict.module.a", "ema.decay", "ema.shadow_params.0",
                        "ema.shadow_params.1", "step", "half"}
    np.testing.assert_array_equal(got["ema.shadow_params.1"], t.numpy() + 1)
    assert got["step"] == 7 and got["ema.decay"] == pytest.approx(0.9999)
    assert got["half"].dtype == np.float32
    assert set(common.strip_prefix({k: v for k, v in got.items() if k.startswith("state")})) \
        == {"a"}


def test_unknown_extension_is_sniffed(tmp_path):
    from safetensors.numpy import save_file

    state = _state()
    save_file(state, str(tmp_path / "weights.data"))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "weights.other")
    assert set(common.load_state_dict(str(tmp_path / "weights.data"))) == set(state)
    assert set(common.load_state_dict(str(tmp_path / "weights.other"))) == set(state)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        common.load_state_dict(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".ckpt"])
def test_html_page_in_place_of_weights(tmp_path, suffix):
    p = tmp_path / f"model{suffix}"
    p.write_text("\n  <!DOCTYPE html><html><head><title>Sign in</title></head></html>")
    with pytest.raises(ValueError, match="HTML page, not a checkpoint"):
        common.load_state_dict(str(p))


def test_git_lfs_pointer(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ValueError, match="Git-LFS pointer"):
        common.load_state_dict(str(p))


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_truncated_file(tmp_path, kind):
    from safetensors.numpy import save_file

    state = {"w": np.ones((64, 64), np.float32)}
    full = tmp_path / f"full.{kind}"
    if kind == "pt":
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, full)
    else:
        save_file(state, str(full))
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        common.load_state_dict(str(cut))


class _Payload:
    """An arbitrary Python object: unpickling it would run this module's code."""

    def __init__(self):
        self.x = 1


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "obj": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="never executes pickled code"):
        common.load_state_dict(str(tmp_path / "evil.pt"))


def test_check_names_and_shapes_lists_problems():
    expected = {"a": (2, 3), "b": (4,), "c": (5,), "d": (1,)}
    got = {"a": np.zeros((3, 2)), "b": np.zeros(4), "x": np.zeros(7)}
    with pytest.raises(ValueError) as e:
        common.check_names_and_shapes(expected, got, "the toy architecture")
    msg = str(e.value)
    assert "the toy architecture" in msg
    assert "2 missing" in msg and "c (5,)" in msg
    assert "1 unexpected" in msg and "x (7,)" in msg
    assert "1 shape mismatch" in msg and "a: file (3, 2), model (2, 3)" in msg
    common.check_names_and_shapes({"b": (4,)}, {"b": np.zeros(4)}, "ok")  # no error


def test_strip_prefix_only_when_all_names_have_it():
    assert common.strip_prefix({"module.a": 1, "module.b": 2}) == {"a": 1, "b": 2}
    assert common.strip_prefix({"state_dict.module.a": 1}) == {"a": 1}
    assert common.strip_prefix({"model.a": 1, "ema.b": 2}) == {"model.a": 1, "ema.b": 2}


def test_layouts_match_torch_ops():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 7, 7)).astype(np.float32)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1)
    got = jax.lax.conv_general_dilated(
        x.transpose(0, 2, 3, 1), common.conv_kernel(w), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(got), ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    lw = rng.normal(size=(4, 6)).astype(np.float32)
    v = rng.normal(size=(2, 6)).astype(np.float32)
    np.testing.assert_allclose(v @ common.dense_kernel(lw), v @ lw.T, rtol=1e-6)
    np.testing.assert_array_equal(common.conv1x1_dense_kernel(w[:, :, :1, :1]),
                                  w[:, :, 0, 0].T)


def test_unflatten_flatten_roundtrip_and_double_set():
    flat = {"a/b/c": 1, "a/d": 2, "e": 3}
    assert common.flatten(common.unflatten(flat)) == flat
    with pytest.raises(ValueError, match="set twice"):
        common.set_nested({"a": {"b": 1}}, ("a", "b"), 2)


class _Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        return nn.Dense(2, name="fc")(x.mean((1, 2)))


def _toy_map():
    m = common.MapEntry
    return [m("conv.weight", "params/conv/kernel", "conv"), m("conv.bias", "params/conv/bias"),
            m("bn.weight", "params/bn/scale"), m("bn.bias", "params/bn/bias"),
            m("bn.running_mean", "batch_stats/bn/mean"),
            m("bn.running_var", "batch_stats/bn/var"),
            m("fc.weight", "params/fc/kernel", "dense"), m("fc.bias", "params/fc/bias")]


def test_flax_param_shapes_and_apply_name_map():
    module = _Toy()
    shapes = common.flax_param_shapes(module, jax.ShapeDtypeStruct((1, 5, 5, 3), jnp.float32))
    assert shapes["params/conv/kernel"] == (3, 3, 3, 4)
    assert shapes["batch_stats/bn/var"] == (4,)
    table = common.expected_source_shapes(_toy_map(), shapes)
    assert table["conv.weight"] == (4, 3, 3, 3) and table["fc.weight"] == (2, 4)
    rng = np.random.default_rng(2)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in table.items()}
    state["bn.running_var"] = np.abs(state["bn.running_var"]) + 0.1
    state["bn.num_batches_tracked"] = np.array(3)
    variables = common.apply_name_map(state, _toy_map(), shapes, "toy",
                                      ignore=lambda k: k.endswith("num_batches_tracked"))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["fc.weight"].T)
    out = module.apply(variables, jnp.ones((1, 5, 5, 3)))
    assert out.shape == (1, 2) and np.all(np.isfinite(out))
    # A map that leaves a variable unfilled, or fills one twice, is refused.
    short = [e for e in _toy_map() if e.source != "fc.bias"]
    del state["fc.bias"]
    with pytest.raises(ValueError, match="left unfilled"):
        common.apply_name_map(state, short, shapes, "toy",
                              ignore=lambda k: k.endswith("num_batches_tracked"))
    state["fc.bias2"] = np.zeros(2, np.float32)
    twice = short + [common.MapEntry("fc.bias2", "params/fc/kernel")]
    with pytest.raises(ValueError, match="shape mismatch|filled twice"):
        common.apply_name_map(state, twice, shapes, "toy",
                              ignore=lambda k: k.endswith("num_batches_tracked"))
