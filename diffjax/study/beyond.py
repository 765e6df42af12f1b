"""Beyond the paper (issue 15): its three open questions, answered on the study's parts.

`run(study)` returns the dict of ``beyond.json``; `write_all` writes it with ``beyond.md``
and ``figures/beyond_*.png``. Everything is a `Workdir` part: a work directory where
`experiments.reproduce` already ran reuses its attack, Jacobian and undefended parts by
name; where they are missing, the smaller fallbacks of ``config.beyond.fallback`` are
computed (their own part names: an attack over the first n examples is ``..._n<n>``), and
``beyond.json`` says which was used.

1. **A purifier designed for compression** (``config.beyond.purifier``, a deterministic
   `pretrained` purifier such as ``digits_purifier``): attacked exactly like the diffusion
   purifiers (`Study.defense` of the name, the study's cascade under the fixed protocol
   with full gradients, the same examples and keys), its compression rate under the same
   estimator (`compression.compression_point`), a masking audit on the same examples
   (the undefended classifier's stronger cascade, BPDA, Square, larger budgets; paired
   exact tests against the study's attack), determinism checks, the issue's goal (clean
   >= 95%, fixed robust accuracy >= the best diffusion purifier's + 10 points, Wilson
   intervals disjoint) and its place on the compression-robustness curve.
2. **Robustness predicted from compression, nothing fitted**: every example's critical
   distance on the undefended classifier (`analysis.critical_distances`, bisection over
   eps with PGD), then `analysis.predict_from_compression` at every sweep point from its
   measured rate and anchor (clean) accuracy, scored with `analysis.compare_predictions`
   beside the fitted logistic's error on the same points.
3. **Why purification moves images away**: bits per dimension under the diffusion prior
   (`diffusion.likelihood`, probability-flow ODE, exact trace at 8x8, dequantised to the
   17 grey levels) of clean images, the adversarial inputs of the study's attack (read
   from the attack part's saved progress), their purifications by every method (under
   each example's realization, so they are the images the fixed verdict classified), the
   purified clean images, and the chain's x0-predictions along the purification; the
   score's norm at each; paired tests against the clean images and the relation of the
   bpd change to the l2 drift of claim 1.
"""

from __future__ import annotations

import io
import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from diffjax import _checks, analysis, parallel, protocols, stats
from diffjax.attacks import APGDConfig, PGDConfig
from diffjax.diffusion import likelihood as likelihood_lib
from diffjax.diffusion.schedules import from_model_space, to_model_space
from diffjax.study import compression, robustness
from diffjax.study.context import UNDEFENDED, Study, as_list, is_designed_purifier, methods_of
from diffjax.study.workdir import as_path

__all__ = ["validate", "run", "designed_purifier", "sweep_points", "predictor",
           "likelihood", "fallback_points", "render_markdown", "write_all", "FIGURES"]

FIGURES = ("beyond_predictor", "beyond_curve", "beyond_likelihood")
_SALT = 0xBE_0001


def validate(config) -> None:
    """A one-line ValueError for a `config.beyond` that cannot run."""
    b = config.beyond
    if not is_designed_purifier(b.purifier):
        _checks.fail("config.beyond.purifier", "a deterministic purifier checkpoint (role "
                     "'purifier'), e.g. digits_purifier", b.purifier)
    _checks.check_int(b.fallback.num_examples, "config.beyond.fallback.num_examples", lo=2)
    _checks.check_int(b.fallback.sweep_num_examples, "config.beyond.fallback.sweep_num_examples",
                      lo=2)
    _checks.check_int(b.fallback.num_rate_examples, "config.beyond.fallback.num_rate_examples",
                      lo=1)
    fallback_points(config)
    _checks.check_int(b.audit.num_examples, "config.beyond.audit.num_examples", lo=0)
    _checks.check_int(b.audit.square_queries, "config.beyond.audit.square_queries", lo=1)
    for e in as_list(b.audit.eps, float):
        _checks.check_number(e, "config.beyond.audit.eps[i]", lo=0.0, hi=1.0, lo_open=True)
    _checks.check_number(b.goal.min_clean_accuracy, "config.beyond.goal.min_clean_accuracy",
                         lo=0.0, hi=1.0)
    _checks.check_number(b.goal.min_gain, "config.beyond.goal.min_gain", lo=-1.0, hi=1.0)
    _checks.check_choice(b.critical.attack, "config.beyond.critical.attack",
                         ("pgd", "apgd-ce"))
    _checks.check_int(b.critical.steps, "config.beyond.critical.steps", lo=1)
    _checks.check_int(b.critical.num_rounds, "config.beyond.critical.num_rounds", lo=0)
    _checks.check_number(b.critical.eps_max, "config.beyond.critical.eps_max", lo=0.0,
                         hi=1.0, lo_open=True)
    lk = b.likelihood
    _checks.check_int(lk.num_images, "config.beyond.likelihood.num_images", lo=2)
    _checks.check_int(lk.num_steps, "config.beyond.likelihood.num_steps", lo=1)
    _checks.check_choice(lk.trace, "config.beyond.likelihood.trace", likelihood_lib.TRACES)
    _checks.check_choice(lk.time_input, "config.beyond.likelihood.time_input",
                         likelihood_lib.TIME_INPUTS)
    _checks.check_int(lk.num_probes, "config.beyond.likelihood.num_probes", lo=1)
    for m in as_list(lk.methods):
        if m != b.purifier and m not in methods_of(config):
            _checks.fail("config.beyond.likelihood.methods", "methods of config.methods or "
                         "config.beyond.purifier", m)
    if lk.adversarial_of not in methods_of(config):
        _checks.fail("config.beyond.likelihood.adversarial_of", "a method of config.methods",
                     lk.adversarial_of)
    for k in as_list(lk.chain_points, int):
        _checks.check_int(k, "config.beyond.likelihood.chain_points[i]", lo=0,
                          hi=int(config.purifier.num_steps) - 1)
    for t in as_list(lk.score_t, int):
        _checks.check_int(t, "config.beyond.likelihood.score_t[i]", lo=0)


# -------------------------------------------------------------------- shared helpers


def _has_part(study: Study, name: str) -> bool:
    """Whether the array part `name` is finished in the work directory (process 0 says)."""
    path = study.workdir.part_file(name, ".npz")
    return bool(parallel.agree_max(int(study.workdir.is_writer and path.exists())))


def _acc(correct) -> dict:
    a = stats.accuracy(np.asarray(correct, bool))
    return {"estimate": a["estimate"], "ci": [a["lo"], a["hi"]], "n": a["n"]}


def _mean_ci(v, confidence: float = 0.95) -> dict:
    """Mean and Student-t interval over images (float64)."""
    v = np.asarray(v, np.float64)
    n = v.size
    m = float(v.mean())
    if n < 2:
        return {"mean": m, "ci": [math.nan, math.nan], "std": math.nan, "n": int(n)}
    sd = float(v.std(ddof=1))
    h = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": m, "ci": [m - h, m + h], "std": sd, "n": int(n)}


