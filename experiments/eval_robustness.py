r"""Robust accuracy of a defended model under a randomness protocol, over a dataset split.

    python -m experiments.eval_robustness --config=experiments/configs/eval_digits.py \
        --workdir=workdir/eval [--config.protocols=fixed,independent,transfer] \
        [--config.methods=ddpm,ddim,none] [--config.attack.steps=20] [--distributed]

For each purifier method (``none``: the undefended classifier) and each protocol
(`diffjax.attacks.protocols`: ``fixed``, ``independent`` with EOT-K, ``transfer``), the
attack (PGD or APGD, full or BPDA gradients) runs over every example of the split and
writes, on process 0 only:

- ``WORKDIR/robustness/<method>_<protocol>.jsonl``: the format of
  `diffjax.attacks.evaluate_dataset` (a meta line, then one line per example: id, label,
  clean_correct, adv_correct, adv_correct_mean/worst over `eval_draws` draws, success,
  linf, l2), readable with `diffjax.attacks.read_results` / `summarize`;
- ``WORKDIR/robustness/<method>_<protocol>/batch_<b>.npz`` (with ``save_adversarial``): the
  adversarial images, their ids and the key data of evaluation draw 0 (the purifier
  randomness the evaluation used), read by `experiments.distances`;
- ``WORKDIR/robustness/summary.json``: accuracies per method and protocol.

Scale-out: one 1-D ``("data",)`` mesh over all devices of all processes; each process reads
its own rows of every global batch (`diffjax.data.batches(process_index=...)`) and they are
assembled with `jax.make_array_from_process_local_data` (`parallel.shard_local_batch`).
Per-example keys are `example_keys(key(seed), id)`, so the numbers do not depend on the
device count or the batch size. A rerun with the same workdir skips finished batches.

Why the script has its own batch loop instead of calling `evaluate_dataset`: that loop
also saves the adversarial images (for `experiments.distances`) and runs with several
processes (it gathers results with `parallel.to_host` and only process 0 writes); the
per-example results are the same (tests/test_scripts.py checks it). The attack itself is
`diffjax.attacks.attack_and_evaluate` under one `jit` (its host-side value checks are done
here on each process's own rows instead, which works when the global array spans hosts).

The helpers below (`load_defense`, `local_batches`, `global_batch`, ...) are shared with
`experiments.distances` and `experiments.compression`, which reuse this module's flags.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import tempfile

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/eval_digits.py",
    "Evaluation config (experiments/configs/eval_{digits,cifar10,imagenet}.py).")
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumable).")
DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                "Call jax.distributed.initialize() (multi-host runs).")

_FIELDS = ("clean_correct", "adv_correct", "adv_correct_mean", "adv_correct_worst",
           "success", "linf", "l2")
UNDEFENDED = "none"


# ----------------------------------------------------------------------------- flags, setup


parse_flags = common.parse_flags  # distances.py and compression.py use it too


def as_list(value) -> list[str]:
    """A config list given as a tuple/list or a comma-separated string (for CLI overrides)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def setup(workdir: str | None, distributed: bool):
    """Initialises JAX (multi-host with `distributed`), checks the workdir; returns
    `(workdir Path, mesh)`: a 1-D Auto mesh over all devices of all processes."""

    from diffjax import parallel

    if not workdir:
        raise ValueError("--workdir: required; e.g. --workdir=workdir/eval")
    parallel.initialize(distributed)  # passes JAX_NUM_PROCESSES / JAX_PROCESS_ID too
    path = pathlib.Path(workdir).expanduser().resolve()
    if parallel.is_writer():
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PermissionError(f"--workdir: cannot write to {path} ({e.strerror}); choose "
                                  "a writable directory") from e
    # Auto axes: the attacks' EOT vmaps reshape the sharded batch axis (see attacks._sharding).
    mesh = parallel.data_mesh()
    return path, mesh


