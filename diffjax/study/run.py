"""The whole study of arXiv 2505.22839 on one dataset: every part, the results dict.

An image's path: data (`Study`: this process's share of the test split) -> purifier
(`Study.defense`) -> attack (`robustness.attack_part`: the config's cascade, early exit
under the realization) -> ONE evaluation pass (`attacks.evaluate` under the realization
and the protocols sharing the attack, with the distances and FID features of those very
purifications) -> the claims' summaries -> results.json -> the report
(`report.write_all`, rendered from results.json).

Purifications that run again, and why:

- the `Independent` protocol's evaluation draws (M purifications of each adversarial
  example under fresh keys) and `Transfer`'s: other random maps by definition;
- the Jacobians of the compression sweep: a Jacobian needs the purifier's linearisation,
  which no forward pass provides (`metrics.compression_rate`);
- the gradient correlation (K + 1 gradients at the clean images) and the randomness
  measurement (eps-ball points, P seeds): new inputs or new keys;
- the audit's attacks: other attacks, by design.

No purification is re-run to measure an image already purified: the clean accuracy, the
`Fixed` verdict, the distances, the FID features and the figure's images of a method all
come from the two purifications (clean and adversarial, under the realization) of its
fixed attack part's evaluation.

Per-example keys are `example_keys(key(seed), id)` with the id the index in the split,
so every number is independent of batch size, batch order, device and process count --
and of the order the parts are computed in: with `config.concurrent_parts` > 1 (one
process), the parts that compile the study's distinct programs (the first method's two
attacks, the first sweep point, the audit's other attacks, the gradient correlation, the
randomness measurement, the undefended attack) are computed first, that many at a time:
on a CPU most of a small study is XLA compiling these programs, one core each; every
later part reuses them. Measured on XLA:CPU (jax 0.10.2): two programs executing at once
do not always give bit-identical results (an attack's adversarial examples moved by up to
0.05 in l2 against a run alone, and once a fixed verdict disagreed with the attack's own
success; with XLA's YNNPACK fusions off they were identical), so the study configs
default to one part at a time and a concurrent run's numbers are only reproducible to
that degree.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from collections.abc import Callable

import jax

from diffjax.study import audit, compression, distances, randomness, robustness, verdicts
from diffjax.study.context import UNDEFENDED, Study, as_list, methods_of, validate_config
from diffjax.study.workdir import Workdir

__all__ = ["run_study", "validate_config"]


def run_study(config, workdir: Workdir, log: Callable[[str], None] = print,
              study: Study | None = None) -> dict:
    """Runs (or resumes) every part of the study; returns the results dict (API.md).

    `study`: an already opened `Study` of this config and work directory (else one is).
    """
    from diffjax.study import report

    validate_config(config)
    t0 = time.time()
    study = study or Study(config, workdir, log)
    methods = methods_of(config)
    res: dict = {"dataset": config.dataset, "split": study.split,
                 "num_examples": int(study.num_examples),
                 "synthetic_data": bool(config.get("synthetic_data"))}
    _start_concurrently(study, methods)
    und = robustness.robust_undefended(study)
    res["clean_accuracy"] = robustness.clean_accuracy(study, methods)
    res["robust_accuracy"] = {"undefended": und["robust_accuracy"],
                              "undefended_ci": und["robust_accuracy_ci"]}
    res["undefended_attack"] = und
    for key in ("distances", "fid", "gradient_correlation", "gradient_correlation_detail",
                "randomness_correlation", "distances_per_example"):
        res[key] = {}
    for m in methods:
        res["robust_accuracy"][m] = robustness.robust(study, m)
        dist = distances.distances(study, robustness.attack_part(study, m))
        res["distances_per_example"][m] = dist.pop("per_example_l2")
        res["distances"][m] = dist
        res["fid"][m] = {"adv_input": dist["fid_adv_input"], "purified": dist["fid_purified"],
                         "purified_clean": dist["fid_purified_clean"],
                         "clean": dist["fid_clean"]}
        gc = robustness.gradient_correlation(study, m)
        res["gradient_correlation"][m] = gc["mean"]
        res["gradient_correlation_detail"][m] = gc
        res["randomness_correlation"][m] = randomness.randomness_correlation(study, m)
    res["compression"] = compression.sweep(study)
    res.update(compression.fit(study, res["compression"], res["clean_accuracy"]["undefended"],
                               res["robust_accuracy"]["undefended"]))
    res["consistency"] = _consistency(study, res, methods)
    if config.audit.enabled:
        res["audit"] = {m: audit.audit(study, m) for m in as_list(config.audit.methods)}
    res["claims"] = verdicts.claims(res)
    res["elapsed_s"] = time.time() - t0
    res["config"] = report.config_to_dict(config)
    res["devices"] = {"count": jax.device_count(), "processes": jax.process_count(),
                      "platform": jax.devices()[0].platform}
    res["parts"] = {"loaded": workdir.loaded_parts, "computed": workdir.computed_parts}
    res["costs"] = _costs(workdir)
    res["figure_examples"] = _figure_parts(study, methods)
    return res


def _start_concurrently(study: Study, methods) -> None:
    """Computes the parts that compile distinct programs `config.concurrent_parts` at a
    time, longest first (module docstring); the sequential pass then loads them. One
    process only: several processes must run their collectives in the same order."""
    cfg = study.config
    workers = int(cfg.get("concurrent_parts") or 1)
    if workers < 2 or jax.process_count() > 1:
        return
    m0 = methods[0]
    thunks = [lambda: robustness.attack_part(study, m0, stream="realization"),
              lambda: robustness.attack_part(study, m0, stream="fresh")]
    sweep = [(m, t) for m in as_list(cfg.compression.methods)
             for t in as_list(cfg.compression.t_stars, int)]
    if sweep:
        main_t = int(cfg.purifier.t_star)
        first = next(((m, t) for m, t in sweep if t != main_t), sweep[0])
        thunks.append(functools.partial(compression.compression_point, study, *first))
    audited = [functools.partial(audit.variant, study, as_list(cfg.audit.methods)[0], v)
               for v in audit.VARIANTS] if cfg.audit.enabled else []
    thunks += [*audited[:1], lambda: robustness.gradient_correlation(study, m0), *audited[1:],
               lambda: robustness.attack_part(study, UNDEFENDED),
               lambda: randomness.randomness_correlation(study, m0)]
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="part")
    try:
        for f in [pool.submit(t) for t in thunks]:
            f.result()  # the first error, raised as the sequential pass would raise it
    finally:  # after an error, parts not started are not started; finished ones are saved
        pool.shutdown(wait=True, cancel_futures=True)


def _consistency(study: Study, res: dict, methods) -> dict:
    """One realization everywhere: the sweep point of each method at the main t* has the
    accuracy table's clean and fixed robust accuracies (the same part), and every fixed
    verdict is the attack's own success under the realization."""
    t = int(study.config.purifier.t_star)
    rows = {}
    for m in methods:
        point = next((p for p in res["compression"] if p["method"] == m and p["t_star"] == t),
                     None)
        part = robustness.attack_part(study, m)
        rows[m] = {
            "fixed_verdict_is_the_attacks_own": robustness.realization_check(part),
            "sweep_point_at_main_t_star": None if point is None else {
                "clean_accuracy_equal": point["clean_accuracy"] == res["clean_accuracy"][m],
                "robust_accuracy_fixed_equal": (point["robust_accuracy_fixed"]
                                                == res["robust_accuracy"][m]["fixed"])}}
    rows[UNDEFENDED] = {"fixed_verdict_is_the_attacks_own": robustness.realization_check(
        robustness.attack_part(study, UNDEFENDED))}
    return rows


def _costs(workdir: Workdir) -> dict:
    every = workdir.all_costs()
    total = {k: float(sum(c[k] for c in every.values())) for k in ("wall_s", "compile_s",
                                                                   "run_s")}
    return {"parts": every, "total": total}


def _figure_parts(study: Study, methods) -> dict:
    """Where the figure's images are: the fixed attack part of each method."""
    t = int(study.config.purifier.t_star)
    return {m: robustness.part_name(m, t, "realization") for m in methods}

