r"""The whole study on the embedded default (sklearn digits, shipped checkpoints).

Run (from a cold start on an idle 2-core AMD EPYC, 2026-12-01: 9 min 13 s, and `:quick`
56-59 s, with the shared gradient oracle; 10 min 13 s and 94-101 s without it, run
alternately; 10 min 10 s on an Intel Xeon before it):

    python -m experiments.reproduce --workdir=workdir/study
    python -m experiments.reproduce --workdir=workdir/quick \
        --config=experiments/configs/reproduce.py:quick

Override anything, e.g. `--config.attack.steps=20 --config.methods=ddpm,sde`.

What the default runs (the budget: <= 10 minutes on 2 CPU cores from a cold start, up to
15 where the evidence needs it; README "What the main job prints"): all 297 test digits;
four purifiers (ddpm, reverse_only, ddim, sde) at t* = 100 of 1000 with 4 reverse steps;
per purifier the cascade APGD-CE then APGD-T (1 target), 10 steps each, early exit in
chunks of 5, full gradients through the sampler, under the realization (fixed and
transfer) and with EOT-2 under fresh draws (independent), evaluated with 8 draws; the
undefended classifier under AutoAttack's pair (APGD-CE + APGD-T over 3 targets, 100 steps
each); l_inf eps 0.1 (digits are nearly binary; 8/255 barely moves a 16-level image);
the gradient correlation (EOT-16, 50 examples) and the randomness measurement; a sweep of
3 samplers x 5 t* (5 to 400) with exact Jacobian spectra on 8 examples and attacks on 32;
the gradient-masking audit on 24 examples (10x the steps, straight-through clips, BPDA,
Square with 300 queries, eps 0.2 and 0.4). Sweep points whose purified clean accuracy
falls below `min_clean_fraction` of the classifier's (t* = 400 erases a digit) are shown
but left out of the fit.

Why it fits: most of a CPU run is XLA compiling, so the study compiles few programs: every
gradient through the purifier -- the attacks under every protocol and EOT count, BPDA,
the gradient correlation, the sweep's Jacobian rows -- comes from ONE compiled program
(`shared_oracle`, `diffjax.attacks.gradients.oracle`), a purifier's method, t* and
schedule are data (`diffusion.make_chain`), chains shorter than
`num_steps` are padded with identity steps, every batch is padded to `batch_size`, eps and
the clips' gradient path (the audit's straight-through attack) are traced, every attack
part shares one evaluation program, the scripts compile with XLA's LLVM at level 1 on a
CPU (`experiments.common.compile_faster_on_cpu`). `concurrent_parts=2` computes the parts
that compile the distinct programs two at a time at the start (`diffjax.study.run`; ~15%
faster cold, not bit-reproducible on XLA:CPU, so off by default). Every verdict carries
its test (README).
"""

import ml_collections


