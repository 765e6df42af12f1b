"""The shared gradient oracle: one compiled program answers every attack, protocol, EOT
count and estimator of a defense, and what it answers agrees with the in-program attacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial
from test_attacks_cascade import mlp_logits as logits_fn
from test_attacks_cascade import noisy_purify

from diffjax import attacks, parallel, protocols, randomness
from diffjax.attacks import APGDConfig, Gradient, PGDConfig, engine, gradients
from diffjax.attacks.cascade import Cascade, run_cascade
from diffjax.defense import Defense

H = W = 4
D = H * W


def problem(n=12, seed=0):
    rng = np.random.default_rng(seed)
    params = (jnp.asarray(rng.normal(size=(D, 8)), jnp.float32),
              jnp.asarray(rng.normal(size=(8, 5)), jnp.float32))
    x = rng.uniform(0.0, 1.0, size=(n, H, W, 1)).astype(np.float32)
    defense = Defense(Partial(noisy_purify), Partial(logits_fn, params))
    keys = randomness.example_keys(jax.random.key(3), jnp.arange(n))
    y = np.asarray(jnp.argmax(defense.logits(jnp.asarray(x), protocols.realization(keys)),
                              -1)).astype(np.int32)
    return defense, x, y, keys


@pytest.mark.parametrize("protocol", [protocols.Fixed(), protocols.Independent(eot=2)],
                         ids=["fixed", "independent_eot2"])
def test_shared_cascade_agrees_with_the_in_program_attacks(protocol):
    defense, x, y, keys = problem()
    attack = (PGDConfig(eps=0.1, step_size=0.03, steps=5),
              APGDConfig(eps=0.1, steps=5),
              APGDConfig(eps=0.1, steps=5, loss="dlr_targeted", target_rank=2))
    out = {shared: run_cascade(defense, x, y, keys, protocol=protocol, batch_size=4,
                               cascade=Cascade(attack, chunk=2, shared_oracle=shared))
           for shared in (False, True)}
    np.testing.assert_array_equal(out[True]["success"], out[False]["success"])
    np.testing.assert_array_equal(out[True]["fooled_by"], out[False]["fooled_by"])
    np.testing.assert_array_equal(out[True]["iterations"], out[False]["iterations"])
    np.testing.assert_allclose(out[True]["x_adv"], out[False]["x_adv"], atol=1e-5)
    assert out[True]["success"].any() and not out[True]["success"].all()


def test_one_program_for_every_protocol_estimator_and_measurement():
    """The realization attack, EOT-2 under fresh draws, BPDA, the gradient correlation and
    a Jacobian row all run the one compiled oracle (per defense structure and batch)."""
    defense, x, y, keys = problem(8, seed=1)
    # On the data mesh, as the cascade places its batches (and a study its own).
    xs, ys, ks, _ = parallel.shard_batch(parallel.data_mesh(), x, y, keys)
    apgd = APGDConfig(eps=0.1, steps=3)
    uses = [
        lambda: run_cascade(defense, x, y, keys, protocol="fixed", batch_size=8,
                            cascade=Cascade((apgd,), shared_oracle=True)),
        lambda: run_cascade(defense, x, y, keys, protocol=protocols.Independent(eot=2),
                            batch_size=8, cascade=Cascade((apgd,), shared_oracle=True)),
        lambda: run_cascade(defense, x, y, keys, protocol="fixed", batch_size=8,
                            cascade=Cascade((APGDConfig(eps=0.1, steps=3,
                                                        gradient=Gradient("bpda")),),
                                            shared_oracle=True)),
        lambda: attacks.gradient_correlation(defense, xs, ys, ks, eot=3,
                                             key=jax.random.key(1), shared_oracle=True),
        lambda: gradients.oracle_call(defense, xs, ys, ks, ys, jnp.int32(0),
                                      jnp.ones_like(xs), jnp.float32(0.0)),
    ]
    uses[0]()
    size = gradients.oracle_program._cache_size()
    for use in uses[1:]:
        jax.block_until_ready(use())
    assert gradients.oracle_program._cache_size() == size
    # ... and the variants share their init and finish programs too.
    before = engine.init_program._cache_size(), engine.finish_program._cache_size()
    for protocol, grad in ((protocols.Fixed(), Gradient()),
                           (protocols.Independent(eot=3), Gradient()),
                           (protocols.Fixed(), Gradient("bpda"))):
        a = APGDConfig(eps=0.1, steps=3, gradient=grad)
        run_cascade(defense, x, y, keys, protocol=protocol, batch_size=8,
                    cascade=Cascade((a,), shared_oracle=True))
    assert engine.init_program._cache_size() <= before[0] + 1
    assert engine.finish_program._cache_size() <= before[1] + 1


def test_bpda_and_the_loss_are_data_and_match_the_in_program_gradients():
    defense, x, y, keys = problem(6, seed=2)
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    real = protocols.realization(keys)
    zero = jnp.zeros_like(xs)
    target = jnp.asarray((y + 1) % 5, jnp.int32)
    for kind in ("full", "bpda"):
        for name in ("ce", "margin", "dlr", "dlr_targeted"):
            got = gradients.oracle_call(defense, xs, ys, real, target,
                                        jnp.int32(gradients.LOSSES.index(name)), zero,
                                        jnp.float32(1.0), kind=kind)
            want = gradients.loss_and_grad(defense, xs, ys, real[None], loss=name,
                                           gradient=Gradient(kind), target=target)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    full = gradients.oracle_call(defense, xs, ys, real, ys, jnp.int32(0), zero,
                                 jnp.float32(1.0), kind="full")
    bpda = gradients.oracle_call(defense, xs, ys, real, ys, jnp.int32(0), zero,
                                 jnp.float32(1.0), kind="bpda")
    np.testing.assert_array_equal(full[2], bpda[2])  # the forward value is untouched
    assert not np.allclose(full[1], bpda[1])
    with pytest.raises(ValueError, match="kind: expected one of"):
        gradients.oracle_call(defense, xs, ys, real, ys, jnp.int32(0), zero,
                              jnp.float32(1.0), kind="identity")


def test_the_cotangent_gives_the_purifiers_jacobian_rows():
    defense, x, _, keys = problem(3, seed=3)
    real = protocols.realization(keys)
    ex = 1  # the Jacobian of example 1 under its realization, one row per basis vector
    xs = jnp.repeat(jnp.asarray(x[ex:ex + 1]), D, axis=0)
    ks = jnp.repeat(real[ex:ex + 1], D, axis=0)
    basis = jnp.eye(D, dtype=jnp.float32).reshape(D, H, W, 1)
    zeros = jnp.zeros(D, jnp.int32)
    _, rows, _ = gradients.oracle_call(defense, xs, zeros, ks, zeros, jnp.int32(0), basis,
                                       jnp.float32(0.0))
    want = jax.jacrev(lambda v: defense.purify(v[None], real[ex:ex + 1])[0].ravel())(
        jnp.asarray(x[ex]))
    np.testing.assert_allclose(np.asarray(rows).reshape(D, D), want.reshape(D, D),
                               atol=1e-6)


def test_shared_correlation_agrees():
    defense, x, y, keys = problem(8, seed=4)
    kw = dict(eot=4, key=jax.random.key(7))
    a = attacks.gradient_correlation(defense, jnp.asarray(x), jnp.asarray(y), keys, **kw)
    b = attacks.gradient_correlation(defense, jnp.asarray(x), jnp.asarray(y), keys,
                                     shared_oracle=True, **kw)
    np.testing.assert_allclose(b, a, atol=1e-5)
