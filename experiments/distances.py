r"""Distances to the clean image: adversarial inputs, their purifications, FID (claim 1).

    python -m experiments.distances --config=experiments/configs/eval_digits.py \
        --workdir=workdir/eval_digits [--config.methods=ddpm,ddim] [--distributed]

The paper's first claim (arXiv 2505.22839, Sec. 3.1): purification moves images *away* from
the clean image (CIFAR-10: l2 ~1.1 for the adversarial input, 2.8-3.6 after purification;
SSIM 0.965 -> 0.79-0.87) while FID improves. For each purifier method this script:

1. takes the adversarial inputs of `experiments.eval_robustness` under
   ``config.distances.protocol`` from the same workdir (``robustness/<method>_<protocol>/``),
   running that evaluation first where it is missing or unfinished (it resumes);
2. purifies every adversarial input and its clean image under the randomness the
   evaluation used (evaluation draw 0, saved with the adversarial images), batch by batch
   over all devices;
3. writes per batch ``distances/<method>/batch_<b>.npz`` (ids; l2, linf, SSIM, PSNR to the
   clean image of the adversarial input, of its purification and of the purified clean
   image; the classifier's penultimate features of each set), so a rerun resumes;
4. writes ``distances/summary.json``: means per method and the FIDs (classifier
   penultimate features, `diffjax.metrics.penultimate_features`; the reference set is
   ``config.distances.fid_reference_examples`` images of ``fid_reference_split``) of the
   adversarial inputs, the purified adversarial set, the purified clean set and the clean
   set itself.

Multi-host: the saved adversarial images are read by every process (the workdir must be on
a filesystem all hosts see, e.g. NFS or a bucket mount), each batch is placed on the global
mesh with `parallel.shard_batch`, and only process 0 writes.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from absl import app, logging

from experiments import eval_robustness as er

_SETS = ("adv_input", "purified", "purified_clean")
_METRICS = ("l2", "linf", "ssim", "psnr")


@jax.jit
def _purify(purify_fn, x, key_data):
    # Under jit the purifier's host-side checks are skipped (inputs checked on the host).
    return purify_fn(x, jax.random.wrap_key_data(key_data))


def read_adversarial(run_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Every saved batch of an `eval_robustness` run, sorted by example id.

    Returns:
      `{"ids" [N], "x_adv" [N,H,W,C], "eval_key0" [N, 2]}`.
    """
    files = sorted(run_dir.glob("batch_*.npz"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no saved adversarial batches (run "
                                "experiments.eval_robustness with save_adversarial=True)")
    parts = []
    for f in files:
        with np.load(f) as z:
            parts.append({k: z[k] for k in ("ids", "x_adv", "eval_key0")})
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(out["ids"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def _batch_metrics(x_adv, pur_adv, pur_clean, clean, features_fn,
                   ssim_args) -> dict[str, np.ndarray]:
    from diffjax import metrics

    out = {}
    for name, imgs in zip(_SETS, (x_adv, pur_adv, pur_clean), strict=True):
        d = metrics.distances_to_clean(jax.numpy.asarray(imgs), jax.numpy.asarray(clean),
                                       **ssim_args)
        for m in _METRICS:
            out[f"{m}_{name}"] = np.asarray(d[m], np.float64)
        out[f"features_{name}"] = metrics.compute_features(features_fn, imgs)
    out["features_clean"] = metrics.compute_features(features_fn, clean)
    return out


def measure(config, workdir: pathlib.Path, mesh, method: str, log=print) -> dict:
    """Distances and FIDs of one purifier method (resuming per batch); see the docstring.

    Returns:
      `{"n", "<metric>_<set>": mean ..., "fid_<set>": ..., "protocol"}` with metric in
      l2/linf/ssim/psnr and set in adv_input/purified/purified_clean (plus fid_clean).
    """
    from diffjax import data, metrics, parallel

    protocol = config.distances.protocol
    er.evaluate(config, workdir, mesh, method, protocol, log=log)  # loads when finished
    adv = read_adversarial(er.run_dir(workdir, method, protocol))
    test = data.load_arrays(config.dataset, config.split, data_dir=config.data_dir or None,
                            num_examples=int(adv["ids"].max()) + 1)
    clean_all = test.images[adv["ids"]]
    purify_fn = er.make_purify_fn(config, method)
    features_fn = metrics.penultimate_features(er.load_classifier(config).logits_fn)
    ssim_args = {"filter_size": int(config.distances.ssim_filter_size),
                 "filter_sigma": float(config.distances.ssim_filter_sigma)}
    bs = int(config.batch_size)
    out_dir = workdir / "distances" / method
    results = []
    n = len(adv["ids"])
    for b, start in enumerate(range(0, n, bs)):
        sl = slice(start, min(start + bs, n))
        file = out_dir / f"batch_{b:05d}.npz"
        if file.is_file():
            with np.load(file) as z:
                saved = {k: z[k] for k in z.files}
            if np.array_equal(saved["ids"], adv["ids"][sl]):
                results.append(saved)
                continue
        x_adv, clean, kd = adv["x_adv"][sl], clean_all[sl], adv["eval_key0"][sl]
        xs, cs, ks, nb = parallel.shard_batch(mesh, x_adv, clean, kd)
        pur_adv = parallel.to_host(_purify(purify_fn, xs, ks))[:nb]
        pur_clean = parallel.to_host(_purify(purify_fn, cs, ks))[:nb]
        res = {"ids": adv["ids"][sl],
               **_batch_metrics(x_adv, pur_adv, pur_clean, clean, features_fn, ssim_args)}
        if parallel.is_writer():
            er.save_npz(file, **res)
        results.append(res)
        log(f"[distances/{method}] batch {b + 1}/{-(-n // bs)}: l2 adv input "
            f"{res['l2_adv_input'].mean():.3f} -> purified {res['l2_purified'].mean():.3f}")
    cat = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
    ref = _reference_features(config, workdir, features_fn)
    summary = {"n": int(n), "protocol": protocol}
    for s in _SETS:
        for m in _METRICS:
            summary[f"{m}_{s}"] = float(np.mean(cat[f"{m}_{s}"]))
        summary[f"fid_{s}"] = float(metrics.fid_from_features(ref, cat[f"features_{s}"]))
    summary["fid_clean"] = float(metrics.fid_from_features(ref, cat["features_clean"]))
    return summary


def _reference_features(config, workdir: pathlib.Path, features_fn) -> np.ndarray:
    """Penultimate features of the FID reference set (cached in the workdir)."""
    from diffjax import data, metrics, parallel

    d = config.distances
    path = workdir / "distances" / f"fid_reference_{d.fid_reference_split}.npz"
    if path.is_file():
        with np.load(path) as z:
            if int(z["n"]) == int(d.fid_reference_examples):
                return z["features"]
    ref = data.load_arrays(config.dataset, d.fid_reference_split,
                           data_dir=config.data_dir or None,
                           num_examples=int(d.fid_reference_examples))
    feats = metrics.compute_features(features_fn, ref.images)
    if parallel.is_writer():
        er.save_npz(path, features=feats, n=np.int64(d.fid_reference_examples))
    return feats


def main(argv):
    del argv
    from experiments import common

    logging.set_verbosity(logging.ERROR)
    with common.one_line_errors():
        from diffjax import _checks, parallel

        config = er.CONFIG.value
        er.validate(config)
        _checks.check_choice(config.distances.protocol, "config.distances.protocol",
                             ("fixed", "independent", "transfer"))
        _checks.check_int(config.distances.fid_reference_examples,
                          "config.distances.fid_reference_examples", lo=2)
        config.save_adversarial = True  # the distances need the adversarial images
        workdir, mesh = er.setup(er.WORKDIR.value, er.DISTRIBUTED.value)
        er.check_models(config, er.as_list(config.methods))
        common.log(f"distances on {jax.device_count()} device(s), workdir {workdir}")
        summary = {}
        for method in er.as_list(config.methods):
            if method == er.UNDEFENDED:
                common.log("[distances] skipping 'none': no purifier to measure")
                continue
            summary[method] = measure(config, workdir, mesh, method, log=common.log)
            s = summary[method]
            common.log(f"[distances/{method}] l2 {s['l2_adv_input']:.3f} -> "
                       f"{s['l2_purified']:.3f}, SSIM {s['ssim_adv_input']:.3f} -> "
                       f"{s['ssim_purified']:.3f}, FID {s['fid_adv_input']:.2f} -> "
                       f"{s['fid_purified']:.2f}")
        if parallel.is_writer():
            path = workdir / "distances" / "summary.json"
            er.write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(
                json.dumps(summary, indent=2, sort_keys=True)))
            common.log(f"wrote {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=er.parse_flags)
