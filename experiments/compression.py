r"""Compression rate and Jacobian spectrum of purifiers at clean images (claim 4).

    python -m experiments.compression --config=experiments/configs/eval_digits.py \
        --workdir=workdir/eval_digits [--config.compression.t_stars=10,100,400] \
        [--config.compression.methods=ddpm,ddim] [--distributed]

The paper (arXiv 2505.22839, Sec. 5): with its randomness fixed, a purifier compresses the
input space around clean images (over 90% of the Jacobian singular values below 0.25 on
CIFAR-10), and the robustness left under fixed randomness follows the compression rate.
For every method in ``config.compression.methods`` and every t* in ``t_stars`` this script
measures, at the first ``config.compression.num_examples`` clean images of the split:

- the compression rate, the RMS singular value ``||J||_F / sqrt(d)`` of the purifier's
  Jacobian (`diffjax.metrics.compression_rate`: exact for ``d <= 1024`` input dims,
  Hutchinson's matrix-free estimate above, or as ``estimator`` says), with its standard
  error;
  ``ad_mode`` picks `vjp`s (``"reverse"``, the configs' default) or `jvp`s
  (``"forward"``) to reach the Jacobian: the same cost for a purifier (d_out = d_in);
- the Jacobian spectrum (``spectrum="exact"``: every singular value; ``"top_k"``: the `k`
  largest by Lanczos, for CIFAR-10/ImageNet sizes; ``"none"``) and the fraction of
  singular values below 0.25.

The randomness is fixed per example to the key the ``fixed`` protocol of
`experiments.eval_robustness` uses for that example (`streams.fixed_keys` of
`example_keys(key(seed), id)`), so the rates pair with those robust accuracies. Batches are
split over all devices of all processes (one `vmap` over the examples of a batch, sharded on
the data mesh); each batch is saved as ``compression/<method>_t<t*>/batch_<b>.npz`` (a rerun
resumes) and ``compression/summary.json`` lists ``{method, t_star, compression_rate, ...}``.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import numpy as np
from absl import app, logging
from jax.tree_util import Partial

from experiments import eval_robustness as er

PROBE_SALT = 0x0C0A_0001  # Hutchinson / Lanczos start vectors: fold_in(example key, salt)


def _purify_one(purify_fn, key, x):
    """`f(x)`: the purifier on one example `[H, W, C]` under its fixed key."""
    return purify_fn(x[None], key[None])[0]


@functools.partial(jax.jit, static_argnames=("estimator", "num_probes", "chunk_size",
                                             "spectrum", "top_k", "ad_mode"))
def _measure(purify_fn, x, key_data, *, estimator, num_probes, chunk_size, spectrum, top_k,
             ad_mode):
    """Rates, standard errors and singular values of a batch (vmapped over examples)."""
    from diffjax import metrics
    from diffjax.attacks import streams

    keys = jax.random.wrap_key_data(key_data)
    fixed = streams.fixed_keys(keys)

    def one(xi, example_key, fixed_key):
        f = Partial(_purify_one, purify_fn, fixed_key)
        probe = jax.random.fold_in(example_key, PROBE_SALT)
        rate, se = metrics.compression_rate(f, xi[None], estimator=estimator, key=probe,
                                            num_probes=num_probes, chunk_size=chunk_size,
                                            ad_mode=ad_mode, return_stderr=True)
        if spectrum == "exact":
            sv = metrics.jacobian_singular_values(f, xi[None], chunk_size=chunk_size,
                                                  ad_mode=ad_mode)[0]
        elif spectrum == "top_k":
            sv = metrics.jacobian_top_singular_values(f, xi[None], top_k, key=probe)[0]
        else:
            sv = jax.numpy.zeros((0,), xi.dtype)
        return rate[0], se[0], sv

    return jax.vmap(one)(x, keys, fixed)


def measure(config, workdir: pathlib.Path, mesh, method: str, t_star: int, log=print) -> dict:
    """The compression point of one method at one t* (resuming per batch).

    Returns:
      `{method, t_star, num_steps, n, compression_rate, compression_rate_std,
      compression_rate_stderr, fraction_sv_below_0.25, spectrum}`.
    """
    from diffjax import data, metrics, parallel

    c = config.compression
    n = min(int(c.num_examples), er.num_examples(config))
    test = data.load_arrays(config.dataset, config.split, data_dir=config.data_dir or None,
                            num_examples=n)
    purify_fn = er.make_purify_fn(config, method, t_star)
    kd_all = er.example_keys(config, test.ids, test.images)
    bs = int(config.batch_size)
    out_dir = workdir / "compression" / f"{method}_t{t_star}"
    d = int(np.prod(test.images.shape[1:]))
    results = []
    for b, start in enumerate(range(0, n, bs)):
        sl = slice(start, min(start + bs, n))
        file = out_dir / f"batch_{b:05d}.npz"
        if file.is_file():
            with np.load(file) as z:
                saved = {k: z[k] for k in z.files}
            if np.array_equal(saved["ids"], test.ids[sl]):
                results.append(saved)
                continue
        x, kd, nb = parallel.shard_batch(mesh, test.images[sl], kd_all[sl])
        rate, se, sv = _measure(purify_fn, x, kd, estimator=c.estimator,
                                num_probes=int(c.num_probes), chunk_size=int(c.chunk_size),
                                spectrum=c.spectrum, top_k=int(c.top_k), ad_mode=c.ad_mode)
        res = {"ids": test.ids[sl], "rate": parallel.to_host(rate)[:nb],
               "stderr": parallel.to_host(se)[:nb], "sv": parallel.to_host(sv)[:nb]}
        if parallel.is_writer():
            er.save_npz(file, **res)
        results.append(res)
        log(f"[compression/{method}/t{t_star}] batch {b + 1}/{-(-n // bs)}: rate "
            f"{res['rate'].mean():.4f}")
    cat = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
    below = None
    if c.spectrum != "none":
        total = d if c.spectrum == "top_k" else None
        frac = np.asarray(metrics.fraction_below(cat["sv"], 0.25, total=total))
        # top_k: undetermined (NaN) where the k-th value is still above 0.25.
        below = float(np.nanmean(frac)) if np.isfinite(frac).any() else None
    steps = min(int(config.purifier.num_steps) or t_star, t_star)
    return {"method": method, "t_star": int(t_star), "num_steps": steps, "n": int(n),
            "compression_rate": float(cat["rate"].mean()),
            "compression_rate_std": float(cat["rate"].std()),
            "compression_rate_stderr": float(np.sqrt(np.mean(cat["stderr"] ** 2) / n)),
            "fraction_sv_below_0.25": below, "spectrum": c.spectrum}


def t_stars(config) -> list[int]:
    """The t* values of the sweep (a tuple or a comma-separated string), checked."""
    from diffjax import _checks

    out = []
    for t in er.as_list(config.compression.t_stars):
        if not t.isdigit():
            _checks.fail("config.compression.t_stars", "comma-separated integers >= 1", repr(t))
        out.append(_checks.check_int(int(t), "config.compression.t_stars[i]", lo=1))
    return out


def validate(config) -> None:
    from diffjax import _checks, diffusion

    c = config.compression
    for m in er.as_list(c.methods):
        _checks.check_choice(m, "config.compression.methods", diffusion.METHODS)
    t_stars(config)
    _checks.check_int(c.num_examples, "config.compression.num_examples", lo=1)
    _checks.check_choice(c.estimator, "config.compression.estimator",
                         ("auto", "exact", "hutchinson"))
    _checks.check_choice(c.spectrum, "config.compression.spectrum", ("exact", "top_k", "none"))
    _checks.check_int(c.num_probes, "config.compression.num_probes", lo=2)
    _checks.check_int(c.top_k, "config.compression.top_k", lo=1)
    _checks.check_int(c.chunk_size, "config.compression.chunk_size", lo=1)
    _checks.check_choice(c.ad_mode, "config.compression.ad_mode", ("forward", "reverse"))


def main(argv):
    del argv
    from experiments import common

    logging.set_verbosity(logging.ERROR)
    with common.one_line_errors():
        from diffjax import parallel

        config = er.CONFIG.value
        er.validate(config)
        validate(config)
        workdir, mesh = er.setup(er.WORKDIR.value, er.DISTRIBUTED.value)
        er.check_models(config, er.as_list(config.compression.methods))
        common.log(f"compression on {jax.device_count()} device(s), workdir {workdir}")
        points = []
        for method in er.as_list(config.compression.methods):
            for t in t_stars(config):
                p = measure(config, workdir, mesh, method, t, log=common.log)
                common.log(f"[compression/{method}/t{t}] rate {p['compression_rate']:.4f} "
                           f"(+-{p['compression_rate_stderr']:.4f}); fraction of singular "
                           f"values below 0.25: {p['fraction_sv_below_0.25']}")
                points.append(p)
        if parallel.is_writer():
            path = workdir / "compression" / "summary.json"
            er.write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(
                json.dumps(points, indent=2, sort_keys=True)))
            common.log(f"wrote {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=er.parse_flags)
