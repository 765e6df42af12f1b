r"""Beyond the paper (issue 15) on the embedded default: the study's config plus `beyond`.

    python -m experiments.beyond --workdir=workdir/study      # after (or without) reproduce
    python -m experiments.beyond --workdir=workdir/quick \
        --config=experiments/configs/beyond.py:quick

The study's fields are `reproduce.py`'s of the same variant, unchanged, so that the parts
have the same names: in a work directory where `experiments.reproduce` ran, the attack,
Jacobian and undefended parts are loaded, not recomputed. Where they are missing the
`beyond.fallback` sizes are computed instead (own part names), to keep a cold start within
its budget (about 10 minutes on 2 CPU cores for the default, under a minute for `quick`):
the study's full attacks of four diffusion purifiers over 297 examples and its 21-point
sweep take far longer than that on 2 cores.

`beyond` (what `diffjax.study.beyond` reads):

- `purifier`: the designed deterministic purifier (a `pretrained` name or directory),
  attacked like the study's purifiers over every example (`batch_size` is 16 in the
  default: every number is independent of it, and the fallbacks' small parts are padded
  to it);
- `fallback`: without the study's parts, the diffusion methods' fixed attacks run over
  the first `num_examples` examples and the sweep over `sweep_points` ("method:t*"), its
  attacks over the first `sweep_num_examples` examples (at the main t*: the method's
  fallback part) and its compression rates at the first `num_rate_examples` images;
- `audit`: the designed purifier's masking audit: the undefended classifier's cascade
  (`attack_undefended`), BPDA, Square with `square_queries` and the study's cascade at
  each of `eps`, over the first `num_examples` (0: all) examples;
- `goal`: clean >= `min_clean_accuracy`, fixed robust accuracy >= the best diffusion
  purifier's + `min_gain`, Wilson intervals disjoint;
- `critical`: the undefended classifier's critical distances (PGD-`steps` CE, bisection
  over eps up to `eps_max`, `num_rounds` rounds);
- `likelihood`: bits/dim under the diffusion prior of the first `num_images` examples:
  clean, the adversarial inputs of `adversarial_of`'s fixed attack, their purifications by
  `methods`, the purified clean images of `clean_methods`, the x0-predictions after the
  `chain_points` steps of `adversarial_of`'s chain; probability-flow ODE with `num_steps`
  RK4 steps and the `trace` ("exact": 64 jvps per evaluation at 8x8), dequantised to
  bins of `dequantize` (1/16: the digits' grey levels); the score norm at `score_t`.

Why these sizes (default; measured on the shared 2-core CPU under a load of about 4, i.e.
with about one core, so an idle machine is faster): the designed purifier is cheap (a
0.17M-parameter conv net, no chain), so it is attacked on every example (13 s for the
study's attack) and audited on the first 100 (the undefended classifier's 100-step cascade
with 9 targets, BPDA, Square with 1,000 queries, eps 0.2 and 0.5); a diffusion method's
full-gradient attack costs about 0.7 s per example there (10 reverse steps in every one of
its 40 iterations), so the fallback attacks the first 48 examples per method (~35 s each)
and the fallback sweep has 6 points (4 new attacks on 32 examples, rates at 4 images); the
exact-trace likelihood costs about 8 s per image and set there (64 jvps through the U-Net
at each of 32 ODE evaluations), so it runs on 8 images and 6 sets (clean, adversarial,
purified by ddpm and by the designed purifier, purified clean, one chain point).

Expected result: see README, "Beyond the paper" (the numbers of a default run).
"""

import ml_collections

from experiments.configs import reproduce


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The study's config of variant `arg` ('' or 'quick') with the `beyond` fields."""
    arg = arg or ""
    if arg not in ("", "quick"):
        raise ValueError(f"config: unknown variant {arg!r}; use '' or 'quick'")
    c = reproduce.get_config(arg)
    if not arg:
        # Every number is independent of the batch size (per-example keys), so the study's
        # parts are reused whatever it was; but a batch is padded to this size, so the
        # fallbacks' small parts (4 Jacobians, 32-48 attacked examples) cost 3x less at 16.
        c.batch_size = 16
    b = c.beyond = ml_collections.ConfigDict()
    b.purifier = "digits_purifier"

    b.fallback = ml_collections.ConfigDict()
    b.fallback.num_examples = 48
    b.fallback.sweep_points = ("ddpm:10,ddpm:30,ddpm:100,ddpm:200,reverse_only:10,"
                               "reverse_only:100")
    b.fallback.sweep_num_examples = 32
    b.fallback.num_rate_examples = 4

    b.audit = ml_collections.ConfigDict()
    b.audit.num_examples = 100  # 0: every example
    b.audit.square_queries = 1000
    b.audit.eps = "0.2,0.5"

    b.goal = ml_collections.ConfigDict()
    b.goal.min_clean_accuracy = 0.95
    b.goal.min_gain = 0.10

    b.critical = ml_collections.ConfigDict()
    b.critical.attack = "apgd-ce"  # or "pgd"
    b.critical.steps = 50
    b.critical.num_rounds = 8
    b.critical.eps_max = 0.5
    b.critical.step_fraction = 0.25

    b.likelihood = ml_collections.ConfigDict()
    b.likelihood.num_images = 8
    b.likelihood.num_steps = 8
    b.likelihood.trace = "exact"
    b.likelihood.num_probes = 4  # Hutchinson only
    b.likelihood.time_input = "fractional"
    b.likelihood.dequantize = 1.0 / 16
    b.likelihood.methods = "ddpm,digits_purifier"
    b.likelihood.clean_methods = "ddpm"
    b.likelihood.adversarial_of = "ddpm"
    b.likelihood.chain_points = "2"  # midway through the 4-step chain
    b.likelihood.score_t = "0,10"

    if arg == "quick":
        b.fallback.num_examples = 24  # the quick study's own sizes: the study's parts
        b.fallback.sweep_points = ("ddpm:10,ddpm:100,ddpm:300,reverse_only:10,"
                                   "reverse_only:100,reverse_only:300")
        b.fallback.sweep_num_examples = 24
        b.fallback.num_rate_examples = 4
        b.audit.num_examples = 0
        b.audit.square_queries = 100
        b.audit.eps = "0.5"
        b.critical.steps = 10
        b.critical.num_rounds = 6
        b.likelihood.num_images = 4
        b.likelihood.num_steps = 4
        b.likelihood.trace = "hutchinson"
        b.likelihood.num_probes = 2
        b.likelihood.chain_points = "1"
        b.likelihood.score_t = "0"
    return c
