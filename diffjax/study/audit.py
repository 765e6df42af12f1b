"""A gradient-masking audit: is the study's attack converged, and is its gradient real?

A robust accuracy is only as good as the attack behind it (Athalye et al. 2018; Carlini et
al. 2019, "On Evaluating Adversarial Robustness"; Croce & Hein 2020). The paper's own
point is that a weak or mismatched evaluation inflates robustness, so the study audits
its own attack, per audited method, on the first `audit.num_examples` examples, under
fixed randomness (the protocol whose number the claims rest on) and, for convergence,
under independent randomness too:

1. **iterations**: robust accuracy with the study's attack at 1x and every multiple in
   `audit.step_multipliers` of its steps (fixed and independent). Plateau: the
   accuracy at the largest multiple is within `audit.tolerance` of the study's (1x) and a
   paired exact test finds no significant drop (one-sided, 5%);
2. **clips**: the attack through straight-through clips (the purifier's x0 and output
   clips pass the gradient: `diffusion.make_purifier(clip_gradient="straight_through")`;
   the choice is data, so this attack runs the study's own compiled programs) against the
   hard clips' gradient;
3. **BPDA**: the attack with the identity as the purifier's backward pass;
4. **gradient-free**: Square (`attacks.square`), `audit.square_queries` queries: it needs
   no gradient, so it is blind to masking;
5. **budget**: the study's attack at every eps in `audit.eps`: unbounded attacks must
   drive the accuracy towards 0 (a gradient that works).

Verdict: "converged" when (1) plateaus under both protocols (``converged_fixed`` and
``converged_independent`` say which; the sentence names each); "unmasked" when none of
(2)-(4) finds significantly more (paired exact test, one-sided, 5%; and more than
`audit.tolerance`) than the study's attack on the same examples and the largest eps of (5)
leaves at most `audit.max_large_eps_accuracy`. Where the fixed protocol is not converged
or not unmasked, the report says that the study's fixed robust accuracy is an upper bound
and gives the worst case over every audit attack, per example, as the tighter one; where
the independent protocol is not converged, that its robust accuracy is an upper bound.
"""

from __future__ import annotations

import numpy as np

from diffjax import stats
from diffjax.study import robustness
from diffjax.study.context import Study, as_list

__all__ = ["audit", "variant", "VARIANTS"]

VARIANTS = ("straight_through", "square", "bpda")  # the attacks other than the study's


def variant(study: Study, method: str, name: str) -> dict:
    """The attack part of one of `VARIANTS` on the audit's examples."""
    a = study.config.audit
    n = min(int(a.num_examples), study.num_examples)
    if name == "straight_through":
        kw = {"defense": study.defense(method, clip_gradient="straight_through")}
    elif name == "bpda":
        kw = {"cascade": study.cascade(method, gradient=study.gradient("bpda"))}
    elif name == "square":
        kw = {"cascade": study.cascade(method, spec="square", steps=int(a.square_queries))}
    else:
        raise ValueError(f"audit variant: expected one of {VARIANTS}, got {name!r}")
    return robustness.attack_part(study, method, None, "realization", n, variant=name, **kw)


def _row(check: str, attack: str, part: dict, field: str, main: np.ndarray) -> dict:
    correct = np.asarray(part[field], bool)
    acc = stats.accuracy(correct)
    test = stats.mcnemar_exact(correct, main, alternative="less")
    return {"check": check, "attack": attack, "robust": acc["estimate"],
            "ci": [acc["lo"], acc["hi"]], "delta_vs_study": test["estimate"],
            "p_value_lower": test["p_value"], "n": int(len(correct)),
            "iterations": int(part["iterations"].sum())}


