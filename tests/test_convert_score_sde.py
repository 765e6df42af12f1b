"""score_sde NCSN++/DDPM++ converters against the reference implementations' own outputs.

Reference data (../shared/reference, see its README): score_sde_pytorch and the original
score_sde (Flax) `NCSNpp` with the `vp/cifar10_ddpmpp_deep_continuous` config at nf=16,
num_res_blocks=2, random weights, run on a fixed input with continuous labels `t*999`
that are whole numbers (5 and 731), so `eps_fn(x, t=[5, 731])` must give the same output.
"""

import json

import jax
import numpy as np
import pytest

from diffjax import pretrained
from diffjax.convert import common, convert_to_dir, score_sde
from diffjax.models import ncsnpp

PTH = "score_sde_ddpmpp_small_checkpoint.pth"
SAFETENSORS = "score_sde_ddpmpp_small.safetensors"
MSGPACK = "score_sde_ddpmpp_small_flax_checkpoint_1"

# One compiled program for every path below (same architecture, same batch shape): the
# weights are arguments of the eps_fn pytree, not constants.
_run = jax.jit(lambda fn, x, t: fn(x, t))


@pytest.fixture(scope="module")
def small_cfg(reference_dir):
    return json.loads((reference_dir / "score_sde_ddpmpp_small_config.json").read_text())


def _io(reference_dir, flax: bool):
    """(x NHWC, integer timesteps, reference eps NHWC) of one reference npz."""
    if flax:
        d = np.load(reference_dir / "score_sde_ddpmpp_small_flax_io.npz")
        x, out = d["x_nhwc"], d["out_nhwc"]
    else:
        d = np.load(reference_dir / "score_sde_ddpmpp_small_io.npz")
        x, out = d["x_nchw"].transpose(0, 2, 3, 1), d["out_nchw"].transpose(0, 2, 3, 1)
    labels = d["labels"]
    t = labels.astype(np.int32)
    assert np.array_equal(t, labels), "the reference labels must be whole timestep indices"
    return x, t, out


def _assert_reproduces(fn, io, tol=1e-5):
    x, t, ref = io
    out = np.asarray(_run(fn, x, t))
    assert out.shape == ref.shape
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < tol, f"max relative error {rel:.3g}"


def _eps_fn(converted):
    assert converted.kind == "ncsnpp"
    return ncsnpp.make_fn(ncsnpp.build(converted.config), converted.config, converted.variables)


def test_safetensors_state_dict_reproduces_reference(reference_dir, small_cfg):
    conv = score_sde.convert_pytorch(str(reference_dir / SAFETENSORS), small_cfg)
    assert conv.meta["weights"] == "state_dict"
    assert conv.schedule == {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                             "beta_end": 2e-2}
    _assert_reproduces(_eps_fn(conv), _io(reference_dir, flax=False))


@pytest.mark.torch
def test_checkpoint_pth_ema_reproduces_reference(reference_dir, small_cfg):
    pytest.importorskip("torch")
    conv = score_sde.convert_pytorch(str(reference_dir / PTH), small_cfg)
    assert conv.meta["weights"] == "ema"
    assert conv.meta["step"] == 10 and conv.meta["ema_decay"] == pytest.approx(0.9999)
    _assert_reproduces(_eps_fn(conv), _io(reference_dir, flax=False))


def test_flax_msgpack_reproduces_reference(reference_dir, small_cfg):
    conv = score_sde.convert_flax(str(reference_dir / MSGPACK), small_cfg)
    assert conv.meta["weights"] == "params_ema" and conv.meta["step"] == 10
    assert conv.schedule["beta_start"] == pytest.approx(1e-4)
    _assert_reproduces(_eps_fn(conv), _io(reference_dir, flax=True))


