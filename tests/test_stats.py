"""diffjax.stats against hand-computed values and scipy.stats."""

import json
import math

import jax
import numpy as np
import pytest
from scipy import stats as sps

from diffjax import stats

Z95 = 1.959963984540054


def wilson_by_roots(k, n, z=Z95):
    """Wilson's interval as the roots in pi of (k/n - pi)^2 = z^2 pi (1 - pi) / n."""
    p = k / n
    a = 1 + z * z / n
    b = -(2 * p + z * z / n)
    c = p * p
    disc = math.sqrt(max(b * b - 4 * a * c, 0.0))
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.27753),  # the classic 0/10: [0, 27.8%]
    (10, 10, 0.72247, 1.0),
    (5, 10, 0.23659, 0.76341),
    (1, 10, 0.01787, 0.40415),
])
def test_wilson_known_values(k, n, lo, hi):
    got = stats.wilson_interval(k, n)
    assert isinstance(got[0], float) and isinstance(got[1], float)
    assert got == pytest.approx((lo, hi), abs=5e-5)
    assert got == pytest.approx(wilson_by_roots(k, n), abs=1e-12)


def test_wilson_edges_arrays_and_levels():
    assert stats.wilson_interval(0, 10)[0] == 0.0 and stats.wilson_interval(10, 10)[1] == 1.0
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)  # no data: no information
    lo, hi = stats.wilson_interval(np.array([0, 5, 10, 0]), np.array([10, 10, 10, 0]))
    np.testing.assert_allclose(lo, [0.0, 0.23659, 0.72247, 0.0], atol=5e-5)
    np.testing.assert_allclose(hi, [0.27753, 0.76341, 1.0, 1.0], atol=5e-5)
    # Wider at higher confidence, nested.
    l90, h90 = stats.wilson_interval(30, 100, 0.90)
    l99, h99 = stats.wilson_interval(30, 100, 0.99)
    assert l99 < l90 < 0.3 < h90 < h99
    assert stats.wilson_interval(30, 100, 0.99) == pytest.approx(
        wilson_by_roots(30, 100, z=sps.norm.ppf(0.995)), abs=1e-12)
    with pytest.raises(ValueError, match="successes"):
        stats.wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        stats.wilson_interval(1, 10, confidence=1.0)


def test_accuracy_dict_is_json_ready():
    acc = stats.accuracy(np.array([1, 1, 0, 1, 0, 1, 1, 1, 1, 0]))
    assert acc["estimate"] == 0.7 and acc["correct"] == 7 and acc["n"] == 10
    assert (acc["lo"], acc["hi"]) == pytest.approx(stats.wilson_interval(7, 10))
    json.dumps(acc)
    assert stats.describe(acc) == "70.0% [39.7, 89.2]"
    with pytest.raises(ValueError, match="correct"):
        stats.accuracy(np.array([0, 2, 1]))


def paired(b11, b10, b01, b00, seed=0):
    """Two correctness vectors with the given 2x2 table, in a shuffled order."""
    a = np.array([1] * b11 + [1] * b10 + [0] * b01 + [0] * b00, bool)
    b = np.array([1] * b11 + [0] * b10 + [1] * b01 + [0] * b00, bool)
    perm = np.random.default_rng(seed).permutation(a.size)
    return a[perm], b[perm]


@pytest.mark.parametrize("table", [(40, 12, 3, 45), (10, 0, 0, 5), (0, 7, 1, 0),
                                   (150, 30, 31, 86), (5, 0, 9, 2)])
def test_mcnemar_p_values_equal_scipy_binomtest(table):
    a, b = paired(*table)
    b10, b01 = table[1], table[2]
    for alt, scipy_alt in (("two-sided", "two-sided"), ("greater", "greater"),
                           ("less", "less")):
        r = stats.mcnemar_exact(a, b, alternative=alt)
        assert (r["b11"], r["b10"], r["b01"], r["b00"]) == table
        if b10 + b01 == 0:
            assert r["p_value"] == 1.0
            continue
        ref = sps.binomtest(b10, b10 + b01, 0.5, alternative=scipy_alt).pvalue
        assert r["p_value"] == pytest.approx(ref, rel=1e-10, abs=1e-15)
    json.dumps(r)


def test_mcnemar_hand_computed():
    # 12 vs 3 discordant pairs: two-sided p = 2 * P(X <= 3 | 15, 1/2) = 2 * 576 / 32768.
    a, b = paired(40, 12, 3, 45)
    r = stats.mcnemar_exact(a, b)
    assert r["p_value"] == pytest.approx(2 * (1 + 15 + 105 + 455) / 2 ** 15, rel=1e-12)
    assert r["difference"] == r["estimate"] == pytest.approx(0.09)
    assert (r["acc_a"], r["acc_b"]) == pytest.approx((0.52, 0.43))
    # A one-sided test in the observed direction halves it; the other way is ~1.
    assert stats.mcnemar_exact(a, b, "greater")["p_value"] == pytest.approx(576 / 2 ** 15)
    assert stats.mcnemar_exact(a, b, "less")["p_value"] > 0.99
    # Swapping A and B mirrors everything.
    s = stats.mcnemar_exact(b, a)
    assert (s["b10"], s["b01"]) == (3, 12)
    assert (s["lo"], s["hi"]) == pytest.approx((-r["hi"], -r["lo"]), abs=1e-12)
    with pytest.raises(ValueError, match="same examples"):
        stats.mcnemar_exact(a, b[:-1])
    with pytest.raises(ValueError, match="alternative"):
        stats.mcnemar_exact(a, b, "both")


