r"""WideResNet-28-10 on CIFAR-10 (the RobustBench "Standard" architecture, [0, 1] inputs).

Command (needs CIFAR-10 prepared with `tfds build cifar10 --file_format=array_record
--data_dir=DIR`, and accelerators: 200 epochs = 78k steps at batch 128):

    python -m experiments.train_classifier --config=experiments/configs/cifar10_classifier.py \
        --config.data_dir=DIR --workdir=/tmp/cifar10_wrn --export_dir=/tmp/cifar10_wrn_model

Quick smoke run (a WRN-10-2, a few steps): ``--config=...cifar10_classifier.py:quick``.

Expected result: about 95-96% clean test accuracy (RobustBench's Standard model: 94.78%).
For the study, converting RobustBench's checkpoint (`--format=robustbench-wrn`) is the
practical path. Recipe (Zagoruyko & Komodakis 2016): SGD with Nesterov momentum 0.9,
lr 0.1 with cosine decay, weight decay 5e-4, random crops (4-pixel shifts) and flips;
BatchNorm statistics are trained and exported with the EMA weights.
"""

import ml_collections

from diffjax.models import classifiers


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; ``arg="quick"`` gives a small-model smoke variant."""
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.data_dir = ""  # the tfds data_dir holding cifar10 in the array_record format
    c.split = "train"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.kind = "wrn"
    c.model.config = classifiers.wrn_28_10_config()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 78_000
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.1
    c.train.warmup_steps = 1000
    c.train.decay = "cosine"
    c.train.grad_clip = 0.0  # 0: no clipping
    c.train.weight_decay = 5e-4
    c.train.ema_decay = 0.999
    c.train.max_shift = 4
    c.train.random_flip = True
    c.train.log_every = 500
    c.train.save_every = 5000

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"
    c.eval.num_examples = 0  # 0: the whole split
    c.eval.batch_size = 500

    if arg == "quick":
        c.model.config = classifiers.wrn_small_config()
        c.train.steps = 4
        c.train.batch_size = 8
        c.train.warmup_steps = 2
        c.train.log_every = 2
        c.train.save_every = 2
        c.eval.num_examples = 16
        c.eval.batch_size = 8
    elif arg not in (None, ""):
        raise ValueError(f"config argument: expected '' or 'quick'; got {arg!r}")
    return c
