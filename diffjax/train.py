"""Training: DDPM epsilon-loss and classifier steps, EMA, checkpoints, data parallelism.

The pieces, each a pure function or a small factory (the absl scripts in `experiments/`
only wire them together):

- `make_optimizer`: optax Adam with a linear warm-up, global-norm gradient clipping.
- `TrainState` / `init_state`: `{step, params, ema_params, opt_state, batch_stats}`.
- `ddpm_loss` + `make_ddpm_step`: the simple epsilon-prediction loss of Ho et al. 2020
  (Algorithm 1; eq. 14: `t ~ U{0..T-1}`, `eps ~ N(0, I)`,
  `|| eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2`).
- `classifier_loss` + `make_classifier_step`: softmax cross-entropy, optional random
  shifts (pad + random crop) as augmentation, BatchNorm statistics when the model has them.
- `make_mesh`, `replicate`, `shard_batch`: data parallelism over all local devices with
  `jax.make_mesh` + `NamedSharding` (state replicated, batch split on its leading axis);
  the loss is the global-batch mean, the same number as on one device.
- `checkpoint_manager`, `restore_or_keep`, `fit`: orbax checkpoints of the whole state,
  resuming from the latest step, a tqdm bar with the loss and steps/s (metrics fetched one
  step late so the host never waits for the device).

Exact resumption: the step's randomness is `fold_in(key, state.step)` and the data order of
`diffjax.data.train_batches` is a function of the step, so N steps in one go and N/2 +
resume + N/2 give bit-identical parameters (tested).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import _checks, parallel
from diffjax.diffusion import Schedule, q_sample, to_model_space

__all__ = [
    "TrainState",
    "make_optimizer",
    "init_state",
    "ema_update",
    "ddpm_loss",
    "make_ddpm_step",
    "classifier_loss",
    "random_shift",
    "make_classifier_step",
    "make_mesh",
    "replicate",
    "shard_batch",
    "checkpoint_manager",
    "restore_or_keep",
    "save_checkpoint",
    "fit",
    "evaluate_accuracy",
]


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue exactly (a pytree).

    Attributes:
      step: int32 scalar, the number of steps taken.
      params: the trainable parameters (the `params` collection).
      ema_params: the exponential moving average of `params` (what DDPM samples with).
      opt_state: the optax state.
      batch_stats: BatchNorm running statistics (`{}` for models without BatchNorm).
    """

    step: Any
    params: Any
    ema_params: Any
    opt_state: Any
    batch_stats: Any

    def variables(self, ema: bool = True) -> dict:
        """The variables dict for `module.apply` (EMA parameters by default)."""
        out = {"params": self.ema_params if ema else self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


def make_optimizer(
    *,
    learning_rate: float,
    warmup_steps: int = 0,
    grad_clip: float | None = 1.0,
    total_steps: int | None = None,
    decay: str = "constant",
    b1: float = 0.9,
    b2: float = 0.999,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
) -> optax.GradientTransformation:
    """Adam (AdamW when `weight_decay > 0`) with a linear warm-up and grad-norm clipping.

    Ho et al. 2020 (App. B): Adam, learning rate 2e-4, 5,000 warm-up steps, gradient
    clipping to norm 1.

    Args:
      learning_rate: the peak learning rate, > 0.
      warmup_steps: steps of linear warm-up from 0 to `learning_rate`.
      grad_clip: the global-norm clipping threshold; None disables clipping.
      total_steps: needed for ``decay="cosine"`` (cosine to 0 at `total_steps`).
      decay: ``"constant"`` after warm-up, or ``"cosine"``.
      b1, b2: Adam's moment decays.
      weight_decay: decoupled weight decay (AdamW); 0 for plain Adam. With
        ``optimizer="sgd"``: L2 weight decay added to the gradient (as in the WRN recipe).
      optimizer: ``"adam"`` or ``"sgd"`` (Nesterov momentum `b1`; the WideResNet recipe:
        lr 0.1, momentum 0.9, weight decay 5e-4).

    Returns:
      An `optax.GradientTransformation`.
    """
    lr = _checks.check_number(learning_rate, "learning_rate", lo=0.0, lo_open=True)
    warmup = _checks.check_int(warmup_steps, "warmup_steps", lo=0)
    _checks.check_choice(decay, "decay", ("constant", "cosine"))
    if decay == "cosine":
        total = _checks.check_int(total_steps, "total_steps", lo=max(warmup, 1))
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
    elif warmup:
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    else:
        sched = optax.constant_schedule(lr)
    parts = []
    if grad_clip is not None:
        parts.append(optax.clip_by_global_norm(
            _checks.check_number(grad_clip, "grad_clip", lo=0.0, lo_open=True)))
    _checks.check_choice(optimizer, "optimizer", ("adam", "sgd"))
    if optimizer == "sgd":
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))
        parts.append(optax.sgd(sched, momentum=b1, nesterov=True))
    elif weight_decay:
        parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay))
    else:
        parts.append(optax.adam(sched, b1=b1, b2=b2))
    return optax.chain(*parts)


