"""Claim 3: robust accuracy under each randomness protocol; clean accuracy; the EOT gradient.

One attack part per (method, t*, attack stream, examples): the cascade of the config
(`Study.cascade`) over the examples (`diffjax.attacks.cascade.run_cascade`, resumable,
with early exit where the protocol attacks the realization), then ONE evaluation program
per batch that classifies the adversarial examples under the protocols that share the
attack and, in the same pass, measures what the other claims need from those very images:

- ``stream="realization"``: the attack of `Fixed` and `Transfer` (they attack the same
  realization); evaluated under `Fixed()` and, at the main t*, `Transfer(eval_draws=M)`;
- ``stream="fresh"``: the EOT attack of `Independent(eot=K, eval_draws=M)`.

The evaluation purifies the clean and the adversarial images under the realization
(`diffjax.attacks.evaluate`): the clean accuracy, the `Fixed` verdict, the distances to
the clean image and the classifier features for the FID (`distances.per_example`) all
come from these two purifications, so no purification is run twice. The part stores
per-example results (and the images of the first few examples, for the figure).
"""

from __future__ import annotations

import functools
import zlib

import jax
import numpy as np

from diffjax import protocols, stats
from diffjax.attacks import cascade as cascade_lib
from diffjax.attacks import evaluation
from diffjax.study import distances
from diffjax.study.context import UNDEFENDED, Study

__all__ = ["part_name", "attack_part", "put_accuracy", "put_mean", "robust", "robust_undefended",
           "clean_accuracy", "gradient_correlation", "realization_check", "FIGURE_EXAMPLES"]

FIGURE_EXAMPLES = 6
CORRELATION_SALT = 0xC0_0001
MEAN_OVER_DRAWS_SALT = 0xC0_0002


def part_name(method: str, t_star: int | None, stream: str, n: int | None = None,
              variant: str = "") -> str:
    """The one spelling of an attack part's name."""
    base = "attack_undefended" if method == UNDEFENDED else f"attack_{method}_t{t_star}_{stream}"
    return base + (f"_n{n}" if n else "") + (f"_{variant}" if variant else "")


@functools.partial(jax.jit, static_argnames=("draws", "ssim"))
def _evaluate_program(defense, x, y, key_data, x_adv, *, draws, ssim):
    """The evaluation of every attack part: under the realization and under `draws`
    evaluation draws (`protocols.eval_draw_keys`, the draws of `Transfer` and of
    `Independent` alike), with the distances and features of those purifications. One
    program whatever the protocols a part reports (`_evaluate_batch` picks them), so the
    realization and fresh attacks and every sweep point share it."""
    keys = jax.random.wrap_key_data(key_data)
    ev = evaluation.evaluate_program(
        defense, x, x_adv, y, keys,
        evals=(protocols.Fixed(), protocols.Transfer(eval_draws=draws)))
    out = {"clean_correct_fixed": ev["clean_correct_fixed"]}
    for name, fields in ev["protocols"].items():
        for k, v in fields.items():
            out[f"{name}_{k}"] = v.T if k == "adv_draws" else v
    out.update(distances.per_example(defense.logits_fn, x, x_adv, ev["purified_adv"],
                                     ev["purified_clean"], ssim))
    out["purified_adv"], out["purified_clean"] = ev["purified_adv"], ev["purified_clean"]
    return out


def _eval_draws(evals, default: int) -> int:
    """The one number of evaluation draws of `evals`' non-fixed protocols."""
    counts = {int(p.eval_draws) for p in evals if not isinstance(p, protocols.Fixed)}
    if len(counts) > 1:
        raise ValueError(f"evals: expected one number of evaluation draws for {evals}; "
                         f"got {sorted(counts)}")
    return counts.pop() if counts else int(default)


def _evaluate_batch(defense, x, y, key_data, x_adv, *, evals, ssim, draws):
    """`_evaluate_program`'s outputs under the names of the protocols `evals`."""
    got = _evaluate_program(defense, x, y, key_data, x_adv, draws=draws, ssim=ssim)
    out = {k: v for k, v in got.items()
           if not k.startswith(("fixed_", "transfer_"))}
    for p in evals:
        src = "fixed" if isinstance(p, protocols.Fixed) else "transfer"
        out.update({f"{p.name}_{k}": got[f"{src}_{k}"]
                    for k in (*evaluation.EVAL_FIELDS, "adv_draws")})
    return out


