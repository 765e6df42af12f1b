"""The statistics behind every verdict: intervals, paired tests, bootstrap.

The paper's claims (arXiv 2505.22839) are differences of robust accuracies on the same
examples (fixed vs. transfer / independent randomness, Sec. 4) and a fit of robustness
against the compression rate (Sec. 5). A verdict on 297 digits carries a sampling error
of several points, so every number the study reports comes with its uncertainty:

- `wilson_interval` / `accuracy`: the Wilson score interval of a binomial proportion
  (Wilson 1927): well-behaved at 0/n and n/n, where the Wald interval collapses to a point.
- `mcnemar_exact`: two per-example correctness vectors over the SAME examples. Only the
  discordant pairs carry information about the difference (McNemar 1947); under H0 (equal
  accuracies) the count of "A right, B wrong" among the `d` discordant pairs is
  Binomial(d, 1/2), which is tested exactly. The difference of accuracies gets Newcombe's
  paired score interval (Newcombe 1998, Stat. Med. 17:2635, "method 10": the two Wilson
  intervals combined with the phi correlation of the pairs), which stays in [-1, 1] and
  does not collapse when there are few discordant pairs.
- `bootstrap_ci`: percentile intervals of any statistic of paired arrays (e.g. claim 4's
  R^2 or a rank correlation), the rows resampled together with indices drawn from a
  `jax.random.key` (the same key gives the same interval). A resample where the statistic
  fails (raises, or returns NaN/Inf: e.g. a fit on a resample with one distinct x) is
  counted and excluded, and the count is returned.
- `holm`: Holm's step-down adjustment when several verdicts are tested at once.
- `describe`: one line for a report, "70.4% [65.0, 75.3]".

Everything here is plain NumPy/SciPy on the host (these run once per report, after the
device work) and returns Python floats and ints, ready for `json.dump`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats as _sps

from diffjax import _checks

__all__ = [
    "ALTERNATIVES",
    "z_value",
    "wilson_interval",
    "accuracy",
    "mcnemar_exact",
    "newcombe_paired_interval",
    "bootstrap_ci",
    "holm",
    "describe",
]

ALTERNATIVES = ("two-sided", "less", "greater")


def _check_confidence(confidence) -> float:
    c = _checks.check_number(confidence, "confidence", lo=0.0, hi=1.0)
    if not 0.0 < c < 1.0:
        _checks.fail("confidence", "a level strictly between 0 and 1, e.g. 0.95", c)
    return c


def z_value(confidence: float = 0.95) -> float:
    """The two-sided standard-normal quantile `z_{1 - (1 - confidence) / 2}` (1.95996 at 95%)."""
    c = _check_confidence(confidence)
    return float(_sps.norm.ppf(0.5 + 0.5 * c))


def wilson_interval(successes, n, confidence: float = 0.95):
    """The Wilson score interval of a binomial proportion `successes / n`.

    `(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`; at 95%, 0/10 gives
    [0, 0.2775], 5/10 [0.2366, 0.7634], 10/10 [0.7225, 1]. The bounds are exactly 0 at
    `successes = 0` and exactly 1 at `successes = n`.

    Args:
      successes: a count, or an array of counts.
      n: the number of trials (same shape, or broadcastable). `n = 0` carries no
        information and gives the whole range [0, 1].
      confidence: the two-sided coverage.

    Returns:
      `(lo, hi)`: Python floats for scalar inputs, float64 arrays otherwise.
    """
    z = z_value(confidence)
    k = np.asarray(successes, np.float64)
    m = np.asarray(n, np.float64)
    if np.any(m < 0) or np.any(k < 0) or np.any(k > m):
        _checks.fail("successes, n", "0 <= successes <= n", f"successes {successes}, n {n}")
    safe = np.where(m > 0, m, 1.0)
    p = k / safe
    denom = 1.0 + z * z / safe
    centre = (p + z * z / (2.0 * safe)) / denom
    half = z * np.sqrt(p * (1.0 - p) / safe + z * z / (4.0 * safe * safe)) / denom
    lo = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(k == m, 1.0, np.clip(centre + half, 0.0, 1.0))
    lo, hi = np.where(m > 0, lo, 0.0), np.where(m > 0, hi, 1.0)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def _as_bool_vector(v, name: str) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim != 1:
        _checks.fail(name, "a vector [N] of per-example correctness", f"shape {a.shape}")
    if a.dtype != bool:
        if a.size and not np.all((a == 0) | (a == 1)):
            _checks.fail(name, "booleans or 0/1 values", f"values {np.unique(a)[:5]}")
        a = a.astype(bool)
    return a


def accuracy(correct, confidence: float = 0.95) -> dict:
    """An accuracy with its Wilson interval, as a JSON-ready dict.

    Args:
      correct: `[N]` booleans (or 0/1), one per example.
      confidence: the interval's coverage.

    Returns:
      `{"estimate", "lo", "hi", "correct", "n", "confidence"}` (`estimate` is NaN when N = 0).
    """
    c = _as_bool_vector(correct, "correct")
    k, n = int(c.sum()), int(c.size)
    lo, hi = wilson_interval(k, n, confidence)
    return {"estimate": k / n if n else math.nan, "lo": lo, "hi": hi, "correct": k, "n": n,
            "confidence": float(confidence)}


def newcombe_paired_interval(n11: int, n10: int, n01: int, n00: int,
                             confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's score interval (method 10) for the difference of paired proportions.

    With the 2x2 table of pairs (`n10`: A right and B wrong, `n01`: A wrong and B right),
    `p1 = (n11 + n10) / n`, `p2 = (n11 + n01) / n`, Wilson intervals `[l1, u1]`, `[l2, u2]`
    and `phi = (n11 n00 - n10 n01) / sqrt((n11+n10)(n01+n00)(n11+n01)(n10+n00))` (0 when a
    margin is empty), the interval of `p1 - p2` is

      `[d - sqrt((p1-l1)^2 - 2 phi (p1-l1)(u2-p2) + (u2-p2)^2),`
      ` d + sqrt((u1-p1)^2 - 2 phi (u1-p1)(p2-l2) + (p2-l2)^2)]`.

    Args:
      n11, n10, n01, n00: the counts of the four kinds of pairs.
      confidence: the coverage.

    Returns:
      `(lo, hi)` Python floats in [-1, 1] (`(-1, 1)` with no pairs).

    References:
      R. G. Newcombe, Improved confidence intervals for the difference between binomial
      proportions based on paired data, Statistics in Medicine 17 (1998) 2635-2650.
    """
    counts = [_checks.check_int(v, name, lo=0) for v, name in
              ((n11, "n11"), (n10, "n10"), (n01, "n01"), (n00, "n00"))]
    a, b, c, d = counts
    n = a + b + c + d
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, confidence)
    l2, u2 = wilson_interval(a + c, n, confidence)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins > 0 else 0.0
    diff = p1 - p2
    dl = (p1 - l1) ** 2 - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    du = (u1 - p1) ** 2 - 2.0 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    lo = diff - math.sqrt(max(dl, 0.0))
    hi = diff + math.sqrt(max(du, 0.0))
    return max(lo, -1.0), min(hi, 1.0)


