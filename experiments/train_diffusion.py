r"""Trains a DDPM eps-model; optionally exports it as a `diffjax.pretrained` model directory.

    python -m experiments.train_diffusion --config=experiments/configs/digits_ddpm.py \
        --workdir=/tmp/digits_ddpm [--export_dir=DIR] [--config.train.steps=...]

Checkpoints go to `WORKDIR/checkpoints`; running the same command again resumes from the
latest one (exactly: keys and data order are functions of the step). With `--export_dir`
the EMA weights are written with `diffjax.pretrained.save`, together with the command and
the numbers reached; `--config.eval.classifier=NAME_OR_DIR` adds the classifier's accuracy
on purified clean test images, `--config.eval.samples_png=FILE` a grid of unconditional
samples. Bad flags or paths end with a one-line error and exit status 1.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app

from experiments import common

_FLAGS = common.define_train_flags()


def _schedule(config):
    from diffjax import diffusion

    sched = dict(config.schedule)
    name = sched.pop("name")
    if name != "linear":
        raise ValueError(f"config.schedule.name: expected 'linear'; got {name!r}")
    return diffusion.linear_schedule(**sched)


def save_grid(images, path, *, scale: int = 4, gap: int = 2) -> None:
    """Writes `[N, H, W, C]` images in [0, 1] as a square grid PNG (nearest upscaling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    hs, ws = h * scale + gap, w * scale + gap
    grid = np.ones((rows * hs + gap, cols * ws + gap, c), np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        big = np.kron(img, np.ones((scale, scale, 1), np.float32))
        grid[gap + r * hs:gap + r * hs + h * scale, gap + q * ws:gap + q * ws + w * scale] = big
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if c == 1:
        plt.imsave(path, grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, np.clip(grid, 0.0, 1.0))


def evaluate(config, eps_fn, schedule, key) -> dict:
    """Purified accuracy of `config.eval.classifier` per method, and the clean accuracy."""
    from diffjax import data, diffusion, pretrained, randomness, train

    ev = config.eval
    clf = pretrained.load(ev.classifier)

    def test_batches():
        return data.batches(config.dataset, ev.split, ev.batch_size,
                            data_dir=config.data_dir or None,
                            num_examples=ev.num_examples or None)

    clean, n = train.evaluate_accuracy(clf.logits_fn, test_batches())
    out = {"classifier": ev.classifier, "eval_split": ev.split, "eval_examples": n,
           "t_star": ev.t_star, "num_steps": ev.num_steps, "clean_accuracy": clean,
           "purified_accuracy": {}}
    for method in [m.strip() for m in ev.methods.split(",") if m.strip()]:
        def purify(x, ids, method=method):
            keys = randomness.example_keys(key, ids)
            return diffusion.purify(eps_fn, x, keys, schedule=schedule, t_star=ev.t_star,
                                    method=method, num_steps=ev.num_steps)

        t0 = time.perf_counter()
        acc, _ = train.evaluate_accuracy(clf.logits_fn, test_batches(), transform=purify)
        out["purified_accuracy"][method] = acc
        print(f"purified accuracy ({method}, t*={ev.t_star}, {ev.num_steps} steps): "
              f"{acc:.4f} on {n} images ({time.perf_counter() - t0:.1f} s)")
    print(f"clean accuracy of {ev.classifier}: {clean:.4f}")
    return out


def sample(eps_fn, schedule, image_shape, num, steps, key):
    """Unconditional samples: DDPM ancestral sampling from x_T over `steps` respaced steps.

    Uses `purify` from t_star = T on a grey image: x_T = sqrt(abar_T) * 0 +
    sqrt(1 - abar_T) * eps with abar_T ~ 4e-5 for the linear schedule, i.e. x_T ~ N(0, I)
    to within 2e-5 in its standard deviation.
    """
    import jax.numpy as jnp

    from diffjax import diffusion, randomness

    x = jnp.full((num, *image_shape), 0.5, jnp.float32)
    keys = randomness.example_keys(key, jnp.arange(num))
    return diffusion.purify(eps_fn, x, keys, schedule=schedule,
                            t_star=schedule.num_timesteps, method="ddpm", num_steps=steps,
                            remat=False)


def run(config, workdir: str, export_dir: str = "", progress: bool = True) -> dict:
    """Trains (resuming from `workdir`), then exports and evaluates; returns the metrics."""
    import jax
    import numpy as np

    from diffjax import data, models, train

    t_start = time.perf_counter()
    key = jax.random.key(config.seed)
    k_init, k_train, k_data, k_eval, k_sample = jax.random.split(key, 5)
    ds = data.info(config.dataset)
    model_cfg = config.model.config.to_dict()
    spec = models.get_spec(config.model.kind)
    if spec.role != "diffusion":
        raise ValueError(f"config.model.kind: expected a diffusion model; got "
                         f"{config.model.kind!r} ({spec.role})")
    module, variables = models.init(config.model.kind, model_cfg, k_init)
    schedule = _schedule(config)
    tc = config.train
    tx = train.make_optimizer(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
                              grad_clip=tc.grad_clip or None)
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
    step_fn = train.make_ddpm_step(module, tx, schedule, key=k_train, ema_decay=tc.ema_decay,
                                   random_flip=tc.get("random_flip", False))
    state, history = train.fit(
        step_fn, state, batches, num_steps=tc.steps, mngr=mngr, save_every=tc.save_every,
        log_every=tc.log_every, to_device=lambda b: train.shard_batch(b, mesh),
        progress=progress, desc="ddpm")
    mngr.close()
    train_s = time.perf_counter() - t_start
    wd = pathlib.Path(workdir)
    with open(wd / "history.jsonl", "a") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    logged = [json.loads(line) for line in open(wd / "history.jsonl")]
    logged = sorted({r["step"]: r for r in logged}.values(), key=lambda r: r["step"])
    tail = [r["loss"] for r in logged if r["step"] > 0.9 * tc.steps]
    # Wall time of all runs in this workdir (resumed ones included), from the logged rates.
    prev, total_s = 0, 0.0
    for r in logged:
        total_s += (r["step"] - prev) / max(r["steps_per_s"], 1e-9)
        prev = r["step"]
    metrics = {
        "steps": int(state.step),
        "final_loss": float(np.mean(tail)) if tail else None,
        "train_seconds_all_runs": round(total_s, 1) if logged else None,
        "train_seconds_this_run": round(train_s, 1),
        "steps_per_s": history[-1]["steps_per_s"] if history else None,
        "param_count": models.param_count(variables),
    }
    print(f"trained {metrics['steps']} steps; loss over the last 10%: {metrics['final_loss']}")
    if not export_dir or jax.process_index() != 0:
        return metrics
    host_vars = jax.device_get(state.variables(ema=True))
    eps_fn = models.make_fn(config.model.kind, model_cfg, host_vars, module=module)
    if config.eval.classifier:
        metrics["purification"] = evaluate(config, eps_fn, schedule, k_eval)
    if config.eval.samples_png:
        imgs = sample(eps_fn, schedule, ds.image_shape, config.eval.num_samples,
                      config.eval.sample_steps, k_sample)
        save_grid(imgs, config.eval.samples_png)
        metrics["samples_png"] = config.eval.samples_png
        metrics["sample_steps"] = config.eval.sample_steps
        print(f"wrote {config.eval.num_samples} samples to {config.eval.samples_png}")
    common.export_ema(export_dir, "experiments.train_diffusion", config, model_cfg, host_vars,
                      metrics, schedule=dict(config.schedule))
    return metrics


def main(argv):
    common.train_main(argv, run, _FLAGS, "experiments/configs/digits_ddpm.py")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