def test_full_size_manifest(reference_dir):
    """The official deep model: every name, shape, the parameters() order, the count."""
    manifest = json.loads(
        (reference_dir / "score_sde_ddpmpp_deep_cifar10_manifest.json").read_text())
    shapes = score_sde.flax_shapes(None)  # eval_shape: nothing allocated
    entries = score_sde.name_map(None, shapes)
    assert [e.source for e in entries] == manifest["parameters_order"]
    params = {n: tuple(s) for n, s, is_param in manifest["state_dict"] if is_param}
    buffers = [n for n, _, is_param in manifest["state_dict"] if not is_param]
    assert common.expected_source_shapes(entries, shapes) == params
    assert buffers == ["sigmas"]
    assert sum(int(np.prod(s)) for s in shapes.values()) == manifest["num_params"]
    assert sum(int(np.prod(s)) for s in params.values()) == manifest["num_params"]
    flax_ref = json.loads(
        (reference_dir / "score_sde_ddpmpp_deep_cifar10_flax_params.json").read_text())
    assert shapes == {f"params/{n}": tuple(s) for n, s in flax_ref}


def test_small_name_map_matches_reference_file(reference_dir, small_cfg):
    """The small model's derived order equals the reference file's `model` state_dict order."""
    state = common.load_state_dict(str(reference_dir / SAFETENSORS))
    entries = score_sde.name_map(small_cfg)
    assert {e.source for e in entries} == set(state) - {"sigmas"}


# ----------------------------------------------------------------------------- EMA list


def _load_torch_ckpt(reference_dir):
    torch = pytest.importorskip("torch")
    return torch, torch.load(reference_dir / PTH, map_location="cpu", weights_only=True)


@pytest.mark.torch
def test_ema_list_is_used_and_matched_by_position(reference_dir, small_cfg, tmp_path):
    torch, ckpt = _load_torch_ckpt(reference_dir)
    # Fill EMA tensor i with the value i: the converted parameter at position i must be i.
    ckpt["ema"]["shadow_params"] = [torch.full_like(p, float(i))
                                    for i, p in enumerate(ckpt["ema"]["shadow_params"])]
    path = tmp_path / "checkpoint_8.pth"
    torch.save(ckpt, path)
    conv = score_sde.convert_pytorch(str(path), small_cfg)
    flat = common.flatten(conv.variables)
    entries = score_sde.name_map(small_cfg)
    for i, e in enumerate(entries):
        assert np.all(flat[e.target] == i), e
    assert len(flat) == len(entries)


@pytest.mark.torch
def test_ema_list_of_wrong_length_or_order(reference_dir, small_cfg, tmp_path):
    torch, ckpt = _load_torch_ckpt(reference_dir)
    shadow = list(ckpt["ema"]["shadow_params"])
    ckpt["ema"]["shadow_params"] = shadow[:-1]
    torch.save(ckpt, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="holds 367 tensors, the model has 368 parameters"):
        score_sde.convert_pytorch(str(tmp_path / "short.pth"), small_cfg)
    # Swap a conv weight with the bias after it: shapes reveal the wrong order.
    ckpt["ema"]["shadow_params"] = shadow[:4] + [shadow[5], shadow[4]] + shadow[6:]
    torch.save(ckpt, tmp_path / "swapped.pth")
    with pytest.raises(ValueError, match=r"ema.shadow_params .*all_modules\.2\.weight"):
        score_sde.convert_pytorch(str(tmp_path / "swapped.pth"), small_cfg)


@pytest.mark.torch
def test_checkpoint_without_ema_uses_model_weights(reference_dir, small_cfg, tmp_path):
    torch, ckpt = _load_torch_ckpt(reference_dir)
    torch.save({"model": ckpt["model"], "step": 3}, tmp_path / "no_ema.pth")
    conv = score_sde.convert_pytorch(str(tmp_path / "no_ema.pth"), small_cfg)
    assert conv.meta["weights"].startswith("model")
    ref = score_sde.convert_pytorch(str(reference_dir / SAFETENSORS), small_cfg)
    jax.tree.map(np.testing.assert_array_equal, conv.variables, ref.variables)


# ----------------------------------------------------------------------------- bad files


