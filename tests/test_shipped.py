"""The checkpoints shipped inside the package: they load, verify and meet their targets."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import data, diffusion, pretrained, randomness, train

SHIPPED = ("digits_classifier", "digits_ddpm")


@pytest.fixture(scope="module")
def classifier():
    return pretrained.load("digits_classifier")


@pytest.fixture(scope="module")
def ddpm():
    return pretrained.load("digits_ddpm")


def test_shipped_models_are_listed_and_small():
    names = pretrained.available()
    for name in SHIPPED:
        assert name in names
        size = sum(p.stat().st_size for p in (pretrained.ASSETS_DIR / name).rglob("*")
                   if p.is_file())
        assert size < 4 * 2**20, f"{name} is {size / 2**20:.1f} MiB"
        info = json.loads((pretrained.ASSETS_DIR / name / "model.json").read_text())
        cmd = info["meta"]["command"]
        assert cmd.startswith("python -m experiments.train_") and "--export_dir=" in cmd
        assert info["meta"]["dataset"] == "digits"


def test_classifier_meets_its_target(classifier):
    assert classifier.role == "classifier"
    acc, n = train.evaluate_accuracy(classifier.logits_fn, data.batches("digits", "test", 128))
    assert n == 297
    assert acc >= 0.97
    # The number recorded in the registry is the number this checkpoint gives.
    assert acc == pytest.approx(classifier.meta["meta"]["metrics"]["test_accuracy"], abs=2e-3)


def test_ddpm_loads_with_its_schedule(ddpm):
    assert ddpm.role == "diffusion"
    sched = ddpm.schedule()
    ref = diffusion.linear_schedule(1000, 1e-4, 2e-2)
    np.testing.assert_allclose(sched.betas, ref.betas)
    x = jnp.zeros((2, 8, 8, 1))
    eps = ddpm.eps_fn(x, jnp.array([0, 999], jnp.int32))
    assert eps.shape == x.shape and bool(jnp.isfinite(eps).all())


def test_purified_accuracy_meets_its_target(classifier, ddpm):
    """The study default: t_star=100, 10 respaced ancestral steps, the recorded key."""
    rec = ddpm.meta["meta"]["metrics"]["purification"]
    assert rec["t_star"] == 100 and rec["num_steps"] == 10
    assert rec["purified_accuracy"]["ddpm"] >= 0.90
    key = jax.random.split(jax.random.key(ddpm.meta["meta"]["seed"]), 5)[3]
    sched = ddpm.schedule()

    def purify(x, ids):
        return diffusion.purify(ddpm.eps_fn, x, randomness.example_keys(key, ids),
                                schedule=sched, t_star=100, method="ddpm", num_steps=10,
                                remat=False)

    acc, n = train.evaluate_accuracy(classifier.logits_fn, data.batches("digits", "test", 297),
                                     transform=purify)
    assert n == 297 and acc >= 0.90
    assert acc == pytest.approx(rec["purified_accuracy"]["ddpm"], abs=0.02)


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(pretrained.ASSETS_DIR / name, dst)
    return dst


def _largest_param_file(d):
    return max((p for p in (d / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("name", SHIPPED)
def test_corrupted_copy_is_reported(tmp_path, name):
    d = _copy(name, tmp_path)
    pretrained.verify(d)  # the intact copy verifies
    f = _largest_param_file(d)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the recorded"):
        pretrained.load(d)


def test_missing_file_is_reported(tmp_path):
    d = _copy("digits_classifier", tmp_path)
    f = _largest_param_file(d)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        pretrained.load(d)
