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
than the others; on a CPU compiling another program costs more than padding). With
`shared_oracle`, PGD and APGD run on the one gradient program of the defense
(`engine.advance_shared`) instead of one per attack.

Several processes (multi-host): each process passes only the examples it owns and packs
its own active examples into its rows (`batch_size / process count`) of every global
batch; the processes agree on the number of batches of every round (a process with fewer
active examples contributes padding rows), so every collective program runs the same
number of times everywhere. Results come back for the caller's own examples.

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

__all__ = ["Cascade", "run_cascade", "ATTACK_NAMES"]

# The attacks a cascade spec may name (`Cascade.from_spec`).
ATTACK_NAMES = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square")


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
      shared_oracle: run the attacks that can (PGD, APGD) on a purifier on the shared
        gradient oracle (`engine.advance_shared`): one compiled gradient program for
        every attack, protocol and EOT count of a defense structure and batch shape,
        instead of one per attack (a CPU compiles each for seconds); results agree with
        the in-program attacks to float32 rounding. An undefended classifier keeps the
        in-program attacks (it compiles in a moment; its cheap iterations run faster in
        one program).
    """

    attacks: tuple
    chunk: int | None = None
    early_exit: bool = True
    bucket_sizes: tuple = ()
    shared_oracle: bool = False

    def __post_init__(self):
        if not self.attacks:
            _checks.fail("cascade.attacks", "at least one attack config", "none")
        for a in self.attacks:
            if not (hasattr(a, "init") and hasattr(a, "step") and hasattr(a, "total_iterations")):
                _checks.fail("cascade.attacks", "attack configs (PGDConfig, APGDConfig, ...)",
                             type(a).__name__)
        if self.chunk is not None:
            _checks.check_int(self.chunk, "cascade.chunk", lo=1)

    @classmethod
    def from_spec(cls, spec, *, norm: str = "linf", eps: float, steps: int,
                  step_size: float | None = None, gradient=None, targets: int = 3,
                  restarts: int = 1, loss: str = "ce", random_start: bool = True,
                  queries: int | None = None, chunk: int | None = None,
                  early_exit: bool = True, shared_oracle: bool = False) -> Cascade:
        """A cascade from names: "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square".

        Args:
          spec: a comma-separated string or a sequence of names, run in that order.
          norm, eps, steps, step_size, gradient, loss, random_start: the attacks'
            settings (`step_size` and `loss` for PGD; `gradient` a `Gradient`).
          targets: APGD-T's target classes (ranks 2 .. targets + 1; AutoAttack: 9).
          restarts: random starts of each APGD (AutoAttack: 1 for APGD-CE, 1 per target).
          queries: Square's query budget (default `steps`).
          chunk, early_exit, shared_oracle: as in `Cascade`.

        Returns:
          The `Cascade`.
        """
        from diffjax.attacks import apgd, gradients, pgd

        names = [v.strip() for v in spec.split(",") if v.strip()] if isinstance(
            spec, str) else list(spec)
        if not names:
            _checks.fail("spec", "attack names, e.g. 'apgd-ce,apgd-t'", repr(spec))
        gradient = gradients.Gradient() if gradient is None else gradient
        out = []
        for name in names:
            _checks.check_choice(name, "attack", ATTACK_NAMES)
            if name == "pgd":
                out.append(pgd.PGDConfig(norm=norm, eps=eps, steps=steps, loss=loss,
                                         step_size=eps / 4 if step_size is None else step_size,
                                         random_start=random_start, gradient=gradient))
            elif name == "square":
                from diffjax.attacks import square

                out.append(square.SquareConfig(norm=norm, eps=eps,
                                               steps=queries or steps))
            else:
                kind = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr_targeted"}[name]
                ranks = range(2, targets + 2) if name == "apgd-t" else [2]
                for rank in ranks:
                    for r in range(restarts):
                        out.append(apgd.APGDConfig(norm=norm, eps=eps, steps=steps, loss=kind,
                                                   gradient=gradient, restart=r,
                                                   target_rank=rank))
        return cls(tuple(out), chunk=chunk, early_exit=early_exit,
                   shared_oracle=shared_oracle)


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


def _local(tree):
    return jax.tree.map(parallel.local_rows, tree)


def _save(store, name, rows: dict, meta: dict | None = None):
    """Saves every process's `rows` (per-example arrays) and `meta` (process 0 writes)."""
    out = {k: parallel.gather_rows(v) for k, v in rows.items()}
    out.update({f"meta_{k}": np.asarray(v) for k, v in (meta or {}).items()})
    store.save(name, out)