def attack_part(study: Study, method: str, t_star: int | None = None,
                stream: str = "realization", n: int | None = None, *, variant: str = "",
                cascade=None, defense=None, evals=None, eps=None) -> dict[str, np.ndarray]:
    """Per-example results of one attack over the first `n` examples (module docstring).

    Args:
      study: the `Study`.
      method: a purifier method, or `UNDEFENDED`.
      t_star: the purification timestep (default the config's).
      stream: "realization" (the attack of Fixed/Transfer) or "fresh" (Independent).
      n: the first n examples (default all).
      variant, cascade, defense, evals, eps: the audit's variants (another attack, another
        gradient path, another budget), saved under their own part name. `defense` is the
        one ATTACKED (e.g. with straight-through clip gradients); the evaluation always
        classifies with the method's own (the forward passes are the same).

    Returns:
      Arrays over the examples in id order: ``ids``, ``x_adv``-free attack results
      (``success``, ``fooled_by``, ``iterations``, ``linf``, ``l2``), the evaluation
      (``clean_correct_fixed``; per protocol ``<p>_adv_correct``, ``_adv_correct_mean``,
      ``_adv_correct_worst``, ``_clean_correct``, ``_adv_draws`` `[n, M]`), the distances
      and features of `distances.per_example`, and ``img_*`` images of the first
      `FIGURE_EXAMPLES` examples.
    """
    cfg = study.config
    t_star = int(t_star or cfg.purifier.t_star)
    n = study.num_examples if n is None else min(int(n), study.num_examples)
    name = part_name(method, t_star, stream, n if n < study.num_examples else None, variant)
    ps = study.protocols()
    if stream == "realization":
        protocol = ps["fixed"]
        main = method == UNDEFENDED or t_star == int(cfg.purifier.t_star)
        default_evals = (ps["fixed"], ps["transfer"]) if main and method != UNDEFENDED else (
            ps["fixed"],)
    else:
        protocol = ps["independent"]
        default_evals = (protocol,)
    evals = evals or default_evals

    def compute():
        d = study.defense(method, t_star)
        casc = cascade or study.cascade(method)
        rows = study.rows(n)
        x, y, kd = study.x[rows], study.y[rows], study.keys[rows]
        out = cascade_lib.run_cascade(
            defense or d, x, y, jax.random.wrap_key_data(kd), cascade=casc, protocol=protocol,
            batch_size=study.batch_size, mesh=study.mesh, store=study.workdir.store(name),
            log=lambda m: study.log(f"[{name}] {m}"), eps=eps)
        ev = study.map_batches(
            functools.partial(_evaluate_batch, d, evals=evals,
                              ssim=distances.ssim_window(x.shape),
                              draws=_eval_draws(evals, cfg.eval_draws)),
            x, y, kd, out["x_adv"])
        res = {"ids": study.ids[rows], **{k: out[k] for k in (
            "success", "fooled_by", "iterations", "linf", "l2")}}
        res.update({k: v for k, v in ev.items() if not k.startswith("purified")})
        fig = study.ids[rows] < FIGURE_EXAMPLES
        res.update({"img_clean": x[fig], "img_x_adv": out["x_adv"][fig],
                    "img_purified_adv": ev["purified_adv"][fig],
                    "img_purified_clean": ev["purified_clean"][fig]})
        res = study.gather(res)
        res["seconds_per_attack"] = out["seconds"]
        return res

    return study.workdir.arrays(name, compute)


def put_accuracy(out: dict, name: str, correct) -> dict:
    """`out[name]` = the accuracy of a correctness vector, `out[name + "_ci"]` its 95%
    Wilson interval (the results schema's sibling convention, API.md)."""
    a = stats.accuracy(np.asarray(correct, bool))
    out[name], out[f"{name}_ci"] = a["estimate"], [a["lo"], a["hi"]]
    return out


def put_mean(out: dict, name: str, per_example, key) -> dict:
    """`out[name]` = the mean of per-example fractions (e.g. the fraction of evaluation
    draws an example survives), `out[name + "_ci"]` its 95% percentile-bootstrap interval
    over the examples: not a binomial proportion, so no Wilson interval."""
    v = np.asarray(per_example, np.float64)
    boot = stats.bootstrap_ci(np.mean, v, key=key)
    out[name], out[f"{name}_ci"] = float(v.mean()), [boot["lo"], boot["hi"]]
    return out


