"""Metrics: compression rate and Jacobian spectrum, distances and similarity, FID.

- `compression_rate`, `jacobian_singular_values`, `jacobian_top_singular_values`,
  `fraction_below` (`diffjax.metrics.compression`): how strongly a map shrinks the input
  space (paper Sec. 5).
"""

from diffjax.metrics.compression import (
    EXACT_MAX_DIM,
    compression_rate,
    fraction_below,
    jacobian_singular_values,
    jacobian_top_singular_values,
)

__all__ = [
    "EXACT_MAX_DIM",
    "compression_rate",
    "fraction_below",
    "jacobian_singular_values",
    "jacobian_top_singular_values",
]
