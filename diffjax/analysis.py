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

Everything here is host-side numpy/scipy on a handful of points: results are Python floats,
ready for ``results.json`` (`SigmoidFit.to_dict`).
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