def _paired(a, b) -> dict:
    """`a - b` over the same images: mean with its t interval, paired t and Wilcoxon
    signed-rank p-values (two-sided), and the fraction of images with a < b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    out = {"difference": _mean_ci(d), "fraction_lower": float(np.mean(d < 0))}
    with np.errstate(all="ignore"):
        out["p_value_t"] = (float(scipy.stats.ttest_rel(a, b).pvalue)
                            if d.size > 1 and np.any(d != d[0]) else 1.0)
        out["p_value_wilcoxon"] = (float(scipy.stats.wilcoxon(d).pvalue)
                                   if d.size > 1 and np.any(d != 0) else 1.0)
    return out


def _t_main(study: Study) -> int:
    return int(study.config.purifier.t_star)


def method_part(study: Study, method: str) -> dict:
    """The fixed attack part of a diffusion method: the study's own (every example) where
    the work directory has it, else the fallback over the first `fallback.num_examples`."""
    if _has_part(study, robustness.part_name(method, _t_main(study), "realization")):
        return robustness.attack_part(study, method)
    return robustness.attack_part(study, method,
                                  n=int(study.config.beyond.fallback.num_examples))


def _summary(part: dict) -> dict:
    fixed, clean = _acc(part["fixed_adv_correct"]), _acc(part["clean_correct_fixed"])
    return {"robust_accuracy_fixed": fixed["estimate"], "robust_accuracy_fixed_ci": fixed["ci"],
            "clean_accuracy": clean["estimate"], "clean_accuracy_ci": clean["ci"],
            "n": fixed["n"]}


# ------------------------------------------------------------------ 2. the predictor


def sweep_points(study: Study) -> list[dict]:
    """The compression-robustness sweep: every point of the study's sweep whose attack part
    the work directory has (an `experiments.reproduce` run), plus the fallback points
    (`fallback.sweep_points`) the study has not computed: attacks over
    the first `sweep_num_examples` examples (at the main t*: the method's part of
    `method_part`), rates over the first `num_rate_examples` (parts of their own names).
    Each point says ``source``: "study" or "fallback"."""
    cfg = study.config
    c, fb = cfg.compression, cfg.beyond.fallback
    t_main = _t_main(study)
    points, seen = [], set()

    def study_n(t):  # the attack examples of the study's own point (None: all)
        n = None if t == t_main else int(c.num_attack_examples)
        return n if n is not None and n < study.num_examples else None

    for m in as_list(c.methods):
        for t in as_list(c.t_stars, int):
            if _has_part(study, robustness.part_name(m, t, "realization", study_n(t))):
                points.append({**compression.compression_point(study, m, t), "source": "study"})
                seen.add((m, t))
    k = int(fb.num_rate_examples)
    for m, t in fallback_points(cfg):
        if (m, t) in seen:
            continue
        if t == t_main:  # the method's own fixed part (`method_part`)
            n = len(method_part(study, m)["ids"])
        else:
            n = int(fb.sweep_num_examples)
        same = (min(n, study.num_examples) == (study_n(t) or study.num_examples)
                and k == int(c.num_examples))
        points.append({**compression.compression_point(study, m, t, n, k),
                       "source": "study" if same else "fallback"})
        seen.add((m, t))
    return points


def fallback_points(config) -> list[tuple[str, int]]:
    """`config.beyond.fallback.sweep_points` ("ddpm:10,reverse_only:100") as pairs."""
    out = []
    for item in as_list(config.beyond.fallback.sweep_points):
        m, _, t = item.partition(":")
        if m not in as_list(config.compression.methods) or not t.strip().isdigit() or int(
                t) < 1:
            _checks.fail("config.beyond.fallback.sweep_points", "method:t* pairs with methods "
                         f"of config.compression.methods ({config.compression.methods})", item)
        out.append((m, int(t)))
    return out


def critical_part(study: Study) -> np.ndarray:
    """Every example's critical distance on the undefended classifier (id order)."""
    cr = study.config.beyond.critical
    a = study.config.attack_undefended
    name = (f"critical_distances_{cr.attack}{int(cr.steps)}_r{int(cr.num_rounds)}"
            f"_e{float(cr.eps_max):g}")

    def compute():
        rows = study.rows()
        if cr.attack == "pgd":
            attack = PGDConfig(norm=a.norm, eps=0.0, step_size=0.0, steps=int(cr.steps),
                               loss="ce")
        else:
            attack = APGDConfig(norm=a.norm, eps=0.0, steps=int(cr.steps), loss="ce")
        d = analysis.critical_distances(
            study.classifier.logits_fn, study.x[rows], study.y[rows], study.key_array(rows),
            attack=attack, eps_max=float(cr.eps_max), num_rounds=int(cr.num_rounds),
            step_fraction=float(cr.step_fraction))
        return study.gather({"ids": study.ids[rows], "distance": d.astype(np.float64)})

    return study.workdir.arrays(name, compute)["distance"]


