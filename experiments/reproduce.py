r"""The main job: every claim of arXiv 2505.22839 on the embedded default, end to end.

    python -m experiments.reproduce --workdir=workdir/study
    python -m experiments.reproduce --workdir=workdir/quick \
        --config=experiments/configs/reproduce.py:quick

Writes WORKDIR/results.json (schema in shared/API.md), WORKDIR/report.md and the figures.
A rerun with the same workdir loads finished parts and resumes an interrupted one.
Multi-host (TPU pod slices, multi-node GPU): add --distributed on every process.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

try:  # with a default config file, overrides like --config.attack.steps apply right here
    _CONFIG = config_flags.DEFINE_config_file(
        "config", "experiments/configs/reproduce.py",
        "Study config file (:quick for the fast one).")
except (AttributeError, KeyError, ValueError, TypeError) as _e:
    common.exit_with_flag_error(_e, sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results (resumable).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache", "~/.cache/diffjax/jax_cache",
    "JAX's persistent compilation cache ('' to disable): compiling the study's ~40 programs "
    "is most of a CPU run's time, and a rerun or resume skips it.")


def main(argv):
    del argv

    logging.set_verbosity(logging.WARNING)  # orbax/absl INFO lines would bury the progress

    with common.one_line_errors():
        import jax

        from diffjax import parallel
        from diffjax.study import Workdir, report, run_study

        parallel.initialize(_DISTRIBUTED.value)
        if _JAX_CACHE.value:
            import os

            jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_JAX_CACHE.value))
        cfg = _CONFIG.value
        if not _WORKDIR.value:
            raise ValueError("--workdir: required; e.g. --workdir=workdir/study")
        fail_after = cfg.debug.fail_after_batches
        workdir = Workdir(_WORKDIR.value, is_writer=parallel.is_writer(),
                          fail_after_batches=fail_after if fail_after > 0 else None,
                          log=common.log)
        common.log(f"diffjax study on {jax.device_count()} {jax.devices()[0].platform} "
                   f"device(s), workdir {workdir.path}")
        res = run_study(cfg, workdir, log=common.log)
        if parallel.is_writer():
            paths = report.write_all(res, workdir.path)
            common.log(report.render_markdown(res).split("## Accuracy")[0].strip())
            common.log("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