def _load(store, name, m: int):
    """`(rows, meta)`: this process's `m` rows of a saved tree and its meta, or None."""
    got = store.load(name)
    if got is None:
        return None
    sizes = parallel.gather_rows(np.asarray([m]))
    start = int(sizes[:jax.process_index()].sum())
    rows = {k: v[start:start + m] for k, v in got.items() if not k.startswith("meta_")}
    meta = {k[5:]: v for k, v in got.items() if k.startswith("meta_")}
    return rows, meta


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
      some attack of the cascade, by its criterion; under fresh draws the last attack's is
      its own success under its random draws, since no attack follows that would need the
      protocol's verdict), ``fooled_by`` `[N]` int (the index of
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
    if key_data.shape[0] != n or len(y) != n:  # (this process's examples)
        _checks.fail("example_keys", f"one key and one label per example ({n})",
                     f"{key_data.shape[0]} keys, {len(y)} labels")
    batch_size = _checks.check_int(batch_size, "batch_size", lo=1)
    probe = np.zeros((1, *x.shape[1:]), np.float32)
    for a in cascade.attacks:  # the protocol against every attack's estimator
        _, protocol = engine.validate(defense, probe, np.zeros(1, np.int32),
                                      jax.random.wrap_key_data(np.zeros((1, 2), np.uint32)),
                                      protocol, getattr(a, "gradient", None), a)
    _checks.check_images(x, "x")
    _checks.check_labels(y, n, defense.num_classes(probe), "y")
    mesh = parallel.data_mesh() if mesh is None else mesh
    eps_all = None if eps is None else np.broadcast_to(np.asarray(eps, np.float32), (n,))
    log = log or (lambda _m: None)

    x_adv = x.copy()
    fooled_by = np.full(n, -1, np.int64)
    iterations = np.zeros(n, np.int64)
    seconds = np.zeros(len(cascade.attacks))
    robust = np.ones(n, bool)
    for s, attack in enumerate(cascade.attacks):
        done = _load(store, f"attack{s}", n) if store is not None else None
        if done is not None:
            done = done[0]
            x_adv, fooled_by, iterations = done["x_adv"], done["fooled_by"], done["iterations"]
            robust = fooled_by < 0
            continue
        t0 = time.time()
        rows = np.flatnonzero(robust)
        if parallel.agree_max(len(rows)):
            last = s == len(cascade.attacks) - 1
            out = _run_one(defense, x, y, key_data, rows, attack, protocol, batch_size, mesh,
                           cascade, store, f"attack{s}", log, eps_all, verdict=not last)
            won = rows[out["fooled"]]
            x_adv[won] = out["x_adv"][out["fooled"]]
            # Keep the last attack's points for the examples nobody fooled (its loss optimum).
            if last:
                x_adv[rows[~out["fooled"]]] = out["x_adv"][~out["fooled"]]
            fooled_by[won] = s
            iterations[rows] += out["iterations"]
            robust[won] = False
        seconds[s] = time.time() - t0
        if store is not None:
            _save(store, f"attack{s}", {"x_adv": x_adv, "fooled_by": fooled_by,
                                        "iterations": iterations})
        log(f"attack {s + 1}/{len(cascade.attacks)} ({type(attack).__name__}): "
            f"{int((fooled_by == s).sum())} of {len(rows)} fooled, {int(robust.sum())} left")
    delta = (x_adv - x).reshape(n, -1)
    return {"x_adv": x_adv, "success": fooled_by >= 0, "fooled_by": fooled_by,
            "iterations": iterations, "linf": np.abs(delta).max(axis=1),
            "l2": np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32),
            "seconds": seconds}


