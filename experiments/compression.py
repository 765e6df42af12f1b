r"""Compression rate, Jacobian spectrum and fixed robust accuracy (claim 4): the sweep alone.

    python -m experiments.compression --workdir=W \
        [--config=experiments/configs/reproduce.py:imagenet] \
        [--config.compression.methods=ddpm,ddim] [--config.compression.t_stars=10,100,400] \
        [--config.compression.estimator=hutchinson --config.compression.spectrum=top_k] \
        [--distributed]

For every method in `config.compression.methods` and t* in `t_stars`
(`diffjax.study.compression`): the compression rate (RMS Jacobian singular value) of the
purifier under each example's realization -- the random map the fixed attack
differentiates -- at the first `compression.num_examples` clean images, with the
configured estimator and spectrum (exact; or Hutchinson and top-k Lanczos at CIFAR-10 and
ImageNet sizes), the fixed robust accuracy of the same realization's attack (at the main
t*, the accuracy table's own part), and the logistic fit with bootstrap intervals. Writes
`W/compression/summary.json`. Multi-host with `--distributed`.
"""

import sys

from absl import app, logging

from experiments import common

CONFIG, WORKDIR, DISTRIBUTED, JAX_CACHE = common.define_study_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    with common.one_line_errors():
        from diffjax.study import UNDEFENDED, compression, robustness

        study = common.open_study(CONFIG.value, WORKDIR.value, DISTRIBUTED.value,
                                  JAX_CACHE.value)
        points = compression.sweep(study)
        for p in points:
            frac = p.get("fraction_sv_below_0.25")
            common.log(f"[{p['method']}/t{p['t_star']}] rate {p['compression_rate']:.4f} "
                       f"(+-{p['compression_rate_stderr']:.4f}), robust (fixed) "
                       f"{100 * p['robust_accuracy_fixed']:.1f}%, singular values below "
                       f"0.25: {'n/a' if frac is None else f'{100 * frac:.0f}%'}")
        und = robustness.attack_part(study, UNDEFENDED)
        fit = compression.fit(study, points, float(und["clean_correct_fixed"].mean()),
                              float(und["fixed_adv_correct"].mean()))
        common.write_summary(study, "compression", {"points": points, **fit})


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
