"""Sharded over 8 simulated CPU devices, a cascade with early exit equals the single-device run.

The 8-device run happens in a subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=8`
must be set before JAX starts); this process, with one CPU device, runs the same cascade.
The defense is a DDPM purifier (`diffjax.diffusion.make_purifier`, 2 reverse steps) over a
tiny convolutional eps-model, then a convolutional classifier: per-example results must
agree (adversarial examples to float tolerance, verdicts exactly). A second check places
inputs on an Explicit-axes mesh (`jax.make_mesh`'s default) for `attack_and_evaluate`.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from conftest import xla_flags
from jax.tree_util import Partial

from diffjax import attacks, diffusion, parallel, protocols, randomness
from diffjax.defense import Defense

HERE = pathlib.Path(__file__).resolve().parent
CHILD = """
import sys
sys.path.insert(0, {here!r})
import jax
import numpy as np
assert jax.local_device_count() == 8, jax.local_device_count()
import test_attacks_sharding as t
out = t.run()
np.savez({path!r}, **{{k: v for k, v in out.items() if k != "seconds"}})
t.explicit_mesh_run({path!r} + ".explicit.npy")
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
    return h.reshape(h.shape[0], -1) @ w2


def build(n=13):
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
    purifier = diffusion.make_purifier(Partial(eps_fn, f(3, 3, 1, 1)),
                                       schedule=diffusion.linear_schedule(), t_star=50,
                                       method="ddpm", num_steps=2)
    params = (f(3, 3, 1, 6), f(4 * 4 * 6, 3))
    defense = Defense(purifier, Partial(cnn_logits, params))
    x = rng.uniform(0.0, 1.0, size=(n, 4, 4, 1)).astype(np.float32)
    y = np.asarray(jnp.argmax(cnn_logits(params, jnp.asarray(x)), -1)).astype(np.int32)
    keys = randomness.example_keys(jax.random.key(3), jnp.arange(n))
    return defense, x, y, keys


CASCADE = attacks.Cascade((attacks.PGDConfig(eps=0.3, step_size=0.12, steps=2),
                           attacks.APGDConfig(eps=0.3, steps=4)), chunk=2)


def run():
    defense, x, y, keys = build(13)
    # Batches of 8: one example per device; repacked after each round of 2 iterations.
    return attacks.run_cascade(defense, x, y, keys, cascade=CASCADE, protocol="fixed",
                               batch_size=8)


def explicit_mesh_run(path):
    """attack_and_evaluate on inputs placed on an Explicit-axes mesh (jax.make_mesh's default),
    as `diffjax.parallel.shard_batch` places them; saves adv_correct_mean per example."""
    defense, x, y, keys = build(13)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    xs, ys, ks, n = parallel.shard_batch(mesh, jnp.asarray(x), jnp.asarray(y), keys)
    out = attacks.attack_and_evaluate(defense, xs, ys, ks, config=CASCADE.attacks[0],
                                      protocol=protocols.Transfer(eval_draws=2))
    assert out["adv_correct"].sharding.mesh == mesh  # results come back on the caller's mesh
    np.save(path, np.asarray(out["adv_correct_mean"])[:n])


def test_eight_devices_equal_one(tmp_path):
    sys.path.insert(0, str(HERE))
    assert jax.local_device_count() == 1
    one = run()
    multi = tmp_path / "eight.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    code = CHILD.format(here=str(HERE), path=str(multi))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(multi) as eight:
        for k in ("success", "fooled_by", "iterations"):
            np.testing.assert_array_equal(eight[k], one[k], err_msg=k)
        np.testing.assert_allclose(eight["x_adv"], one["x_adv"], atol=1e-5)
    # Both attacks fool some examples, and some examples stay robust.
    assert {-1, 0, 1} <= set(one["fooled_by"].tolist())
    explicit_mesh_run(str(tmp_path / "one.explicit.npy"))
    np.testing.assert_array_equal(np.load(str(multi) + ".explicit.npy"),
                                  np.load(str(tmp_path / "one.explicit.npy")))