def robust_undefended(study: Study) -> dict:
    """The undefended classifier under the config's `attack_undefended` cascade."""
    p = attack_part(study, UNDEFENDED)
    out = put_accuracy({}, "robust_accuracy", p["fixed_adv_correct"])
    put_accuracy(out, "clean_accuracy", p["clean_correct_fixed"])
    out.update({"l2_adv_input": float(np.mean(p["l2"])), "n": int(len(p["ids"])),
                "attack_seconds": p["seconds_per_attack"].tolist(),
                "fooled_by_attack": np.bincount(
                    p["fooled_by"][p["fooled_by"] >= 0],
                    minlength=len(p["seconds_per_attack"])).tolist()})
    return out


def robust(study: Study, method: str) -> dict:
    """Claim 3 for one method: fixed, transfer (M draws) and independent (EOT, M draws),
    with the paired exact tests of fixed against the other two on the same examples."""
    fixed = attack_part(study, method, stream="realization")
    fresh = attack_part(study, method, stream="fresh")
    und = attack_part(study, UNDEFENDED)
    f, t = fixed["fixed_adv_correct"], fixed["transfer_adv_correct"]
    i, u = fresh["independent_adv_correct"], und["fixed_adv_correct"]
    out = {}
    for name, v in (("fixed", f), ("transfer", t), ("independent_eot", i),
                    ("transfer_worst_over_draws", fixed["transfer_adv_correct_worst"]),
                    ("independent_worst_over_draws", fresh["independent_adv_correct_worst"])):
        put_accuracy(out, name, v)
    salt = jax.random.fold_in(jax.random.fold_in(study.root, MEAN_OVER_DRAWS_SALT),
                              zlib.crc32(method.encode()))
    for j, (name, v) in enumerate((
            ("transfer_mean_over_draws", fixed["transfer_adv_correct_mean"]),
            ("independent_mean_over_draws", fresh["independent_adv_correct_mean"]))):
        put_mean(out, name, v, jax.random.fold_in(salt, j))
    out.update({
        "fuzzy_robustness_histogram": np.histogram(fresh["independent_adv_correct_mean"],
                                                   bins=10, range=(0, 1))[0].tolist(),
        # Paired exact tests on the same examples (one-sided: the paper's direction).
        "test_fixed_vs_transfer": stats.mcnemar_exact(f, t, alternative="less"),
        "test_fixed_vs_independent": stats.mcnemar_exact(f, i, alternative="less"),
        "test_gain_fixed_vs_undefended": stats.mcnemar_exact(f, u, alternative="greater"),
        "attack_iterations_fixed": int(fixed["iterations"].sum()),
        "attack_iterations_independent": int(fresh["iterations"].sum()),
        "n": int(len(f)),
    })
    return out


def clean_accuracy(study: Study, methods) -> dict:
    """Clean accuracy of the classifier and of every purifier under the realization (the
    clean images' purification of the fixed attack parts' evaluation)."""
    out = put_accuracy({}, "undefended", attack_part(study, UNDEFENDED)["clean_correct_fixed"])
    for m in methods:
        put_accuracy(out, m, attack_part(study, m, stream="realization")["clean_correct_fixed"])
    return out


def _correlation_batch(defense, x, y, key_data, *, eot, salt_key, shared_oracle):
    from diffjax import attacks

    keys = jax.random.wrap_key_data(key_data)
    return {"cosine": attacks.gradient_correlation(defense, x, y, keys, eot=eot, key=salt_key,
                                                   shared_oracle=shared_oracle)}


def gradient_correlation(study: Study, method: str) -> dict:
    """Cosine between the EOT-K gradient and the gradient under the realization (the one
    the fixed attack follows), at the clean images."""
    cfg = study.config.correlation

    def compute():
        d = study.defense(method)
        rows = study.rows(int(cfg.num_examples))
        fn = functools.partial(_correlation_batch, d, eot=int(cfg.eot),
                               salt_key=jax.random.fold_in(study.root, CORRELATION_SALT),
                               shared_oracle=study.shared_oracle)
        got = study.map_batches(fn, study.x[rows], study.y[rows], study.keys[rows])
        v = study.gather(got)["cosine"]
        boot = stats.bootstrap_ci(np.mean, v, key=jax.random.fold_in(study.root,
                                                                     CORRELATION_SALT))
        return {"mean": float(v.mean()), "std": float(v.std()), "eot": int(cfg.eot),
                "n": int(len(v)), "ci": [boot["lo"], boot["hi"]]}

    return study.workdir.part(f"gradient_correlation_{method}", compute)


def realization_check(part: dict) -> bool:
    """True when the fixed verdicts are the attack's own (one realization, by construction)."""
    return bool(np.all(part["fixed_adv_correct"] == ~part["success"]))