def audit(study: Study, method: str) -> dict:
    """The audit table and verdict of one method (module docstring)."""
    cfg = study.config
    a = cfg.audit
    n = min(int(a.num_examples), study.num_examples)
    tol = float(a.tolerance)
    steps = int(cfg.attack.steps)
    rows = []

    def part(stream, variant="", **kw):
        return robustness.attack_part(study, method, None, stream, n, variant=variant, **kw)

    main = part("realization")  # == the first n examples of the study's own fixed part
    base = np.asarray(main["fixed_adv_correct"], bool)
    worst = base.copy()
    main_fresh = part("fresh")
    base_fresh = np.asarray(main_fresh["independent_adv_correct"], bool)
    rows.append(_row("iterations", f"study's attack, {steps} steps (fixed)", main,
                     "fixed_adv_correct", base))
    rows.append(_row("iterations", f"study's attack, {steps} steps (independent, EOT)",
                     main_fresh, "independent_adv_correct", base_fresh))
    plateau = {}
    for mult in as_list(a.step_multipliers, int):
        if mult == 1:
            continue
        s = steps * mult
        fx = part("realization", f"steps{s}", cascade=study.cascade(method, steps=s))
        worst &= np.asarray(fx["fixed_adv_correct"], bool)
        rows.append(_row("iterations", f"study's attack, {s} steps (fixed)", fx,
                         "fixed_adv_correct", base))
        fr = part("fresh", f"steps{s}", cascade=study.cascade(method, steps=s))
        rows.append(_row("iterations", f"study's attack, {s} steps (independent, EOT)", fr,
                         "independent_adv_correct", base_fresh))
        plateau = {"steps": s, "fixed": rows[-2], "independent": rows[-1]}

    def plateaus(r) -> bool:
        return r is None or (r["delta_vs_study"] >= -tol and r["p_value_lower"] >= 0.05)

    conv_fixed, conv_independent = (plateaus(plateau.get(k)) for k in ("fixed", "independent"))
    conv = conv_fixed and conv_independent

    st = variant(study, method, "straight_through")
    rows.append(_row("clips", "straight-through clip gradients", st, "fixed_adv_correct", base))
    bp = variant(study, method, "bpda")
    rows.append(_row("gradient", "BPDA (identity backward through the purifier)", bp,
                     "fixed_adv_correct", base))
    sq = variant(study, method, "square")
    rows.append(_row("gradient-free", f"Square, {int(a.square_queries)} queries", sq,
                     "fixed_adv_correct", base))
    for p in (st, bp, sq):
        worst &= np.asarray(p["fixed_adv_correct"], bool)
    masked = [r for r in rows[-3:] if r["delta_vs_study"] < -tol and r["p_value_lower"] < 0.05]

    budget = []
    for eps in as_list(a.eps, float):
        pe = part("realization", f"eps{eps:g}", cascade=study.cascade(method, eps=eps))
        r = _row("budget", f"study's attack, eps {eps:g}", pe, "fixed_adv_correct", base)
        r["eps"] = eps
        rows.append(r)
        budget.append(r)
    big = budget[-1]["robust"] if budget else 0.0
    blocked = bool(budget) and big > float(a.max_large_eps_accuracy)
    unmasked = not masked and not blocked
    worst_acc = stats.accuracy(worst)
    verdict = {"converged": bool(conv), "converged_fixed": bool(conv_fixed),
               "converged_independent": bool(conv_independent), "unmasked": bool(unmasked),
               "worst_case_fixed": worst_acc["estimate"],
               "worst_case_fixed_ci": [worst_acc["lo"], worst_acc["hi"]],
               "study_fixed": float(base.mean()),
               "study_fixed_ci": rows[0]["ci"],  # the first row: the study's attack on these
               "stronger_attacks": [r["attack"] for r in masked],
               "large_eps_accuracy": big,
               "large_eps_accuracy_ci": budget[-1]["ci"] if budget else None}
    # The sentence names each protocol's verdict: the claims rest on the fixed one.
    if conv_fixed and unmasked:
        text = (f"fixed randomness: converged and unmasked: {plateau.get('steps', steps)} "
                "steps, straight-through clips, BPDA and Square find no significantly more "
                "than the study's attack")
        if budget:
            text += f"; eps {budget[-1]['eps']:g} leaves {stats.describe(big, budget[-1]['ci'])}"
    else:
        why = []
        if not conv_fixed:
            why.append("more iterations still lower the accuracy")
        if masked:
            why.append("stronger: " + ", ".join(r["attack"] for r in masked))
        if blocked:
            left = stats.describe(big, budget[-1]["ci"])
            why.append(f"eps {budget[-1]['eps']:g} still leaves {left}")
        text = ("fixed randomness: NOT converged/unmasked (" + "; ".join(why) + "): the "
                "study's fixed robust accuracy is an upper bound; the worst case over the "
                f"audit's attacks, {stats.describe(worst_acc)} on these examples, is the "
                "tighter one")
    if plateau.get("independent"):
        r = plateau["independent"]
        change = (f"{plateau['steps']} steps change its accuracy by "
                  f"{100 * r['delta_vs_study']:+.1f} points, p = {r['p_value_lower']:.2g}")
        text += ("; independent randomness (EOT): " + (
            f"converged ({change})" if conv_independent else
            f"NOT converged ({change}): its robust accuracy is an upper bound"))
    verdict["sentence"] = text
    return {"method": method, "n": n, "rows": rows, "verdict": verdict,
            "tolerance": tol}
