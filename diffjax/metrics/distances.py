"""Distances and similarity to the clean image, per example (paper Sec. 3.1, Table 1).

The paper's first finding: purification moves images *away* from the clean image (CIFAR-10,
l2 from about 1.1 for the adversarial input to 2.8-3.6 after purification; SSIM from about
0.965 to 0.79-0.87). Every function here takes two batches of the same shape and returns one
number per example, ``[B]``; all are `jit`-compiled, `vmap`-able and differentiable.

- `l1_distance`, `l2_distance`, `linf_distance`: norms of ``x - y`` over all of an
  example's entries (images in [0, 1]: the paper's scale, l_inf 8/255 budgets).
- `ssim`: the structural similarity of Wang et al. (2004), through dm-pix (an 11x11
  Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, per channel over the valid region,
  averaged over positions and channels). This is the standard definition and matches
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=max_val, channel_axis=-1)``.
- `psnr`: ``10 log10(max_val^2 / MSE)`` in dB (as scikit-image's
  ``peak_signal_noise_ratio`` with ``data_range=max_val``); identical images give +inf.
- `snr`: ``10 log10(||reference||^2 / ||x - reference||^2)`` in dB: the clean image is
  the signal, the difference the noise; identical images give +inf.
- `distances_to_clean`: all of the above at once, as a dict.
"""

from __future__ import annotations

import functools

import dm_pix
import jax
import jax.numpy as jnp

from diffjax import _checks

__all__ = [
    "l1_distance",
    "l2_distance",
    "linf_distance",
    "ssim",
    "psnr",
    "snr",
    "distances_to_clean",
]


def _check_pair(x, y, x_name: str, y_name: str, *, rank: int | None = None):
    for a, name in ((x, x_name), (y, y_name)):
        _checks.check_images(a, name, rank=rank, value_range=None)
        if a.ndim < 2:
            _checks.fail(name, "a batch [B, ...] of rank >= 2", f"shape {tuple(a.shape)}")
    if x.shape != y.shape:
        _checks.fail(y_name, f"the shape of {x_name}, {tuple(x.shape)}",
                     f"shape {tuple(y.shape)}")


def _flat_diff(x, y):
    return (x - y).reshape(x.shape[0], -1)


@jax.jit
def _l1(x, y):
    return jnp.sum(jnp.abs(_flat_diff(x, y)), axis=1)


@jax.jit
def _l2(x, y):
    return jnp.linalg.norm(_flat_diff(x, y), axis=1)


@jax.jit
def _linf(x, y):
    return jnp.max(jnp.abs(_flat_diff(x, y)), axis=1)


def l1_distance(x, y):
    """Per-example l1 distance ``sum |x - y|`` over all entries; ``[B, ...] -> [B]``."""
    _check_pair(x, y, "x", "y")
    return _l1(x, y)


def l2_distance(x, y):
    """Per-example l2 distance ``||x - y||_2`` over all entries; ``[B, ...] -> [B]``.

    The paper's Table 1 distance (images in [0, 1]; CIFAR-10 l2 about 1.1 for an l_inf
    8/255 PGD-EOT input, 2.8-3.6 after purification).
    """
    _check_pair(x, y, "x", "y")
    return _l2(x, y)


def linf_distance(x, y):
    """Per-example l_inf distance ``max |x - y|`` over all entries; ``[B, ...] -> [B]``."""
    _check_pair(x, y, "x", "y")
    return _linf(x, y)


@functools.partial(jax.jit, static_argnames=("max_val", "filter_size", "filter_sigma", "k1",
                                             "k2"))
def _ssim(x, y, *, max_val, filter_size, filter_sigma, k1, k2):
    return dm_pix.ssim(x, y, max_val=max_val, filter_size=filter_size,
                       filter_sigma=filter_sigma, k1=k1, k2=k2)


