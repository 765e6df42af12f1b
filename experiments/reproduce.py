r"""The main job: every claim of arXiv 2505.22839 on the embedded default, end to end.

    python -m experiments.reproduce --workdir=workdir/study
    python -m experiments.reproduce --workdir=workdir/quick \
        --config=experiments/configs/reproduce.py:quick

Writes WORKDIR/results.json (schema in shared/API.md), WORKDIR/report.md and the figures.
A rerun with the same workdir loads finished parts and resumes an interrupted one.
Multi-host (TPU pod slices, multi-node GPU): add --distributed on every process.
"""

import sys

from absl import app, logging

from experiments import common

CONFIG, WORKDIR, DISTRIBUTED, JAX_CACHE = common.define_study_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax/absl INFO lines would bury the progress
    with common.one_line_errors():
        from diffjax import parallel
        from diffjax.study import report, run_study

        study = common.open_study(CONFIG.value, WORKDIR.value, DISTRIBUTED.value,
                                  JAX_CACHE.value)
        res = run_study(study.config, study.workdir, log=common.log, study=study)
        if parallel.is_writer():
            paths = report.write_all(res, study.workdir.path)
            for line in report.summary_lines(res):
                common.log(line)
            common.log("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