def validate(config) -> None:
    """One-line ValueErrors for a config that cannot run, before any work starts."""
    from diffjax import _checks, data, diffusion

    data.info(config.dataset)
    for m in as_list(config.methods):
        _checks.check_choice(m, "config.methods", (*diffusion.METHODS, UNDEFENDED))
    for p in as_list(config.protocols):
        _checks.check_choice(p, "config.protocols", ("fixed", "independent", "transfer"))
    a = config.attack
    _checks.check_choice(a.name, "config.attack.name", ("pgd", "apgd"))
    _checks.check_choice(a.norm, "config.attack.norm", ("linf", "l2"))
    _checks.check_number(a.eps, "config.attack.eps", lo=0.0,
                         hi=1.0 if a.norm == "linf" else None)
    _checks.check_number(a.step_size, "config.attack.step_size", lo=0.0, lo_open=True)
    _checks.check_int(a.steps, "config.attack.steps", lo=1)
    _checks.check_int(a.eot, "config.attack.eot", lo=1)
    _checks.check_choice(a.gradient, "config.attack.gradient", ("full", "bpda"))
    _checks.check_int(config.batch_size, "config.batch_size", lo=1)
    _checks.check_int(config.eval_draws, "config.eval_draws", lo=1)
    _checks.check_int(config.purifier.t_star, "config.purifier.t_star", lo=1)
    _checks.check_int(config.purifier.num_steps, "config.purifier.num_steps", lo=0,
                      hi=config.purifier.t_star)
    _checks.check_choice(config.keys_from, "config.keys_from", ("ids", "content"))
    if config.num_examples:
        _checks.check_int(config.num_examples, "config.num_examples", lo=1)


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class _Resized:
    """`x [B,h,w,C] -> resize(purify(resize(x, size)), (h, w))`: a purifier trained at
    another resolution (ImageNet: 224 classifier crops, the 256x256 guided diffusion;
    DiffPure's bilinear 224 -> 256 -> 224). Hashable: jit treats it as static."""

    size: int

    def __call__(self, purify_fn, x, keys):
        import jax

        b, h, w, c = x.shape
        up = jax.image.resize(x, (b, self.size, self.size, c), "bilinear")
        out = purify_fn(up, keys)
        return jax.numpy.clip(jax.image.resize(out, (b, h, w, c), "bilinear"), 0.0, 1.0)


@functools.cache
def _load(name: str):
    from diffjax import pretrained

    return pretrained.load(name)


def load_classifier(config):
    model = _load(config.classifier)
    if model.role != "classifier":
        raise ValueError(f"config.classifier: {config.classifier!r} is a {model.role}, "
                         "expected a classifier")
    return model


def load_diffusion(config):
    model = _load(config.diffusion)
    if model.role != "diffusion":
        raise ValueError(f"config.diffusion: {config.diffusion!r} is a {model.role}, "
                         "expected a diffusion model")
    return model


def check_models(config, methods) -> None:
    """Loads the classifier and (when a method purifies) the diffusion model up front, so
    a missing checkpoint directory fails before any data is read or work is done."""
    load_classifier(config)
    if any(m != UNDEFENDED for m in methods):
        load_diffusion(config)


def make_purify_fn(config, method: str, t_star: int | None = None):
    """The purifier `(x, keys) -> x'` of `method` at `t_star` (default the config's)."""
    from jax.tree_util import Partial

    from diffjax.defense import make_purifier

    model = load_diffusion(config)
    t_star = int(t_star or config.purifier.t_star)
    steps = min(int(config.purifier.num_steps) or t_star, t_star)
    purify = make_purifier(model.eps_fn, schedule=model.schedule(), t_star=t_star,
                           method=method, num_steps=steps)
    res = int(config.purifier.get("resolution", 0) or 0)
    if res and res != _image_size(config):
        purify = Partial(_Resized(res), purify)
    return purify


def load_defense(config, method: str, t_star: int | None = None):
    """The `Defense` of `method` ("none": the undefended classifier)."""
    from diffjax.defense import Defense, undefended

    classifier = load_classifier(config)
    if method == UNDEFENDED:
        return undefended(classifier.logits_fn)
    return Defense(make_purify_fn(config, method, t_star), classifier.logits_fn)


def _image_size(config) -> int:
    from diffjax import data

    return data.info(config.dataset).image_shape[0]


def attack_config(config, protocol: str):
    """The `PGDConfig`/`APGDConfig` of the config; EOT-K only under `independent` (under
    `fixed`/`transfer` every draw would be the same fixed key, so K = 1)."""
    from diffjax import attacks

    a = config.attack
    eot = int(a.eot) if protocol == "independent" else 1
    grad = attacks.Gradient(a.gradient, eot, int(a.eot_batch_size) or None)
    if a.name == "apgd":
        return attacks.APGDConfig(norm=a.norm, eps=float(a.eps), steps=int(a.steps),
                                  loss=a.loss, gradient=grad)
    return attacks.PGDConfig(norm=a.norm, eps=float(a.eps), step_size=float(a.step_size),
                             steps=int(a.steps), random_start=bool(a.random_start),
                             loss=a.loss, gradient=grad)


