"""Attacks over a whole set of examples: cascades, early exit, and repacking into batches.

`run_cascade` runs a sequence of attacks (AutoAttack's recipe, Croce & Hein 2020: APGD-CE,
then APGD-T, ...) over every example of a set, each attack only on the examples that all
earlier ones failed to fool, and keeps, per example, the first adversarial example that
fooled it (the worst case over the cascade). Within one attack it works only where it
counts:

- **Early exit.** When the protocol attacks the example's realization (`Fixed`,
  `Transfer`), whether an iterate fools the example is deterministic, and the attacks keep
  their first fooling point (`PGDConfig.keep_fooling_point`, APGD's `x_best_adv`). The
  attack then runs in rounds of `chunk` iterations (`diffjax.attacks.engine.advance`);
  after each round the fooled examples leave and the rest are repacked into full batches,
  so the compute goes to the examples still robust. Chunked and whole runs give the same
  adversarial examples (iterations are keyed by their index; a fooled example would not
  have moved anyway), so early exit changes the cost, never the result (tested).
- **Between attacks** "still robust" is the protocol's own verdict: under a realization
  stream the attack's success (deterministic); under fresh draws (`Independent`),
  correct under the protocol's evaluation draw 0, the draw the reported accuracy uses.

Batches: the active examples are packed in order into batches of `batch_size` (the last
one padded with copies of a real row, masked out), placed on the data mesh
(`diffjax.parallel`), so every round of every attack runs one compiled program per
attack structure (plus one per extra size in `bucket_sizes`, for a last batch much smaller
than the others; on a CPU compiling another program costs more than padding).

Resuming: with a `store` (any object with `load(name) -> dict | None`,
`save(name, arrays)` and `delete(name)`, e.g. the study's work directory), the state of
every example is saved after every batch of every round and the results of every attack
when it ends, so an interrupted run continues where it stopped and reaches the same
result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks, parallel
from diffjax.attacks import engine, evaluation

__all__ = ["Cascade", "run_cascade"]


@dataclasses.dataclass(frozen=True)
class Cascade:
    """Attacks run in order, each on the examples still robust (module docstring).

    Attributes:
      attacks: the attack configs (`PGDConfig`, `APGDConfig`, `SquareConfig`, ...).
      chunk: iterations per round of early exit (None: each attack in one round).
      early_exit: drop fooled examples between rounds (only under a protocol that attacks
        the realization; under fresh draws every round keeps every example).
      bucket_sizes: extra batch sizes (smaller than the batch size) for the last batch of
        a round; each is one more compiled program.
    """

    attacks: tuple
    chunk: int | None = None
    early_exit: bool = True
    bucket_sizes: tuple = ()

    def __post_init__(self):
        if not self.attacks:
            _checks.fail("cascade.attacks", "at least one attack config", "none")
        for a in self.attacks:
            if not (hasattr(a, "init") and hasattr(a, "step") and hasattr(a, "steps")):
                _checks.fail("cascade.attacks", "attack configs (PGDConfig, APGDConfig, ...)",
                             type(a).__name__)
        if self.chunk is not None:
            _checks.check_int(self.chunk, "cascade.chunk", lo=1)


def _pack(active: np.ndarray, batch_size: int, buckets: Sequence[int]) -> list[np.ndarray]:
    """Rows of `active` in batches of `batch_size`; the last batch padded to the smallest
    bucket that holds it (padding rows repeat its last row; -1 marks them in `order`)."""
    out = []
    sizes = sorted({batch_size, *[b for b in buckets if b < batch_size]})
    for i in range(0, len(active), batch_size):
        rows = active[i:i + batch_size]
        size = next(s for s in sizes if s >= len(rows))
        out.append(np.concatenate([rows, np.full(size - len(rows), -1, rows.dtype)]))
    return out


def _rows(tree, idx):
    """`tree`'s rows `idx`, padding rows (-1) replaced by the first real one."""
    safe = np.where(idx < 0, idx[np.argmax(idx >= 0)] if (idx >= 0).any() else 0, idx)
    return jax.tree.map(lambda a: a[safe], tree)


def _scatter(tree, idx, values):
    """Writes the rows of `values` (device padding beyond `len(idx)` ignored) to `idx`."""
    keep = idx >= 0
    for dst, src in zip(jax.tree.leaves(tree), jax.tree.leaves(values), strict=True):
        dst[idx[keep]] = src[:len(idx)][keep]


