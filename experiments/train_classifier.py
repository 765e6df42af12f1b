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
import time

from absl import app

from experiments import common

_FLAGS = common.define_train_flags()


def run(config, workdir: str, export_dir: str = "", progress: bool = True) -> dict:
    """Trains (resuming from `workdir`), evaluates, exports; returns the metrics."""
    import jax
    import numpy as np

    from diffjax import data, models, train

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
        common.export_ema(export_dir, "experiments.train_classifier", config, model_cfg,
                          host_vars, metrics)
    return metrics


def main(argv):
    common.train_main(argv, run, _FLAGS, "experiments/configs/digits_classifier.py")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
