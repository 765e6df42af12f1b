r"""DDPM on CIFAR-10 (Ho et al. 2020's recipe, `unet.cifar10_config()`, 35.7M parameters).

Command (needs CIFAR-10 prepared with `tfds build cifar10 --file_format=array_record
--data_dir=DIR`, and accelerators: about 800k steps, days on one GPU; data-parallel over
all local devices):

    python -m experiments.train_diffusion --config=experiments/configs/cifar10_ddpm.py \
        --config.data_dir=DIR --workdir=/tmp/cifar10_ddpm --export_dir=/tmp/cifar10_ddpm_model

Quick smoke run (a small U-Net, a few steps): ``--config=...cifar10_ddpm.py:quick``.

Expected result: Ho et al. report FID 3.17 after 800k steps at batch 128. For the study,
converting the public checkpoints (`experiments.convert_checkpoint`) is the practical path;
this config exists so the same code trains at scale. Recipe (Ho et al. App. B): Adam 2e-4,
5,000 warm-up steps, grad-norm clip 1, EMA 0.9999, dropout 0.1, random horizontal flips,
linear betas 1e-4..2e-2 over T = 1000.
"""

import ml_collections

from diffjax.models import unet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; ``arg="quick"`` gives a small-model smoke variant."""
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.data_dir = ""  # the tfds data_dir holding cifar10 in the array_record format
    c.split = "train"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.kind = "ddpm_unet"
    c.model.config = unet.cifar10_config()

    c.schedule = ml_collections.ConfigDict(
        {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 2e-2})

    c.train = ml_collections.ConfigDict()
    c.train.steps = 800_000
    c.train.batch_size = 128
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 5000
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.random_flip = True
    c.train.log_every = 1000
    c.train.save_every = 10_000

    c.eval = ml_collections.ConfigDict()
    c.eval.classifier = ""  # e.g. a converted robustbench-wrn directory
    c.eval.split = "test"
    c.eval.num_examples = 512
    c.eval.batch_size = 128
    c.eval.t_star = 100
    c.eval.num_steps = 100
    c.eval.methods = "ddpm"
    c.eval.samples_png = ""
    c.eval.num_samples = 64
    c.eval.sample_steps = 100

    if arg == "quick":
        c.model.config = dict(unet.cifar10_config(), ch=32, ch_mult=[1, 2],
                              num_res_blocks=1, num_groups=8)
        c.train.steps = 4
        c.train.batch_size = 8
        c.train.warmup_steps = 2
        c.train.log_every = 2
        c.train.save_every = 2
        c.eval.num_examples = 16
        c.eval.batch_size = 8
        c.eval.num_steps = 2
        c.eval.num_samples = 4
        c.eval.sample_steps = 2
    elif arg not in (None, ""):
        raise ValueError(f"config argument: expected '' or 'quick'; got {arg!r}")
    return c
