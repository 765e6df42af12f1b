r"""Trains a deterministic purifier for compression; optionally exports it (open question 1).

    python -m experiments.train_purifier --config=experiments/configs/digits_purifier.py \
        --workdir=/tmp/digits_purifier [--export_dir=DIR] [--config.train.steps=...]

The objective (`diffjax.train_purifier`): the frozen classifier's cross-entropy on purified
clean and noisy images (the anchor) plus the squared compression rate of the purifier
(Hutchinson). Checkpoints go to `WORKDIR/checkpoints`; running the same command again
resumes from the latest one (exactly). After training, the EMA weights are evaluated on
the test split (`diffjax.train_purifier.evaluate_purifier`: clean accuracy, PGD / APGD-CE /
APGD-DLR robust accuracy with the full gradient through the purifier, compression rate)
and, with `--export_dir`, written with `diffjax.pretrained.save` together with the command
and these numbers. Bad flags or paths end with a one-line error and exit status 1.
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
    import jax.numpy as jnp
    import numpy as np

    from diffjax import data, models, pretrained, randomness, train
    from diffjax import train_purifier as tp

    t_start = time.perf_counter()
    key = jax.random.key(config.seed)
    k_init, k_train, k_data, k_eval = jax.random.split(key, 4)
    data.info(config.dataset)  # checks the name early
    model_cfg = config.model.config.to_dict()
    spec = models.get_spec(config.model.kind)
    if spec.role != "purifier":
        raise ValueError(f"config.model.kind: expected a purifier; got {config.model.kind!r} "
                         f"({spec.role})")
    clf = pretrained.load(config.classifier)
    module, variables = models.init(config.model.kind, model_cfg, k_init)
    tc = config.train
    tx = train.make_optimizer(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
                              grad_clip=tc.grad_clip or None, total_steps=tc.steps,
                              decay=tc.decay)
    state = train.init_state(variables, tx)
    mngr = train.checkpoint_manager(workdir)
    state = train.restore_or_keep(mngr, state)
    start = int(state.step)
    if start:
        print(f"resuming from step {start} in {workdir}")
    batches = data.train_batches(config.dataset, config.split, tc.batch_size, key=k_data,
                                 start_step=start, data_dir=config.data_dir or None)
    ob = config.objective
    step_fn = tp.make_purifier_step(
        module, tx, clf.logits_fn, key=k_train, ema_decay=tc.ema_decay,
        noise_radius=ob.noise_radius, jacobian_weight=ob.jacobian_weight,
        spectral_weight=ob.spectral_weight, num_probes=ob.num_probes,
        power_iterations=ob.power_iterations, ball_weight=ob.ball_weight,
        ball_radius=ob.ball_radius, ball_steps=ob.ball_steps)
    state, history = train.fit(step_fn, state, batches, num_steps=tc.steps, mngr=mngr,
                               save_every=tc.save_every, log_every=tc.log_every,
                               progress=progress, desc="purifier")
    mngr.close()
    train_s = time.perf_counter() - t_start
    wd = pathlib.Path(workdir)
    with open(wd / "history.jsonl", "a") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    host_vars = jax.device_get(state.variables(ema=True))
    purify_fn = models.make_fn(config.model.kind, model_cfg, host_vars, module=module)
    ev = config.eval
    test = data.load_arrays(config.dataset, ev.split, data_dir=config.data_dir or None,
                            num_examples=ev.num_examples or None)
    x, y = jnp.asarray(test.images), jnp.asarray(test.labels)
    keys = randomness.example_keys(k_eval, jnp.asarray(test.ids))
    t_eval = time.perf_counter()
    evaluation = tp.evaluate_purifier(purify_fn, clf.logits_fn, x, y, keys, eps=ev.eps,
                                      norm=ev.norm, pgd_steps=ev.pgd_steps,
                                      apgd_steps=ev.apgd_steps)
    metrics = {
        "steps": int(state.step),
        "classifier": config.classifier,
        "eval_split": ev.split,
        **evaluation,
        "final_train": {k: float(np.mean([r[k] for r in history[-3:]]))
                        for k in ("loss", "ce", "rate2")} if history else None,
        "train_seconds_this_run": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - t_eval, 1),
        "param_count": models.param_count(variables),
    }
    rob = evaluation["robust_accuracy"]
    print(f"trained {metrics['steps']} steps in {train_s:.0f} s; {ev.split} ({len(y)} images): "
          f"clean {evaluation['clean_accuracy']:.4f}, robust (l_{ev.norm[1:]} eps {ev.eps}) "
          f"PGD-{ev.pgd_steps} {rob['pgd']:.4f}, APGD-CE {rob['apgd_ce']:.4f}, APGD-DLR "
          f"{rob['apgd_dlr']:.4f}, worst {rob['worst']:.4f}; compression rate "
          f"{evaluation['compression_rate']:.4f} (top singular value "
          f"{evaluation['top_singular_value']:.3f})")
    if export_dir:
        common.export_ema(export_dir, "experiments.train_purifier", config, model_cfg,
                          host_vars, metrics, objective=config.objective.to_dict())
    return metrics


def main(argv):
    common.train_main(argv, run, _FLAGS, "experiments/configs/digits_purifier.py")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
