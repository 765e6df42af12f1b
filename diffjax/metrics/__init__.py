"""Metrics: compression rate and Jacobian spectrum, distances and similarity, FID.

- `compression_rate`, `jacobian_singular_values`, `jacobian_top_singular_values`,
  `fraction_below` (`diffjax.metrics.compression`): how strongly a map shrinks the input
  space (paper Sec. 5).
- `l1_distance`, `l2_distance`, `linf_distance`, `ssim`, `psnr`, `snr`,
  `distances_to_clean` (`diffjax.metrics.distances`): per-example distance and similarity
  to the clean image (paper Sec. 3.1).
- `fid`, `fid_from_features`, `frechet_distance`, `feature_statistics`,
  `compute_features`, `penultimate_features`, `save_statistics`, `load_statistics`
  (`diffjax.metrics.fid`): the Frechet distance with a pluggable feature extractor.
"""

from diffjax.metrics.compression import (
    EXACT_MAX_DIM,
    compression_rate,
    fraction_below,
    jacobian_singular_values,
    jacobian_top_singular_values,
)
from diffjax.metrics.distances import (
    distances_to_clean,
    l1_distance,
    l2_distance,
    linf_distance,
    psnr,
    snr,
    ssim,
)
from diffjax.metrics.fid import (
    compute_features,
    feature_statistics,
    fid,
    fid_from_features,
    frechet_distance,
    load_statistics,
    penultimate_features,
    save_statistics,
)

__all__ = [
    "EXACT_MAX_DIM",
    "compression_rate",
    "fraction_below",
    "jacobian_singular_values",
    "jacobian_top_singular_values",
    "distances_to_clean",
    "l1_distance",
    "l2_distance",
    "linf_distance",
    "psnr",
    "snr",
    "ssim",
    "compute_features",
    "feature_statistics",
    "fid",
    "fid_from_features",
    "frechet_distance",
    "load_statistics",
    "penultimate_features",
    "save_statistics",
]
