r"""Trains a classifier; optionally exports it as a `diffjax.pretrained` model directory.

    python -m experiments.train_classifier --config=experiments/configs/digits_classifier.py \
        --workdir=/tmp/digits_classifier [--export_dir=DIR] [--config.train.steps=...]

Checkpoints go to `WORKDIR/checkpoints`; running the same command again resumes from the
latest one (exactly). After training, the EMA weights are evaluated on the test split
(every example: padded, masked batches) and, with `--export_dir`, written with
`diffjax.pretrained.save` together with the command and the accuracy. Bad flags or paths
end with a one-line error and exit status 1.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (experiments/configs).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_EXPORT = flags.DEFINE_string("export_dir", "", "Write the trained EMA model here.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _command() -> str:
    return shlex.join(["python", "-m", "experiments.train_classifier", *sys.argv[1:]])


def run(config, workdir: str, export_dir: str = "", progress: bool = True) -> dict:
    """Trains (resuming from `workdir`), evaluates, exports; returns the metrics."""
    import jax
    import numpy as np

    from diffjax import data, models, pretrained, train

    t_start = time.perf_counter()
    key = jax.random.key(config.seed)
    k_init, k_train, k_data = jax.random.split(key, 3)
    data.info(config.dataset)  # checks the name early
    model_cfg = config.model.config.to_dict()
    spec = models.get_spec(config.model.kind)
    if spec.role != "classifier":
        raise ValueError(f"config.model.kind: expected a classifier; got "
                         f"{config.model.kind!r} ({spec.role})")
    module, variables = models.init(config.model.kind, model_cfg, k_init)
    tc = config.train
    tx = train.make_optimizer(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
                              grad_clip=tc.grad_clip or None, total_steps=tc.steps,
                              decay=tc.decay, weight_decay=tc.weight_decay,
                              optimizer=tc.get("optimizer", "adam"))
    mesh = train.make_mesh()
    state = train.replicate(train.init_state(variables, tx), mesh)
    mngr = train.checkpoint_manager(workdir)
    state = train.restore_or_keep(mngr, state)
    start = int(state.step)
    if start:
        print(f"resuming from step {start} in {workdir}")
    batches = data.train_batches(
        config.dataset, config.split, tc.batch_size, key=k_data, start_step=start,
        data_dir=config.data_dir or None, process_index=jax.process_index(),
        process_count=jax.process_count())
    step_fn = train.make_classifier_step(module, tx, key=k_train, ema_decay=tc.ema_decay,
                                         max_shift=tc.max_shift,
                                         random_flip=tc.get("random_flip", False))
    state, history = train.fit(
        step_fn, state, batches, num_steps=tc.steps, mngr=mngr, save_every=tc.save_every,
        log_every=tc.log_every, to_device=lambda b: train.shard_batch(b, mesh),
        progress=progress, desc="classifier")
    mngr.close()
    wd = pathlib.Path(workdir)
    with open(wd / "history.jsonl", "a") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    host_vars = jax.device_get(state.variables(ema=True))
    logits_fn = models.make_fn(config.model.kind, model_cfg, host_vars, module=module)
    ev = config.eval
    acc, n = train.evaluate_accuracy(logits_fn, data.batches(
        config.dataset, ev.split, ev.batch_size, data_dir=config.data_dir or None,
        num_examples=ev.num_examples or None))
    metrics = {
        "steps": int(state.step),
        "test_accuracy": acc,
        "eval_split": ev.split,
        "eval_examples": n,
        "final_train_loss": float(np.mean([r["loss"] for r in history[-3:]]))
        if history else None,
        "train_seconds_this_run": round(time.perf_counter() - t_start, 1),
        "param_count": models.param_count(variables),
    }
    print(f"trained {metrics['steps']} steps; {ev.split} accuracy (EMA weights): {acc:.4f} "
          f"on {n} examples")
    if export_dir and jax.process_index() == 0:
        out = pretrained.save(
            export_dir, kind=config.model.kind, config=model_cfg, variables=host_vars,
            name=pathlib.Path(export_dir).name,
            meta={"command": _command(), "dataset": config.dataset, "metrics": metrics,
                  "train": config.train.to_dict(), "seed": config.seed, "params": "ema",
                  "jax_version": jax.__version__})
        print(f"exported the EMA model to {out}")
    return metrics


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]} (flags are --name=value)")
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required (checkpoints go to WORKDIR/checkpoints)")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        config = _CONFIG.value
        if config is None:
            sys.exit("error: --config is required, e.g. --config=experiments/configs/"
                     "digits_ddpm.py")
        run(config, _WORKDIR.value, _EXPORT.value, _PROGRESS.value)
    except (ValueError, OSError, KeyError) as e:  # OSError: missing files, bad paths
        sys.exit(f"error: {common.one_line(e)}")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
