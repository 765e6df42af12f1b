r"""DDPM on the embedded default (sklearn digits, 8x8x1): the shipped `digits_ddpm`.

Command (what produced `diffjax/assets/digits_ddpm`: 41 minutes of training on the heavily
shared 2-core machine it ran on; the feasibility probe timed ~8.5 minutes for a similar
237k-parameter U-Net on 2 idle cores; the classifier must exist first, see
digits_classifier.py):

    python -m experiments.train_diffusion --config=experiments/configs/digits_ddpm.py \
        --workdir=/tmp/runs/digits_ddpm --export_dir=diffjax/assets/digits_ddpm \
        --config.eval.classifier=digits_classifier \
        --config.eval.samples_png=docs/digits_samples.png --progress=false

(The shipped model was trained by this command without the last three flags, then this
command resumed at step 6,000, trained nothing more and exported: resumption is exact, so
one run of it from an empty workdir gives the same weights.)

Quick smoke run (about a minute, mostly compilation):
``--config=experiments/configs/digits_ddpm.py:quick``.

Expected result: training loss (batch loss averaged over the last 10% of the logged
steps) about 0.085; the shipped `digits_classifier` gets >= 90% on DDPM-purified clean
test images at the study default (t_star = 100, 10 respaced ancestral steps), recorded in
the model's meta; samples that look like digits (`docs/digits_samples.png`).

Why these sizes: the whole study on this default must run in 10 minutes on a 2-core CPU,
and every attack step backpropagates through the purifier's reverse steps, i.e. through
U-Net calls. So the images stay at 8x8 (16x16 would cost ~4x per call), the U-Net is
small (`unet.digits_config()`: ch 32, ch_mult (1, 1), one res block per level, attention
at 4x4; 0.28M parameters), and the study default is
t_star = 100 (as on CIFAR-10, t* = 0.1 of T = 1000) with 10 respaced reverse steps
instead of 100 (10x cheaper; the probe in PAPER_NOTES.md keeps 96% purified accuracy).
Training: Adam 2e-4 with 200 warm-up steps, grad-norm clip 1, batch 128, 6,000 steps
(~512 epochs of the 1,500 training images); EMA decay 0.995 instead of DDPM's 0.9999,
since a 6,000-step run would otherwise sample from weights averaged mostly over its
first, untrained steps.
"""

import ml_collections

from diffjax.models import unet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; ``arg="quick"`` gives a seconds-long smoke variant."""
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.data_dir = ""  # tfds data_dir for cifar10 / imagenet2012; unused for digits
    c.split = "train"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.kind = "ddpm_unet"
    c.model.config = unet.digits_config()

    c.schedule = ml_collections.ConfigDict(
        {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 2e-2})

    c.train = ml_collections.ConfigDict()
    c.train.steps = 6000
    c.train.batch_size = 128
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 200
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.995
    c.train.log_every = 100
    c.train.save_every = 1000

    c.eval = ml_collections.ConfigDict()
    c.eval.classifier = ""  # a pretrained name/dir: measure purified accuracy after training
    c.eval.split = "test"
    c.eval.num_examples = 0  # 0: the whole split
    c.eval.batch_size = 128
    c.eval.t_star = 100
    c.eval.num_steps = 10
    c.eval.methods = "ddpm,reverse_only,ddim"
    c.eval.samples_png = ""  # write a grid of unconditional samples here
    c.eval.num_samples = 100
    c.eval.sample_steps = 100  # respaced ancestral steps over all T timesteps

    if arg == "quick":
        c.train.steps = 20
        c.train.batch_size = 32
        c.train.warmup_steps = 5
        c.train.log_every = 5
        c.train.save_every = 10
        c.eval.num_examples = 64
        c.eval.batch_size = 32
        c.eval.num_samples = 16
        c.eval.sample_steps = 10
    elif arg not in (None, ""):
        raise ValueError(f"config argument: expected '' or 'quick'; got {arg!r}")
    return c
