"""Sharded over 8 simulated CPU devices, the dataset evaluation equals the single-device one.

The 8-device run happens in a subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=8`
must be set before JAX starts); this process, with one CPU device, runs the same evaluation.
The defense is a DDPM purifier (`diffjax.diffusion.purify`, 2 reverse steps) over a tiny
convolutional eps-model, then a convolutional classifier: per-example results must agree
bit for bit (they are written as JSON floats and compared exactly).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffjax import attacks, diffusion, parallel, randomness
from diffjax.defense import Defense, make_purifier

HERE = pathlib.Path(__file__).resolve().parent
CHILD = """
import sys
sys.path.insert(0, {here!r})
import jax
assert jax.local_device_count() == 8, jax.local_device_count()
from diffjax.attacks import evaluation
import test_attacks_sharding as t
orig, seen = evaluation.attack_and_evaluate_program, []
def spy(*args, **kwargs):
    res, ev = orig(*args, **kwargs)
    seen.append(len(res.success.sharding.device_set))
    return res, ev
evaluation.attack_and_evaluate_program = spy
t.evaluate({path!r}, {protocol!r})
assert seen and all(s == 8 for s in seen), seen
t.explicit_mesh_run({path!r} + ".explicit", {protocol!r})
"""


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))


def eps_fn(params, x_t, t):
    del t
    return jnp.tanh(conv(x_t, params))


def cnn_logits(params, x):
    w1, w2 = params
    h = jax.nn.relu(conv(x, w1))
    return jnp.mean(h, axis=(1, 2)) @ w2


def build(n=13):
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
    purifier = make_purifier(Partial(eps_fn, f(3, 3, 1, 1)), schedule=diffusion.linear_schedule(),
                             t_star=50, method="ddpm", num_steps=2)
    params = (f(3, 3, 1, 6), f(6, 3))
    defense = Defense(purifier, Partial(cnn_logits, params))
    x = rng.uniform(0.0, 1.0, size=(n, 4, 4, 1)).astype(np.float32)
    y = np.asarray(jnp.argmax(cnn_logits(params, jnp.asarray(x)), -1)).astype(np.int32)
    return defense, x, y


CFG = attacks.PGDConfig(norm="linf", eps=0.05, step_size=0.02, steps=2,
                        gradient=attacks.Gradient("full", eot=2))
KEY = 3


def evaluate(path, protocol):
    import test_attacks_evaluate as ev

    defense, x, y = build(13)
    # Batches of 8 (one example per device; the last batch 5 real rows + 3 masked ones).
    return attacks.evaluate_dataset(
        defense, ev.batches_of(x, y, 8), config=CFG, protocol=protocol,
        key=jax.random.key(KEY), out_path=str(path), eval_draws=2, progress=False)


def explicit_mesh_run(path, protocol):
    """attack_and_evaluate on inputs placed on an Explicit-axes mesh (jax.make_mesh's default),
    as `diffjax.parallel.shard_batch` places them; writes adv_correct per example id."""
    defense, x, y = build(13)
    mesh = parallel.data_mesh()
    keys = randomness.example_keys(jax.random.key(KEY), jnp.arange(13))
    xs, ys, ks, n = parallel.shard_batch(mesh, jnp.asarray(x), jnp.asarray(y), keys)
    out = attacks.attack_and_evaluate(defense, xs, ys, ks, config=CFG, protocol=protocol,
                                      eval_draws=2)
    assert out["adv_correct"].sharding.mesh == mesh  # results come back on the caller's mesh
    np.save(path + ".npy", np.asarray(out["adv_correct_mean"])[:n])


def test_eight_devices_equal_one(tmp_path):
    sys.path.insert(0, str(HERE))
    protocol = "independent"
    single, multi = tmp_path / "one.jsonl", tmp_path / "eight.jsonl"
    assert jax.local_device_count() == 1
    s1 = evaluate(single, protocol)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    code = CHILD.format(here=str(HERE), path=str(multi), protocol=protocol)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, r1 = attacks.read_results(str(single))
    _, r8 = attacks.read_results(str(multi))
    assert len(r1) == 13
    assert sorted(r1, key=lambda r: r["id"]) == sorted(r8, key=lambda r: r["id"])
    assert attacks.summarize(r8) == s1
    explicit = np.load(str(multi) + ".explicit.npy")
    np.testing.assert_array_equal(
        explicit, [r["adv_correct_mean"] for r in sorted(r1, key=lambda r: r["id"])])
