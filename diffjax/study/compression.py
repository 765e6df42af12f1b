"""Claim 4: fixed-randomness robustness follows the purifier's compression rate.

The paper (Sec. 5): with its randomness fixed, a purifier compresses the input space
around clean images (over 90% of the Jacobian singular values below 0.25 on CIFAR-10), and
across samplers and t* the robust accuracy under fixed randomness follows the compression
rate along a sigmoid. Each sweep point (method, t*) measures, under each example's
REALIZATION (the random map the fixed attack differentiates; `diffjax.protocols`):

- the compression rate (RMS Jacobian singular value) of the first
  `compression.num_examples` clean images, in one batched call
  (`metrics.compression_rate(purify_fn, x, keys=realization)`) with the configured
  estimator ("exact" below `metrics.EXACT_MAX_DIM` input dims with "auto", or Hutchinson
  with probes keyed by the example), and the spectrum ("exact": every singular value;
  "top_k": the k largest by Lanczos, for CIFAR-10/ImageNet sizes; "none");
- the fixed robust accuracy and the clean accuracy of the fixed attack part
  (`robustness.attack_part`): at the main t* the accuracy table's own part (the same
  numbers by construction), elsewhere over `compression.num_attack_examples` examples.

The fit: the four-parameter logistic of `diffjax.analysis` through the points that keep
the content (purified clean accuracy at least `min_clean_fraction` of the classifier's),
anchored at the undefended classifier (rate 1), with percentile-bootstrap intervals (over
the points) of its R^2 and of the Spearman rank correlation.
"""

from __future__ import annotations

import functools
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks, analysis, metrics, stats
from diffjax.study import robustness
from diffjax.study.context import Study, as_list

__all__ = ["compression_point", "fit", "sweep"]

PROBE_SALT = 0x0C0A_0001
_BOOT_SALT = 0x0C0A_0002
# One spectrum at a time: two executions of `_measure` at once (two sweep points computed
# by concurrent parts, `config.concurrent_parts`) hung for good on XLA:CPU inside the
# batched SVD (its LAPACK call); without the spectrum they ran side by side.
_SPECTRUM_LOCK = threading.Lock()


@functools.partial(jax.jit, static_argnames=("estimator", "spectrum", "top_k", "num_probes",
                                             "chunk_size", "ad_mode", "lanczos_iterations"),
                   compiler_options=metrics.compression.COMPILER_OPTIONS)
def _measure(purify_fn, x, key_data, *, estimator, spectrum, top_k, num_probes, chunk_size,
             ad_mode, lanczos_iterations=None):
    from diffjax import protocols

    keys = jax.random.wrap_key_data(key_data)
    real = protocols.realization(keys)
    probe = jax.vmap(lambda k: jax.random.fold_in(k, PROBE_SALT))(keys)
    rate, se = metrics.compression_rate(purify_fn, x, keys=real, estimator=estimator,
                                        key=probe, num_probes=num_probes,
                                        chunk_size=chunk_size, ad_mode=ad_mode,
                                        return_stderr=True)
    out = {"rate": rate, "stderr": se}
    if spectrum == "exact":
        out["sv"] = metrics.jacobian_singular_values(purify_fn, x, keys=real,
                                                     chunk_size=chunk_size, ad_mode=ad_mode)
    elif spectrum == "top_k":
        out["sv"] = metrics.jacobian_top_singular_values(purify_fn, x, top_k, keys=real,
                                                         num_iterations=lanczos_iterations,
                                                         key=probe)
    return out


def _jacobian_rows(defense, x, key_data, index, *, d: int):
    """Rows `index` `[B]` of the Jacobian of the purifier under the realization of each
    row's example (`x`, `key_data`: that example's, repeated), from the shared gradient
    oracle: the gradient of `<e_index, purify(x)>` (the loss weighted 0)."""
    from diffjax import protocols
    from diffjax.attacks import gradients

    keys = protocols.realization(jax.random.wrap_key_data(key_data))
    basis = jax.nn.one_hot(index, d, dtype=x.dtype).reshape(x.shape)
    y = index * 0
    _, rows, _ = gradients.oracle_call(defense, x, y, keys, y, jnp.int32(0), basis,
                                       jnp.float32(0.0), kind="full")
    return {"row": rows.reshape(rows.shape[0], -1)}


