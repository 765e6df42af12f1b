"""The whole study of arXiv 2505.22839 as a library: resumable parts, results, report.

`run_study(config, Workdir(path))` computes (or loads) every part and returns the results
dict; `report.write_all(results, path)` writes results.json, report.md and the figures.
`experiments/reproduce.py` is the command-line wrapper; notebooks call these directly.
"""

from diffjax.study import report
from diffjax.study.run import Study, run_study, validate_config
from diffjax.study.workdir import Interrupted, Workdir

__all__ = ["Interrupted", "Study", "Workdir", "report", "run_study", "validate_config"]
