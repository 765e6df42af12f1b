"""The whole study of arXiv 2505.22839 as a library: resumable parts, results, report.

`run_study(config, Workdir(path))` computes (or loads) every part and returns the results
dict; `report.write_all(results, path)` writes results.json, then report.md and the
figures rendered from it. One module per measurement: `robustness` (claim 3, clean
accuracy, the gradient correlation), `distances` (claim 1), `randomness` (claim 2),
`compression` (claim 4), `audit` (the gradient-masking audit), `verdicts` (the tests
behind each claim); `context.Study` is what they share. `experiments/reproduce.py` is the
command-line wrapper; `experiments/eval_robustness.py`, `distances.py` and
`compression.py` run single parts; notebooks call these directly.
"""

from diffjax.study import report
from diffjax.study.context import UNDEFENDED, Study, validate_config
from diffjax.study.run import run_study
from diffjax.study.workdir import Interrupted, Workdir

__all__ = ["Interrupted", "Study", "UNDEFENDED", "Workdir", "report", "run_study",
           "validate_config"]