def mcnemar_exact(a_correct, b_correct, alternative: str = "two-sided",
                  confidence: float = 0.95) -> dict:
    """McNemar's exact test of two classifiers (or protocols) on the SAME examples.

    Under H0 (equal accuracies) the number `b10` of examples that A gets right and B gets
    wrong, among the `b10 + b01` discordant ones, is Binomial(b10 + b01, 1/2). The
    p-value is exact (the binomial tails; two-sided: twice the smaller tail, capped at 1,
    which equals `scipy.stats.binomtest(b10, b10 + b01).pvalue` for p = 1/2). With no
    discordant pair the p-value is 1.

    Args:
      a_correct: `[N]` booleans (0/1): example i correct under A.
      b_correct: `[N]` booleans: example i correct under B (the same examples, same order).
      alternative: "two-sided"; "greater": H1 is acc(A) > acc(B) (e.g. A = transfer,
        B = fixed: the paper's "transfer recovers the robustness"); "less": acc(A) < acc(B).
      confidence: the coverage of the interval of the difference.

    Returns:
      A JSON-ready dict: `n`, `b11` (both right), `b10` (A only), `b01` (B only), `b00`,
      `acc_a`, `acc_b`, `estimate` (= `difference` = acc_a - acc_b, i.e. (b10 - b01) / n),
      `lo`, `hi` (Newcombe's paired score interval of the difference, method 10; see
      `newcombe_paired_interval`), `p_value`, `alternative`, `confidence`, `method`.
    """
    _checks.check_choice(alternative, "alternative", ALTERNATIVES)
    confidence = _check_confidence(confidence)
    a = _as_bool_vector(a_correct, "a_correct")
    b = _as_bool_vector(b_correct, "b_correct")
    if a.shape != b.shape:
        _checks.fail("b_correct", f"the same examples as a_correct, shape {a.shape}",
                     f"shape {b.shape}")
    n = int(a.size)
    b11, b10 = int(np.sum(a & b)), int(np.sum(a & ~b))
    b01, b00 = int(np.sum(~a & b)), int(np.sum(~a & ~b))
    d = b10 + b01
    if d == 0:
        p = 1.0
    else:
        lower = float(_sps.binom.cdf(b10, d, 0.5))  # P(X <= b10)
        upper = float(_sps.binom.sf(b10 - 1, d, 0.5))  # P(X >= b10)
        p = {"less": lower, "greater": upper,
             "two-sided": min(1.0, 2.0 * min(lower, upper))}[alternative]
    lo, hi = newcombe_paired_interval(b11, b10, b01, b00, confidence)
    diff = (b10 - b01) / n if n else math.nan
    return {
        "n": n, "b11": b11, "b10": b10, "b01": b01, "b00": b00,
        "acc_a": (b11 + b10) / n if n else math.nan,
        "acc_b": (b11 + b01) / n if n else math.nan,
        "estimate": diff, "difference": diff, "lo": lo, "hi": hi,
        "p_value": float(p), "alternative": alternative, "confidence": confidence,
        "method": "exact binomial test on the discordant pairs (McNemar); Newcombe (1998) "
                  "paired score interval (method 10) for the difference",
    }


