"""Claim 1: purification moves images away from the clean image, while the FID improves.

The paper (Sec. 3.1): on CIFAR-10 the l2 distance to the clean image grows from ~1.1 (the
adversarial input) to 2.8-3.6 after purification and SSIM falls from ~0.965 to 0.79-0.87,
yet the purified set's FID is better. `per_example` measures, inside the attack parts'
evaluation (`robustness.attack_part`) and from the very images the `Fixed` evaluation
classified (the purifications under the realization), the distances of the adversarial
input, of its purification and of the purified clean image to the clean image, and the
classifier's penultimate features of each set for the FID. `distances` summarises a
method: means, a paired test of "purified farther than the adversarial input" (the
exact sign test on the per-example differences, with a bootstrap interval of the mean
difference), and the FIDs against a reference set (each process features its own share).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from scipy import stats as sps

from diffjax import data, metrics, parallel, stats
from diffjax.study.context import Study

__all__ = ["per_example", "ssim_window", "distances", "SETS", "METRICS"]

SETS = ("adv_input", "purified", "purified_clean")
METRICS = ("l2", "linf", "ssim", "snr")
_SALT = 0xD1_0001


def ssim_window(shape) -> tuple[int, float]:
    """SSIM's standard 11-tap, sigma 1.5 Gaussian window, shrunk for small images.

    For images smaller than 11 pixels (8x8 digits) the window is the largest odd size that
    fits, with sigma scaled in proportion (7 taps, sigma ~0.95 on 8x8).
    """
    side = min(shape[1], shape[2])
    size = min(11, side if side % 2 else side - 1)
    return size, 1.5 * size / 11


def per_example(logits_fn, x, x_adv, purified_adv, purified_clean, ssim) -> dict:
    """Distances to the clean image and FID features of the three sets, per example.

    Args:
      logits_fn: the classifier (its penultimate features are the FID's features).
      x: `[B,H,W,C]` clean images; x_adv: the adversarial inputs; purified_adv /
        purified_clean: their purifications and the clean images' (under the realization).
      ssim: `(filter_size, filter_sigma)` (`ssim_window`).

    Returns:
      ``dist_<metric>_<set>`` `[B]` for metric in `METRICS`, set in `SETS`, and
      ``feat_<set>`` `[B, F]` (plus ``feat_clean``).
    """
    size, sigma = ssim
    feats = metrics.penultimate_features(logits_fn)
    out = {}
    for name, imgs in zip(SETS, (x_adv, purified_adv, purified_clean), strict=True):
        d = metrics.distances_to_clean(imgs, x, filter_size=size, filter_sigma=sigma)
        for m in METRICS:
            out[f"dist_{m}_{name}"] = d[m]
        out[f"feat_{name}"] = feats(imgs)
    out["feat_clean"] = feats(x)
    return out


@jax.jit
def _features(logits_fn, x):
    return {"feat": metrics.penultimate_features(logits_fn)(x)}


def _reference_features(study: Study) -> np.ndarray:
    """Penultimate features of the FID reference set (train split; each process reads and
    features its own share, then all are gathered)."""
    cfg = study.config

    def compute():
        n = min(int(cfg.fid_reference_examples), study.info.split_sizes["train"])
        ids = parallel.share(n)
        ref = data.load_arrays(cfg.dataset, "train", data_dir=cfg.get("data_dir"), ids=ids,
                               synthetic=bool(cfg.get("synthetic_data")), seed=int(cfg.seed))
        got = study.map_batches(functools.partial(_features, study.classifier.logits_fn),
                                ref.images)
        return study.gather(got)

    return study.workdir.arrays("fid_reference_features", compute)["feat"]


def _fid(ref, feats) -> float:
    if len(feats) < 2:
        return float("nan")
    return float(metrics.fid_from_features(ref, feats))


def distances(study: Study, part: dict) -> dict:
    """Claim 1 for one method, from its fixed attack part (`robustness.attack_part`)."""
    out = {}
    for s in SETS:
        for m in METRICS:
            v = part[f"dist_{m}_{s}"]
            out[f"{m}_{s}"] = float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() \
                else float("inf")
    # Names of the results schema (API.md): *_adv_input, *_purified.
    diff = part["dist_l2_purified"] - part["dist_l2_adv_input"]
    farther = int(np.sum(diff > 0))
    ties = int(np.sum(diff == 0))
    test = sps.binomtest(farther, len(diff) - ties, 0.5, alternative="greater") \
        if len(diff) > ties else None
    boot = stats.bootstrap_ci(np.mean, diff, key=jax.random.fold_in(study.root, _SALT))
    out["test_purified_farther"] = {
        "farther": farther, "closer": int(np.sum(diff < 0)), "ties": ties,
        "mean_difference": float(np.mean(diff)), "ci": [boot["lo"], boot["hi"]],
        "p_value": float(test.pvalue) if test is not None else 1.0,
        "method": "exact sign test of l2(purified) - l2(adversarial input) > 0; percentile "
                  "bootstrap of the mean difference"}
    ref = _reference_features(study)
    for s in (*SETS, "clean"):
        out[f"fid_{s}"] = _fid(ref, part[f"feat_{s}"])
    out["per_example_l2"] = {"adv_input": part["dist_l2_adv_input"].tolist(),
                             "purified": part["dist_l2_purified"].tolist()}
    return out