def test_other_architecture_lists_tensors(reference_dir, small_cfg, tmp_path):
    # The small file read as the official deep model.
    with pytest.raises(ValueError, match=r"does not match the score_sde .* missing .*"
                                         r"shape mismatch"):
        score_sde.convert_pytorch(str(reference_dir / SAFETENSORS), None)
    # One tensor removed, one foreign tensor added.
    from safetensors.numpy import save_file

    state = common.load_state_dict(str(reference_dir / SAFETENSORS))
    state.pop("all_modules.5.Conv_0.weight")
    state["all_modules.99.weight"] = np.zeros((3, 3), np.float32)
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing \(e.g. all_modules.5.Conv_0.weight "
                                         r"\(16, 16, 3, 3\)\), 1 unexpected \(e.g. "
                                         r"all_modules.99.weight \(3, 3\)\)"):
        score_sde.convert_pytorch(str(tmp_path / "other.safetensors"), small_cfg)
    # The Flax checkpoint read as the deep model.
    with pytest.raises(ValueError, match=r"does not match the score_sde .*shape mismatch"):
        score_sde.convert_flax(str(reference_dir / MSGPACK), None)


def test_truncated_files(reference_dir, small_cfg, tmp_path):
    for name in (SAFETENSORS, MSGPACK):
        data = (reference_dir / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        score_sde.convert_pytorch(str(tmp_path / SAFETENSORS), small_cfg)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        score_sde.convert_flax(str(tmp_path / MSGPACK), small_cfg)


@pytest.mark.torch
def test_truncated_pth(reference_dir, small_cfg, tmp_path):
    pytest.importorskip("torch")
    data = (reference_dir / PTH).read_bytes()
    (tmp_path / PTH).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        score_sde.convert_pytorch(str(tmp_path / PTH), small_cfg)


def test_html_page_instead_of_weights(small_cfg, tmp_path):
    page = b"<!DOCTYPE html><html><head><title>Google Drive</title></head></html>"
    for name in ("checkpoint_8.pth", "checkpoint_26"):
        (tmp_path / name).write_bytes(page)
    with pytest.raises(ValueError, match="HTML page"):
        score_sde.convert_pytorch(str(tmp_path / "checkpoint_8.pth"), small_cfg)
    with pytest.raises(ValueError, match="HTML page"):
        score_sde.convert_flax(str(tmp_path / "checkpoint_26"), small_cfg)


def test_msgpack_without_params_ema(small_cfg, tmp_path):
    from flax import serialization

    (tmp_path / "ckpt").write_bytes(serialization.msgpack_serialize({"step": 3, "lr": 0.1}))
    with pytest.raises(ValueError, match="no 'params_ema'"):
        score_sde.convert_flax(str(tmp_path / "ckpt"), small_cfg)


def test_bad_model_config(reference_dir):
    with pytest.raises(ValueError, match="unknown field"):
        score_sde.convert_flax(str(reference_dir / MSGPACK), {"n_f": 16})


# ----------------------------------------------------------------------------- the API


@pytest.mark.torch
def test_converted_directory_loads_with_api_eps_fn(reference_dir, small_cfg, tmp_path):
    """convert_to_dir + pretrained.load(DIR).eps_fn gives the reference output."""
    pytest.importorskip("torch")
    out = convert_to_dir("score-sde-pytorch", reference_dir / PTH, tmp_path / "sde",
                         model_config=small_cfg)
    loaded = pretrained.load(out)
    assert loaded.kind == "ncsnpp" and loaded.role == "diffusion"
    assert loaded.meta["source"]["sha256"] == pretrained.sha256_file(reference_dir / PTH)
    assert loaded.meta["schedule"]["num_timesteps"] == 1000
    _assert_reproduces(loaded.eps_fn, _io(reference_dir, flax=False))


def test_flax_save_load_roundtrip(reference_dir, small_cfg, tmp_path):
    conv = score_sde.convert_flax(str(reference_dir / MSGPACK), small_cfg)
    out = pretrained.save(tmp_path / "sde_flax", kind=conv.kind, config=conv.config,
                          variables=conv.variables, schedule=conv.schedule, meta=conv.meta)
    loaded = pretrained.load(out)
    assert loaded.config == conv.config
    _assert_reproduces(loaded.eps_fn, _io(reference_dir, flax=True))