def predictor(study: Study, points: list[dict], d: np.ndarray, und: dict) -> dict:
    """Predicted (hyperspherical cap, nothing fitted) vs measured fixed robust accuracy at
    every sweep point, beside the fitted logistic's error on the same points."""
    eps = float(study.config.attack.eps)
    cr = study.config.beyond.critical
    pred, meas, labels = [], [], []
    for p in points:
        n = int(p["num_attack_examples"])
        pred.append(float(analysis.predict_from_compression(
            d[:n], [p["compression_rate"]], eps, anchor_accuracy=[p["clean_accuracy"]])[0]))
        meas.append(p["robust_accuracy_fixed"])
        labels.append(f"{p['method']} t*={p['t_star']}")
    out = analysis.compare_predictions(pred, meas, labels=labels) if points else {
        "mae": None, "r2": None, "n": 0, "points": []}
    fitted = compression.fit(study, [dict(p) for p in points], und["clean"], und["robust"])
    params = (fitted["sigmoid_fit"] or {}).get("params")
    logistic = None
    if params is not None and points:
        lp = analysis.predict(params, [p["compression_rate"] for p in points])
        logistic = analysis.compare_predictions(lp, meas, labels=labels)
        for row, v in zip(out["points"], lp, strict=True):
            row["logistic"] = float(v)
        logistic = {k: logistic[k] for k in ("mae", "max_abs_error", "r2", "n")}
    used = [i for i, p in enumerate(points) if p["clean_accuracy"] >= float(
        study.config.compression.min_clean_fraction) * und["clean"]]
    for row, p in zip(out["points"], points, strict=True):
        row.update({"method": p["method"], "t_star": p["t_star"],
                    "compression_rate": p["compression_rate"],
                    "anchor_accuracy": p["clean_accuracy"], "n": p["num_attack_examples"],
                    "ci": p["robust_accuracy_fixed_ci"], "source": p["source"]})
    in_fit = None
    if len(used) >= 2:
        sub = analysis.compare_predictions([pred[i] for i in used], [meas[i] for i in used])
        in_fit = {"predictor": {k: sub[k] for k in ("mae", "r2", "n")}}
        if params is not None:
            lsub = analysis.compare_predictions([out["points"][i]["logistic"] for i in used],
                                                [meas[i] for i in used])
            in_fit["logistic"] = {k: lsub[k] for k in ("mae", "r2", "n")}
    # The same rule with the largest singular value (the worst direction's gain; clipped
    # at 1: a purifier that expands that direction is taken as the identity there).
    top = [p for p in points if p.get("top_singular_values")]
    variant = None
    if top and len(top) == len(points):
        tp = [float(analysis.predict_from_compression(
            d[:int(p["num_attack_examples"])], [min(p["top_singular_values"][0], 1.0)], eps,
            anchor_accuracy=[p["clean_accuracy"]])[0]) for p in points]
        cmp = analysis.compare_predictions(tp, meas)
        variant = {"rule": "A * P(d > min(s_max, 1) eps | d > 0), s_max the mean top singular "
                           "value", "mae": cmp["mae"], "r2": cmp["r2"], "n": cmp["n"]}
        for row, v in zip(out["points"], tp, strict=True):
            row["predicted_top_singular_value"] = float(v)
    grid = np.linspace(0.0, 1.0, 41)
    cap_curve = {"rates": grid.tolist(), "anchor_accuracy": und["clean"],
                 "predicted": analysis.predict_from_compression(
                     d, grid, eps, anchor_accuracy=np.full(grid.size, und["clean"])).tolist()}
    anchor = float(analysis.predict_from_compression(d, [1.0], eps,
                                                     anchor_accuracy=[und["clean"]])[0])
    finite = d[np.isfinite(d) & (d > 0)]
    bias = float(np.mean(np.subtract(pred, meas))) if points else None
    answer = (f"nothing fitted, from each point's rate and clean accuracy: MAE "
              f"{100 * out['mae']:.1f} points, R^2 {out['r2']:.2f} over {out['n']} sweep points, "
              f"mean error {100 * bias:+.1f} points" if points else "no sweep points")
    if logistic:
        answer += (f"; the fitted logistic on the same points: MAE {100 * logistic['mae']:.1f} "
                   f"points, R^2 {logistic['r2']:.2f}")
    if variant:
        answer += (f"; with the top singular value instead of the RMS rate: MAE "
                   f"{100 * variant['mae']:.1f} points")
    return {**out, "bias": bias, "answer": answer,
            "rule": "A * P(d > rate eps | d > 0), rate the RMS Jacobian singular "
                           "value, A the point's clean accuracy", "logistic": logistic,
            "top_singular_value_variant": variant, "points_keeping_content": in_fit,
            "cap_curve": cap_curve,
            "sigmoid_fit": fitted["sigmoid_fit"], "eps": eps,
            "undefended_check": {"predicted": anchor, "measured": und["robust"],
                                 "note": "rate 1 with the classifier's clean accuracy: "
                                         "P(d > eps), the PGD bisection's own robust accuracy"},
            "critical_distance": {
                "n": int(d.size), "median": float(np.median(d)),
                "quantiles_10_50_90": [float(q) for q in np.quantile(finite, [.1, .5, .9])]
                if finite.size else None,
                "fraction_misclassified_clean": float(np.mean(d == 0)),
                "fraction_never_fooled": float(np.mean(np.isinf(d))),
                "attack": f"{cr.attack.upper()}-{int(cr.steps)} (CE), bisection "
                          f"{int(cr.num_rounds)} rounds up to eps {float(cr.eps_max):g}"}}


# --------------------------------------------------------- 1. the designed purifier


def designed_purifier(study: Study, diffusion: dict, fit_params, d: np.ndarray) -> dict:
    """The designed purifier evaluated like the diffusion purifiers (module docstring)."""
    cfg = study.config
    b = cfg.beyond
    name = b.purifier
    t_main = _t_main(study)
    fixed = robustness.attack_part(study, name)
    fresh = robustness.attack_part(study, name, stream="fresh")
    point = compression.compression_point(study, name, t_main)
    out = {"name": name, **_summary(fixed)}
    out["clean_accuracy_ci"] = _acc(fixed["clean_correct_fixed"])["ci"]
    for k in ("compression_rate", "compression_rate_std", "compression_rate_stderr",
              "fraction_sv_below_0.25", "top_singular_values", "num_rate_examples"):
        out[k] = point.get(k)
    out["attack"] = f"{cfg.attack.cascade}, {int(cfg.attack.steps)} steps, l_{cfg.attack.norm} " \
                    f"eps {float(cfg.attack.eps):g}, full gradient, fixed protocol (the study's)"
    out["protocols"] = {
        "fixed": _acc(fixed["fixed_adv_correct"]),
        "transfer": _acc(fixed["transfer_adv_correct"]),
        "independent_eot": _acc(fresh["independent_adv_correct"]),
    }

    # Determinism: the same image under other keys is the same image.
    x = study.x[: min(8, len(study.x))]
    k1 = study.key_array(np.arange(len(x)))
    k2 = jax.random.split(jax.random.fold_in(study.root, _SALT), len(x))
    purify = study.defense(name).purify_fn
    diff = float(jnp.max(jnp.abs(purify(x, k1) - purify(x, k2))))
    draws = fresh["independent_adv_correct_mean"]
    out["determinism"] = {
        "max_abs_difference_other_keys": diff,
        "transfer_equals_fixed": bool(np.array_equal(fixed["transfer_adv_correct"],
                                                     fixed["fixed_adv_correct"])),
        "transfer_draws_agree": bool(np.all(fixed["transfer_adv_correct_worst"]
                                            == fixed["transfer_adv_correct"])),
        "independent_draws_agree": bool(np.all((draws == 0) | (draws == 1))),
        "fixed_verdict_is_the_attacks_own": robustness.realization_check(fixed),
    }
    out["audit"], audit_worst = _audit(study, name, fixed)
    # Every example's worst case: the study's attack, and the audit's attacks where they ran.
    worst_all = np.asarray(fixed["fixed_adv_correct"], bool).copy()
    worst_all[: len(audit_worst)] &= audit_worst
    wa = _acc(worst_all)
    out["robust_accuracy_worst_case"], out["robust_accuracy_worst_case_ci"] = (
        wa["estimate"], wa["ci"])

    # The goal of the issue, against the best diffusion purifier of the study.
    best_m = max(diffusion, key=lambda m: (diffusion[m]["robust_accuracy_fixed"],
                                           diffusion[m]["n"]))
    best = diffusion[best_m]
    out["best_diffusion"] = {"method": best_m, **best}
    out["goal"] = _goal(b.goal, out, best, fixed, method_part(study, best_m))
    worst = {**out, "robust_accuracy_fixed": wa["estimate"],
             "robust_accuracy_fixed_ci": wa["ci"]}
    out["goal_worst_case_over_audit"] = {k: v for k, v in _goal(
        b.goal, worst, best, None, None).items() if k != "paired_test_vs_best"}

    # Where it falls on the compression-robustness curve.
    eps = float(cfg.attack.eps)
    cap = float(analysis.predict_from_compression(
        d, [out["compression_rate"]], eps, anchor_accuracy=[out["clean_accuracy"]])[0])
    curve = {"compression_rate": out["compression_rate"],
             "measured": out["robust_accuracy_fixed"],
             "predictor_cap": cap, "predictor_cap_error": cap - out["robust_accuracy_fixed"]}
    if fit_params is not None:
        s = float(analysis.predict(fit_params, out["compression_rate"]))
        curve.update({"sigmoid": s, "sigmoid_error": s - out["robust_accuracy_fixed"],
                      "sigmoid_upper_asymptote": float(fit_params["upper"])})
    out["curve"] = curve
    g, au = out["goal"], out["audit"]
    out["answer"] = (
        f"{name}: clean {_pct(out['clean_accuracy'], out['clean_accuracy_ci'])}, fixed robust "
        f"{_pct(out['robust_accuracy_fixed'], out['robust_accuracy_fixed_ci'])} over {out['n']} "
        f"examples vs the best diffusion purifier {best_m} "
        f"{_pct(best['robust_accuracy_fixed'], best['robust_accuracy_fixed_ci'])} over "
        f"{best['n']}: goal {'passed' if g['passed'] else 'FAILED'} (gain "
        f"{100 * g['gain']:+.1f} points for +{100 * g['min_gain']:.0f} needed, interval gap "
        f"{100 * g['interval_gap']:+.1f} points); audit: "
        f"{'unmasked' if au['unmasked'] else 'NOT unmasked'} on the first {au['n']} examples "
        f"(worst case over its attacks {_pct(au['worst_case']['estimate'])} vs the study's "
        f"attack {_pct(au['study_attack_on_these']['estimate'])} there), worst case on every "
        f"example {_pct(wa['estimate'], wa['ci'])}; rate "
        f"{out['compression_rate']:.4f}, where the sweep's logistic predicts "
        f"{_pct(curve.get('sigmoid'))} and the cap predictor {_pct(curve['predictor_cap'])}")
    return out


