"""Dataset evaluation: JSONL per example, resume after an interrupt, padding, summary."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffjax import attacks
from diffjax.attacks import PGDConfig, evaluation
from diffjax.data import Batch
from diffjax.defense import Defense

H = W = 4
D = H * W
N = 11
CFG = PGDConfig(norm="linf", eps=0.05, step_size=0.02, steps=2)


def noisy_purify(x, keys):
    n = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
    return jnp.clip(x + 0.1 * n, 0.0, 1.0)


def mlp_logits(params, x):
    w1, w2 = params
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def build(n=N):
    rng = np.random.default_rng(0)
    params = (jnp.asarray(rng.normal(size=(D, 8)), jnp.float32),
              jnp.asarray(rng.normal(size=(8, 3)), jnp.float32))
    defense = Defense(Partial(noisy_purify), Partial(mlp_logits, params))
    x = rng.uniform(0.0, 1.0, size=(n, H, W, 1)).astype(np.float32)
    y = np.asarray(jnp.argmax(mlp_logits(params, jnp.asarray(x)), -1)).astype(np.int32)
    y[::4] = (y[::4] + 1) % 3  # some clean mistakes
    return defense, x, y


def batches_of(x, y, size):
    """Batches in diffjax.data.Batch form; the last one padded with masked-out rows."""
    out = []
    for i in range(0, len(x), size):
        n = min(size, len(x) - i)
        pad = size - n
        out.append(Batch(
            images=np.concatenate([x[i:i + n], np.zeros((pad,) + x.shape[1:], np.float32)]),
            labels=np.concatenate([y[i:i + n], np.zeros(pad, np.int32)]),
            ids=np.concatenate([np.arange(i, i + n), -np.ones(pad, np.int64)]).astype(np.int32),
            mask=np.arange(size) < n))
    return out


def run(defense, batches, path, protocol="transfer", **kw):
    return attacks.evaluate_dataset(defense, batches, config=CFG, protocol=protocol,
                                    key=jax.random.key(7), out_path=str(path), eval_draws=3,
                                    progress=False, **kw)


def by_id(path):
    meta, records = attacks.read_results(str(path))
    assert meta is not None
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an example was written twice"
    return {r["id"]: r for r in records}


class Interrupted(Exception):
    pass


def interrupt_after(batches, k):
    for i, b in enumerate(batches):
        if i == k:
            raise Interrupted
        yield b


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    defense, x, y = build()
    path = tmp_path_factory.mktemp("ref") / "full.jsonl"
    summary = run(defense, batches_of(x, y, 4), path)
    return defense, x, y, by_id(path), summary


def test_full_run_writes_every_real_example(reference):
    defense, x, y, records, summary = reference
    assert sorted(records) == list(range(N))  # padding rows (id -1) skipped
    assert summary["n"] == N
    assert summary["clean_correct"] == sum(r["clean_correct"] for r in records.values())
    assert summary["robust_correct"] == sum(r["adv_correct"] for r in records.values())
    assert summary["clean_accuracy"] == pytest.approx(summary["clean_correct"] / N)
    for r in records.values():
        assert r["label"] == int(y[r["id"]])
        assert r["linf"] <= CFG.eps + 1e-6
        assert r["adv_correct_worst"] <= r["adv_correct_mean"] <= 1.0


def test_interrupt_and_resume_gives_the_same_results(reference, tmp_path):
    defense, x, y, records, summary = reference
    path = tmp_path / "resumed.jsonl"
    with pytest.raises(Interrupted):
        run(defense, interrupt_after(batches_of(x, y, 4), 2), path)
    partial = by_id(path)
    assert sorted(partial) == list(range(8))  # the two finished batches were kept
    # A crash in the middle of a write leaves a partial line: it is dropped on resume.
    with open(path, "a") as f:
        f.write('{"id": 9, "label"')
    before = evaluation.attack_and_evaluate_program._cache_size()
    resumed = run(defense, batches_of(x, y, 4), path)
    assert evaluation.attack_and_evaluate_program._cache_size() - before <= 1
    assert by_id(path) == records
    assert resumed == summary
    # Running again over a finished file computes nothing new and changes nothing.
    again = run(defense, batches_of(x, y, 4), path)
    assert again == summary and by_id(path) == records


def test_results_do_not_depend_on_the_batch_size(reference, tmp_path):
    defense, x, y, records, _ = reference
    path = tmp_path / "bs3.jsonl"
    batches = batches_of(x, y, 3)[::-1]  # other batch size, other order
    run(defense, [b._asdict() for b in batches], path)  # dicts work too
    assert by_id(path) == records


def test_resume_with_other_settings_is_refused(reference, tmp_path):
    defense, x, y, _, _ = reference
    path = tmp_path / "meta.jsonl"
    run(defense, batches_of(x[:4], y[:4], 4), path)
    with pytest.raises(ValueError, match="out_path"):
        run(defense, batches_of(x, y, 4), path, protocol="fixed")
    first = json.loads(open(path).readline())
    assert first["meta"]["protocol"] == "transfer"


def test_bad_inputs(reference, tmp_path):
    defense, x, y, _, _ = reference
    with pytest.raises(ValueError, match="protocol"):
        run(defense, batches_of(x, y, 4), tmp_path / "a.jsonl", protocol="nope")
    with pytest.raises(ValueError, match="labels"):
        run(defense, batches_of(x, y + 3, 4), tmp_path / "b.jsonl")
    with pytest.raises(ValueError, match="batches"):
        run(defense, [{"images": x, "labels": y}], tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="keys_from"):
        run(defense, batches_of(x, y, 4), tmp_path / "d.jsonl", keys_from="hash")
