"""Cascades over a set of examples: early exit changes the cost, never the result; the
cascade keeps each example's first fooling point; an interrupted run resumes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffjax import attacks, protocols, randomness
from diffjax.attacks import APGDConfig, PGDConfig
from diffjax.attacks.cascade import Cascade, run_cascade
from diffjax.defense import Defense, undefended

H = W = 4
D = H * W


def noisy_purify(x, keys):
    n = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
    return jnp.clip(x + 0.08 * n, 0.0, 1.0)


def mlp_logits(params, x):
    w1, w2 = params
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def problem(n=13, seed=0):
    rng = np.random.default_rng(seed)
    params = (jnp.asarray(rng.normal(size=(D, 8)), jnp.float32),
              jnp.asarray(rng.normal(size=(8, 4)), jnp.float32))
    x = rng.uniform(0.0, 1.0, size=(n, H, W, 1)).astype(np.float32)
    y = np.asarray(jnp.argmax(mlp_logits(params, jnp.asarray(x)), -1)).astype(np.int32)
    keys = randomness.example_keys(jax.random.key(3), jnp.arange(n))
    return params, x, y, keys


PGD = PGDConfig(eps=0.08, step_size=0.02, steps=7)


@pytest.mark.parametrize("attack", [PGD, APGDConfig(eps=0.08, steps=7)])
def test_early_exit_gives_the_whole_runs_adversarial_examples(attack):
    params, x, y, keys = problem()
    defense = Defense(Partial(noisy_purify), Partial(mlp_logits, params))
    whole = attacks.engine.run(attack, defense, x, y, keys, protocols.Fixed())
    out = run_cascade(defense, x, y, keys, cascade=Cascade((attack,), chunk=2),
                      protocol=protocols.Fixed(), batch_size=4)
    np.testing.assert_array_equal(out["success"], np.asarray(whole.success))
    np.testing.assert_allclose(out["x_adv"], np.asarray(whole.x_adv), atol=1e-6)
    assert out["success"].any() and not out["success"].all()
    # The fooled examples left early: less work than every example's full run.
    full = attack.total_iterations  # APGD: steps + 1 gradients
    assert out["iterations"].sum() < 13 * full
    assert np.all(out["iterations"][~out["success"]] == full)


def test_no_example_fooled_by_the_last_iterate_escapes():
    params, x, y, keys = problem(24, seed=1)
    defense = Defense(Partial(noisy_purify), Partial(mlp_logits, params))
    last = attacks.pgd_attack(defense, x, y, keys, protocol="fixed",
                              config=PGDConfig(eps=0.08, step_size=0.03, steps=9,
                                               keep_fooling_point=False))
    out = run_cascade(defense, x, y, keys, protocol="fixed", batch_size=8,
                      cascade=Cascade((PGDConfig(eps=0.08, step_size=0.03, steps=9),), chunk=3))
    fooled_last = np.asarray(last.success)
    assert np.all(out["success"][fooled_last])  # a superset
    # ... and the kept fooling points really fool the realization.
    logits = defense.logits(out["x_adv"], protocols.realization(keys))
    np.testing.assert_array_equal(np.argmax(logits, -1) != y, out["success"])


def test_cascade_attacks_only_the_robust_and_keeps_the_first_fooling_point():
    params, x, y, keys = problem(16, seed=2)
    plain = undefended(Partial(mlp_logits, params))
    weak = PGDConfig(eps=0.03, step_size=0.01, steps=2)
    strong = APGDConfig(eps=0.08, steps=6, loss="dlr_targeted", target_rank=2)
    out = run_cascade(plain, x, y, keys, cascade=Cascade((weak, strong), chunk=2),
                      protocol="fixed", batch_size=8)
    first = run_cascade(plain, x, y, keys, cascade=Cascade((weak,)), protocol="fixed",
                        batch_size=8)
    won_first = first["fooled_by"] == 0
    np.testing.assert_array_equal(out["fooled_by"] == 0, won_first)
    np.testing.assert_allclose(out["x_adv"][won_first], first["x_adv"][won_first])
    assert (out["fooled_by"] == 1).any()  # the second attack added something ...
    # ... spent only on the examples the first one left.
    assert np.all(out["iterations"][won_first] == first["iterations"][won_first])
    assert np.all(out["linf"] <= 0.08 + 1e-6)


class DictStore:
    def __init__(self):
        self.data, self.saves = {}, 0

    def load(self, name):
        v = self.data.get(name)
        return None if v is None else {k: np.array(a) for k, a in v.items()}

    def save(self, name, arrays):
        self.data[name] = {k: np.array(a) for k, a in arrays.items()}
        self.saves += 1

    def delete(self, name):
        self.data.pop(name, None)


class Stop(Exception):
    pass


def test_an_interrupted_cascade_resumes_to_the_same_result():
    params, x, y, keys = problem(10, seed=3)
    defense = Defense(Partial(noisy_purify), Partial(mlp_logits, params))
    cascade = Cascade((PGD, APGDConfig(eps=0.08, steps=4)), chunk=2)
    whole = run_cascade(defense, x, y, keys, cascade=cascade, protocol="fixed", batch_size=4)
    store, lines = DictStore(), []

    def stop_after_three(msg):
        lines.append(msg)
        if len(lines) == 3:
            raise Stop

    with pytest.raises(Stop):
        run_cascade(defense, x, y, keys, cascade=cascade, protocol="fixed", batch_size=4,
                    store=store, log=stop_after_three)
    assert store.saves >= 3
    resumed = run_cascade(defense, x, y, keys, cascade=cascade, protocol="fixed",
                          batch_size=4, store=store)
    for k in ("x_adv", "success", "fooled_by", "iterations"):
        np.testing.assert_array_equal(resumed[k], whole[k])


def test_independent_keeps_every_example_and_judges_by_evaluation_draw_zero():
    params, x, y, keys = problem(12, seed=4)
    defense = Defense(Partial(noisy_purify), Partial(mlp_logits, params))
    p = protocols.Independent(eot=2, eval_draws=3)
    first = run_cascade(defense, x, y, keys, cascade=Cascade((PGD,), chunk=2), protocol=p,
                        batch_size=8)
    assert np.all(first["iterations"] == 7)  # fresh draws: no early exit
    both = run_cascade(defense, x, y, keys, cascade=Cascade((PGD, PGD), chunk=2), protocol=p,
                       batch_size=8)
    # Between attacks, "fooled" is the protocol's verdict: wrong under evaluation draw 0.
    ev = attacks.evaluate(defense, x, y, keys, first["x_adv"], under=(p,))
    np.testing.assert_array_equal(both["fooled_by"] == 0,
                                  ~np.asarray(ev["protocols"]["independent"]["adv_correct"]))
    assert np.all(both["iterations"][both["fooled_by"] == 0] == 7)


def test_apgd_variants_share_one_compiled_program():
    """Steps, restarts, target classes and the loss are traced: a whole AutoAttack-style
    cascade of APGD runs compiles one step program."""
    from diffjax.attacks import engine

    params, x, y, keys = problem(8, seed=5)
    plain = undefended(Partial(mlp_logits, params))
    run_cascade(plain, x, y, keys, protocol="fixed", batch_size=8,
                cascade=Cascade((APGDConfig(eps=0.05, steps=3),), chunk=2))
    before = engine.advance_program._cache_size()
    cascade = Cascade.from_spec("apgd-ce,apgd-dlr,apgd-t", eps=0.05, steps=5, targets=3,
                                restarts=2, chunk=2)
    assert len(cascade.attacks) == 2 + 2 + 3 * 2
    out = run_cascade(plain, x, y, keys, cascade=cascade, protocol="fixed", batch_size=8)
    assert engine.advance_program._cache_size() == before
    assert np.all(out["linf"] <= 0.05 + 1e-6)