def _resample_indices(key, num_resamples: int, n: int) -> np.ndarray:
    import jax

    idx = jax.random.randint(key, (num_resamples, n), 0, n)
    return np.asarray(idx)


def bootstrap_ci(statistic: Callable[..., Any], *arrays, key, num_resamples: int = 2000,
                 confidence: float = 0.95) -> dict:
    """A percentile bootstrap interval of `statistic(*arrays)`, the rows resampled together.

    Resample r uses the rows `idx[r]` of every array (paired data stay paired), with
    `idx = jax.random.randint(key, (num_resamples, N), 0, N)`: the same key gives the same
    interval. A resample where the statistic raises (e.g. `LinAlgError`, a fit on a
    degenerate resample) or returns NaN/Inf is counted in `num_failed` and excluded; the
    interval is the `(1 - c)/2` and `(1 + c)/2` quantiles (NumPy's linear interpolation) of
    the remaining values.

    Args:
      statistic: `(*resampled_arrays) -> float`; it sees NumPy arrays.
      *arrays: one or more arrays with the same leading length N >= 1 (the examples, or
        the points of a fit).
      key: a `jax.random.key` (or a raw uint32 key).
      num_resamples: the number of bootstrap resamples.
      confidence: the coverage.

    Returns:
      A JSON-ready dict: `estimate` (the statistic on the data; NaN if it fails there),
      `lo`, `hi` (NaN when every resample failed), `num_resamples`, `num_failed`,
      `confidence`, `method`.
    """
    confidence = _check_confidence(confidence)
    num_resamples = _checks.check_int(num_resamples, "num_resamples", lo=1)
    if not arrays:
        _checks.fail("arrays", "at least one array to resample", "none")
    data = [np.asarray(a) for a in arrays]
    n = data[0].shape[0] if data[0].ndim else 0
    for i, a in enumerate(data):
        if a.ndim == 0 or a.shape[0] != n:
            _checks.fail(f"arrays[{i}]", f"a leading axis of length {n} (paired rows)",
                         f"shape {a.shape}")
    if n == 0:
        _checks.fail("arrays", "at least one row", "0 rows")

    def value(*xs) -> float:
        try:
            v = float(statistic(*xs))
        except (ArithmeticError, ValueError, np.linalg.LinAlgError, FloatingPointError):
            return math.nan
        return v if math.isfinite(v) else math.nan

    with np.errstate(all="ignore"):
        estimate = value(*data)
        idx = _resample_indices(key, num_resamples, n)
        values = np.array([value(*(a[i] for a in data)) for i in idx], np.float64)
    ok = np.isfinite(values)
    failed = int(num_resamples - ok.sum())
    if ok.any():
        alpha = 1.0 - confidence
        lo, hi = (float(q) for q in np.quantile(values[ok], [alpha / 2, 1.0 - alpha / 2]))
    else:
        lo = hi = math.nan
    return {"estimate": estimate, "lo": lo, "hi": hi, "num_resamples": num_resamples,
            "num_failed": failed, "confidence": confidence,
            "method": "percentile bootstrap over paired rows"}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control for several tests).

    The i-th smallest p-value is multiplied by `(m - i)` (i from 0), made non-decreasing
    and capped at 1: reject H_j at level a iff `holm(p)[j] <= a`.

    Args:
      p_values: m p-values in [0, 1].

    Returns:
      The m adjusted p-values, in the input order (Python floats).
    """
    p = np.asarray(p_values, np.float64).reshape(-1)
    if np.any(~((p >= 0) & (p <= 1))):
        _checks.fail("p_values", "values in [0, 1]", p.tolist())
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.maximum.accumulate(np.minimum(1.0, p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adj
    return [float(v) for v in out]


def describe(estimate, interval=None, *, percent: bool = True, digits: int = 1) -> str:
    """One line for a report: `"70.4% [65.0, 75.3]"` (or `"0.640 [0.412, 0.803]"`).

    Args:
      estimate: a number, or a dict with "estimate", "lo" and "hi" (what `accuracy`,
        `mcnemar_exact` and `bootstrap_ci` return).
      interval: `(lo, hi)` when `estimate` is a number; None prints the estimate alone.
      percent: print fractions as percentages.
      digits: decimals (of the percentage when `percent`).

    Returns:
      The string; NaN values print as "nan".
    """
    if isinstance(estimate, dict):
        interval = (estimate["lo"], estimate["hi"])
        estimate = estimate["estimate"]
    scale, unit = (100.0, "%") if percent else (1.0, "")

    def f(v) -> str:
        v = float(v)
        return "nan" if math.isnan(v) else f"{v * scale:.{digits}f}"

    text = f(estimate) + unit
    if interval is not None:
        text += f" [{f(interval[0])}, {f(interval[1])}]"
    return text