@functools.partial(jax.jit, static_argnames=("spectrum",))
def _from_jacobians(jac, *, spectrum):
    """`_measure`'s exact outputs from the Jacobians `[k, d_out, d_in]` themselves."""
    rate = jnp.sqrt(jnp.sum(jnp.square(jac), axis=(1, 2)) / jac.shape[2])
    out = {"rate": rate, "stderr": jnp.zeros_like(rate), "finite": jnp.isfinite(jac).all()}
    if spectrum == "exact":
        out["sv"] = jax.vmap(lambda m: jnp.linalg.svd(m, compute_uv=False))(jac)
    return out


def _measure_shared(study: Study, defense, rows, spectrum: str) -> dict:
    """`_measure` with the exact estimator, the Jacobians' rows taken from the shared
    gradient oracle (`config.shared_oracle`: the program every attack of the study runs
    on) in batches of the study's batch size, instead of a program of their own."""
    x, keys = study.x[rows], study.keys[rows]
    k, d = len(rows), int(np.prod(x.shape[1:]))
    rep = np.repeat(np.arange(k), d)
    index = np.tile(np.arange(d, dtype=np.int32), k)
    got = study.map_batches(functools.partial(_jacobian_rows, defense, d=d), x[rep],
                            keys[rep], index)
    out = _from_jacobians(jnp.asarray(got["row"].reshape(k, d, d)), spectrum=spectrum)
    if not bool(out.pop("finite")):
        _checks.fail("purifier", "finite outputs and derivatives at the clean images",
                     "NaN/Inf in a Jacobian", "check the diffusion checkpoint")
    return {name: np.asarray(v) for name, v in out.items()}


def compression_point(study: Study, method: str, t_star: int,
                      num_attack_examples: int | None = None,
                      num_rate_examples: int | None = None) -> dict:
    """One point of the sweep (module docstring); `num_attack_examples` (default the
    config's, and every example at the main t*) overrides the attack part's examples,
    `num_rate_examples` the Jacobians' (a part of its own name when not the config's)."""
    cfg = study.config
    c = cfg.compression
    main = t_star == int(cfg.purifier.t_star)
    k = int(c.num_examples if num_rate_examples is None else num_rate_examples)

    def compute():
        d = study.defense(method, t_star)
        rows = study.rows(k)
        exact = c.estimator == "exact" or (
            c.estimator == "auto" and int(np.prod(study.x.shape[1:])) <= metrics.EXACT_MAX_DIM)
        with _SPECTRUM_LOCK:
            if study.shared_oracle and exact and c.spectrum in ("exact", "none"):
                got = _measure_shared(study, d, rows, c.spectrum)
            else:
                got = study.map_batches(functools.partial(
                    _measure, d.purify_fn, estimator=c.estimator, spectrum=c.spectrum,
                    top_k=int(c.top_k), num_probes=int(c.num_probes),
                    chunk_size=int(c.chunk_size),
                    lanczos_iterations=int(c.get("lanczos_iterations") or 0) or None,
                    ad_mode=c.ad_mode), study.x[rows], study.keys[rows])
        got = study.gather(got)
        rates = got["rate"]
        d_in = int(np.prod(study.x.shape[1:]))
        out = {"compression_rate": float(np.mean(rates)),
               "compression_rate_std": float(np.std(rates)),
               "compression_rate_stderr": float(np.sqrt(np.mean(got["stderr"] ** 2)
                                                        / len(rates))),
               "num_rate_examples": int(len(rates)), "spectrum": c.spectrum}
        if "sv" in got:
            total = d_in if c.spectrum == "top_k" else None
            frac = np.asarray(metrics.fraction_below(got["sv"], 0.25, total=total))
            out["fraction_sv_below_0.25"] = (float(np.nanmean(frac)) if np.isfinite(frac).any()
                                             else None)
            out["top_singular_values"] = np.mean(got["sv"][:, :8], axis=0).tolist()
        return out

    jac = study.workdir.part(f"compression_{method}_t{t_star}"
                             + (f"_r{k}" if k != int(c.num_examples) else ""), compute)
    n = None if main else int(c.num_attack_examples)
    n = n if num_attack_examples is None else int(num_attack_examples)
    part = robustness.attack_part(study, method, t_star, "realization", n)
    steps = min(int(cfg.purifier.num_steps), t_star)
    return {"method": method, "t_star": int(t_star), "num_steps": steps, **jac,
            "robust_accuracy_fixed": _value(part["fixed_adv_correct"]),
            "robust_accuracy_fixed_ci": _ci(part["fixed_adv_correct"]),
            "clean_accuracy": _value(part["clean_correct_fixed"]),
            "clean_accuracy_ci": _ci(part["clean_correct_fixed"]),
            "num_attack_examples": int(len(part["ids"]))}


