"""The FID InceptionV3 (kind ``fid_inception``) and its converter (format ``fid-inception``).

The reference data ``tests/data/fid_inception_reference.npz`` was made by
``experiments/make_fid_reference.py`` with pytorch-fid 0.3.0 itself (torchvision 0.29.1):
its ``InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)``
filled with random weights drawn from ``numpy.random.default_rng(0)`` in ``state_dict``
order. It holds the state_dict's names and shapes (the layout of
``pt_inception-2015-12-05-6726825d.pth``), two 32x32 images and their 2048-d pool features.
Here the same weights are regenerated from the recorded table, written to a safetensors
file, converted, and the Flax features compared with pytorch-fid's. The real weights file
is not used (nothing is downloaded).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import convert, metrics, models, pretrained
from diffjax.convert import fid_inception as cf
from diffjax.models import fid_inception
from experiments import make_fid_reference as mfr

REF = pathlib.Path(__file__).resolve().parent / "data" / "fid_inception_reference.npz"
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def ref():
    with np.load(REF, allow_pickle=False) as d:
        data = {k: d[k] for k in d.files}
    data["names"] = [str(n) for n in data["names"]]
    data["shapes"] = [mfr.parse_shape(str(s)) for s in data["shapes"]]
    data["table"] = dict(zip(data["names"], data["shapes"], strict=True))
    return data


def _save_safetensors(path, state):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory):
    """The random reference weights converted through a safetensors file and a model dir."""
    state = mfr.random_state(ref["names"], ref["shapes"])
    tmp = tmp_path_factory.mktemp("fid_inception")
    src = _save_safetensors(tmp / "pt_inception_random.safetensors", state)
    out = convert.convert_to_dir("fid-inception", src, tmp / "model")
    return pretrained.load(out)


def test_full_size_layout_and_parameter_count(ref):
    table = ref["table"]
    assert len(table) == 566  # pytorch-fid's Inception state_dict, fc included
    # Every pytorch-fid tensor except fc and num_batches_tracked is converted, with its shape.
    want = {k: v for k, v in table.items()
            if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert cf.source_shapes() == want
    assert {k: table[k] for k in cf.FC_SHAPES} == cf.FC_SHAPES
    assert set(table) - set(want) - set(cf.FC_SHAPES) == {
        k for k in table if k.endswith("num_batches_tracked")}
    # Parameters: conv weights and BatchNorm weight/bias, without fc (torchvision's
    # inception_v3 minus AuxLogits and the classifier).
    n_params = sum(int(np.prod(s)) for k, s in want.items() if not k.endswith(BN_BUFFERS))
    module = models.build("fid_inception", fid_inception.fid_inception_config())
    spec = models.get_spec("fid_inception")
    shapes = jax.eval_shape(lambda k: spec.init(module, {}, k), jax.random.key(0))
    assert models.param_count(shapes) == n_params == 21_785_568
    n_stats = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["batch_stats"]))
    assert n_stats == sum(int(np.prod(s)) for k, s in want.items() if k.endswith(BN_BUFFERS))
    # One conv + BatchNorm per BasicConv2d: 94 of them.
    assert sum(k.endswith(".conv.weight") for k in want) == 94


def test_matches_pytorch_fid(ref, converted):
    assert converted.kind == "fid_inception" and converted.role == "features"
    assert converted.config == {"resolution": 299}
    feats = np.asarray(jax.jit(lambda f, x: f(x))(converted.fn, jnp.asarray(ref["images"])))
    want = ref["features"]
    assert feats.shape == want.shape == (2, 2048) and feats.dtype == np.float32
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-4 * scale)
    # The reference is not degenerate: the two images' features differ by far more than
    # the tolerance, and the features are not all equal.
    assert np.abs(want[0] - want[1]).max() > 100 * 1e-4 * scale
    assert want.std() > 0.1 * scale


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    # Upsampling (CIFAR -> 299), mixed, and shrinking (no antialiasing in pytorch-fid).
    for h, w, size in ((32, 32, 299), (17, 40, 29), (320, 300, 299), (150, 120, 61)):
        x = rng.uniform(0, 1, (2, h, w, 3)).astype(np.float32)
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(size, size), mode="bilinear",
            align_corners=False).numpy().transpose(0, 2, 3, 1)
        got = np.asarray(fid_inception.resize_bilinear(jnp.asarray(x), size))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{h}x{w} -> {size}")


def test_pool_branch_average_excludes_padding():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(2, 5, 6, 4)).astype(np.float32)
    got = np.asarray(fid_inception._avg_pool_3x3(jnp.asarray(x)))
    want = torch.nn.functional.avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), 3,
                                          stride=1, padding=1, count_include_pad=False)
    np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), atol=1e-6)
    # A constant image stays constant at the borders (zero padding would pull corners to 4/9).
    np.testing.assert_allclose(fid_inception._avg_pool_3x3(jnp.ones((1, 4, 4, 1))), 1.0)


def test_features_fn_any_size_differentiable(converted):
    fn = converted.fn
    x = jax.ShapeDtypeStruct((3, 40, 57, 3), jnp.float32)
    assert jax.eval_shape(fn, x).shape == (3, 2048)
    grad = jax.eval_shape(jax.grad(lambda x: fn(x).sum()), x)
    assert grad.shape == x.shape
    with pytest.raises(ValueError, match="x: expected values in"):
        fn(jnp.full((1, 32, 32, 3), 2.0))
    with pytest.raises(ValueError, match="channels-first"):
        fn(jnp.zeros((1, 3, 32, 32)))


def test_registry_and_config_errors():
    spec = models.get_spec("fid_inception")
    assert spec.role == "features" and spec.default_config() == {"resolution": 299}
    assert "fid_inception" in models.KINDS and "fid-inception" in convert.FORMATS
    with pytest.raises(ValueError, match="config: expected keys among resolution"):
        fid_inception.build({"width": 8})
    with pytest.raises(ValueError, match=r"config\['resolution'\]"):
        fid_inception.build({"resolution": 32})
    with pytest.raises(ValueError, match="model_config"):
        cf.config_from_model_config([299])


def test_metrics_compute_features_and_fid(converted, ref):
    images = np.concatenate([ref["images"], ref["images"][:, ::-1]])  # 4 images
    # batch_size 3: the last batch is padded inside compute_features.
    feats = metrics.compute_features(converted.fn, images, batch_size=3)
    assert feats.shape == (4, 2048) and feats.dtype == np.float64
    np.testing.assert_allclose(feats[:2], ref["features"], rtol=1e-4,
                               atol=1e-4 * np.abs(ref["features"]).max())
    # The Frechet distance on the first 64 features (the full 2048-d one costs two
    # 2048 x 2048 eigendecompositions, ~30 s on a busy 2-core machine; the distance itself
    # is tested in test_metrics_fid.py).
    sub = feats[:, :64]
    assert metrics.fid_from_features(sub, sub) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid_from_features(sub[:2], sub[2:]) > 1e-3


@pytest.fixture(scope="module")
def zero_state(ref):
    return {k: np.zeros(s, np.float32) for k, s in ref["table"].items()
            if not k.endswith("num_batches_tracked")}


def test_bad_files(tmp_path, zero_state):
    html = tmp_path / "pt_inception.pth"
    html.write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    with pytest.raises(ValueError, match="HTML page"):
        convert.convert("fid-inception", html)
    good = _save_safetensors(tmp_path / "ok.safetensors", zero_state)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: 1 << 16])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert.convert("fid-inception", truncated)
    # A missing tensor, a wrong shape and an extra one, all listed.
    state = dict(zero_state)
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    state["Mixed_5b.branch_pool.conv.weight"] = np.zeros((64, 192, 1, 1), np.float32)
    state["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
    bad = _save_safetensors(tmp_path / "bad.safetensors", state)
    with pytest.raises(ValueError, match=r"1 missing \(e.g. Mixed_6b.branch7x7_2.conv.weight"
                                         r".*1 unexpected \(e.g. AuxLogits.*1 shape mismatch"):
        convert.convert("fid-inception", bad)
    # torchvision's ImageNet Inception (1000 classes) is not the FID network.
    state = {**zero_state, "fc.weight": np.zeros((1000, 2048), np.float32),
             "fc.bias": np.zeros((1000,), np.float32)}
    tv = _save_safetensors(tmp_path / "torchvision.safetensors", state)
    with pytest.raises(ValueError, match="torchvision's ImageNet inception_v3"):
        convert.convert("fid-inception", tv)


def test_optional_fc_and_prefix(tmp_path, zero_state):
    # fc absent and a DataParallel `module.` prefix: still the FID network.
    state = {f"module.{k}": v for k, v in zero_state.items() if not k.startswith("fc.")}
    result = convert.convert("fid-inception",
                             _save_safetensors(tmp_path / "nofc.safetensors", state))
    assert result.kind == "fid_inception"
    assert set(result.variables) == {"params", "batch_stats"}
    assert "fc" not in result.variables["params"]


def test_pickle_source_without_num_batches_tracked(tmp_path, ref):
    torch = pytest.importorskip("torch")
    state = mfr.random_state(ref["names"], ref["shapes"])
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()
                if not k.endswith("num_batches_tracked")}, path)
    result = convert.convert("fid-inception", path)
    conv = result.variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"]
    np.testing.assert_array_equal(
        conv, state["Mixed_7c.branch_pool.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(result.variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
                                  state["Conv2d_1a_3x3.bn.running_var"])