def ssim(x, y, *, max_val: float = 1.0, filter_size: int = 11, filter_sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03):
    """Per-example structural similarity (Wang et al. 2004), via dm-pix.

    Per channel: local means, variances and covariance under a Gaussian window
    (`filter_size`, `filter_sigma`), the SSIM map over the valid region (no padding), then
    the mean over positions and channels. Matches scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, sigma=filter_sigma, use_sample_covariance=False,
    data_range=max_val, channel_axis=-1`` when ``filter_size == 2 * int(3.5 * sigma + 0.5)
    + 1`` (11 for sigma 1.5, 7 for sigma 0.8 to 0.99).

    Args:
      x, y: ``[B, H, W, C]`` float images (in [0, max_val]); symmetric in `x` and `y`.
      max_val: the dynamic range (1.0 for [0, 1] images).
      filter_size: the Gaussian window's side, odd, at most ``min(H, W)``. For 8x8 images
        (the embedded digits) use e.g. ``filter_size=7, filter_sigma=1.0``.
      filter_sigma: the window's standard deviation.
      k1, k2: the stabilising constants, ``C1 = (k1 max_val)^2``, ``C2 = (k2 max_val)^2``.

    Returns:
      ``[B]`` SSIM values in [-1, 1] (1 for identical images).
    """
    _check_pair(x, y, "x", "y", rank=4)
    filter_size = _checks.check_int(filter_size, "filter_size", lo=1)
    if filter_size > min(x.shape[1], x.shape[2]):
        _checks.fail("filter_size", f"at most the image side, {min(x.shape[1:3])}",
                     filter_size, "pass e.g. filter_size=7, filter_sigma=1.0 for 8x8 images")
    return _ssim(x, y, max_val=_checks.check_number(max_val, "max_val", lo=0.0, lo_open=True),
                 filter_size=filter_size,
                 filter_sigma=_checks.check_number(filter_sigma, "filter_sigma", lo=0.0,
                                                   lo_open=True),
                 k1=_checks.check_number(k1, "k1", lo=0.0),
                 k2=_checks.check_number(k2, "k2", lo=0.0))


@jax.jit
def _psnr(x, reference, max_val):
    mse = jnp.mean(jnp.square(_flat_diff(x, reference)), axis=1)
    return 10.0 * jnp.log10(max_val**2 / mse)


def psnr(x, reference, *, max_val: float = 1.0):
    """Per-example peak signal-to-noise ratio in dB, ``10 log10(max_val^2 / MSE)``.

    Args:
      x: ``[B, ...]`` float images.
      reference: the clean images, same shape.
      max_val: the dynamic range (1.0 for [0, 1] images).

    Returns:
      ``[B]`` PSNR in dB (+inf where ``x == reference``).
    """
    _check_pair(x, reference, "x", "reference")
    max_val = _checks.check_number(max_val, "max_val", lo=0.0, lo_open=True)
    return _psnr(x, reference, jnp.asarray(max_val, x.dtype))


@jax.jit
def _snr(x, reference):
    signal = jnp.sum(jnp.square(reference.reshape(reference.shape[0], -1)), axis=1)
    noise = jnp.sum(jnp.square(_flat_diff(x, reference)), axis=1)
    return 10.0 * (jnp.log10(signal) - jnp.log10(noise))


def snr(x, reference):
    """Per-example signal-to-noise ratio in dB, ``10 log10(||ref||^2 / ||x - ref||^2)``.

    The clean image is the signal and ``x - reference`` the noise (the paper compares the
    SNR of adversarial and purified images to the clean one).

    Args:
      x: ``[B, ...]`` float images.
      reference: the clean images, same shape.

    Returns:
      ``[B]`` SNR in dB (+inf where ``x == reference``).
    """
    _check_pair(x, reference, "x", "reference")
    return _snr(x, reference)


def distances_to_clean(x, clean, *, max_val: float = 1.0, filter_size: int = 11,
                       filter_sigma: float = 1.5) -> dict:
    """Every distance and similarity of `x` to the clean images, per example.

    Args:
      x: ``[B, H, W, C]`` images (adversarial inputs or purified images).
      clean: the clean images, same shape.
      max_val, filter_size, filter_sigma: as in `ssim` / `psnr`.

    Returns:
      A dict of ``[B]`` arrays: ``l1``, ``l2``, ``linf``, ``ssim``, ``psnr``, ``snr``.
    """
    return {
        "l1": l1_distance(x, clean),
        "l2": l2_distance(x, clean),
        "linf": linf_distance(x, clean),
        "ssim": ssim(x, clean, max_val=max_val, filter_size=filter_size,
                     filter_sigma=filter_sigma),
        "psnr": psnr(x, clean, max_val=max_val),
        "snr": snr(x, clean),
    }
