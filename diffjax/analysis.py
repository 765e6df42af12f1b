"""Robustness against compression rate: the sigmoid fit and the gradient-free ranking.

The paper (Sec. 5) finds that, across samplers (DDPM, reverse-only, DDIM) and purification
timesteps, the robust accuracy under fixed randomness follows a sigmoid of the compression
rate: it approaches the clean accuracy as compression gets strong (rate -> 0) and the
undefended robustness as the rate nears 1. We fit the four-parameter logistic

    ``acc(rate) = lower + (upper - lower) / (1 + exp(slope * (rate - midpoint)))``

(`upper`: the strong-compression asymptote, the clean accuracy; `lower`: the
no-compression asymptote, the undefended robust accuracy; `slope` > 0 for a decreasing
curve; `midpoint`: the rate of the half-way point). Either asymptote can be fixed at a
measured value (``upper=clean_acc``, ``lower=undefended_acc``), which is how the paper
reads the curve, or left free.

Confidence intervals come from the covariance of `scipy.optimize.curve_fit` (scaled by the
residual variance, Student-t quantiles with ``n - n_free`` degrees of freedom) or from a
pairs bootstrap (percentile intervals; the resampling indices come from a
`jax.random.key`, so the same key gives the same intervals).

`rank_correlation` measures how well the compression rate ranks purifiers by robustness
without computing a single attack gradient (Spearman or Kendall; a strongly negative value
means lower rate, higher robustness), and `rank_purifiers` orders candidates by rate.

The sigmoid is fitted after the fact. `predict_from_compression` predicts instead, with no
fitted parameter (the hyperspherical cap of the paper's OpenReview version): each example's
critical distance `d` on the undefended classifier (`critical_distances`, a bisection over
eps with a real attack) and a purifier's measured compression rate `c` and anchor accuracy
`A` give ``A * P(d > c eps | d > 0)``; `compare_predictions` scores it against the
measured accuracies (MAE, R^2).

Everything here except `critical_distances` (which runs attacks) is host-side numpy/scipy
on a handful of points: results are Python floats, ready for ``results.json``
(`SigmoidFit.to_dict`, `compare_predictions`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import numpy as np
import scipy.optimize
import scipy.stats

from diffjax import _checks

__all__ = [
    "PARAM_NAMES",
    "SigmoidFit",
    "sigmoid",
    "fit_sigmoid",
    "predict",
    "rank_correlation",
    "rank_purifiers",
    "critical_distances",
    "predict_from_compression",
    "compare_predictions",
]

PARAM_NAMES = ("upper", "lower", "slope", "midpoint")


def sigmoid(rate, upper: float, lower: float, slope: float, midpoint: float):
    """The four-parameter logistic ``lower + (upper - lower) / (1 + exp(slope (rate - mid)))``.

    Args:
      rate: compression rates (any shape; numpy or a scalar).
      upper: the value as ``rate -> -inf`` (for ``slope > 0``): the clean accuracy.
      lower: the value as ``rate -> +inf``: the undefended robust accuracy.
      slope: the steepness (``> 0``: decreasing in the rate).
      midpoint: the rate at which the curve is half-way between the asymptotes.

    Returns:
      Predicted robust accuracies, the shape of `rate` (float64).
    """
    z = np.clip(slope * (np.asarray(rate, np.float64) - midpoint), -700.0, 700.0)
    return lower + (upper - lower) / (1.0 + np.exp(z))


@dataclasses.dataclass(frozen=True)
class SigmoidFit:
    """A fitted four-parameter logistic (see the module docstring).

    Attributes:
      params: ``{upper, lower, slope, midpoint}``, fixed ones included.
      stderr: their standard errors (0 for fixed ones; NaN when undetermined).
      ci: ``{name: (low, high)}`` confidence intervals at level `confidence`.
      r2: the coefficient of determination ``1 - SS_res / SS_tot`` on the fitted points.
      n: the number of points.
      fixed: the names of the parameters held fixed.
      confidence: the intervals' level, e.g. 0.95.
      ci_method: ``"covariance"`` or ``"bootstrap"``.
    """

    params: dict
    stderr: dict
    ci: dict
    r2: float
    n: int
    fixed: tuple
    confidence: float
    ci_method: str

    def __call__(self, rate):
        """Predicted robust accuracy at `rate` (as `predict`)."""
        return sigmoid(rate, **self.params)

    def to_dict(self) -> dict:
        """A JSON-able dict: ``params``, ``r2`` (the keys results.json needs), and the rest."""
        return {
            "params": {k: float(v) for k, v in self.params.items()},
            "r2": float(self.r2),
            "stderr": {k: float(v) for k, v in self.stderr.items()},
            "ci": {k: [float(a), float(b)] for k, (a, b) in self.ci.items()},
            "n": int(self.n),
            "fixed": list(self.fixed),
            "confidence": float(self.confidence),
            "ci_method": self.ci_method,
        }


def _as_points(rates, robust_accuracy):
    x = np.asarray(rates, np.float64).ravel()
    y = np.asarray(robust_accuracy, np.float64).ravel()
    if x.shape != y.shape:
        _checks.fail("robust_accuracy", f"one value per rate ({x.size})", f"{y.size} values")
    for name, a in (("rates", x), ("robust_accuracy", y)):
        if not np.all(np.isfinite(a)):
            _checks.fail(name, "finite values", f"{int((~np.isfinite(a)).sum())} NaN/Inf")
    return x, y


def _initial_guess(x, y, free, fixed_values):
    upper = fixed_values.get("upper", float(np.max(y)))
    lower = fixed_values.get("lower", float(np.min(y)))
    # Decreasing data (the paper's case) gives a positive slope.
    rho = scipy.stats.spearmanr(x, y).statistic if np.ptp(x) > 0 and np.ptp(y) > 0 else -1.0
    sign = -1.0 if (np.isfinite(rho) and rho > 0) else 1.0
    if upper < lower:  # asymptotes given the other way round: flip the slope's sign
        sign = -sign
    half = 0.5 * (upper + lower)
    order = np.argsort(x)
    crossing = np.flatnonzero(np.diff(np.sign(y[order] - half)) != 0)
    if crossing.size:  # interpolate linearly where the data cross the half-way level
        i = crossing[0]
        (x0, x1), (y0, y1) = x[order][i:i + 2], y[order][i:i + 2]
        mid = float(x0 + (half - y0) * (x1 - x0) / (y1 - y0)) if y1 != y0 else float(x0)
    else:
        mid = float(np.median(x))
    slope = sign * 8.0 / max(float(np.ptp(x)), 1e-12)
    guess = {"upper": upper, "lower": lower, "slope": slope, "midpoint": mid}
    return [guess[k] for k in free]


def _curve_fit(x, y, free, fixed_values, p0, sigma):
    def model(rate, *theta):
        p = dict(fixed_values)
        p.update(zip(free, theta, strict=True))
        return sigmoid(rate, **p)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.optimize.OptimizeWarning)
        popt, pcov = scipy.optimize.curve_fit(model, x, y, p0=p0, sigma=sigma,
                                              absolute_sigma=False, maxfev=20000)
    return popt, pcov, model


def fit_sigmoid(
    rates,
    robust_accuracy,
    *,
    upper: float | None = None,
    lower: float | None = None,
    sigma=None,
    confidence: float = 0.95,
    ci_method: str = "covariance",
    num_bootstrap: int = 1000,
    key=None,
) -> SigmoidFit:
    """Fits robust accuracy against compression rate with a four-parameter logistic.

    Args:
      rates: ``[n]`` compression rates (one per purifier configuration: sampler x t*).
      robust_accuracy: ``[n]`` robust accuracies under fixed randomness, in [0, 1].
      upper: fix the strong-compression asymptote (the clean accuracy), or None to fit it.
      lower: fix the no-compression asymptote (the undefended robust accuracy), or None.
      sigma: optional ``[n]`` standard deviations of the accuracies (e.g. binomial
        ``sqrt(p (1 - p) / N)``), used as weights.
      confidence: the level of the intervals, in (0, 1).
      ci_method: ``"covariance"`` (curve_fit's covariance and Student-t quantiles) or
        ``"bootstrap"`` (percentile intervals from `num_bootstrap` pairs resamples).
      num_bootstrap: resamples for ``"bootstrap"``, >= 10.
      key: a `jax.random.key` for ``"bootstrap"`` (default ``jax.random.key(0)``).

    Returns:
      A `SigmoidFit`. Intervals are NaN when the data cannot determine them (no residual
      degrees of freedom, or a singular covariance).

    Raises:
      ValueError: mismatched or non-finite inputs, fewer points than free parameters, or a
        fit that does not converge.
    """
    x, y = _as_points(rates, robust_accuracy)
    confidence = _checks.check_number(confidence, "confidence", lo=0.0, hi=1.0, lo_open=True)
    if confidence >= 1.0:
        _checks.fail("confidence", "a level in (0, 1)", confidence)
    _checks.check_choice(ci_method, "ci_method", ("covariance", "bootstrap"))
    fixed_values = {}
    if upper is not None:
        fixed_values["upper"] = _checks.check_number(upper, "upper")
    if lower is not None:
        fixed_values["lower"] = _checks.check_number(lower, "lower")
    free = [k for k in PARAM_NAMES if k not in fixed_values]
    if x.size < len(free):
        _checks.fail("rates", f"at least {len(free)} points to fit {', '.join(free)}",
                     f"{x.size} points", "fix upper/lower at measured accuracies")
    if sigma is not None:
        sigma = np.asarray(sigma, np.float64).ravel()
        if sigma.shape != x.shape or not np.all(sigma > 0):
            _checks.fail("sigma", f"{x.size} positive standard deviations", sigma)
    p0 = _initial_guess(x, y, free, fixed_values)
    # A few starting slopes (the logistic's least squares has flat directions far from the
    # data); the best converged fit wins.
    best, error = None, None
    for scale in (1.0, 0.25, 4.0):
        start = [v * scale if k == "slope" else v for k, v in zip(free, p0, strict=True)]
        try:
            popt, pcov, model = _curve_fit(x, y, free, fixed_values, start, sigma)
        except RuntimeError as e:
            error = e
            continue
        w = 1.0 if sigma is None else 1.0 / sigma
        sse = float(np.sum((w * (y - model(x, *popt))) ** 2))
        if best is None or sse < best[0]:
            best = (sse, popt, pcov, model)
    if best is None:
        raise ValueError(f"robust_accuracy: expected data a logistic can fit; the fit did not "
                         f"converge ({error})")
    _, popt, pcov, model = best
    params = dict(fixed_values)
    params.update(zip(free, popt.tolist(), strict=True))
    params = {k: float(params[k]) for k in PARAM_NAMES}
    resid = y - model(x, *popt)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan")

    dof = x.size - len(free)
    se_free = np.sqrt(np.clip(np.diag(pcov), 0.0, None)) if np.all(np.isfinite(pcov)) \
        else np.full(len(free), np.nan)
    if dof <= 0:
        se_free = np.full(len(free), np.nan)
    stderr = {k: 0.0 for k in fixed_values}
    stderr.update(zip(free, se_free.tolist(), strict=True))
    ci = {k: (v, v) for k, v in fixed_values.items()}
    if ci_method == "covariance":
        q = scipy.stats.t.ppf(0.5 + confidence / 2, dof) if dof > 0 else np.nan
        for k, v, s in zip(free, popt, se_free, strict=True):
            ci[k] = (float(v - q * s), float(v + q * s))
    else:
        num_bootstrap = _checks.check_int(num_bootstrap, "num_bootstrap", lo=10)
        key = jax.random.key(0) if key is None else key
        idx = np.asarray(jax.random.randint(key, (num_bootstrap, x.size), 0, x.size))
        draws = []
        for rows in idx:  # host-side refits of a handful of points
            if np.unique(x[rows]).size < len(free):
                continue
            try:
                p, _, _ = _curve_fit(x[rows], y[rows], free, fixed_values, popt.tolist(),
                                     None if sigma is None else sigma[rows])
            except RuntimeError:
                continue
            draws.append(p)
        draws = np.asarray(draws).reshape(-1, len(free))
        alpha = (1.0 - confidence) / 2
        for j, k in enumerate(free):
            if draws.shape[0] >= 10:
                lo, hi = np.quantile(draws[:, j], [alpha, 1.0 - alpha])
                ci[k] = (float(lo), float(hi))
            else:
                ci[k] = (math.nan, math.nan)
    ci = {k: tuple(map(float, ci[k])) for k in PARAM_NAMES}
    stderr = {k: float(stderr[k]) for k in PARAM_NAMES}
    return SigmoidFit(params=params, stderr=stderr, ci=ci, r2=r2, n=int(x.size),
                      fixed=tuple(k for k in PARAM_NAMES if k in fixed_values),
                      confidence=confidence, ci_method=ci_method)


def predict(fit: SigmoidFit, rate):
    """The robust accuracy a fitted sigmoid predicts at measured compression rate(s).

    Args:
      fit: a `SigmoidFit` (or a dict with its four ``params``, e.g. from results.json).
      rate: compression rate(s), any shape.

    Returns:
      Predicted robust accuracies, the shape of `rate` (float64).
    """
    params = fit.params if isinstance(fit, SigmoidFit) else fit.get("params", fit)
    missing = [k for k in PARAM_NAMES if k not in params]
    if missing:
        _checks.fail("fit", f"a SigmoidFit or a dict with params {', '.join(PARAM_NAMES)}",
                     f"missing {', '.join(missing)}")
    rate = np.asarray(rate, np.float64)
    if not np.all(np.isfinite(rate)):
        _checks.fail("rate", "finite compression rates", "NaN/Inf entries")
    return sigmoid(rate, **{k: float(params[k]) for k in PARAM_NAMES})


def rank_correlation(rates, robust_accuracy, *, method: str = "spearman") -> dict:
    """The rank correlation between compression rate and robust accuracy.

    The paper's use: rank purifiers by robustness without gradients. A value near -1 means
    the rate orders the purifiers exactly as their (expensive) robust accuracies do.

    Args:
      rates: ``[n]`` compression rates, n >= 3.
      robust_accuracy: ``[n]`` robust accuracies.
      method: ``"spearman"`` or ``"kendall"`` (tau-b; better behaved with ties).

    Returns:
      ``{"method", "statistic", "pvalue", "n"}`` (Python floats/ints).
    """
    x, y = _as_points(rates, robust_accuracy)
    _checks.check_choice(method, "method", ("spearman", "kendall"))
    if x.size < 3:
        _checks.fail("rates", "at least 3 points", f"{x.size}")
    res = scipy.stats.spearmanr(x, y) if method == "spearman" else scipy.stats.kendalltau(x, y)
    return {"method": method, "statistic": float(res.statistic), "pvalue": float(res.pvalue),
            "n": int(x.size)}


def rank_purifiers(rates, names=None, *, fit: SigmoidFit | None = None) -> list[dict]:
    """Orders purifiers from the most to the least compressive (lowest rate first).

    Args:
      rates: ``[n]`` compression rates.
      names: ``[n]`` labels (default ``"0"``, ``"1"``, ...).
      fit: optional `SigmoidFit`; adds each purifier's predicted robust accuracy.

    Returns:
      A list of dicts ``{"name", "compression_rate"[, "predicted_robust_accuracy"]}``,
      predicted most robust first.
    """
    r = np.asarray(rates, np.float64).ravel()
    if not np.all(np.isfinite(r)):
        _checks.fail("rates", "finite values", "NaN/Inf entries")
    names = [str(i) for i in range(r.size)] if names is None else [str(n) for n in names]
    if len(names) != r.size:
        _checks.fail("names", f"{r.size} names, one per rate", f"{len(names)} names")
    out = []
    for i in np.argsort(r, kind="stable"):
        row = {"name": names[i], "compression_rate": float(r[i])}
        if fit is not None:
            row["predicted_robust_accuracy"] = float(predict(fit, r[i]))
        out.append(row)
    return out


# --------------------------------------------------------------------------------------
# Robustness predicted from compression with no fitted parameter (the hyperspherical cap).
# --------------------------------------------------------------------------------------
#
# The OpenReview version of the paper explains the sigmoid with a hyperspherical cap: along
# an adversarial direction the classifier's label flips at a critical distance d; a
# purifier that shrinks the eps-ball around its anchor by its compression rate c keeps an
# example whose critical distance exceeds the shrunk radius, d > c eps. Measure every
# example's d once, on the undefended classifier (`critical_distances`), and every sweep
# point's robust accuracy follows from its measured rate alone
# (`predict_from_compression`); `compare_predictions` scores the prediction.


def critical_distances(
    logits_fn,
    x,
    y,
    example_keys,
    *,
    attack=None,
    norm: str = "linf",
    eps_max: float = 0.5,
    num_rounds: int = 12,
    step_fraction: float = 0.25,
) -> np.ndarray:
    """Each example's critical distance on an undefended classifier, by bisection over eps.

    The critical distance of `x` is the smallest budget at which `attack` fools the
    classifier. Every example keeps its own bracket `[lo, hi]` (`hi` = `eps_max` first);
    a round attacks the whole batch once with per-example budgets `eps = (lo + hi) / 2`
    (traced: one compiled attack for all rounds) and moves `hi` to the norm of the
    adversarial example found (<= eps) where the attack succeeds, `lo` to `eps` where it
    fails. The result is `hi`: the norm of a real adversarial example, within
    `eps_max / 2^num_rounds` of the smallest budget the attack succeeds at (attack success
    is assumed monotone in eps; a stronger attack gives smaller distances).

    Args:
      logits_fn: the classifier, `(x [B,H,W,C] in [0, 1]) -> [B, K]`.
      x: `[B, H, W, C]` clean images in [0, 1].
      y: `[B]` int labels.
      example_keys: `[B]` typed keys (the attack's random start; the fixed protocol).
      attack: an attack config (`diffjax.attacks.PGDConfig`, `APGDConfig`, ...); its
        `eps` is ignored and its `step_size`, where it has one, is set to
        `step_fraction * eps` per example. Default: PGD-20 with the CE loss, in `norm`.
      norm: the threat model of the default attack ("linf" or "l2").
      eps_max: the largest budget tried (l_inf: at most 1).
      num_rounds: bisection rounds after the first attack at `eps_max`.
      step_fraction: the step size as a fraction of each example's budget.

    Returns:
      `[B]` float64 distances in the attack's norm: 0 where the clean image is already
      misclassified, `inf` where the attack fails even at `eps_max`.
    """
    import jax.numpy as jnp

    from diffjax.attacks import PGDConfig, engine
    from diffjax.defense import undefended

    _checks.check_images(x, "x")
    y = jnp.asarray(y, jnp.int32)
    _checks.check_choice(norm, "norm", ("linf", "l2"))
    if attack is None:
        attack = PGDConfig(norm=norm, eps=0.0, step_size=0.0, steps=20, loss="ce")
    eps_max = _checks.check_number(eps_max, "eps_max", lo=0.0, lo_open=True,
                                   hi=1.0 if attack.norm == "linf" else None)
    num_rounds = _checks.check_int(num_rounds, "num_rounds", lo=0)
    step_fraction = _checks.check_number(step_fraction, "step_fraction", lo=0.0,
                                         lo_open=True)
    defense = undefended(logits_fn)
    has_step = hasattr(attack, "step_size")
    n_key = "linf" if attack.norm == "linf" else "l2"

    def fooled_at(eps):
        e = jnp.asarray(eps, jnp.float32)
        kw = {"step_size": e * step_fraction} if has_step else {}
        res = engine.run(attack, defense, x, y, example_keys, "fixed", eps=e, **kw)
        return np.array(res.success), np.array(getattr(res, n_key), np.float64)

    clean_ok = np.asarray(jnp.argmax(logits_fn(x), axis=-1) == y)
    b = x.shape[0]
    lo = np.zeros(b)
    hi = np.full(b, eps_max)
    ok, dist = fooled_at(hi)
    ok &= clean_ok
    hi = np.where(ok, np.minimum(hi, dist), hi)
    never = clean_ok & ~ok
    for _ in range(num_rounds):
        mid = 0.5 * (lo + hi)
        ok, dist = fooled_at(mid)
        hi = np.where(ok, np.minimum(mid, dist), hi)
        lo = np.where(ok, lo, mid)
    out = np.where(clean_ok, hi, 0.0)
    return np.where(never, np.inf, out)


def predict_from_compression(critical_distance, rates, eps: float, *,
                             anchor_accuracy=None) -> np.ndarray:
    """Fixed-randomness robust accuracy predicted from compression rates, nothing fitted.

    The hyperspherical-cap rule: a purifier with compression rate `c` shrinks the eps-ball
    around its anchor to radius `c eps`, so an example stays correct when its anchor is
    classified correctly and its critical distance exceeds `c eps`:

        predicted(c) = A * P(d > c eps | d > 0),

    `d` the undefended classifier's critical distances (`critical_distances`; 0 for a
    misclassified clean image) and `A` the purifier's anchor accuracy (its clean accuracy
    under fixed randomness, measured without any attack). The conditional survival is
    taken over the examples the classifier gets right, so the two limits are the
    measured ones: `c -> 0` gives `A`, and the identity purifier (`c = 1`, `A` = the
    classifier's clean accuracy) gives the undefended robust accuracy `P(d > eps)`.
    Without `anchor_accuracy`, `A` is the classifier's own clean accuracy `P(d > 0)`
    (anchors assumed as accurate as the clean images). The rule assumes the purifier keeps
    each anchor's margin (its critical distance at the anchor equals the clean one's) and
    shrinks the adversarial direction as much as an average one (the rate is the RMS
    singular value).

    Args:
      critical_distance: `[N]` per-example critical distances (0: misclassified clean;
        `inf`: never fooled within the searched budgets).
      rates: `[n]` compression rates (one per purifier / sweep point), or `[n, N]`
        per-example rates of the same examples (`metrics.compression_rate` per example),
        then the rule is applied example by example.
      eps: the attack budget, in the norm of the distances.
      anchor_accuracy: None or `[n]` anchor (clean) accuracies of the purifiers.

    Returns:
      `[n]` predicted robust accuracies in [0, 1] (float64).
    """
    d = np.asarray(critical_distance, np.float64).ravel()
    if d.size == 0 or np.any(np.isnan(d)) or np.any(d < 0):
        _checks.fail("critical_distance", "non-negative distances (inf allowed), one per "
                     "example", f"{d.size} values, min {np.nanmin(d) if d.size else None}")
    eps = _checks.check_number(eps, "eps", lo=0.0)
    r = np.asarray(rates, np.float64)
    if r.ndim == 0:
        r = r[None]
    if r.ndim == 2 and r.shape[1] != d.size:
        _checks.fail("rates", f"[n] rates or [n, {d.size}] per-example rates",
                     f"shape {r.shape}")
    if r.ndim > 2 or not np.all(np.isfinite(r)) or np.any(r < 0):
        _checks.fail("rates", "finite non-negative compression rates, [n] or [n, N]",
                     f"shape {r.shape}")
    correct = d > 0
    if not correct.any():
        return np.zeros(r.shape[0])
    shrunk = (r[:, None] if r.ndim == 1 else r) * eps  # [n, 1] or [n, N]
    survives = d[None, :] > shrunk
    survival = (survives & correct[None, :]).sum(axis=1) / correct.sum()
    if anchor_accuracy is None:
        anchor = np.full(r.shape[0], correct.mean())
    else:
        anchor = np.asarray(anchor_accuracy, np.float64).ravel()
        if anchor.shape != (r.shape[0],) or np.any((anchor < 0) | (anchor > 1)):
            _checks.fail("anchor_accuracy", f"{r.shape[0]} accuracies in [0, 1], one per "
                         "rate", anchor)
    return anchor * survival


def compare_predictions(predicted, measured, *, labels=None) -> dict:
    """How well predicted robust accuracies match measured ones (JSON-ready floats).

    Args:
      predicted: `[n]` predicted accuracies.
      measured: `[n]` measured accuracies.
      labels: optional `[n]` names of the points (e.g. ``"ddpm t*=100"``).

    Returns:
      ``{"mae", "max_abs_error", "r2", "n", "points": [{"predicted", "measured"[,
      "label"]}, ...]}``: `r2 = 1 - SS_res / SS_tot` about the measured mean (NaN when the
      measured values are all equal), the coefficient of determination of the prediction
      itself (no fitted line in between).
    """
    p, m = _as_points(predicted, measured)
    if labels is not None and len(labels) != p.size:
        _checks.fail("labels", f"{p.size} labels, one per point", f"{len(labels)} labels")
    err = p - m
    ss_tot = float(np.sum((m - m.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else math.nan
    points = []
    for i in range(p.size):
        row = {"predicted": float(p[i]), "measured": float(m[i])}
        if labels is not None:
            row["label"] = str(labels[i])
        points.append(row)
    return {"mae": float(np.mean(np.abs(err))) if p.size else math.nan,
            "max_abs_error": float(np.max(np.abs(err))) if p.size else math.nan,
            "r2": r2, "n": int(p.size), "points": points}