def init_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    """A fresh `TrainState` from a model's variables dict (EMA starts at the params)."""
    if not isinstance(variables, dict) or "params" not in variables:
        _checks.fail("variables", "a variables dict with a 'params' entry (from module.init)",
                     type(variables).__name__)
    # Fresh copies: the train step donates the state, which must not delete the caller's
    # arrays.
    params = jax.tree.map(jnp.array, variables["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.array, params),
        opt_state=tx.init(params),
        batch_stats=jax.tree.map(jnp.array, variables.get("batch_stats", {})),
    )


def ema_update(ema, params, decay):
    """`decay * ema + (1 - decay) * params`, leaf by leaf (DDPM's EMA of the weights)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def _apply_update(state: TrainState, tx, grads, batch_stats, ema_decay) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema_update(state.ema_params, params, ema_decay),
        opt_state=opt_state,
        batch_stats=batch_stats,
    )


# --------------------------------------------------------------------------- DDPM


def ddpm_loss(apply_fn: Callable, params, images, key, schedule: Schedule):
    """The DDPM epsilon-prediction loss (Ho et al. 2020, Algorithm 1, eq. 14).

    Args:
      apply_fn: `apply_fn(params, x_t, t, dropout_key) -> eps` with x_t NHWC in [-1, 1]
        and t int32 `[B]`.
      params: the parameters passed to `apply_fn`.
      images: float32 `[B, H, W, C]` clean images in [0, 1].
      key: one key for the batch (timesteps, noise and dropout are drawn from it).
      schedule: the noise schedule (`diffjax.diffusion.linear_schedule()`).

    Returns:
      The scalar mean squared error between the true and the predicted noise.
    """
    x0 = to_model_space(images)
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_timesteps, jnp.int32)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    eps = apply_fn(params, x_t, t, k_drop)
    return jnp.mean(jnp.square(eps - noise))


def make_ddpm_step(
    module,
    tx: optax.GradientTransformation,
    schedule: Schedule,
    *,
    key,
    ema_decay: float,
    random_flip: bool = False,
) -> Callable:
    """A jitted DDPM training step `step(state, batch) -> (state, metrics)`.

    The state is donated (updated in place); the step's key is `fold_in(key, state.step)`.
    `module.apply(variables, x_t, t, train=True, rngs={"dropout": k})` must predict eps.

    Args:
      module: the Flax eps-model (e.g. `diffjax.models.build("ddpm_unet", config)`).
      tx: the optimiser (`make_optimizer`).
      schedule: the noise schedule the model is trained for.
      key: the run's base key for timesteps, noise and dropout.
      ema_decay: the EMA decay in [0, 1) (DDPM: 0.9999; the short digits run: 0.995).
      random_flip: flip each image left-right with probability 1/2 (Ho et al.'s CIFAR-10
        training; not for digits, whose mirror images are not digits).

    Returns:
      `step(state, batch)` where `batch.images` is float32 `[B, H, W, C]` in [0, 1];
      metrics `{"loss"}`.
    """
    ema_decay = _checks.check_number(ema_decay, "ema_decay", lo=0.0, hi=1.0)

    def apply_fn(params, x_t, t, k):
        return module.apply({"params": params}, x_t, t, train=True, rngs={"dropout": k})

    def step(state: TrainState, batch):
        k = jax.random.fold_in(key, state.step)
        images = batch.images
        if random_flip:
            k, k_flip = jax.random.split(k)
            flip = jax.random.bernoulli(k_flip, 0.5, (images.shape[0], 1, 1, 1))
            images = jnp.where(flip, images[:, :, ::-1], images)
        loss, grads = jax.value_and_grad(ddpm_loss, argnums=1)(
            apply_fn, state.params, images, k, schedule)
        new = _apply_update(state, tx, grads, state.batch_stats, ema_decay)
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=0)


# --------------------------------------------------------------------------- classifier


def random_shift(images, key, max_shift: int):
    """Shifts each image by up to `max_shift` pixels (edge padding + random crop).

    Args:
      images: `[B, H, W, C]`.
      key: one key for the batch.
      max_shift: the largest shift in pixels, >= 0.

    Returns:
      `[B, H, W, C]` shifted images.
    """
    if max_shift == 0:
        return images
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def classifier_loss(logits, labels, mask=None):
    """Mean softmax cross-entropy over the unmasked examples; also returns the accuracy.

    Args:
      logits: `[B, K]`.
      labels: int32 `[B]`.
      mask: optional bool `[B]` (padding rows False).

    Returns:
      `(loss, accuracy)` scalars.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    w = jnp.ones_like(ce) if mask is None else mask.astype(ce.dtype)
    denom = jnp.maximum(w.sum(), 1.0)
    return (ce * w).sum() / denom, (correct * w).sum() / denom


def make_classifier_step(
    module,
    tx: optax.GradientTransformation,
    *,
    key,
    ema_decay: float,
    max_shift: int = 0,
    random_flip: bool = False,
) -> Callable:
    """A jitted classifier training step `step(state, batch) -> (state, metrics)`.

    Calls `module.apply(variables, x, train=True, rngs={"dropout": k})` on [0, 1] images
    (with `mutable=["batch_stats"]` when the state holds BatchNorm statistics). The state
    is donated; the step's key is `fold_in(key, state.step)`.

    Args:
      module: the Flax classifier.
      tx: the optimiser.
      key: the run's base key (augmentation, dropout).
      ema_decay: the EMA decay of the parameters.
      max_shift: random-shift augmentation in pixels (0: none; CIFAR-10: 4).
      random_flip: random left-right flips (CIFAR-10; not digits).

    Returns:
      `step(state, batch)` with `batch.images` `[B, H, W, C]` in [0, 1] and `batch.labels`
      int32 `[B]`; metrics `{"loss", "accuracy"}` (of the training batch).
    """
    ema_decay = _checks.check_number(ema_decay, "ema_decay", lo=0.0, hi=1.0)
    max_shift = _checks.check_int(max_shift, "max_shift", lo=0)

    def loss_fn(params, batch_stats, images, labels, k):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
            logits, upd = module.apply(variables, images, train=True, rngs={"dropout": k},
                                       mutable=["batch_stats"])
            batch_stats = upd["batch_stats"]
        else:
            logits = module.apply(variables, images, train=True, rngs={"dropout": k})
        loss, acc = classifier_loss(logits, labels)
        return loss, (acc, batch_stats)

    def step(state: TrainState, batch):
        k_aug, k_drop = jax.random.split(jax.random.fold_in(key, state.step))
        images = random_shift(batch.images, k_aug, max_shift)
        if random_flip:
            flip = jax.random.bernoulli(jax.random.fold_in(k_aug, 1), 0.5,
                                        (images.shape[0], 1, 1, 1))
            images = jnp.where(flip, images[:, :, ::-1], images)
        (loss, (acc, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, images, batch.labels, k_drop)
        new = _apply_update(state, tx, grads, bs, ema_decay)
        return new, {"loss": loss, "accuracy": acc}

    return jax.jit(step, donate_argnums=0)


# --------------------------------------------------------------------------- devices


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ``("data",)`` mesh over the first `num_devices` devices (default: all)."""
    n = jax.device_count() if num_devices is None else _checks.check_int(
        num_devices, "num_devices", lo=1, hi=jax.device_count())
    return parallel.data_mesh(jax.devices()[:n])  # Auto axes: see diffjax.parallel


def replicate(tree, mesh: jax.sharding.Mesh):
    """Places a pytree (e.g. the `TrainState`) on every device of `mesh`, replicated."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch, mesh: jax.sharding.Mesh):
    """Turns this process's rows of a batch into global arrays split over ``"data"``.

    Every leaf's leading axis is split over the mesh (`jax.make_array_from_process_local_data`,
    so it also works with several hosts, each passing its own rows). The local batch size
    must be a multiple of the number of local devices.
    """
    sharding = NamedSharding(mesh, P("data"))
    n_local = len(mesh.local_devices)

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % n_local:
            _checks.fail("batch", f"a leading size divisible by the {n_local} local devices",
                         f"shape {x.shape}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir, *, max_to_keep: int = 2):
    """An orbax `CheckpointManager` writing to `workdir/checkpoints`."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(workdir).expanduser().resolve() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(path, options=options)


def save_checkpoint(mngr, state: TrainState) -> None:
    """Saves the whole state under its step (asynchronously; `mngr.wait_until_finished()`)."""
    import orbax.checkpoint as ocp

    mngr.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(state))


def restore_or_keep(mngr, state: TrainState, step: int | None = None) -> TrainState:
    """Restores the latest checkpoint (or the one of `step`) into `state`'s structure.

    The restored arrays get `state`'s shardings (replicated on the mesh when `state` was
    placed with `replicate`). Returns `state` itself when `mngr` holds no checkpoint (a
    fresh run).
    """
    import orbax.checkpoint as ocp

    latest = mngr.latest_step() if step is None else step
    if latest is None:
        return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return mngr.restore(latest, args=ocp.args.StandardRestore(abstract))


def fit(
    step_fn: Callable,
    state: TrainState,
    batch_iter: Iterable,
    *,
    num_steps: int,
    mngr=None,
    save_every: int = 1000,
    log_every: int = 100,
    to_device: Callable | None = None,
    progress: bool = True,
    desc: str = "train",
) -> tuple[TrainState, list[dict]]:
    """Runs `step_fn` until `state.step == num_steps`, checkpointing along the way.

    The loop never blocks on the device: the metrics of step `s` are fetched after step
    `s + 1` has been dispatched. A checkpoint is written every `save_every` steps and at
    the end (when `mngr` is given).

    Args:
      step_fn: `step_fn(state, batch) -> (state, metrics)` (from `make_*_step`).
      state: the state to start from (restored or fresh); its `step` may be > 0.
      batch_iter: yields the batch of step `state.step`, then the next, ...
        (`diffjax.data.train_batches(..., start_step=state.step)`).
      num_steps: the total number of steps of the run (not the number still to take).
      mngr: an orbax `CheckpointManager` or None.
      save_every: checkpoint period in steps.
      log_every: every `log_every` steps the metrics are appended to the history.
      to_device: maps a host batch to device arrays (e.g. `lambda b: shard_batch(b, mesh)`);
        default `jax.device_put`.
      progress: show a tqdm bar with the loss and steps/s.
      desc: the bar's label.

    Returns:
      `(state, history)`: the final state and a list of `{"step", metric: float, ...,
      "steps_per_s"}` records.
    """
    from tqdm.auto import tqdm

    num_steps = _checks.check_int(num_steps, "num_steps", lo=0)
    to_device = to_device or jax.device_put
    start = int(jax.device_get(state.step))
    history: list[dict] = []
    bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress,
               dynamic_ncols=True)
    pending = None  # (step, device metrics) of the previous step, fetched one step late.
    t0, s0 = time.perf_counter(), start
    it = iter(batch_iter)

    def report(step, metrics):
        nonlocal t0, s0
        rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if step % log_every == 0 or step == num_steps:
            rec["step"] = step
            rec["steps_per_s"] = (step - s0) / max(now - t0, 1e-9)
            history.append(rec)
            t0, s0 = now, step
        bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)

    for step in range(start + 1, num_steps + 1):
        state, metrics = step_fn(state, to_device(next(it)))
        if pending is not None:
            report(*pending)
        pending = (step, metrics)
        bar.update(1)
        if mngr is not None and (step % save_every == 0 and step != num_steps):
            save_checkpoint(mngr, state)
    if pending is not None:
        report(*pending)
    if mngr is not None and num_steps > start:
        save_checkpoint(mngr, state)
        mngr.wait_until_finished()
    bar.close()
    return state, history


# --------------------------------------------------------------------------- evaluation


@jax.jit
def _predict(fn, x):
    return jnp.argmax(fn(x), axis=-1)


def evaluate_accuracy(
    logits_fn: Callable,
    batch_iter: Iterable,
    *,
    transform: Callable | None = None,
) -> tuple[float, int]:
    """Accuracy of `logits_fn` over padded, masked batches (padding rows never count).

    Args:
      logits_fn: `logits_fn(x) -> [B, K]` on [0, 1] images (a `Partial` or any callable).
      batch_iter: yields `diffjax.data.Batch` (e.g. `diffjax.data.batches(...)`).
      transform: optional `transform(images, ids) -> images` applied first (a purifier
        with per-example keys derived from `ids`).

    Returns:
      `(accuracy in [0, 1], number of real examples)`.
    """
    if not isinstance(logits_fn, jax.tree_util.Partial):
        logits_fn = jax.tree_util.Partial(logits_fn)
    correct, total = 0, 0
    for b in batch_iter:
        x = jnp.asarray(b.images)
        if transform is not None:
            x = transform(x, jnp.asarray(b.ids))
        pred = np.asarray(_predict(logits_fn, x))
        mask = np.asarray(b.mask)
        correct += int(((pred == np.asarray(b.labels)) & mask).sum())
        total += int(mask.sum())
    return correct / max(total, 1), total
