r"""Distances to the clean image and FID (claim 1): the study's distance part alone.

    python -m experiments.distances --workdir=W \
        [--config=experiments/configs/reproduce.py:cifar10] [--config.methods=ddpm,ddim] \
        [--distributed]

For every purifier in `config.methods`: its fixed attack part (run first where missing,
resuming; `diffjax.study.robustness.attack_part`), whose evaluation purified every
adversarial input and its clean image under the example's realization and measured, on
those very images, the l2 / l_inf / SSIM / SNR distances to the clean image and the
classifier features for the FID (`diffjax.study.distances`). Writes
`W/distances/summary.json`: per method the means, the exact sign test of "purified
farther than the adversarial input" with a bootstrap interval of the mean difference, and
the FIDs of the adversarial inputs, the purified sets and the clean set against
`config.fid_reference_examples` training images. Multi-host with `--distributed`.
"""

import sys

from absl import app, logging

from experiments import common

CONFIG, WORKDIR, DISTRIBUTED, JAX_CACHE = common.define_study_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    with common.one_line_errors():
        from diffjax.study import distances, robustness
        from diffjax.study.context import methods_of

        study = common.open_study(CONFIG.value, WORKDIR.value, DISTRIBUTED.value,
                                  JAX_CACHE.value)
        summary = {}
        for m in methods_of(study.config):
            d = distances.distances(study, robustness.attack_part(study, m))
            d.pop("per_example_l2")
            summary[m] = d
            t = d["test_purified_farther"]
            common.log(f"[{m}] l2 {d['l2_adv_input']:.3f} -> {d['l2_purified']:.3f} (farther "
                       f"for {t['farther']} examples, p = {t['p_value']:.2g}), SSIM "
                       f"{d['ssim_adv_input']:.3f} -> {d['ssim_purified']:.3f}, FID "
                       f"{d['fid_adv_input']:.2f} -> {d['fid_purified']:.2f}")
        common.write_summary(study, "distances", summary)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