def _to_host(tree):
    return jax.tree.map(parallel.to_host, tree)


def run_cascade(defense, x, y, example_keys, *, cascade: Cascade, protocol, batch_size: int,
                mesh=None, store=None, log: Callable[[str], None] | None = None,
                eps=None) -> dict:
    """Runs a cascade of attacks over every example (module docstring).

    Args:
      defense: a `diffjax.defense.Defense`.
      x: `[N,H,W,C]` clean images in [0, 1] (host array).
      y: `[N]` int labels.
      example_keys: `[N]` typed per-example keys (or their `[N, 2]` key data).
      cascade: the attacks (`Cascade`).
      protocol: a `diffjax.protocols.Protocol` or its name.
      batch_size: rows per batch (a multiple of the device count is best).
      mesh: the data mesh (`parallel.data_mesh()` by default).
      store: where to save progress (module docstring), or None.
      log: prints one progress line per round, or None.
      eps: overrides every attack's `eps`: a number or `[N]` per example.

    Returns:
      A dict of host arrays: ``x_adv`` `[N,H,W,C]`, ``success`` `[N]` bool (fooled by
      some attack of the cascade, by its criterion), ``fooled_by`` `[N]` int (the index of
      the first attack that fooled the example, -1 if none), ``iterations`` `[N]` int
      (iterations spent on the example, summed over the attacks), ``linf``/``l2`` `[N]`,
      and ``seconds`` (wall time per attack, computed in this call, `[len(attacks)]`).
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    n = len(x)
    if hasattr(example_keys, "dtype") and jnp.issubdtype(example_keys.dtype,
                                                         jax.dtypes.prng_key):
        key_data = np.asarray(jax.random.key_data(example_keys))
    else:
        key_data = np.asarray(example_keys, np.uint32)
    if key_data.shape[0] != n or len(y) != n:
        _checks.fail("example_keys", f"one key and one label per example ({n})",
                     f"{key_data.shape[0]} keys, {len(y)} labels")
    batch_size = _checks.check_int(batch_size, "batch_size", lo=1)
    for a in cascade.attacks:  # the inputs, the protocol against every attack's estimator
        _, protocol = engine.validate(defense, x[:1], y[:1], jax.random.wrap_key_data(
            key_data[:1]), protocol, getattr(a, "gradient", None))
    _checks.check_images(x, "x")
    _checks.check_labels(y, n, defense.num_classes(x[:1]), "y")
    mesh = parallel.data_mesh() if mesh is None else mesh
    eps_all = None if eps is None else np.broadcast_to(np.asarray(eps, np.float32), (n,))
    log = log or (lambda _m: None)

    x_adv = x.copy()
    fooled_by = np.full(n, -1, np.int64)
    iterations = np.zeros(n, np.int64)
    seconds = np.zeros(len(cascade.attacks))
    robust = np.ones(n, bool)
    for s, attack in enumerate(cascade.attacks):
        done = store.load(f"attack{s}") if store is not None else None
        if done is not None:
            x_adv, fooled_by, iterations = done["x_adv"], done["fooled_by"], done["iterations"]
            robust = fooled_by < 0
            continue
        t0 = time.time()
        rows = np.flatnonzero(robust)
        if len(rows):
            out = _run_one(defense, x, y, key_data, rows, attack, protocol, batch_size, mesh,
                           cascade, store, f"attack{s}", log, eps_all)
            won = rows[out["fooled"]]
            x_adv[won] = out["x_adv"][out["fooled"]]
            # Keep the last attack's points for the examples nobody fooled (its loss optimum).
            last = s == len(cascade.attacks) - 1
            if last:
                x_adv[rows[~out["fooled"]]] = out["x_adv"][~out["fooled"]]
            fooled_by[won] = s
            iterations[rows] += out["iterations"]
            robust[won] = False
        seconds[s] = time.time() - t0
        if store is not None:
            store.save(f"attack{s}", {"x_adv": x_adv, "fooled_by": fooled_by,
                                      "iterations": iterations})
        log(f"attack {s + 1}/{len(cascade.attacks)} ({type(attack).__name__}): "
            f"{int((fooled_by == s).sum())} of {len(rows)} fooled, {int(robust.sum())} left")
    delta = (x_adv - x).reshape(n, -1)
    return {"x_adv": x_adv, "success": fooled_by >= 0, "fooled_by": fooled_by,
            "iterations": iterations, "linf": np.abs(delta).max(axis=1),
            "l2": np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32),
            "seconds": seconds}


def _put(mesh, size, *arrays):
    return parallel.shard_batch(mesh, *arrays, rows=size)


def _run_one(defense, x, y, key_data, rows, attack, protocol, batch_size, mesh, cascade,
             store, name, log, eps_all) -> dict:
    """One attack over `rows`: rounds of `chunk` iterations with early exit; returns the
    per-row `x_adv`, `fooled` (the cascade's criterion) and `iterations`."""
    m = len(rows)
    steps = int(attack.steps)
    chunk = steps if cascade.chunk is None else min(int(cascade.chunk), steps)
    drop = cascade.early_exit and protocol.attack_stream == "realization"
    static, eps0, step0 = engine.static_and_budget(attack)
    batches = _pack(np.arange(m), batch_size, cascade.bucket_sizes)

    def placed(idx):
        """The batch of rows `idx` (-1: padding) on the mesh: (ctx, x, y)."""
        g = rows[_rows(np.arange(m), idx)]
        size = len(idx)
        xs, ys, ks, _ = _put(mesh, size, x[g], y[g], jax.random.wrap_key_data(key_data[g]))
        eps = eps0 if eps_all is None else _put(mesh, size, eps_all[g])[0]
        return engine.make_context(defense, ks, eps, step0, xs.shape[0]), xs, ys

    def put_state(idx):
        return jax.tree.map(lambda a: _put(mesh, len(idx), a)[0], _rows(state, idx))

    state = store.load(f"{name}_state") if store is not None else None
    if state is not None:
        start = int(state.pop("_start")[0])
        active, iters = state.pop("_active"), state.pop("_iters")
    else:
        state, start, iters, active = None, 0, np.zeros(m, np.int64), np.ones(m, bool)
        for idx in batches:
            ctx, xs, ys = placed(idx)
            host = _to_host(engine.init_program(ctx, xs, ys, attack=static, protocol=protocol))
            if state is None:
                state = jax.tree.map(lambda a: np.zeros((m, *a.shape[1:]), a.dtype), host)
            _scatter(state, idx, host)

    while start < steps:
        live = np.flatnonzero(active)
        if not len(live):
            break
        t0 = time.time()
        for idx in _pack(live, batch_size, cascade.bucket_sizes):
            ctx, xs, ys = placed(idx)
            st, fooled = engine.advance_program(ctx, xs, ys, put_state(idx), jnp.uint32(start),
                                                attack=static, protocol=protocol, length=chunk)
            _scatter(state, idx, _to_host(st))
            real = idx[idx >= 0]
            iters[real] += min(chunk, steps - start)
            if drop:
                f = parallel.to_host(fooled)[:len(idx)]
                active[idx[(idx >= 0) & f]] = False
        start += chunk
        if store is not None:
            store.save(f"{name}_state", {**state, "_start": np.array([start]),
                                         "_active": active, "_iters": iters})
        log(f"{type(attack).__name__} iterations {min(start, steps)}/{steps}: "
            f"{int(active.sum())}/{m} examples still attacked ({time.time() - t0:.1f} s)")

    x_out = np.zeros_like(x[rows])
    fooled_out = np.zeros(m, bool)
    for idx in batches:
        ctx, xs, ys = placed(idx)
        res = engine.finish_program(ctx, xs, ys, put_state(idx), attack=static,
                                    protocol=protocol)
        k = len(idx)
        xa = parallel.to_host(res.x_adv)[:k]
        if protocol.attack_stream == "realization":
            won = parallel.to_host(res.success)[:k]
        else:  # the protocol's verdict: wrong under its evaluation draw 0
            ev = evaluation.evaluate_program(defense, xs, res.x_adv, ys, ctx.example_keys,
                                             evals=(protocol,))
            won = ~parallel.to_host(ev["protocols"][protocol.name]["adv_correct"])[:k]
        keep = idx >= 0
        x_out[idx[keep]] = xa[keep]
        fooled_out[idx[keep]] = won[keep]
    if store is not None:
        store.delete(f"{name}_state")
    return {"x_adv": x_out, "fooled": fooled_out, "iterations": iters}
