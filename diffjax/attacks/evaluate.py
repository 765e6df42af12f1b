"""Robust accuracy over a dataset: sharded, padded and masked, resumable, per example.

`evaluate_dataset` runs `attack_and_evaluate` batch by batch. Each batch is padded to a
multiple of the device count (and to the size of a full batch, so the program compiles
once), placed with a `NamedSharding` over a 1-D ``("data",)`` mesh on the batch axis, and
attacked; the per-example results of the real (masked-in) examples are appended to a
JSONL file as soon as the batch finishes (flushed and fsynced). On a restart, examples
whose id is already in the file are skipped, so an interrupted run resumes without redoing
or losing examples. Every random number is a function of the example key (from its id or
its clean content), so the results do not depend on the device count, the batch size or
the order of the batches.

One process: the batches are host arrays placed with `jax.device_put` on the local devices
(a multi-host run assembles global arrays itself, as `experiments.eval_robustness` does,
and calls `attack_and_evaluate`). Example ids must be unique across the dataset.

File format: the first line is ``{"meta": {...}}`` (protocol, attack config, evaluation
draws, key derivation, root key); a resume with different settings is refused. Every
other line is one example: ``{"id", "label", "clean_correct", "adv_correct",
"adv_correct_mean", "adv_correct_worst", "success", "linf", "l2"}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import _checks, parallel, protocols, randomness
from diffjax.attacks import engine, evaluation

__all__ = ["evaluate_dataset", "read_results", "summarize"]

_FIELDS = ("clean_correct", "adv_correct", "adv_correct_mean", "adv_correct_worst",
           "success", "linf", "l2")


def _field(batch, name, required=True):
    if isinstance(batch, Mapping):
        value = batch.get(name)
    else:
        value = getattr(batch, name, None)
    if value is None and required:
        _checks.fail("batches", f"batches with a field {name!r} (images, labels, ids, mask)",
                     type(batch).__name__)
    return value


def read_results(path) -> tuple[dict | None, list[dict]]:
    """Reads a results file: `(meta or None, [per-example records])`.

    A truncated last line (a crash in the middle of a write) is ignored.
    """
    meta, records = None, []
    if not os.path.exists(path):
        return meta, records
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            rec = json.loads(line)
            if "meta" in rec:
                meta = rec["meta"]
            else:
                records.append(rec)
    return meta, records


def summarize(records: Iterable[dict]) -> dict:
    """Counts and accuracies of per-example records (fractions in [0, 1]).

    Returns:
      `{n, clean_correct, robust_correct, robust_worst_correct, clean_accuracy,
      robust_accuracy, robust_accuracy_mean, robust_accuracy_worst, attack_success_rate}`;
      robust accuracy is under evaluation draw 0, `_mean` averages over the M draws and
      `_worst` needs all M draws correct.
    """
    records = list(records)
    n = len(records)
    clean = sum(bool(r["clean_correct"]) for r in records)
    robust = sum(bool(r["adv_correct"]) for r in records)
    worst = sum(bool(r["adv_correct_worst"]) for r in records)
    mean = sum(float(r["adv_correct_mean"]) for r in records)
    success = sum(bool(r["success"]) for r in records)
    frac = (lambda c: c / n) if n else (lambda c: float("nan"))
    return {
        "n": n, "clean_correct": clean, "robust_correct": robust,
        "robust_worst_correct": worst, "clean_accuracy": frac(clean),
        "robust_accuracy": frac(robust), "robust_accuracy_mean": frac(mean),
        "robust_accuracy_worst": frac(worst), "attack_success_rate": frac(success),
    }


def _open_for_append(path, meta):
    old_meta, records = read_results(path)
    if old_meta is not None and old_meta != meta:
        _checks.fail("out_path", f"a results file written with the same settings {meta}",
                     f"a file written with {old_meta}",
                     "write to a new out_path, or delete the old file")
    if os.path.exists(path):
        # Drop a partial last line so that appended records start on a fresh line.
        with open(path, "rb+") as f:
            data = f.read()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):
                f.truncate(cut)
    f = open(path, "a")  # noqa: SIM115 - closed by the caller
    if old_meta is None:
        f.write(json.dumps({"meta": meta}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return f, records


def _round_up(n, m):
    return -(-n // m) * m


def evaluate_dataset(defense, batches, *, config, protocol: str, key, out_path,
                     mesh=None, eval_draws: int = 1, keys_from: str = "ids",
                     progress: bool = True, total: int | None = None) -> dict:
    """Attacks and evaluates every example of `batches`, appending results to `out_path`.

    Args:
      defense: a `diffjax.defense.Defense`.
      batches: an iterable of batches with fields (attributes or dict keys) ``images``
        `[b,H,W,C]` in [0, 1], ``labels`` `[b]`, ``ids`` `[b]` (unique example ids) and
        optionally ``mask`` `[b]` (False for padding rows, which are skipped).
      config: a `PGDConfig` or an `APGDConfig`.
      protocol: "fixed", "independent" or "transfer" (`diffjax.attacks.protocols`).
      key: the root typed key; example keys are `example_keys(key, ids)` or, with
        `keys_from="content"`, `content_keys(key, images)` of the clean images.
      out_path: the JSONL results file (created, or resumed).
      mesh: a 1-D mesh with axis "data"; None uses all local devices.
      eval_draws: M, the number of evaluation draws per example.
      keys_from: "ids" or "content".
      progress: show a tqdm progress bar over batches.
      total: the number of batches for the progress bar (default `len(batches)`).

    Returns:
      The `summarize` dict over every example in the file (this run's and earlier ones).
    """
    from tqdm.auto import tqdm

    _checks.check_choice(keys_from, "keys_from", ("ids", "content"))
    eval_draws = _checks.check_int(eval_draws, "eval_draws", lo=1)
    protocol = protocols.as_protocol(protocol, eval_draws=eval_draws)
    if not hasattr(config, "init"):
        _checks.fail("config", "an attack config (PGDConfig, APGDConfig, ...)",
                     type(config).__name__)
    if mesh is None:
        mesh = parallel.data_mesh(jax.local_devices())
    if tuple(mesh.axis_names) != ("data",):
        _checks.fail("mesh", "a 1-D mesh with axis names ('data',)", mesh.axis_names)
    mesh = engine.auto_mesh(mesh)
    n_dev = mesh.devices.size
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    meta = {"protocol": protocol.name, "config": repr(config), "eval_draws": eval_draws,
            "keys_from": keys_from, "key": np.asarray(jax.random.key_data(key)).tolist()}
    defense_dev = jax.device_put(defense, replicated)

    f, records = _open_for_append(out_path, meta)
    done = {int(r["id"]) for r in records}
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    bar = tqdm(total=total, disable=not progress, unit="batch", desc=f"attack/{protocol}")
    padded_size, num_classes = 0, None
    try:
        for batch in batches:
            images = np.asarray(_field(batch, "images"), np.float32)
            labels = np.asarray(_field(batch, "labels"), np.int32)
            ids = np.asarray(_field(batch, "ids")).astype(np.int64)
            mask = _field(batch, "mask", required=False)
            mask = np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool)
            if not (len(images) == len(labels) == len(ids) == len(mask)):
                _checks.fail("batches", "images, labels, ids and mask of one length",
                             f"{len(images)}, {len(labels)}, {len(ids)}, {len(mask)}")
            keep = mask & np.array([int(i) not in done for i in ids], bool)
            bar.update(1)
            if not keep.any():
                continue
            x, y, bid = images[keep], labels[keep], ids[keep]
            _checks.check_images(x, "images")
            n = len(x)
            padded_size = max(padded_size, _round_up(len(ids), n_dev), _round_up(n, n_dev))
            pad = padded_size - n
            if keys_from == "ids":
                ek = randomness.example_keys(key, jnp.asarray(bid))
            else:
                ek = randomness.content_keys(key, jnp.asarray(x))
            ek_data = np.asarray(jax.random.key_data(ek))
            rep = np.zeros(pad, np.int64)  # pad with copies of the first example
            xp = np.concatenate([x, x[rep]])
            yp = np.concatenate([y, y[rep]])
            kp = jax.random.wrap_key_data(np.concatenate([ek_data, ek_data[rep]]))
            if num_classes is None:
                num_classes = defense.num_classes(jnp.asarray(x))
            _checks.check_labels(y, n, num_classes, "labels")
            out = evaluation.attack_and_evaluate(
                defense_dev, jax.device_put(xp, data_sharding),
                jax.device_put(yp, data_sharding), jax.device_put(kp, data_sharding),
                config=config, protocol=protocol)
            host = {k: np.asarray(out[k])[:n] for k in _FIELDS}
            lines = []
            for j in range(n):
                rec = {"id": int(bid[j]), "label": int(y[j])}
                for k in _FIELDS:
                    v = host[k][j]
                    rec[k] = bool(v) if v.dtype == bool else float(v)
                lines.append(json.dumps(rec) + "\n")
                records.append(rec)
                done.add(int(bid[j]))
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            s = summarize(records)
            bar.set_postfix(clean=f"{s['clean_accuracy']:.3f}",
                            robust=f"{s['robust_accuracy']:.3f}")
    finally:
        bar.close()
        f.close()
    return summarize(records)
