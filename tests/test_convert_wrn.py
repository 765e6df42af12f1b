"""RobustBench WideResNet converter vs RobustBench's own output and the WRN-28-10 layout."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import convert, models
from diffjax.convert import wrn

torch = pytest.importorskip("torch")

call = jax.jit(lambda fn, *args: fn(*args))


def _small(reference_dir):
    return json.loads((reference_dir / "robustbench_wrn_small_config.json").read_text())


def _logits(c, x_nhwc):
    return np.asarray(call(models.make_fn(c.kind, c.config, c.variables), jnp.asarray(x_nhwc)))


def test_reference_logits(reference_dir):
    c = wrn.convert(str(reference_dir / "robustbench_wrn_small.pt"), _small(reference_dir))
    assert c.kind == "wrn" and c.schedule is None
    assert set(c.variables) == {"params", "batch_stats"}
    d = np.load(reference_dir / "robustbench_wrn_small_io.npz")
    out = _logits(c, d["x_nchw"].transpose(0, 2, 3, 1))
    ref = d["logits"]
    assert np.abs(out - ref).max() <= 2e-5 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_bare_state_dict_without_prefix(reference_dir, tmp_path):
    obj = torch.load(reference_dir / "robustbench_wrn_small.pt", weights_only=True)
    bare = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    torch.save(bare, tmp_path / "bare.pt")
    a = wrn.convert(str(reference_dir / "robustbench_wrn_small.pt"), _small(reference_dir))
    b = wrn.convert(str(tmp_path / "bare.pt"), _small(reference_dir))
    assert jax.tree.all(jax.tree.map(np.array_equal, a.variables, b.variables))


def test_full_size_manifest(reference_dir):
    manifest = json.loads((reference_dir / "robustbench_wrn_28_10_manifest.json").read_text())
    official = {n: tuple(s) for n, s in manifest["state_dict"]
                if not n.endswith("num_batches_tracked")}
    config = wrn.config_from_robustbench(manifest["args"])
    assert config == wrn.config_from_robustbench(None)  # WRN-28-10 is the default
    ours = wrn.source_shapes(config)
    assert ours == official
    trainable = sum(math.prod(s) for n, s in ours.items() if "running" not in n)
    assert trainable == manifest["num_params"] == 36_479_194


def test_another_architecture_is_listed(reference_dir):
    with pytest.raises(ValueError) as e:  # the WRN-10-2 file read as the default WRN-28-10
        wrn.convert(str(reference_dir / "robustbench_wrn_small.pt"))
    msg = str(e.value)
    assert "does not match the robustbench-wrn architecture (WRN-28-10" in msg
    assert "missing (e.g. block1.layer.1." in msg and "shape mismatch" in msg
    with pytest.raises(ValueError, match="unknown keys"):
        wrn.config_from_robustbench({"depth": 28, "width": 10})
    with pytest.raises(ValueError, match="6n"):
        wrn.config_from_robustbench({"depth": 27})


def test_bad_files(reference_dir, tmp_path):
    cut = tmp_path / "Standard.pt"
    cut.write_bytes((reference_dir / "robustbench_wrn_small.pt").read_bytes()[:50_000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert.convert("robustbench-wrn", cut, _small(reference_dir))
    cut.write_text("<html><head><title>Google Drive</title></head></html>")
    with pytest.raises(ValueError, match="HTML page"):
        convert.convert("robustbench-wrn", cut, _small(reference_dir))
