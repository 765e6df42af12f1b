"""diffjax.train: the losses go down, resumption is exact, data parallelism is transparent."""

import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags

from diffjax import data, train
from diffjax.diffusion import linear_schedule

ROOT = pathlib.Path(__file__).resolve().parents[1]


class TinyEps(nn.Module):
    """A tiny eps-model: two convs with a timestep embedding and dropout."""

    @nn.compact
    def __call__(self, x, t, train=False):
        emb = nn.Dense(8)(jnp.sin(t[:, None] / 1000.0 * jnp.arange(1, 5)))
        h = nn.Conv(8, (3, 3))(x) + emb[:, None, None, :]
        h = nn.Dropout(0.1, deterministic=not train)(nn.silu(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


class TinyCNN(nn.Module):
    """A tiny classifier with BatchNorm."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Conv(8, (3, 3))(x)
        h = nn.BatchNorm(use_running_average=not train)(h)
        h = nn.relu(h).reshape(x.shape[0], -1)
        return nn.Dense(10)(h)


def _digits(n=256):
    return data.load_arrays("digits", "train", num_examples=n)


def _ddpm_setup(key=0):
    module = TinyEps()
    variables = module.init(jax.random.key(key), jnp.zeros((1, 8, 8, 1)),
                            jnp.zeros((1,), jnp.int32))
    tx = train.make_optimizer(learning_rate=3e-3, warmup_steps=2)
    step = train.make_ddpm_step(module, tx, linear_schedule(), key=jax.random.key(1),
                                ema_decay=0.9)
    return module, train.init_state(variables, tx), step


def _run(step_fn, state, start, stop, n=256, batch=32):
    it = data.train_batches("digits", "train", batch, key=jax.random.key(2), start_step=start,
                            num_examples=n)
    return train.fit(step_fn, state, it, num_steps=stop, progress=False, log_every=1)


def test_ddpm_loss_decreases():
    _, state, step = _ddpm_setup()
    state, hist = _run(step, state, 0, 40)
    losses = [h["loss"] for h in hist]
    assert len(losses) == 40 and int(state.step) == 40
    assert step._cache_size() == 1  # compiled once for all 40 steps
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4])
    # EMA lags the params but moved away from the init.
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, state.ema_params)
    assert max(jax.tree.leaves(diff)) > 0


def test_classifier_loss_decreases_and_batch_stats_update():
    module = TinyCNN()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    tx = train.make_optimizer(learning_rate=1e-2)
    step = train.make_classifier_step(module, tx, key=jax.random.key(3), ema_decay=0.9,
                                      max_shift=1)
    state = train.init_state(variables, tx)
    bs0 = jax.tree.map(np.asarray, state.batch_stats)
    state, hist = _run(step, state, 0, 40)
    losses = [h["loss"] for h in hist]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4])
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), bs0, state.batch_stats)
    assert all(jax.tree.leaves(moved))


def test_warmup_starts_at_zero_and_clipping_bounds_update():
    tx = train.make_optimizer(learning_rate=1.0, warmup_steps=10, grad_clip=1.0)
    params = {"w": jnp.ones(3)}
    st = tx.init(params)
    upd, st = tx.update({"w": jnp.full(3, 100.0)}, st, params)
    np.testing.assert_array_equal(upd["w"], 0.0)  # lr 0 at step 0
    upd, _ = tx.update({"w": jnp.full(3, 100.0)}, st, params)
    assert float(jnp.abs(upd["w"]).max()) <= 0.1 + 1e-6  # lr 0.1 at step 1, Adam |u| <= lr


def test_random_shift_is_a_translation():
    x = jnp.arange(2 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 1)
    np.testing.assert_array_equal(train.random_shift(x, jax.random.key(0), 0), x)
    y = np.asarray(train.random_shift(x, jax.random.key(0), 1))
    for i in range(2):  # the interior of each image is a shifted copy of the original
        found = any(np.array_equal(y[i, 1:7, 1:7], np.asarray(x[i, 1 + dy:7 + dy, 1 + dx:7 + dx]))
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        assert found


def test_resume_is_exact(tmp_path):
    # N steps in one go (checkpointing at N/2 on the way: the save must not be affected
    # by the next step donating the state's buffers).
    _, state, step = _ddpm_setup()
    mid = train.checkpoint_manager(tmp_path / "full")
    full, _ = train.fit(step, state, data.train_batches(
        "digits", "train", 32, key=jax.random.key(2), num_examples=256),
        num_steps=8, mngr=mid, save_every=4, progress=False)
    full = jax.tree.map(np.asarray, full)
    # N/2, checkpoint, a fresh process-like restart (new state, new step fn), N/2.
    _, state, step = _ddpm_setup()
    mngr = train.checkpoint_manager(tmp_path)
    state, _ = train.fit(step, state, data.train_batches(
        "digits", "train", 32, key=jax.random.key(2), num_examples=256),
        num_steps=4, mngr=mngr, progress=False)
    mngr.close()
    _, fresh, step = _ddpm_setup()
    mngr = train.checkpoint_manager(tmp_path)
    assert mngr.latest_step() == 4
    resumed = train.restore_or_keep(mngr, fresh)
    assert int(resumed.step) == 4
    resumed, _ = _run(step, resumed, 4, 8)
    mngr.close()
    resumed = jax.tree.map(np.asarray, resumed)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # The uninterrupted run's mid-way checkpoint equals the interrupted run's last one.
    assert mid.all_steps() == [4, 8]
    at4 = jax.tree.map(np.asarray, train.restore_or_keep(mid, fresh, step=4))
    mid.close()
    mngr = train.checkpoint_manager(tmp_path)
    stopped = jax.tree.map(np.asarray, train.restore_or_keep(mngr, fresh, step=4))
    mngr.close()
    for a, b in zip(jax.tree.leaves(at4), jax.tree.leaves(stopped), strict=True):
        np.testing.assert_array_equal(a, b)


def test_restore_without_checkpoint_keeps_state(tmp_path):
    _, state, _ = _ddpm_setup()
    mngr = train.checkpoint_manager(tmp_path)
    assert train.restore_or_keep(mngr, state) is state
    mngr.close()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="learning_rate"):
        train.make_optimizer(learning_rate=0.0)
    with pytest.raises(ValueError, match="total_steps"):
        train.make_optimizer(learning_rate=1e-3, decay="cosine")
    with pytest.raises(ValueError, match="ema_decay"):
        train.make_ddpm_step(TinyEps(), train.make_optimizer(learning_rate=1e-3),
                             linear_schedule(), key=jax.random.key(0), ema_decay=1.5)


_DP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from diffjax import data, train
    from diffjax.diffusion import linear_schedule
    from tests.test_train import TinyEps
    module = TinyEps()
    v = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
    tx = train.make_optimizer(learning_rate=1e-3)
    out = {}
    for n in (1, 8):
        mesh = train.make_mesh(n)
        step = train.make_ddpm_step(module, tx, linear_schedule(), key=jax.random.key(1),
                                    ema_decay=0.9)
        state = train.replicate(train.init_state(v, tx), mesh)
        it = data.train_batches("digits", "train", 32, key=jax.random.key(2))
        losses = []
        for _ in range(3):
            b = train.shard_batch(next(it), mesh)
            if n == 8:
                assert len(b.images.sharding.device_set) == 8
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        assert state.params["Conv_0"]["kernel"].sharding.is_fully_replicated
        out[n] = (np.array(losses), jax.tree.map(np.asarray, state.params))
    np.testing.assert_allclose(out[1][0], out[8][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[8][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    print("DP-OK", out[1][0], out[8][0])
""")


def test_data_parallel_matches_one_device():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    res = subprocess.run([sys.executable, "-c", _DP_SCRIPT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DP-OK" in res.stdout


CONFIGS = ["digits_ddpm", "digits_classifier", "cifar10_ddpm", "cifar10_classifier"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "quick"])
def test_configs_build(name, arg):
    import importlib

    from diffjax import models

    cfg = importlib.import_module(f"experiments.configs.{name}").get_config(arg)
    assert cfg.dataset in data.NAMES
    models.build(cfg.model.kind, cfg.model.config.to_dict())
    if arg == "quick":
        assert cfg.train.steps <= 20
    with pytest.raises(ValueError, match="quick"):
        importlib.import_module(f"experiments.configs.{name}").get_config("bogus")


def _script(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", f"experiments.{module}", *args], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_scripts_train_resume_and_export(tmp_path):
    """Both scripts end to end on tiny settings: train, resume, export, load back."""
    from diffjax import pretrained

    tiny = ["--config.model.config.ch=8", "--config.model.config.num_groups=4"]
    ddpm = ["--config=experiments/configs/digits_ddpm.py:quick", f"--workdir={tmp_path}/d",
            "--config.train.steps=2", "--progress=false", *tiny]
    clf = ["--config=experiments/configs/digits_classifier.py:quick",
           f"--workdir={tmp_path}/c", "--config.train.steps=3", "--progress=false",
           "--config.train.warmup_steps=1",
           "--config.model.config.dense=8",
           f"--export_dir={tmp_path}/clf"]
    p1, p2 = _script("train_diffusion", *ddpm), _script("train_classifier", *clf)
    rc, out, err = _finish(p1)
    assert rc == 0, err[-2000:]
    # Resume to step 4 and export, with the purification figure and a sample grid.
    p1 = _script("train_diffusion", *ddpm[:2], "--config.train.steps=4", *ddpm[3:],
                 f"--export_dir={tmp_path}/ddpm", "--config.eval.classifier=digits_classifier",
                 "--config.eval.num_examples=8", "--config.eval.batch_size=8",
                 "--config.eval.methods=ddpm", "--config.eval.num_steps=2",
                 f"--config.eval.samples_png={tmp_path}/s.png", "--config.eval.num_samples=4",
                 "--config.eval.sample_steps=2")
    rc2, out2, err2 = _finish(p2)
    assert rc2 == 0, err2[-2000:]
    rc, out, err = _finish(p1)
    assert rc == 0, err[-2000:]
    assert "resuming from step 2" in out
    m = pretrained.load(tmp_path / "ddpm")
    metrics = m.meta["meta"]["metrics"]
    assert metrics["steps"] == 4 and "--export_dir=" in m.meta["meta"]["command"]
    assert 0.0 <= metrics["purification"]["purified_accuracy"]["ddpm"] <= 1.0
    assert (tmp_path / "s.png").stat().st_size > 0
    c = pretrained.load(tmp_path / "clf")
    assert c.meta["meta"]["metrics"]["eval_examples"] == 64
    meta = c.meta["meta"]
    assert meta["command"].startswith("python -m experiments.train_classifier --config=")
    assert meta["seed"] == 0 and meta["train"]["steps"] == 3 and meta["params"] == "ema"
    assert c.logits_fn(jnp.zeros((2, 8, 8, 1))).shape == (2, 10)


def test_scripts_bad_flags_one_line_error(tmp_path):
    procs = [
        _script("train_diffusion", "--config=experiments/configs/nope.py", f"--workdir={tmp_path}"),
        _script("train_classifier", "--config=experiments/configs/digits_classifier.py:quick",
                f"--workdir={tmp_path}", "--config.train.stepz=3"),
        _script("train_classifier", "--config=experiments/configs/digits_classifier.py:quick"),
        _script("train_classifier", f"--workdir={tmp_path}"),
        _script("train_purifier", f"--workdir={tmp_path}", "extra"),
    ]
    expected = ["nope.py", "stepz", "--workdir",
                "--config is required, e.g. --config=experiments/configs/digits_classifier.py",
                "unexpected arguments ['extra']"]
    for p, expect in zip(procs, expected, strict=True):
        rc, out, err = _finish(p, 120)
        assert rc == 1
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], err