def _goal(g, designed: dict, best: dict, fixed, best_part) -> dict:
    clean, rob = designed["clean_accuracy"], designed["robust_accuracy_fixed"]
    lo, hi_best = designed["robust_accuracy_fixed_ci"][0], best["robust_accuracy_fixed_ci"][1]
    gain = rob - best["robust_accuracy_fixed"]
    out = {"min_clean_accuracy": float(g.min_clean_accuracy), "min_gain": float(g.min_gain),
           "clean_ok": bool(clean >= float(g.min_clean_accuracy)),
           "clean_margin": clean - float(g.min_clean_accuracy),
           "gain": gain, "gain_ok": bool(gain >= float(g.min_gain)),
           "gain_margin": gain - float(g.min_gain),
           "intervals_disjoint": bool(lo > hi_best), "interval_gap": lo - hi_best}
    out["passed"] = bool(out["clean_ok"] and out["gain_ok"] and out["intervals_disjoint"])
    if fixed is not None:
        common = np.intersect1d(fixed["ids"], best_part["ids"])
        a = np.asarray(fixed["fixed_adv_correct"], bool)[np.isin(fixed["ids"], common)]
        bb = np.asarray(best_part["fixed_adv_correct"], bool)[np.isin(best_part["ids"], common)]
        out["paired_test_vs_best"] = stats.mcnemar_exact(a, bb, alternative="greater")
    return out


def _audit(study: Study, name: str, fixed: dict) -> dict:
    """The masking audit of a deterministic purifier on the same examples: the study's
    attack against the undefended classifier's (stronger) cascade, BPDA, Square, and
    larger budgets (module docstring of `diffjax.study.audit` for the reading)."""
    cfg = study.config
    a = cfg.beyond.audit
    n = int(a.num_examples) or study.num_examples
    n = min(n, study.num_examples)
    tol = float(cfg.audit.tolerance)

    def part(variant="", **kw):
        return robustness.attack_part(study, name, None, "realization", n, variant=variant,
                                      **kw)

    base_part = part()
    base = np.asarray(base_part["fixed_adv_correct"], bool)
    und = cfg.attack_undefended
    variants = [
        ("strong", f"{und.cascade}, {int(und.steps)} steps, {int(und.targets)} targets "
                   "(the undefended classifier's cascade), full gradient",
         dict(cascade=study.cascade(UNDEFENDED))),
        ("bpda", "the study's cascade, BPDA (identity backward through the purifier)",
         dict(cascade=study.cascade(name, gradient=study.gradient("bpda")))),
        ("square", f"Square, {int(a.square_queries)} queries (gradient-free)",
         dict(cascade=study.cascade(name, spec="square", steps=int(a.square_queries)))),
    ]
    rows = [_audit_row("study's attack", "", base_part, base)]
    worst = base.copy()
    got = {}
    for variant, label, kw in variants:
        got[variant] = np.asarray(part(variant, **kw)["fixed_adv_correct"], bool)
        worst &= got[variant]
        rows.append(_audit_row(label, variant, part(variant, **kw), base))
    budget = []
    for e in as_list(a.eps, float):
        p = part(f"eps{e:g}", cascade=study.cascade(name, eps=e))
        r = _audit_row(f"the study's cascade at eps {e:g}", f"eps{e:g}", p, base)
        r["eps"] = e
        budget.append(r)
    stronger = [r["attack"] for r in rows[1:]
                if r["delta_vs_study"] < -tol and r["p_value_lower"] < 0.05]
    large = budget[-1]["robust"] if budget else None
    blocked = large is not None and large > float(cfg.audit.max_large_eps_accuracy)
    w = _acc(worst)
    agree = stats.mcnemar_exact(got["bpda"], got["square"])
    square = stats.mcnemar_exact(got["square"], base)
    by = {r["variant"]: r for r in rows}
    acc = ", ".join(f"{k} {100 * by[v]['robust']:.1f}%" for k, v in (
        ("the study's attack", ""), ("the stronger cascade", "strong"), ("BPDA", "bpda"),
        ("Square", "square")))
    if not stronger and not blocked:
        sentence = (f"unmasked: no audit attack finds significantly more ({acc}); the "
                    "gradient-free Square " + ("agrees with" if square["p_value"] >= 0.05
                                               else "differs from")
                    + f" the full-gradient attack (paired p = {square['p_value']:.2g})"
                    + ("; BPDA is weaker (the identity is a poor surrogate for the "
                       "purifier's backward pass)" if by["bpda"]["delta_vs_study"] > tol
                       else "") + (f"; eps {budget[-1]['eps']:g} leaves {100 * large:.1f}%"
                                   if budget else ""))
    else:
        why = (["stronger: " + ", ".join(stronger)] if stronger else []) + (
            [f"eps {budget[-1]['eps']:g} still leaves {100 * large:.1f}%"] if blocked else [])
        sentence = (f"NOT unmasked ({'; '.join(why)}): the worst case over the audit, "
                    f"{100 * w['estimate']:.1f}%, is the tighter number")
    return {"n": int(n), "rows": rows + budget, "tolerance": tol, "worst_case": w,
            "study_attack_on_these": _acc(base),
            "stronger_attacks": stronger, "square_vs_study": square,
            "square_agrees_with_full_gradient": bool(square["p_value"] >= 0.05),
            "bpda_vs_square": agree,
            "bpda_and_square_agree": bool(agree["p_value"] >= 0.05),
            "large_eps_accuracy": large,
            "large_eps_accuracy_ci": budget[-1]["ci"] if budget else None,
            "unmasked": bool(not stronger and not blocked),
            "sentence": sentence}, worst


