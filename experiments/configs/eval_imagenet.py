r"""The paper's ImageNet setting: guided-diffusion 256 uncond, ResNet-50, BPDA-EOT 4/255.

Checkpoints (download by hand; nothing is fetched at run time), converted once:

    python -m experiments.convert_checkpoint --format=guided-diffusion \
        --src=256x256_diffusion_uncond.pt --out=checkpoints/guided_256_uncond
    python -m experiments.convert_checkpoint --format=torchvision-resnet50 \
        --src=resnet50-11ad3fa6.pth --out=checkpoints/resnet50

ImageNet must be prepared for tfds (manual download, then `tfds build imagenet2012
--file_format=array_record --data_dir=DATA`). Then:

    python -m experiments.eval_robustness --config=experiments/configs/eval_imagenet.py \
        --config.data_dir=DATA --workdir=workdir/imagenet [--distributed]
    python -m experiments.distances ...      # same flags
    python -m experiments.compression ...    # same flags

Images are the classifier's 224x224 centre crops (`diffjax.data`); the purifier works at
256x256 (`purifier.resolution`): 224 -> bilinear 256 -> purify -> bilinear 224, as DiffPure
does, inside the defended function, so the attack sees the whole chain. A missing
checkpoint directory ends with one `error:` line. `:quick` checks the pipeline at toy size.

Settings (PAPER_NOTES.md): t* = 150 of T = 1000, 150 reverse steps [paper]; BPDA-EOT only
(the identity as the purifier's backward pass; full gradients through a 256x256 U-Net are
out of reach), l_inf eps 4/255 [paper/peer], PGD-200 with EOT-20 as on CIFAR-10 [peer],
step 1/255 [inferred: a quarter of eps], 512 validation images [peer].

Expected (the paper, ImageNet): under `fixed` randomness the robustness gain falls to
about 29.5%; the OpenReview version reports DiffPure clean 68.5% / robust 34.0% with the
noise fixed (BPDA, t = 150). `independent` and `transfer` give markedly higher figures.
"""

import ml_collections

from experiments.configs import eval_cifar10


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The config; ``arg="quick"`` gives a toy-size check of the same pipeline."""
    c = eval_cifar10.get_config()
    c.dataset = "imagenet2012"
    c.split = "validation"
    c.num_examples = 512
    c.batch_size = 16
    c.diffusion = "checkpoints/guided_256_uncond"  # guided-diffusion, converted
    c.classifier = "checkpoints/resnet50"  # torchvision-resnet50, converted

    c.purifier.t_star = 150
    c.purifier.num_steps = 150
    c.purifier.resolution = 256

    c.attack.eps = 4 / 255
    c.attack.step_size = 1 / 255
    c.attack.steps = 200
    c.attack.eot = 20
    c.attack.eot_batch_size = 1
    c.attack.gradient = "bpda"

    c.distances.fid_reference_split = "train"
    c.distances.fid_reference_examples = 5000

    c.compression.methods = "ddpm"
    c.compression.t_stars = "50,150,300"
    c.compression.num_examples = 16
    c.compression.estimator = "hutchinson"  # d = 150,528
    c.compression.num_probes = 32
    # d = 150,528: no full spectrum; the 32 largest singular values by Lanczos.
    c.compression.spectrum = "top_k"
    c.compression.top_k = 32
    c.compression.chunk_size = 4

    if arg == "quick":
        c.num_examples = 2
        c.batch_size = 2
        c.purifier.num_steps = 2
        c.attack.steps = 2
        c.attack.eot = 2
        c.distances.fid_reference_examples = 8
        c.compression.t_stars = "150"
        c.compression.num_examples = 1
        c.compression.num_probes = 2
        c.compression.top_k = 2
    elif arg:
        raise ValueError(f"config: unknown variant {arg!r}; use '' or 'quick'")
    return c