def _value(correct) -> float:
    return float(np.mean(np.asarray(correct, bool)))


def _ci(correct) -> list[float]:
    a = stats.accuracy(np.asarray(correct, bool))
    return [a["lo"], a["hi"]]


def fit(study: Study, points: list[dict], und_clean: float, und_robust: float) -> dict:
    """The logistic fit of fixed robust accuracy on the compression rate (module doc),
    with bootstrap intervals; marks each point's `in_fit`."""
    min_frac = float(study.config.compression.min_clean_fraction)
    used, excluded = [], []
    for p in points:
        ok = p["clean_accuracy"] >= min_frac * und_clean
        p["in_fit"] = bool(ok)
        (used if ok else excluded).append(p)
    rates = np.array([1.0] + [p["compression_rate"] for p in used])
    robust = np.array([und_robust] + [p["robust_accuracy_fixed"] for p in used])
    info = {"num_points": int(len(rates)), "anchor": "undefended classifier (rate 1)",
            "min_clean_fraction": min_frac,
            "excluded": [f"{p['method']} t*={p['t_star']}" for p in excluded]}
    key = jax.random.fold_in(study.root, _BOOT_SALT)

    def rho(x, y):
        with warnings.catch_warnings():  # constant resamples: NaN, counted as failed
            warnings.simplefilter("ignore")
            return analysis.rank_correlation(x, y)["statistic"]

    try:
        full = analysis.fit_sigmoid(rates, robust, lower=und_robust)
        result = {**full.to_dict(), **info}
        r2 = functools.partial(_refit_r2, start=full.params, lower=und_robust)
        boot = stats.bootstrap_ci(r2, rates, robust, key=key, num_resamples=1000)
        result["r2_ci"] = [boot["lo"], boot["hi"]]
        result["r2_bootstrap_failed"] = boot["num_failed"]
    except (ValueError, RuntimeError) as e:  # too few / degenerate points: say so
        result = {"params": None, "r2": None, "error": str(e), **info}
    try:
        rank = analysis.rank_correlation(rates, robust)
        boot = stats.bootstrap_ci(rho, rates, robust, key=key, num_resamples=1000)
        rank["ci"] = [boot["lo"], boot["hi"]]
    except ValueError as e:
        rank = {"statistic": None, "error": str(e)}
    return {"sigmoid_fit": result, "rank_correlation": rank}


def _refit_r2(x, y, *, start: dict, lower: float) -> float:
    """R^2 of the logistic refitted to a bootstrap resample, from the full fit's optimum
    (one local refit, bounded: `analysis.fit_sigmoid`'s three global starts with up to
    20,000 evaluations each take minutes over a thousand resamples)."""
    import scipy.optimize

    free = ("upper", "slope", "midpoint")

    def model(rate, *theta):
        return analysis.sigmoid(rate, lower=lower, **dict(zip(free, theta, strict=True)))

    with warnings.catch_warnings():  # a failed resample is counted by bootstrap_ci
        warnings.simplefilter("ignore")
        try:
            popt, _ = scipy.optimize.curve_fit(model, x, y, p0=[start[k] for k in free],
                                               maxfev=400)
        except RuntimeError:  # no convergence on this resample (NaN: counted as failed)
            return np.nan
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - model(x, *popt)) ** 2)) / ss_tot if ss_tot > 0 else np.nan


def sweep(study: Study) -> list[dict]:
    """Every point of the sweep (config.compression.methods x t_stars)."""
    c = study.config.compression
    return [compression_point(study, m, t) for m in as_list(c.methods)
            for t in as_list(c.t_stars, int)]