def _audit_row(label: str, variant: str, part: dict, base: np.ndarray) -> dict:
    c = np.asarray(part["fixed_adv_correct"], bool)
    acc = stats.accuracy(c)
    less = stats.mcnemar_exact(c, base, alternative="less")
    return {"attack": label, "variant": variant, "robust": acc["estimate"],
            "ci": [acc["lo"], acc["hi"]], "delta_vs_study": less["estimate"],
            "p_value_lower": less["p_value"],
            "p_value_two_sided": stats.mcnemar_exact(c, base)["p_value"], "n": int(c.size),
            "iterations": int(part["iterations"].sum()),
            "seconds": float(np.sum(part["seconds_per_attack"]))}


# --------------------------------------------------------------- 3. the likelihood


@jax.jit
def _chain_x0(eps_fn, x, keys, chain):
    """The purification chain of `chain` on `x` under `keys` (the realization), keeping
    every step's x0-prediction: `(output [B,...], x0 [steps, B, ...])` in [0, 1]. The
    step rule is `diffusion.samplers.Chain`'s (hard clips); the output must equal the
    purifier's (checked by the caller)."""
    shape = x.shape[1:]

    def normal(data):
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, data), shape,
                                                    x.dtype))(keys)

    xm = to_model_space(x)
    x_t = chain.x_scale * xm + chain.noise_scale * normal(0)
    batch = x.shape[0]

    def step(xs, c):
        eps = eps_fn(xs, jnp.full((batch,), c.t, jnp.int32)).astype(xs.dtype)
        x0 = (xs - c.eps_x0 * eps) * c.x0_scale
        x0 = jnp.where(c.clip, jnp.clip(x0, -1.0, 1.0), x0)
        new = c.c_x0 * x0 + c.c_x * xs + c.c_eps * eps + c.c_noise * normal(c.noise_index)
        return new, jnp.clip(from_model_space(x0), 0.0, 1.0)

    steps = chain.num_steps
    per_step = chain._replace(x_scale=jnp.zeros(steps), noise_scale=jnp.zeros(steps))
    out, x0s = jax.lax.scan(step, x_t, per_step)
    return jnp.clip(from_model_space(out), 0.0, 1.0), x0s


def _adversarial(study: Study, method: str, n: int) -> tuple[np.ndarray, str]:
    """The adversarial inputs of `method`'s fixed attack part at the first `n` examples
    (id order), read from the part's saved progress (the cascade's last attack keeps
    every example, gathered in id order), and the part's name."""
    part = method_part(study, method)
    m = int(len(part["ids"]))
    name = robustness.part_name(method, _t_main(study), "realization",
                                m if m < study.num_examples else None)
    last = len(study.cascade(method).attacks) - 1
    got = study.workdir.store(name).load(f"attack{last}")
    if got is None or "x_adv" not in got:
        raise FileNotFoundError(
            f"{study.workdir.path}/parts/{name}/attack{last}.npz: the attack part's saved "
            f"adversarial examples are missing; delete parts/{name}.npz to recompute it")
    if n > len(got["x_adv"]):
        raise ValueError(f"config.beyond.likelihood.num_images: at most {m} (the examples "
                         f"of {name})")
    x_adv = got["x_adv"][:n]
    k = min(n, robustness.FIGURE_EXAMPLES)
    if not np.allclose(x_adv[:k], part["img_x_adv"][:k], atol=1e-6):
        raise ValueError(f"{name}: saved adversarial examples disagree with the part's")
    return x_adv, name


def likelihood(study: Study) -> dict:
    """Bits per dimension under the diffusion prior along purification (module docstring).

    Runs on the first `num_images` examples of every process's share, gathered (each
    process computes all of them: they are few)."""
    cfg = study.config
    lk = cfg.beyond.likelihood
    n = min(int(lk.num_images), study.num_examples)
    first = study.gather({"x": study.x[study.rows(n)], "k": study.keys[study.rows(n)]})
    x = first["x"]
    keys = jax.random.wrap_key_data(first["k"])
    real = protocols.realization(keys)
    adv_of = lk.adversarial_of
    x_adv, source = _adversarial(study, adv_of, n)
    methods = as_list(lk.methods)
    chain_points = as_list(lk.chain_points, int)
    what = f"{source}|{methods}|{as_list(lk.clean_methods)}|{chain_points}"
    img_name = f"beyond_images_n{n}_{zlib.crc32(what.encode()):08x}"
    tag = (f"{lk.trace}{int(lk.num_steps)}"
           + (f"p{int(lk.num_probes)}" if lk.trace == "hutchinson" else "")
           + f"_{lk.time_input}_dq{float(lk.dequantize):g}_{img_name[len('beyond_images_'):]}")
    eps_fn, schedule = study.diffusion_model.eps_fn, study.schedule

    def images() -> dict:
        sets = {"clean": x, "adversarial": x_adv}
        for m in methods:
            sets[f"purified_{m}"] = np.asarray(study.defense(m).purify_fn(x_adv, real))
        for m in as_list(lk.clean_methods):
            sets[f"purified_clean_{m}"] = np.asarray(study.defense(m).purify_fn(x, real))
        if chain_points:
            purify = study.defense(adv_of).purify_fn
            eps_part, chain, _ = purify.args
            out, x0s = _chain_x0(eps_part, jnp.asarray(x_adv), real, chain)
            sets["_chain_end_difference"] = np.asarray(
                [float(jnp.max(jnp.abs(out - purify(x_adv, real))))])
            pad = chain.num_steps - min(int(cfg.purifier.num_steps), _t_main(study))
            for k in chain_points:
                sets[f"chain_{k}"] = np.asarray(x0s[pad + k])
        return sets

    imgs = study.workdir.arrays(img_name, images)
    set_names = [k for k in imgs if not k.startswith("_")]
    bpd, score = {}, {}
    t_score = as_list(lk.score_t, int)
    d_in = float(np.prod(x.shape[1:]))
    for s in set_names:
        def compute(s=s):
            im = jnp.asarray(imgs[s])
            r = likelihood_lib.log_likelihood(
                eps_fn, im, keys, schedule=schedule, num_steps=int(lk.num_steps),
                trace=lk.trace, num_probes=int(lk.num_probes),
                dequantize=float(lk.dequantize) or None, time_input=lk.time_input)
            sn = [np.asarray(likelihood_lib.score_norm(eps_fn, im, t, schedule=schedule))
                  for t in t_score]
            return {"bpd": np.asarray(r.bpd, np.float64),
                    "score": np.stack(sn, axis=1) / math.sqrt(d_in) if sn else
                    np.zeros((n, 0))}

        got = study.workdir.arrays(f"beyond_bpd_{s}_{tag}", compute)
        bpd[s], score[s] = got["bpd"], got["score"]
        study.log(f"[beyond] bits/dim of {s}: {bpd[s].mean():.3f}")

    clean = bpd["clean"]

    def l2(a, b):
        return np.sqrt(((a - b).reshape(len(a), -1).astype(np.float64) ** 2).sum(1))

    drift_adv = l2(x_adv, x)
    out = {"num_images": int(n), "trace": lk.trace, "num_steps": int(lk.num_steps),
           "num_probes": int(lk.num_probes) if lk.trace == "hutchinson" else None,
           "time_input": lk.time_input, "dequantize": float(lk.dequantize),
           "adversarial_of": adv_of, "adversarial_part": source, "score_t": t_score,
           "clean_bpd": _mean_ci(clean), "adversarial_bpd": _mean_ci(bpd["adversarial"]),
           "purified_bpd": {m: _mean_ci(bpd[f"purified_{m}"]) for m in methods},
           "purified_clean_bpd": {m: _mean_ci(bpd[f"purified_clean_{m}"])
                                  for m in as_list(lk.clean_methods)},
           "adversarial_vs_clean": _paired(bpd["adversarial"], clean),
           "purified_vs_clean": {}, "purified_vs_adversarial": {},
           "purified_clean_vs_clean": {}, "drift": {},
           "score_norm_rms": {s: {str(t): _mean_ci(score[s][:, i])
                                  for i, t in enumerate(t_score)} for s in set_names},
           "per_image_bpd": {s: bpd[s].tolist() for s in set_names}}
    if t_score:
        t0 = 0
        out["score_norm_vs_clean"] = {s: _paired(score[s][:, t0], score["clean"][:, t0])
                                      for s in set_names if s != "clean"}
    for m in methods:
        pb = bpd[f"purified_{m}"]
        out["purified_vs_clean"][m] = _paired(pb, clean)
        out["purified_vs_adversarial"][m] = _paired(pb, bpd["adversarial"])
        drift = l2(imgs[f"purified_{m}"], x)
        rho = None
        if n > 2 and np.ptp(drift) > 0 and np.ptp(pb - clean) > 0:
            rho = scipy.stats.spearmanr(drift, pb - clean)
        out["drift"][m] = {
            "l2_adversarial_to_clean": _mean_ci(drift_adv),
            "l2_purified_to_clean": _mean_ci(drift),
            "farther_than_adversarial": _paired(drift, drift_adv),
            "spearman_drift_vs_bpd_change": None if rho is None else {
                "rho": float(rho.statistic), "p_value": float(rho.pvalue)}}
    for m in as_list(lk.clean_methods):
        out["purified_clean_vs_clean"][m] = _paired(bpd[f"purified_clean_{m}"], clean)
    if chain_points:
        out["chain"] = {
            "method": adv_of, "input": "adversarial",
            "points": ["input"] + [f"x0 after step {k + 1}" for k in chain_points]
            + (["output"] if adv_of in methods else []),
            "bpd": [_mean_ci(bpd["adversarial"])]
            + [_mean_ci(bpd[f"chain_{k}"]) for k in chain_points]
            + ([_mean_ci(bpd[f"purified_{adv_of}"])] if adv_of in methods else []),
            "end_matches_purifier_max_abs": float(imgs["_chain_end_difference"][0])}
    out["answer"] = _likelihood_answer(out, methods)
    return out


