r"""Robustness, distances and compression on the embedded default (sklearn digits).

One config serves the three per-piece scripts:

    python -m experiments.eval_robustness --config=experiments/configs/eval_digits.py \
        --workdir=workdir/eval_digits
    python -m experiments.distances --config=experiments/configs/eval_digits.py \
        --workdir=workdir/eval_digits
    python -m experiments.compression --config=experiments/configs/eval_digits.py \
        --workdir=workdir/eval_digits

Models: the shipped `digits_ddpm` (1000-step linear DDPM schedule) and `digits_classifier`
(any directory from `experiments.convert_checkpoint` or `pretrained.save` works too).
Settings follow the study's (`experiments/configs/reproduce.py`, which says why): t* = 100
of 1000 with 10 respaced reverse steps, PGD-10 l_inf eps 0.1 (step 0.025), full gradients,
EOT-4 under `independent`, 96 test examples. `:quick` is a seconds-long smoke variant.

Expected (PAPER_NOTES.md's probe of the same setting, +-5% at 96 examples): classifier
clean ~99%, after DDPM purification ~96%; undefended robust ~47%; purified robust
`fixed` < `independent` < `transfer` (about 71% / 78% / 80%); l2 to the clean image grows
from ~0.67 (adversarial input) to ~1.0 after purification; compression rates below 1 that
fall as t* grows.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The config; ``arg="quick"`` shrinks everything to a smoke run."""
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.data_dir = ""
    c.split = "test"
    c.num_examples = 96  # 0: the whole split
    c.batch_size = 48  # global; rounded up to a multiple of the device count
    c.seed = 0
    c.keys_from = "ids"  # per-example keys from the example id ("content": image bytes)

    c.diffusion = "digits_ddpm"  # a shipped name or a model directory
    c.classifier = "digits_classifier"
    c.methods = "ddpm"  # comma-separated: ddpm, reverse_only, ddim, reverse_only_ddim, sde, none
    c.protocols = "fixed,independent,transfer"
    c.eval_draws = 4  # M evaluation draws per adversarial example (multi-draw accuracy)
    c.save_adversarial = True  # keep x_adv for experiments.distances

    c.purifier = ml_collections.ConfigDict()
    c.purifier.t_star = 100
    c.purifier.num_steps = 10  # reverse steps respaced over [0, t_star); 0: t_star steps
    c.purifier.resolution = 0  # 0: the data's; else resize in and out of the purifier

    c.attack = ml_collections.ConfigDict()
    c.attack.name = "pgd"  # or "apgd"
    c.attack.norm = "linf"
    c.attack.eps = 0.1
    c.attack.step_size = 0.025
    c.attack.steps = 10
    c.attack.eot = 4  # EOT draws under `independent` (1 under fixed/transfer)
    c.attack.eot_batch_size = 0  # 0: all draws at once
    c.attack.gradient = "full"  # or "bpda"
    c.attack.loss = "ce"
    c.attack.random_start = True

    c.distances = ml_collections.ConfigDict()
    c.distances.protocol = "transfer"  # whose adversarial inputs to measure
    c.distances.fid_reference_split = "train"
    c.distances.fid_reference_examples = 1500
    c.distances.ssim_filter_size = 7  # SSIM's 11x11 window does not fit 8x8 images
    c.distances.ssim_filter_sigma = 1.0

    c.compression = ml_collections.ConfigDict()
    c.compression.methods = "ddpm,reverse_only,ddim"
    c.compression.t_stars = "10,30,100,200,400"
    c.compression.num_examples = 16
    c.compression.estimator = "auto"  # exact below 1024 input dims, else Hutchinson
    c.compression.num_probes = 64
    c.compression.spectrum = "exact"  # "exact", "top_k" (Lanczos) or "none"
    c.compression.top_k = 32
    c.compression.chunk_size = 32
    # "reverse": the Jacobian from vjps (rows), "forward": from jvps (columns); the same
    # cost for a purifier (d_out = d_in).
    c.compression.ad_mode = "reverse"

    if arg == "quick":
        c.num_examples = 8
        c.batch_size = 8
        c.eval_draws = 2
        c.purifier.num_steps = 2
        c.attack.steps = 2
        c.attack.step_size = 0.05
        c.attack.eot = 2
        c.distances.fid_reference_examples = 64
        c.compression.methods = "ddpm"
        c.compression.t_stars = "10,100"
        c.compression.num_examples = 4
    elif arg:
        raise ValueError(f"config: unknown variant {arg!r}; use '' or 'quick'")
    return c