def _run_one(defense, x, y, key_data, rows, attack, protocol, batch_size, mesh, cascade,
             store, name, log, eps_all, verdict: bool = True) -> dict:
    """One attack over `rows`: rounds of `chunk` iterations with early exit; returns the
    per-row `x_adv`, `fooled` (the cascade's criterion; with `verdict=False`, under fresh
    draws, the attack's own success: no evaluation is run when no attack follows) and
    `iterations`."""
    m = len(rows)
    steps = int(attack.total_iterations)
    chunk = steps if cascade.chunk is None else min(int(cascade.chunk), steps)
    drop = cascade.early_exit and protocol.attack_stream == "realization"
    # The shared oracle saves compiling a gradient through the purifier; a bare classifier
    # compiles in a moment, and its cheap iterations run faster in one program.
    shared = (cascade.shared_oracle and engine.shares_oracle(attack)
              and not defense.is_undefended)
    static, eps0, step0, options = engine.static_and_budget(attack)
    local = parallel.local_batch_size(batch_size)
    buckets = cascade.bucket_sizes if jax.process_count() == 1 else ()

    def pack(which):
        """Local batches of `which`, as many as the process with the most (agreed)."""
        out = _pack(which, local, buckets)
        total = parallel.agree_max(len(out))
        return out + [np.full(local, -1, np.int64)] * (total - len(out))

    def placed(idx):
        """The batch of rows `idx` (-1: padding) on the mesh: (ctx, x, y)."""
        if m:
            g = rows[_rows(np.arange(m), idx)]
            xb, yb, kb = x[g], y[g], key_data[g]
            eb = None if eps_all is None else eps_all[g]
        else:  # this process owns no example of the stage: padding only
            xb = np.zeros((len(idx), *x.shape[1:]), np.float32)
            yb, kb = np.zeros(len(idx), np.int32), np.zeros((len(idx), 2), np.uint32)
            eb = None if eps_all is None else np.zeros(len(idx), np.float32)
        xs, ys, ks, _ = parallel.put_local(mesh, xb, yb, jax.random.wrap_key_data(kb),
                                           rows=len(idx))
        eps = eps0 if eb is None else parallel.put_local(mesh, eb, rows=len(idx))[0]
        return engine.make_context(defense, ks, eps, step0, xs.shape[0], options), xs, ys

    def put_state(idx):
        if not m:
            return jax.tree.map(lambda a: parallel.put_local(
                mesh, np.zeros((len(idx), *a.shape[1:]), a.dtype), rows=len(idx))[0], state)
        return jax.tree.map(lambda a: parallel.put_local(mesh, a, rows=len(idx))[0],
                            _rows(state, idx))

    saved = _load(store, f"{name}_state", m) if store is not None else None
    if saved is not None:
        state, meta = saved
        start = int(meta["start"][0])
        active, iters = state.pop("_active").astype(bool), state.pop("_iters")
    else:
        state, start, iters, active = None, 0, np.zeros(m, np.int64), np.ones(m, bool)
        for idx in pack(np.arange(m)):
            ctx, xs, ys = placed(idx)
            a, p = engine.for_init(static, protocol)
            host = _local(engine.init_program(ctx, xs, ys, attack=a, protocol=p))
            if state is None:
                state = jax.tree.map(lambda a: np.zeros((m, *a.shape[1:]), a.dtype), host)
            _scatter(state, idx, host)

    while start < steps:
        live = np.flatnonzero(active)
        if not parallel.agree_max(len(live)):
            break
        t0 = time.time()
        for idx in pack(live):
            ctx, xs, ys = placed(idx)
            if shared:
                st, fooled = engine.advance_shared(ctx, xs, ys, put_state(idx), start,
                                                   min(start + chunk, steps), attack=static,
                                                   protocol=protocol)
            else:
                st, fooled = engine.advance_program(ctx, xs, ys, put_state(idx),
                                                    jnp.uint32(start), attack=static,
                                                    protocol=protocol, length=chunk)
            _scatter(state, idx, _local(st))
            iters[idx[idx >= 0]] += min(chunk, steps - start)
            if drop:
                f = parallel.local_rows(fooled)[:len(idx)]
                active[idx[(idx >= 0) & f]] = False
        start += chunk
        if store is not None:
            _save(store, f"{name}_state", {**state, "_active": active, "_iters": iters},
                  {"start": np.array([start])})
        log(f"{type(attack).__name__} iterations {min(start, steps)}/{steps}: "
            f"{parallel.agree_max(int(active.sum()))} examples still attacked "
            f"({time.time() - t0:.1f} s)")

    x_out = np.zeros((m, *x.shape[1:]), np.float32)
    fooled_out = np.zeros(m, bool)
    for idx in pack(np.arange(m)):
        ctx, xs, ys = placed(idx)
        a, p = engine.for_finish(static, protocol)
        res = engine.finish_program(ctx, xs, ys, put_state(idx), attack=a, protocol=p)
        k = len(idx)
        xa = parallel.local_rows(res.x_adv)[:k]
        if protocol.attack_stream == "realization" or not verdict:
            won = parallel.local_rows(res.success)[:k]
        else:  # the protocol's verdict: wrong under its evaluation draw 0
            ev = evaluation.evaluate_program(defense, xs, res.x_adv, ys, ctx.example_keys,
                                             evals=(protocol,))
            won = ~parallel.local_rows(ev["protocols"][protocol.name]["adv_correct"])[:k]
        keep = idx >= 0
        x_out[idx[keep]] = xa[keep]
        fooled_out[idx[keep]] = won[keep]
    if store is not None:
        store.delete(f"{name}_state")
    return {"x_adv": x_out, "fooled": fooled_out, "iterations": iters}