def _likelihood_answer(out: dict, methods) -> str:
    def diff(t):
        d = t["difference"]
        return (f"{d['mean']:+.3f} bits/dim [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], Wilcoxon "
                f"p = {t['p_value_wilcoxon']:.2g}")

    def verdict(t):
        d = t["difference"]
        if d["ci"][1] < 0:
            return "more likely than the clean images"
        if d["ci"][0] > 0:
            return "less likely than the clean images"
        return "as likely as the clean images (the interval covers 0)"

    n = out["num_images"]
    parts = [f"on {n} images, clean {out['clean_bpd']['mean']:.3f} bits/dim; adversarial "
             f"inputs {diff(out['adversarial_vs_clean'])} vs clean"]
    for m in methods:
        t, dr = out["purified_vs_clean"][m], out["drift"][m]
        parts.append(f"purified by {m} {diff(t)}: {verdict(t)}, while l2 to the clean image "
                     f"goes {dr['l2_adversarial_to_clean']['mean']:.2f} -> "
                     f"{dr['l2_purified_to_clean']['mean']:.2f}")
    for m, t in out["purified_clean_vs_clean"].items():
        parts.append(f"clean images purified by {m} {diff(t)}: {verdict(t)}")
    return "; ".join(parts)


# ------------------------------------------------------------------------- the whole


def run(study: Study) -> dict:
    """Every part of beyond.json (module docstring), computed or loaded."""
    validate(study.config)
    cfg = study.config
    und_part = robustness.attack_part(study, UNDEFENDED)
    und = {"clean": float(np.mean(und_part["clean_correct_fixed"])),
           "robust": float(np.mean(und_part["fixed_adv_correct"]))}
    diffusion = {}
    for m in methods_of(cfg):
        if is_designed_purifier(m):
            continue
        part = method_part(study, m)
        n = len(part["ids"])
        diffusion[m] = {**_summary(part),
                        "source": "study" if n == study.num_examples else "fallback"}
        study.log(f"[beyond] {m}: robust (fixed) {100 * diffusion[m]['robust_accuracy_fixed']:.1f}%"
                  f" over {n} examples")
    points = sweep_points(study)
    d = critical_part(study)
    pred = predictor(study, points, d, und)
    study.log(f"[beyond] predictor: MAE {pred['mae']:.3f}, R^2 {pred['r2']:.2f} over "
              f"{pred['n']} sweep points")
    params = (pred.get("sigmoid_fit") or {}).get("params")
    dp = designed_purifier(study, diffusion, params, d)
    study.log(f"[beyond] {dp['name']}: clean {100 * dp['clean_accuracy']:.1f}%, robust (fixed) "
              f"{100 * dp['robust_accuracy_fixed']:.1f}%, rate {dp['compression_rate']:.4f}; "
              f"goal {'passed' if dp['goal']['passed'] else 'failed'}")
    lk = likelihood(study)
    study.log(f"[beyond] likelihood: {lk['answer']}")
    return {"dataset": cfg.dataset, "num_examples": int(study.num_examples),
            "t_star": _t_main(study), "eps": float(cfg.attack.eps), "norm": cfg.attack.norm,
            "undefended": {"clean_accuracy": und["clean"], "robust_accuracy_fixed": und["robust"],
                           "n": int(len(und_part["ids"]))},
            "diffusion": diffusion, "designed_purifier": dp, "predictor": pred,
            "sweep": points, "likelihood": lk,
            "parts": {"loaded": list(study.workdir.loaded_parts),
                      "computed": list(study.workdir.computed_parts)}}


# ------------------------------------------------------------------- the report


def _pct(v, ci=None) -> str:
    return "n/a" if v is None else stats.describe(v, ci or None)