def newcombe_by_hand(a, b, c, d, z=Z95):
    """Newcombe (1998) method 10 from the paper's formulas, Wilson limits by their roots."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_by_roots(a + b, n, z)
    l2, u2 = wilson_by_roots(a + c, n, z)
    e, f, g, h = a + b, c + d, a + c, b + d
    phi = (a * d - b * c) / math.sqrt(e * f * g * h) if e * f * g * h else 0.0
    delta = math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    eps = math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return p1 - p2 - delta, p1 - p2 + eps


@pytest.mark.parametrize("table", [(40, 12, 3, 45), (150, 30, 31, 86), (5, 0, 9, 2),
                                   (0, 7, 1, 0), (60, 0, 0, 0)])
def test_newcombe_interval_by_hand(table):
    lo, hi = stats.newcombe_paired_interval(*table)
    assert (lo, hi) == pytest.approx(newcombe_by_hand(*table), abs=1e-9)
    d = (table[1] - table[2]) / sum(table)
    assert -1.0 <= lo <= d <= hi <= 1.0
    assert stats.newcombe_paired_interval(0, 0, 0, 0) == (-1.0, 1.0)


def test_newcombe_interval_covers_about_95_percent():
    # Paired Bernoulli pairs with P(A only) = 0.15, P(B only) = 0.05: true diff 0.10.
    rng = np.random.default_rng(0)
    probs = [0.45, 0.15, 0.05, 0.35]
    hits, reps = 0, 1500
    for table in rng.multinomial(80, probs, size=reps):
        lo, hi = stats.newcombe_paired_interval(*(int(t) for t in table))
        hits += lo <= 0.10 <= hi
    assert 0.93 <= hits / reps <= 0.975  # Newcombe's method 10 is near-nominal here


def test_bootstrap_mean_matches_the_normal_theory_interval_and_is_keyed():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, size=400)
    key = jax.random.key(3)
    r = stats.bootstrap_ci(np.mean, x, key=key, num_resamples=2000)
    half = Z95 * x.std() / math.sqrt(x.size)
    assert r["estimate"] == pytest.approx(x.mean())
    assert r["lo"] == pytest.approx(x.mean() - half, abs=0.2 * half)
    assert r["hi"] == pytest.approx(x.mean() + half, abs=0.2 * half)
    assert r["num_failed"] == 0
    assert stats.bootstrap_ci(np.mean, x, key=key, num_resamples=2000) == r  # same key
    other = stats.bootstrap_ci(np.mean, x, key=jax.random.key(4), num_resamples=2000)
    assert other["lo"] != r["lo"]
    json.dumps(r)


def test_bootstrap_keeps_pairs_together_and_counts_failures():
    # y = 3 x exactly: every paired resample has slope exactly 3; an unpaired one would not.
    x = np.arange(8, dtype=np.float64)
    y = 3.0 * x

    def slope(xs, ys):
        if np.ptp(xs) == 0:
            raise ValueError("one distinct x")
        return np.polyfit(xs, ys, 1)[0]

    r = stats.bootstrap_ci(slope, x, y, key=jax.random.key(0), num_resamples=300)
    assert r["lo"] == pytest.approx(3.0) and r["hi"] == pytest.approx(3.0)
    # With two points, a resample draws the same point twice with probability 1/2.
    two = stats.bootstrap_ci(slope, x[:2], y[:2], key=jax.random.key(0), num_resamples=400)
    assert 150 < two["num_failed"] < 250
    assert two["lo"] == pytest.approx(3.0)
    # NaN results count as failures too; all failing gives NaN bounds.
    nan = stats.bootstrap_ci(lambda v: np.nan, x, key=jax.random.key(0), num_resamples=10)
    assert nan["num_failed"] == 10 and math.isnan(nan["lo"]) and math.isnan(nan["estimate"])
    with pytest.raises(ValueError, match="leading axis"):
        stats.bootstrap_ci(slope, x, y[:3], key=jax.random.key(0))


def test_holm_and_describe():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5]) == [0.5]
    assert stats.describe(0.704, (0.650, 0.753)) == "70.4% [65.0, 75.3]"
    assert stats.describe(0.64, (0.412, 0.803), percent=False, digits=3) == \
        "0.640 [0.412, 0.803]"
    assert stats.describe({"estimate": 0.5, "lo": math.nan, "hi": 0.9}) == "50.0% [nan, 90.0]"
    assert stats.describe(0.25) == "25.0%"
