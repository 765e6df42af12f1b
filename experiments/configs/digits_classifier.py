r"""The small CNN classifier on the embedded default (sklearn digits): `digits_classifier`.

Command (what produced `diffjax/assets/digits_classifier`; 4 minutes on the shared
2-core machine):

    python -m experiments.train_classifier --config=experiments/configs/digits_classifier.py \
        --workdir=/tmp/runs/digits_classifier --export_dir=diffjax/assets/digits_classifier \
        --progress=false

Quick smoke run (about a minute, mostly compilation):
``--config=experiments/configs/digits_classifier.py:quick``.

Expected result: 98.3% clean accuracy on the 297 test images (target >= 97%), recorded
in the model's meta.

Choices: `classifiers.digits_cnn_config()` (two conv stages of 32/64 channels, ~0.1M
parameters) with dropout 0.25 before the last layer; random 1-pixel shifts as
augmentation (1,500 training images overfit quickly otherwise); Adam 1e-3 with 100
warm-up steps and cosine decay over 2,000 steps at batch 128; EMA 0.99 of the weights,
which are the ones exported.
"""

import ml_collections

from diffjax.models import classifiers


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; ``arg="quick"`` gives a seconds-long smoke variant."""
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.data_dir = ""  # tfds data_dir for cifar10 / imagenet2012; unused for digits
    c.split = "train"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.kind = "cnn"
    c.model.config = dict(classifiers.digits_cnn_config(), dropout=0.25)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 2000
    c.train.batch_size = 128
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.decay = "cosine"
    c.train.grad_clip = 1.0
    c.train.weight_decay = 0.0
    c.train.ema_decay = 0.99
    c.train.max_shift = 1
    c.train.log_every = 100
    c.train.save_every = 500

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"
    c.eval.num_examples = 0  # 0: the whole split
    c.eval.batch_size = 128

    if arg == "quick":
        c.train.steps = 20
        c.train.batch_size = 32
        c.train.warmup_steps = 5
        c.train.log_every = 5
        c.train.save_every = 10
        c.eval.num_examples = 64
        c.eval.batch_size = 32
    elif arg not in (None, ""):
        raise ValueError(f"config argument: expected '' or 'quick'; got {arg!r}")
    return c
