"""Claim 2: the purified image follows the purifier's randomness more than its input.

The paper (Sec. 3.2): 100 points of the eps-ball around a clean image, purified with ONE
seed, give purified-minus-clean differences that correlate ~0.995 pairwise; the clean
image purified with 100 seeds gives ~0.24. Here "one seed" is the example's realization
(the randomness every fixed-randomness number of that example uses) and "many seeds" are
its evaluation draws 0..P-1 (`diffjax.protocols.eval_draw_keys`); the eps-ball points are
uniform in the l_inf ball of the attack's budget, keyed by the example. Per image, the mean
pairwise Pearson correlation of each set; the verdict compares them image by image (an
exact sign test over the images).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from scipy import stats as sps

from diffjax import protocols
from diffjax.study.context import Study

__all__ = ["randomness_correlation", "mean_pairwise_corr"]

_POINTS = 0x5A_0001


def mean_pairwise_corr(diffs: np.ndarray) -> float:
    """Mean Pearson correlation over all pairs of rows of `diffs` (flattened)."""
    v = diffs.reshape(diffs.shape[0], -1).astype(np.float64)
    c = np.corrcoef(v)
    iu = np.triu_indices(len(v), 1)
    return float(np.nanmean(c[iu]))


@jax.jit
def _purify(purify_fn, x, key_data):
    return {"out": purify_fn(x, jax.random.wrap_key_data(key_data))}


def randomness_correlation(study: Study, method: str) -> dict:
    """Claim 2 for one method on the first `config.randomness.num_images` examples."""
    cfg = study.config.randomness
    p, k_img = int(cfg.num_points), int(cfg.num_images)
    eps = float(study.config.attack.eps)

    def compute():
        pur = study.defense(method).purify_fn
        rows = study.rows(k_img)
        keys = jax.random.wrap_key_data(study.keys[rows])
        real = np.asarray(jax.random.key_data(protocols.realization(keys)))
        seeds = np.asarray(jax.random.key_data(protocols.eval_draw_keys(keys, p)))  # [p, b]
        pts, same, many, clean = [], [], [], []
        for j, r in enumerate(rows):
            k = jax.random.fold_in(jax.random.wrap_key_data(study.keys[r]), _POINTS)
            delta = jax.random.uniform(k, (p, *study.x.shape[1:]), minval=-eps, maxval=eps)
            pts.append(np.clip(study.x[r][None] + np.asarray(delta), 0.0, 1.0))
            same.append(np.repeat(real[j][None], p, 0))
            many.append(seeds[:, j])
            clean.append(np.repeat(study.x[r][None], p, 0))
        if rows.size:
            x_all = np.concatenate(pts + clean)
            k_all = np.concatenate(same + many)
        else:
            x_all = np.zeros((0, *study.x.shape[1:]), np.float32)
            k_all = np.zeros((0, 2), np.uint32)
        out = study.map_batches(functools.partial(_purify, pur), x_all, k_all).get(
            "out", x_all)
        one_seed, many_seeds = [], []
        half = len(rows) * p
        for j, r in enumerate(rows):
            a = out[j * p:(j + 1) * p] - study.x[r][None]
            b = out[half + j * p:half + (j + 1) * p] - study.x[r][None]
            one_seed.append(mean_pairwise_corr(a))
            many_seeds.append(mean_pairwise_corr(b))
        got = study.gather({"one": np.asarray(one_seed, np.float64),
                            "many": np.asarray(many_seeds, np.float64)})
        wins = int(np.sum(got["one"] > got["many"]))
        test = sps.binomtest(wins, len(got["one"]), 0.5, alternative="greater")
        return {"one_seed_eps_ball": float(np.mean(got["one"])),
                "many_seeds_clean": float(np.mean(got["many"])),
                "per_image": {"one_seed": got["one"].tolist(), "many_seeds": got["many"].tolist()},
                "test_one_seed_higher": {"images_higher": wins, "images": int(len(got["one"])),
                                         "p_value": float(test.pvalue),
                                         "method": "exact sign test over images"},
                "num_images": int(len(got["one"])), "num_points": p}

    return study.workdir.part(f"randomness_correlation_{method}", compute)

