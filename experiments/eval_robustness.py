r"""Robust accuracy under randomness protocols (claim 3): the study's attack parts alone.

    python -m experiments.eval_robustness --workdir=W \
        [--config=experiments/configs/reproduce.py:cifar10] [--config.methods=ddpm,sde] \
        [--config.protocols=fixed,transfer,independent] [--config.attack.steps=20] \
        [--config.synthetic_data=True] [--distributed]

For the undefended classifier and every purifier in `config.methods`, the study's attacks
(`diffjax.study.robustness.attack_part`: the config's cascade, early exit under fixed
randomness; the EOT attack for `independent`) over the first `config.num_examples`
examples, evaluated under each protocol of `config.protocols` (`fixed` and `transfer` share
one attack). Writes `W/robustness/summary.json`: per method and protocol the robust
accuracy with its 95% Wilson interval, the mean and worst case over the evaluation draws,
and the clean accuracy under the realization. The parts are the study's own
(`W/parts/attack_*`): `experiments.reproduce` with the same workdir reuses them, and a
rerun resumes. Multi-host: the same command on every host with `--distributed`.
"""

import sys

from absl import app, logging

from experiments import common

CONFIG, WORKDIR, DISTRIBUTED, JAX_CACHE = common.define_study_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # orbax/tfds INFO lines would bury the progress
    with common.one_line_errors():
        from diffjax import _checks, protocols
        from diffjax.study import UNDEFENDED, robustness
        from diffjax.study.context import as_list, methods_of

        wanted = as_list(CONFIG.value.protocols)
        for p in wanted:
            _checks.check_choice(p, "config.protocols", protocols.PROTOCOLS)
        study = common.open_study(CONFIG.value, WORKDIR.value, DISTRIBUTED.value,
                                  JAX_CACHE.value)
        summary = {}
        for m in [UNDEFENDED, *methods_of(study.config)]:
            rows = {}
            fixed = robustness.attack_part(study, m)
            for p in wanted:
                part = fixed
                if m == UNDEFENDED:
                    p_eval = "fixed"  # the identity purifier: every protocol is the same
                elif p == "independent":
                    part, p_eval = robustness.attack_part(study, m, stream="fresh"), p
                else:
                    p_eval = p
                row = robustness.put_accuracy({}, "robust", part[f"{p_eval}_adv_correct"])
                robustness.put_accuracy(row, "clean_fixed", part["clean_correct_fixed"])
                if f"{p_eval}_adv_correct_mean" in part:
                    row["robust_mean_over_draws"] = float(part[f"{p_eval}_adv_correct_mean"].mean())
                    robustness.put_accuracy(row, "robust_worst_over_draws",
                                            part[f"{p_eval}_adv_correct_worst"])
                row["n"] = int(len(part["ids"]))
                rows[p] = row
                common.log(f"[{m}/{p}] robust {100 * row['robust']:.1f}% "
                           f"[{100 * row['robust_ci'][0]:.1f}, {100 * row['robust_ci'][1]:.1f}]"
                           f" over {row['n']} examples")
            summary[m] = rows
        common.write_summary(study, "robustness", summary)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