def _num(v, d: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def render_markdown(res: dict) -> str:
    """beyond.md: the three answers, from a beyond.json dict."""
    dp, pr, lk = res["designed_purifier"], res["predictor"], res["likelihood"]
    g, best, au = dp["goal"], dp["best_diffusion"], dp["audit"]
    lines = ["## Beyond the paper", "",
             f"Dataset `{res['dataset']}`, {res['num_examples']} test examples; Wilson 95% "
             "intervals for accuracies, Student-t 95% intervals over images for bits/dim.", "",
             "Answers:", "",
             f"1. A purifier designed for compression: {dp.get('answer', 'n/a')}.",
             f"2. Robustness predicted from compression: {pr.get('answer', 'n/a')}.",
             f"3. Likelihood under the prior: {lk.get('answer', 'n/a')}.", "",
             f"### 1. A deterministic purifier designed for compression (`{dp['name']}`)", "",
             f"Attacked like the diffusion purifiers ({dp['attack']}), on {dp['n']} examples:",
             "",
             "| purifier | clean | robust, fixed | compression rate | n | source |",
             "|---|---|---|---|---|---|",
             f"| **{dp['name']}** | {_pct(dp['clean_accuracy'], dp['clean_accuracy_ci'])} | "
             f"**{_pct(dp['robust_accuracy_fixed'], dp['robust_accuracy_fixed_ci'])}** | "
             f"{_num(dp['compression_rate'], 4)} | {dp['n']} | |"]
    rates = {(p["method"], p["t_star"]): p["compression_rate"] for p in res.get("sweep", [])}
    t_main = res.get("t_star")
    for m, r in res["diffusion"].items():
        rate = rates.get((m, t_main))
        lines.append(f"| {m} | {_pct(r['clean_accuracy'], r['clean_accuracy_ci'])} | "
                     f"{_pct(r['robust_accuracy_fixed'], r['robust_accuracy_fixed_ci'])} | "
                     f"{_num(rate, 4) if rate is not None else ''} | {r['n']} | "
                     f"{r['source']} |")
    pt = g.get("paired_test_vs_best") or {}
    ind = dp["protocols"]["independent_eot"]
    lines += ["", f"Goal (clean >= {100 * g['min_clean_accuracy']:.0f}%, fixed robust accuracy "
              f">= the best diffusion purifier's ({best['method']}, "
              f"{_pct(best['robust_accuracy_fixed'], best['robust_accuracy_fixed_ci'])}) + "
              f"{100 * g['min_gain']:.0f} points, intervals disjoint): "
              f"**{'PASSED' if g['passed'] else 'FAILED'}**: gain "
              f"{100 * g['gain']:+.1f} points (margin {100 * g['gain_margin']:+.1f}), interval "
              f"gap {100 * g['interval_gap']:+.1f} points, clean margin "
              f"{100 * g['clean_margin']:+.1f}; paired exact test on the {pt.get('n', 0)} "
              f"common examples: p = {_num(pt.get('p_value'), 4)}.",
              "",
              f"Determinism: other keys change the output by "
              f"{dp['determinism']['max_abs_difference_other_keys']:.1e}; the transfer "
              f"protocol's verdicts equal the fixed ones: "
              f"{dp['determinism']['transfer_equals_fixed']}; independent EOT attack: "
              f"{_pct(ind['estimate'], ind['ci'])}.",
              "", f"Masking audit on {au['n']} examples ({au['sentence']}):", "",
              "| attack | robust | vs the study's attack | p (variant lower) |",
              "|---|---|---|---|"]
    for r in au["rows"]:
        lines.append(f"| {r['attack']} | {_pct(r['robust'], r['ci'])} | "
                     f"{100 * r['delta_vs_study']:+.1f} | {_num(r['p_value_lower'], 3)} |")
    gw = dp["goal_worst_case_over_audit"]
    lines += ["", f"Worst case per example (the study's attack everywhere, the audit's "
              f"attacks on its {au['n']} examples): "
              f"{_pct(dp['robust_accuracy_worst_case'], dp['robust_accuracy_worst_case_ci'])}; "
              "the goal on it: "
              f"{'passed' if gw['passed'] else 'failed'} (gain {100 * gw['gain']:+.1f} points, "
              f"gap {100 * gw['interval_gap']:+.1f}).", ""]
    cv = dp["curve"]
    lines.append(f"On the compression-robustness curve: rate {_num(cv['compression_rate'], 4)}; "
                 f"the fitted logistic predicts {_pct(cv.get('sigmoid'))} (its plateau "
                 f"{_pct(cv.get('sigmoid_upper_asymptote'))}), the parameter-free predictor "
                 f"{_pct(cv['predictor_cap'])}; measured {_pct(cv['measured'])}.")
    lines += ["", "![curve](figures/beyond_curve.png)", "",
              "### 2. Robustness predicted from compression, no fitted parameter", "",
              f"Critical distances of the undefended classifier "
              f"({pr['critical_distance']['attack']}; median "
              f"{_num(pr['critical_distance']['median'], 3)}), then "
              "`A * P(d > rate * eps | d > 0)` at each sweep point "
              f"(A its clean accuracy): over {pr['n']} points MAE "
              f"{_pct(pr['mae'])}, R^2 {_num(pr['r2'], 2)}"]
    if pr.get("logistic"):
        lines[-1] += (f"; the fitted 4-parameter logistic on the same points: MAE "
                      f"{_pct(pr['logistic']['mae'])}, R^2 {_num(pr['logistic']['r2'], 2)}")
    lines[-1] += "."
    kc = pr.get("points_keeping_content")
    if kc:
        lines.append(f"On the {kc['predictor']['n']} points that keep the content: predictor "
                     f"MAE {_pct(kc['predictor']['mae'])}, R^2 {_num(kc['predictor']['r2'], 2)}"
                     + (f"; logistic MAE {_pct(kc['logistic']['mae'])}, R^2 "
                        f"{_num(kc['logistic']['r2'], 2)}" if kc.get("logistic") else "")
                     + ".")
    lines += ["", "| point | rate | measured | predicted (cap) | logistic | n | source |",
              "|---|---|---|---|---|---|---|"]
    for p in pr["points"]:
        lines.append(f"| {p['label']} | {_num(p['compression_rate'], 3)} | "
                     f"{_pct(p['measured'], p['ci'])} | {_pct(p['predicted'])} | "
                     f"{_pct(p.get('logistic'))} | {p['n']} | {p['source']} |")
    lines += ["", "![predictor](figures/beyond_predictor.png)", "",
              "### 3. Why purification moves images away: likelihood under the prior", "",
              f"{lk['num_images']} test images, probability-flow ODE ({lk['trace']} trace, "
              f"{lk['num_steps']} RK4 steps, dequantised to bins of {lk['dequantize']:g}); "
              f"adversarial inputs of the {lk['adversarial_of']} fixed attack; lower bits/dim "
              "= more likely.", "",
              "| images | bits/dim | vs clean (paired) | Wilcoxon p | l2 to clean |",
              "|---|---|---|---|---|"]
    lines.append(f"| clean | {_mci(lk['clean_bpd'])} | | | |")
    av = lk["adversarial_vs_clean"]
    lines.append(f"| adversarial | {_mci(lk['adversarial_bpd'])} | {_dci(av)} | "
                 f"{_num(av['p_value_wilcoxon'], 3)} | "
                 f"{_mci(next(iter(lk['drift'].values()))['l2_adversarial_to_clean'])} |"
                 if lk["drift"] else "")
    for m, v in lk["purified_bpd"].items():
        t = lk["purified_vs_clean"][m]
        lines.append(f"| purified ({m}) | {_mci(v)} | {_dci(t)} | "
                     f"{_num(t['p_value_wilcoxon'], 3)} | "
                     f"{_mci(lk['drift'][m]['l2_purified_to_clean'])} |")
    for m, v in lk.get("purified_clean_bpd", {}).items():
        t = lk["purified_clean_vs_clean"][m]
        lines.append(f"| purified clean ({m}) | {_mci(v)} | {_dci(t)} | "
                     f"{_num(t['p_value_wilcoxon'], 3)} | |")
    lines += ["", lk["answer"] + ".", ""]
    rel = [f"{m}: Spearman {_num(v['spearman_drift_vs_bpd_change']['rho'], 2)} "
           f"(p = {_num(v['spearman_drift_vs_bpd_change']['p_value'], 2)})"
           for m, v in lk["drift"].items() if v["spearman_drift_vs_bpd_change"]]
    if rel:
        lines.append("Relation to the l2 drift (per image, l2 purified-to-clean against the "
                     "bpd change from clean): " + "; ".join(rel) + ".")
    ch = lk.get("chain")
    if ch and ch.get("bpd"):
        lines.append("Along the chain (" + ch["method"] + ", adversarial input): " + " -> ".join(
            f"{p} {_num(b['mean'], 3)}" for p, b in zip(ch["points"], ch["bpd"], strict=True))
            + " bits/dim.")
    sn = lk["score_norm_rms"]
    if sn:
        t0 = str(lk["score_t"][0])
        lines.append(f"Score norm (RMS per dimension, t = {t0}): " + ", ".join(
            f"{s} {_num(v[t0]['mean'], 2)}" for s, v in sn.items()) + ".")
    lines += ["", "![likelihood](figures/beyond_likelihood.png)", ""]
    return "\n".join(lines)


def _mci(v: dict) -> str:
    return f"{v['mean']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"


def _dci(t: dict) -> str:
    d = t["difference"]
    return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def _figures(res: dict, out) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        (out / f"{name}.png").write_bytes(buf.getvalue())
        paths.append(out / f"{name}.png")

    pr = res["predictor"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    pts = pr["points"]
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
    if pts:
        meas = [p["measured"] for p in pts]
        err = np.array([[p["measured"] - p["ci"][0], p["ci"][1] - p["measured"]]
                        for p in pts]).T
        ax.errorbar([p["predicted"] for p in pts], meas, yerr=err, fmt="o", ms=4,
                    label=f"cap predictor (nothing fitted): MAE {100 * pr['mae']:.1f} pts, "
                          f"R$^2$ {pr['r2']:.2f}")
        tv = pr.get("top_singular_value_variant")
        if tv:
            ax.scatter([p["predicted_top_singular_value"] for p in pts], meas, marker="v",
                       color="C2", label=f"cap with the top singular value: MAE "
                                         f"{100 * tv['mae']:.1f} pts, R$^2$ {tv['r2']:.2f}")
        if pr.get("logistic"):
            ax.scatter([p["logistic"] for p in pts], meas, marker="x", color="C1",
                       label=f"fitted logistic: MAE {100 * pr['logistic']['mae']:.1f} pts, "
                             f"R$^2$ {pr['logistic']['r2']:.2f}")
    ax.set_xlabel("predicted robust accuracy (fixed)")
    ax.set_ylabel("measured robust accuracy (fixed)")
    ax.legend(fontsize=7)
    save(fig, "beyond_predictor")

    dp = res["designed_purifier"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, m in enumerate(sorted({p["method"] for p in res["sweep"]})):
        sel = [p for p in res["sweep"] if p["method"] == m]
        ax.scatter([p["compression_rate"] for p in sel],
                   [p["robust_accuracy_fixed"] for p in sel], color=f"C{i}", label=m, s=18)
    fit = pr.get("sigmoid_fit") or {}
    grid = np.linspace(0.0, 1.0, 200)
    if fit.get("params") is not None:
        ax.plot(grid, analysis.sigmoid(grid, **fit["params"]), "k--", lw=1,
                label="fitted logistic (sweep)")
    cc = pr.get("cap_curve")
    if cc:
        ax.plot(cc["rates"], cc["predicted"], color="C2", lw=1,
                label="cap predictor, nothing fitted (anchor = clean acc.)")
    ax.errorbar([dp["compression_rate"]], [dp["robust_accuracy_fixed"]],
                yerr=[[dp["robust_accuracy_fixed"] - dp["robust_accuracy_fixed_ci"][0]],
                      [dp["robust_accuracy_fixed_ci"][1] - dp["robust_accuracy_fixed"]]],
                fmt="*", ms=12, color="C3", label=f"{dp['name']} (designed)")
    und = res["undefended"]
    ax.scatter([1.0], [und["robust_accuracy_fixed"]], marker="x", color="k",
               label="undefended (rate 1)")
    ax.set_xlabel("compression rate (RMS Jacobian singular value)")
    ax.set_ylabel("robust accuracy, fixed randomness")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    save(fig, "beyond_curve")

    lk = res["likelihood"]
    labels = ["clean", "adversarial"] + [f"purified\n{m}" for m in lk["purified_bpd"]] + [
        f"purified clean\n{m}" for m in lk.get("purified_clean_bpd", {})]
    vals = [lk["clean_bpd"], lk["adversarial_bpd"], *lk["purified_bpd"].values(),
            *lk.get("purified_clean_bpd", {}).values()]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    mean = [v["mean"] for v in vals]
    yerr = np.array([[v["mean"] - v["ci"][0], v["ci"][1] - v["mean"]] for v in vals]).T
    ax.bar(range(len(vals)), mean, yerr=yerr, color=["C0", "C3"] + ["C2"] * (len(vals) - 2))
    lo = min(v["ci"][0] for v in vals)
    hi = max(v["ci"][1] for v in vals)
    ax.set_ylim(lo - 0.2 * (hi - lo + 1e-6), hi + 0.2 * (hi - lo + 1e-6))
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("bits/dim (lower = more likely)")
    ch = lk.get("chain") or {}
    ax = axes[1]
    if ch.get("bpd"):
        m = [b["mean"] for b in ch["bpd"]]
        e = np.array([[b["mean"] - b["ci"][0], b["ci"][1] - b["mean"]] for b in ch["bpd"]]).T
        ax.errorbar(range(len(m)), m, yerr=e, fmt="o-")
        ax.axhline(lk["clean_bpd"]["mean"], color="C0", ls=":", label="clean")
        ax.set_xticks(range(len(m)))
        ax.set_xticklabels([p.replace("x0 after ", "x0@") for p in ch["points"]], fontsize=7,
                           rotation=20)
        ax.set_title(f"along the {ch['method']} chain", fontsize=9)
        ax.legend(fontsize=7)
    save(fig, "beyond_likelihood")
    return paths


def write_all(res: dict, workdir) -> dict:
    """Writes WORKDIR/beyond.json, beyond.md and figures/beyond_*.png (process 0)."""
    out = as_path(workdir)
    if jax.process_index() != 0:
        return {}
    (out / "beyond.json").write_text(json.dumps(res, indent=2, sort_keys=True, default=float))
    (out / "beyond.md").write_text(render_markdown(res))
    figs = _figures(res, out / "figures")
    return {"json": out / "beyond.json", "report": out / "beyond.md", "figures": figs}

