r"""The paper's CIFAR-10 setting: DDPM++ (score_sde) purifier, WRN-28-10, PGD-200 EOT-20.

Checkpoints (download by hand; nothing is fetched at run time), converted once:

    python -m experiments.convert_checkpoint --format=score-sde-pytorch \
        --src=checkpoint_8.pth --out=checkpoints/cifar10_ddpmpp_deep
    python -m experiments.convert_checkpoint --format=robustbench-wrn \
        --src=Standard.pt --out=checkpoints/wrn_28_10_standard

(`checkpoint_8.pth`: score_sde's `vp/cifar10_ddpmpp_deep_continuous`; `Standard.pt`:
RobustBench's Linf "Standard" WRN-28-10.) CIFAR-10 must be prepared for tfds once:
`tfds build cifar10 --file_format=array_record --data_dir=DATA`. Then:

    python -m experiments.eval_robustness --config=experiments/configs/eval_cifar10.py \
        --config.data_dir=DATA --workdir=workdir/cifar10
    python -m experiments.distances --config=experiments/configs/eval_cifar10.py \
        --config.data_dir=DATA --workdir=workdir/cifar10
    python -m experiments.compression --config=experiments/configs/eval_cifar10.py \
        --config.data_dir=DATA --workdir=workdir/cifar10

Point `--config.diffusion` / `--config.classifier` elsewhere if the directories live
elsewhere; a missing directory ends with one `error:` line. Add `--distributed` on every
host of a pod slice. `:quick` runs the same pipeline at toy sizes (4 images, PGD-2, 2
reverse steps) to check the setup.

Settings (PAPER_NOTES.md): t* = 100 of T = 1000 (t = 0.1), 100 reverse steps, the model
used as a discrete eps-model on the linear schedule 1e-4..2e-2; full-gradient PGD-200 with
EOT-20 (Lee & Kim's defaults, the paper's stand-in for AutoAttack), l_inf eps 8/255, step
0.007, 512 test images (DiffPure's / Lee & Kim's evaluation size). EOT-20 applies to the
`independent` protocol; `fixed` and `transfer` attack one fixed randomness per example.

Expected (the paper, CIFAR-10): WRN clean 94.8%; robust accuracy under `fixed` about 24%
above the undefended ~0% (the paper's 23.7% gain), `independent` PGD-EOT around 70%,
`transfer` about 77%; l2 to the clean image ~1.1-1.19 for the adversarial input and
2.8-3.6 after purification, SSIM 0.965 -> 0.79-0.87; over 90% of the Jacobian singular
values below 0.25. Cost: the paper's full-gradient evaluation took about 10 GPU-days;
count about 3.7 A100-seconds per image per EOT gradient (100 reverse steps).
"""

import ml_collections

from experiments.configs import eval_digits


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The config; ``arg="quick"`` gives a toy-size check of the same pipeline."""
    c = eval_digits.get_config()
    c.dataset = "cifar10"
    c.data_dir = ""  # the tfds data_dir holding cifar10 as array_record
    c.split = "test"
    c.num_examples = 512
    c.batch_size = 64
    c.diffusion = "checkpoints/cifar10_ddpmpp_deep"  # score-sde-pytorch, converted
    c.classifier = "checkpoints/wrn_28_10_standard"  # robustbench-wrn, converted
    c.methods = "ddpm"
    c.eval_draws = 1

    c.purifier.t_star = 100
    c.purifier.num_steps = 100
    c.purifier.resolution = 0

    c.attack.name = "pgd"
    c.attack.norm = "linf"
    c.attack.eps = 8 / 255
    c.attack.step_size = 0.007
    c.attack.steps = 200
    c.attack.eot = 20
    c.attack.eot_batch_size = 4  # bounds memory: 4 of the 20 draws at once
    c.attack.gradient = "full"

    c.distances.fid_reference_split = "train"
    c.distances.fid_reference_examples = 10_000
    c.distances.ssim_filter_size = 11
    c.distances.ssim_filter_sigma = 1.5

    c.compression.methods = "ddpm,reverse_only,ddim"
    c.compression.t_stars = "20,50,100,200,400"
    c.compression.num_examples = 16
    c.compression.estimator = "auto"  # d = 3072 > 1024: Hutchinson
    c.compression.num_probes = 64
    # The whole spectrum (claim 4: >90% of singular values below 0.25): 3,072 vjps per
    # image through the 100 reverse steps. "top_k" (Lanczos) is cheaper but leaves the
    # fraction undetermined (NaN) unless the k-th value is already below 0.25.
    c.compression.spectrum = "exact"
    c.compression.top_k = 64
    c.compression.chunk_size = 16

    if arg == "quick":
        c.num_examples = 4
        c.batch_size = 4
        c.purifier.num_steps = 2
        c.attack.steps = 2
        c.attack.eot = 2
        c.distances.fid_reference_examples = 16
        c.compression.t_stars = "100"
        c.compression.num_examples = 2
        c.compression.num_probes = 4
        c.compression.spectrum = "none"
    elif arg:
        raise ValueError(f"config: unknown variant {arg!r}; use '' or 'quick'")
    return c