# ----------------------------------------------------------------------------- data


def global_batch_size(config) -> int:
    """The configured batch size rounded up to a multiple of the device count (the extra
    rows are masked padding): every device gets the same number of rows."""
    import jax

    n = jax.device_count()
    return -(-int(config.batch_size) // n) * n


def num_examples(config) -> int:
    from diffjax import data

    size = data.info(config.dataset).split_sizes[config.split]
    return min(int(config.num_examples or size), size)


def local_batches(config):
    """This process's rows of every global batch (padded, masked), as `data.Batch`es."""
    import jax

    from diffjax import data

    return data.batches(config.dataset, config.split, global_batch_size(config),
                        data_dir=config.data_dir or None, num_examples=num_examples(config),
                        process_index=jax.process_index(), process_count=jax.process_count())


def example_keys(config, ids, images):
    """Key data `[b, 2]` of the per-example keys (from ids, or the clean images' bytes)."""
    import jax
    import numpy as np

    from diffjax import randomness

    root = jax.random.key(int(config.seed))
    if config.keys_from == "content":
        keys = randomness.content_keys(root, images)
    else:
        keys = randomness.example_keys(root, np.maximum(ids, 0))  # padding rows: id -1
    return np.asarray(jax.random.key_data(keys))


def global_batch(mesh, batch, key_data):
    """Each process's rows -> global arrays on the mesh: (x, y, key data, ids, mask)."""
    import numpy as np

    from diffjax import _checks, parallel

    _checks.check_images(batch.images, "images")
    return tuple(parallel.shard_local_batch(mesh, np.asarray(a)) for a in (
        batch.images, batch.labels, key_data, batch.ids, batch.mask))


def write_atomic(path: pathlib.Path, write) -> None:
    """Writes through a temporary file renamed into place (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npz(path: pathlib.Path, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            import numpy as np

            np.savez(f, **arrays)

    write_atomic(path, write)


def agree(flags_on_writer):
    """Process 0's boolean array, on every process (which batches to skip on a resume)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return np.asarray(flags_on_writer)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(flags_on_writer)))


# ----------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=("config", "protocol", "eval_draws"))
def _attack(defense, x, y, key_data, *, config, protocol, eval_draws):
    # Under jit the library's host-side value checks are skipped (the inputs are tracers);
    # `global_batch` ran them on each process's own rows.
    from diffjax import attacks

    keys = jax.random.wrap_key_data(key_data)
    out = attacks.attack_and_evaluate(defense, x, y, keys, config=config, protocol=protocol,
                                      eval_draws=eval_draws)
    return {**{k: out[k] for k in _FIELDS}, "x_adv": out["x_adv"],
            "eval_key0": out["eval_keys"][0]}


def run_dir(workdir: pathlib.Path, method: str, protocol: str) -> pathlib.Path:
    return workdir / "robustness" / f"{method}_{protocol}"


def evaluate(config, workdir: pathlib.Path, mesh, method: str, protocol: str,
             log=print, progress: bool = True) -> dict:
    """Attacks and evaluates every example (resuming); returns `attacks.summarize(...)`.

    Args:
      config: the evaluation config.
      workdir: the output directory.
      mesh: the 1-D ``("data",)`` mesh over all devices.
      method: a purifier method or "none".
      protocol: "fixed", "independent" or "transfer".
      log: prints a progress line.
      progress: show a tqdm bar (process 0).

    Returns:
      The summary dict of `diffjax.attacks.summarize` over every evaluated example.
    """
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from diffjax import attacks, data, parallel

    defense = load_defense(config, method)
    acfg = attack_config(config, protocol)
    out_dir = run_dir(workdir, method, protocol)
    path = out_dir.with_suffix(".jsonl")
    meta = {"protocol": protocol, "config": repr(acfg), "eval_draws": int(config.eval_draws),
            "keys_from": config.keys_from,
            "key": np.asarray(jax.random.key_data(jax.random.key(int(config.seed)))).tolist(),
            "method": method, "dataset": config.dataset, "split": config.split,
            "purifier": config.purifier.to_dict(), "diffusion": config.diffusion,
            "classifier": config.classifier}
    n, bs = num_examples(config), global_batch_size(config)
    nb = data.num_batches(n, bs)
    skip = np.zeros(nb, bool)
    records: list[dict] = []
    writer = parallel.is_writer()
    if writer:
        old_meta, records = attacks.read_results(path)
        if old_meta is not None and old_meta != meta:
            raise ValueError(f"{path}: written with other settings; use another --workdir "
                             "or delete the file")
        done = {int(r["id"]) for r in records}
        for b in range(nb):
            ids = range(b * bs, min((b + 1) * bs, n))
            saved = (out_dir / f"batch_{b:05d}.npz").is_file() or not config.save_adversarial
            skip[b] = saved and all(i in done for i in ids)
        _truncate_partial_line(path)
        if old_meta is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps({"meta": meta}) + "\n")
    skip = agree(skip)
    if skip.any():
        log(f"[{method}/{protocol}] resuming: {int(skip.sum())}/{nb} batches done")
    bar = tqdm(total=nb, initial=int(skip.sum()), disable=not (progress and writer),
               unit="batch", desc=f"{method}/{protocol}")
    for b, batch in enumerate(local_batches(config)):
        if skip[b]:
            continue
        kd = example_keys(config, batch.ids, batch.images)
        x, y, kd, ids, mask = global_batch(mesh, batch, kd)
        out = _attack(defense, x, y, kd, config=acfg, protocol=protocol,
                      eval_draws=int(config.eval_draws))
        host = {k: parallel.to_host(v) for k, v in out.items()}
        ids, mask, labels = (parallel.to_host(a) for a in (ids, mask, y))
        if writer:
            done = {int(r["id"]) for r in records}
            keep = mask & np.array([int(i) not in done for i in ids], bool)
            if config.save_adversarial:
                save_npz(out_dir / f"batch_{b:05d}.npz", ids=ids[mask],
                         x_adv=host["x_adv"][mask], eval_key0=host["eval_key0"][mask])
            lines = []
            for j in np.flatnonzero(keep):
                rec = {"id": int(ids[j]), "label": int(labels[j])}
                for k in _FIELDS:
                    v = host[k][j]
                    rec[k] = bool(v) if v.dtype == bool else float(v)
                records.append(rec)
                lines.append(json.dumps(rec) + "\n")
            with open(path, "a") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
            s = attacks.summarize(records)
            bar.set_postfix(clean=f"{s['clean_accuracy']:.3f}",
                            robust=f"{s['robust_accuracy']:.3f}")
        bar.update(1)
    bar.close()
    summary = attacks.summarize(records) if writer else {}
    if writer:
        log(f"[{method}/{protocol}] n={summary['n']} clean {summary['clean_accuracy']:.4f} "
            f"robust {summary['robust_accuracy']:.4f} (mean over draws "
            f"{summary['robust_accuracy_mean']:.4f})")
    return summary


def _truncate_partial_line(path: pathlib.Path) -> None:
    """Drops a half-written last line (a crash mid-write) so appends start on a new line."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        content = f.read()
        cut = content.rfind(b"\n") + 1
        if cut != len(content):
            f.truncate(cut)


def main(argv):
    del argv
    from experiments import common

    logging.set_verbosity(logging.ERROR)  # orbax/tfds log at INFO/WARNING: keep errors 1 line
    with common.one_line_errors():
        config = CONFIG.value
        validate(config)
        workdir, mesh = setup(WORKDIR.value, DISTRIBUTED.value)
        check_models(config, as_list(config.methods))
        common.log(f"eval_robustness on {jax.device_count()} {jax.devices()[0].platform} "
                   f"device(s), {jax.process_count()} process(es); workdir {workdir}")
        summary: dict = {}
        for method in as_list(config.methods):
            for protocol in as_list(config.protocols):
                summary.setdefault(method, {})[protocol] = evaluate(
                    config, workdir, mesh, method, protocol, log=common.log)
        if jax.process_index() == 0:
            path = workdir / "robustness" / "summary.json"
            write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(
                json.dumps(summary, indent=2, sort_keys=True)))
            common.log(f"wrote {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