def _attack(cascade: str, steps: int, *, eps: float = 0.1, step_size: float = 0.025,
            targets: int = 3, chunk: int = 0) -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict()
    a.cascade = cascade  # attacks run in order, each on the examples still robust
    a.norm = "linf"
    a.eps = eps
    a.step_size = step_size  # PGD's (APGD sets its own)
    a.steps = steps  # per attack of the cascade
    a.targets = targets  # APGD-T's target classes
    a.restarts = 1
    a.queries = 0  # Square's query budget (0: steps)
    a.chunk = chunk  # early exit: iterations per round (0: the whole attack in one round)
    a.early_exit = True
    a.loss = "ce"
    a.gradient = "full"
    a.random_start = True
    a.eot = 4  # EOT draws under the independent protocol
    a.eot_batch_size = 0  # 0: all draws at once
    return a


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.data_dir = None
    c.split = ""  # "": test (validation for imagenet2012)
    c.synthetic_data = False  # random images with the dataset's shape: no download
    c.diffusion = "digits_ddpm"  # a shipped name, or a directory from convert_checkpoint
    c.classifier = "digits_classifier"
    c.seed = 0
    c.num_examples = 297
    c.batch_size = 50
    c.methods = "ddpm,reverse_only,ddim,sde"  # comma-separated: --config.methods=ddpm,sde
    c.eval_draws = 8
    c.protocols = "fixed,transfer,independent"  # what experiments.eval_robustness reports
    # Parts computed at once at the start (one process; diffjax.study.run). 1: on XLA:CPU
    # two programs running at once do not give bit-identical results (YNNPACK's kernels;
    # BENCHMARKS.md, "Compiling the study"), and a number must not depend on what ran
    # beside it. 2 saves ~15% of a cold CPU run where bit-reproducibility is not needed.
    c.concurrent_parts = 1
    # Every gradient through the purifier (the attacks' iterations under every protocol
    # and EOT count, the gradient correlation, the Jacobians' rows) from ONE compiled
    # program per batch shape (`diffjax.attacks.gradients.oracle`): on a CPU compiling
    # each costs seconds, most of a cold run (BENCHMARKS.md, "Compiling the study").
    # False: the in-program attacks (one program per attack; what an accelerator with a
    # long purifier may prefer: EOT draws batched in one program).
    c.shared_oracle = True

    c.purifier = ml_collections.ConfigDict()
    c.purifier.t_star = 100
    c.purifier.num_steps = 4
    c.purifier.resolution = 0  # 0: the diffusion model's own image size
    # What a gradient keeps of each reverse step: True ("steps"), "save_conv" or False
    # ("none") (diffjax.diffusion.REMAT_MODES). 4 steps of a 0.28M U-Net on 8x8: the
    # activations are small, so all of them.
    c.purifier.remat = ml_collections.FieldReference(False, field_type=object)
    c.purifier.clip_gradient = "hard"

    # The purified models' attack; the undefended classifier (cheap) gets AutoAttack's.
    c.attack = _attack("apgd-ce,apgd-t", 10, targets=1, chunk=5)
    c.attack.eot = 2
    c.attack_undefended = _attack("apgd-ce,apgd-t", 100, targets=3, chunk=25)

    c.correlation = ml_collections.ConfigDict()
    c.correlation.eot = 16
    c.correlation.num_examples = 50

    c.randomness = ml_collections.ConfigDict()
    c.randomness.num_images = 8
    c.randomness.num_points = 50

    c.compression = ml_collections.ConfigDict()
    c.compression.methods = "ddpm,reverse_only,ddim"
    c.compression.t_stars = "5,30,100,200,400"
    c.compression.num_examples = 8
    c.compression.num_attack_examples = 32
    c.compression.min_clean_fraction = 0.9  # fit only points that keep the content
    c.compression.estimator = "auto"  # exact below 1024 input dims, else Hutchinson
    c.compression.num_probes = 64
    c.compression.spectrum = "exact"  # "exact", "top_k" (Lanczos) or "none"
    c.compression.top_k = 32
    c.compression.lanczos_iterations = 0  # 0: max(2 top_k, top_k + 20); raise if unconverged
    c.compression.chunk_size = 64
    c.compression.ad_mode = "reverse"  # vjps: ~15x faster than jvps through the U-Net on CPU

    c.audit = ml_collections.ConfigDict()
    c.audit.enabled = True
    c.audit.methods = "ddpm"
    c.audit.num_examples = 24
    c.audit.step_multipliers = "1,10"  # the study's steps x these, fixed and independent
    c.audit.eps = "0.2,0.4"  # a larger budget must drive the accuracy towards 0
    c.audit.square_queries = 300
    c.audit.tolerance = 0.02  # a difference that counts (and is significant at 5%)
    c.audit.max_large_eps_accuracy = 0.05

    c.fid_reference_examples = 1500

    c.debug = ml_collections.ConfigDict()
    c.debug.fail_after_batches = -1  # test hook: > 0 stops after that many saved pieces

    if arg == "quick":
        c.num_examples = 24
        c.batch_size = 24
        c.eval_draws = 4
        c.purifier.num_steps = 4
        c.attack = _attack("apgd-ce", 4, chunk=2, step_size=0.04)
        c.attack.eot = 2
        c.attack_undefended = _attack("apgd-ce,apgd-t", 20, targets=3, chunk=10)
        c.correlation.eot = 4
        c.correlation.num_examples = 24
        c.randomness.num_images = 2
        c.randomness.num_points = 24
        c.compression.methods = "ddpm,reverse_only"
        c.compression.t_stars = "10,100,300"
        c.compression.num_examples = 4
        c.compression.num_attack_examples = 24
        c.audit.num_examples = 24
        c.audit.step_multipliers = "1,3"
        c.audit.eps = "0.4"
        c.audit.square_queries = 50
        c.audit.tolerance = 0.05
        c.audit.max_large_eps_accuracy = 0.2
        c.fid_reference_examples = 300
    elif arg == "cifar10":
        # The paper's CIFAR-10 setting (PAPER_NOTES.md): DDPM++ deep (score_sde) + WRN-28-10
        # Standard, converted with experiments.convert_checkpoint into these directories;
        # t* = 100 with all 100 reverse steps, full-gradient PGD-200 EOT-20, l_inf 8/255,
        # step 0.007, on the first 512 test images. Days of GPU time at these sizes: run
        # it on an accelerator (README: scale-out). Check and time it first on any machine
        # with --config.synthetic_data=True, small checkpoints and small sizes
        # (tests/paper_configs.py; experiments.project_cost projects the whole run).
        c.dataset = "cifar10"
        c.concurrent_parts = 1  # also: an accelerator runs one program at a time
        c.shared_oracle = False  # EOT-20 batched in one program per attack
        c.diffusion = "~/.cache/diffjax/checkpoints/ddpmpp_cifar10"
        c.classifier = "~/.cache/diffjax/checkpoints/wrn_28_10_standard"
        c.num_examples = 512
        c.batch_size = 64
        c.purifier.num_steps = 100
        c.purifier.remat = True
        c.attack = _attack("pgd", 200, eps=8 / 255, step_size=0.007, chunk=25)
        c.attack.eot = 20
        c.attack_undefended = _attack("apgd-ce,apgd-t", 100, eps=8 / 255, targets=9, chunk=25)
        c.correlation.eot = 20
        c.correlation.num_examples = 64
        c.randomness.num_images = 16
        c.randomness.num_points = 100
        c.compression.t_stars = "25,50,100,150,200"
        c.compression.num_examples = 8
        c.compression.num_attack_examples = 128
        c.compression.estimator = "hutchinson"  # d = 3,072
        c.compression.spectrum = "top_k"
        c.compression.top_k = 32
        c.compression.chunk_size = 16
        c.audit.num_examples = 64
        c.audit.step_multipliers = "1,2"
        c.audit.eps = "0.0627,0.125"  # 16/255, 32/255
        # Square's budget follows the attack's: 1,000 queries against PGD-200 (a query is
        # one purification; PGD-200 EOT-20 costs ~12,000 per example), 10 for a 2-step
        # check run. A lazy reference: --config.attack.steps=N gives 5N.
        c.audit.square_queries = c.attack.get_ref("steps") * 5
        c.fid_reference_examples = 10000
    elif arg == "imagenet":
        # The paper's ImageNet setting: guided-diffusion 256x256 unconditional + ResNet-50,
        # t* = 150, BPDA-EOT l_inf 4/255 (full gradients through 150 steps at 256x256 were
        # out of the paper's budget too); 224 for the classifier, 256 for the purifier.
        # Jacobians matrix-free only (d = 150,528): Hutchinson rate, top-k Lanczos spectrum.
        c.dataset = "imagenet2012"
        c.concurrent_parts = 1
        c.shared_oracle = False
        c.diffusion = "~/.cache/diffjax/checkpoints/guided_256_uncond"
        c.classifier = "~/.cache/diffjax/checkpoints/resnet50"
        c.num_examples = 512
        c.batch_size = 16
        c.purifier.t_star = 150
        c.purifier.num_steps = 150
        c.purifier.remat = True
        c.attack = _attack("pgd", 100, eps=4 / 255, step_size=1 / 255, chunk=25)
        c.attack.gradient = "bpda"
        c.attack.eot = 20
        c.attack.eot_batch_size = 1
        c.attack_undefended = _attack("apgd-ce,apgd-t", 100, eps=4 / 255, targets=9, chunk=25)
        c.correlation.eot = 20
        c.correlation.num_examples = 16
        c.compression.t_stars = "50,100,150,200"
        c.compression.num_examples = 2
        c.compression.num_attack_examples = 64
        c.compression.estimator = "hutchinson"  # d = 150,528: matrix-free only
        c.compression.num_probes = 32
        c.compression.spectrum = "top_k"
        c.compression.top_k = 32
        c.compression.chunk_size = 4
        c.audit.num_examples = 16
        c.audit.step_multipliers = "1,2"
        c.audit.eps = "0.0314"  # 8/255
        c.audit.square_queries = c.attack.get_ref("steps") * 10  # 1,000 at PGD-100
        c.fid_reference_examples = 5000
    elif arg:
        raise ValueError(f"config: unknown variant {arg!r}; use '', 'quick', 'cifar10' or "
                         "'imagenet'")
    return c
