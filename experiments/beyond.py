r"""Beyond the paper (issue 15): the paper's open questions on the study's parts.

    python -m experiments.beyond --workdir=W \
        [--config=experiments/configs/beyond.py:quick] [--config.beyond.likelihood.num_images=16]

Writes `W/beyond.json`, `W/beyond.md` (a report section) and `W/figures/beyond_*.png`
(`diffjax.study.beyond`): (1) the designed deterministic purifier (`digits_purifier`)
attacked like the diffusion purifiers, its masking audit, the issue's goal against the best
diffusion purifier and its place on the compression-robustness curve; (2) every sweep
point's fixed robust accuracy predicted from its compression rate with no fitted parameter
(critical distances of the undefended classifier), beside the fitted logistic; (3) the
diffusion prior's bits/dim of clean, adversarial, purified images and along the chain, and
the relation to the l2 drift of claim 1. With the workdir of `experiments.reproduce`, its
parts are reused by name; a rerun resumes. Multi-host with `--distributed`.
"""

import sys
import time

from absl import app, logging

from experiments import common

CONFIG, WORKDIR, DISTRIBUTED, JAX_CACHE = common.define_study_flags(
    "experiments/configs/beyond.py")
_T0 = time.time()


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    with common.one_line_errors():
        from diffjax.study import beyond

        beyond.validate(CONFIG.value)
        study = common.open_study(CONFIG.value, WORKDIR.value, DISTRIBUTED.value,
                                  JAX_CACHE.value)
        res = beyond.run(study)
        res["elapsed_s"] = time.time() - _T0
        res["config"] = CONFIG.value.to_dict()
        out = beyond.write_all(res, study.workdir.path)
        for k in ("json", "report"):
            if k in out:
                common.log(f"wrote {out[k]}")
        dp = res["designed_purifier"]
        g = dp["goal"]
        common.log(f"designed purifier {dp['name']}: clean {100 * dp['clean_accuracy']:.1f}%, "
                   f"robust (fixed) {100 * dp['robust_accuracy_fixed']:.1f}% vs best diffusion "
                   f"{dp['best_diffusion']['method']} "
                   f"{100 * dp['best_diffusion']['robust_accuracy_fixed']:.1f}%: goal "
                   f"{'PASSED' if g['passed'] else 'FAILED'} (gain margin "
                   f"{100 * g['gain_margin']:+.1f} points, interval gap "
                   f"{100 * g['interval_gap']:+.1f})")
        p = res["predictor"]
        common.log(f"predictor (nothing fitted): MAE {100 * p['mae']:.1f} points, R^2 "
                   f"{p['r2']:.2f} over {p['n']} sweep points" + (
                       f"; fitted logistic: MAE {100 * p['logistic']['mae']:.1f}, R^2 "
                       f"{p['logistic']['r2']:.2f}" if p.get("logistic") else ""))
        common.log(f"likelihood: {res['likelihood']['answer']}")
        common.log(f"done in {res['elapsed_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
