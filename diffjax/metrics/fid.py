"""Frechet distance between feature distributions (FID), with a pluggable feature extractor.

The paper reports that purification improves FID (purified images look more like the data
distribution) while FID does not predict robustness (Sec. 3.1). The Frechet distance between
Gaussians fitted to two feature sets (Heusel et al. 2017) is

    ``FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``.

The matrix square root is taken stably: ``tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2}``
and the right-hand matrix is symmetric positive semi-definite, so both roots come from
symmetric eigendecompositions (`numpy.linalg.eigh`) in float64, negative round-off
eigenvalues clipped to 0; no complex parts, no `scipy.linalg.sqrtm` iterations.

Feature extractors: any ``features_fn(x) -> [B, F]`` on ``[B, H, W, C]`` images in [0, 1].

- Default, on the embedded dataset: `penultimate_features(logits_fn)`, the input of the last
  `flax.linen.Dense` layer of a Flax classifier (e.g. the shipped digits CNN), read with
  `flax.linen.intercept_methods`, so no model code has to expose it.
- The standard FID (InceptionV3 pool3 features, 2048-d) needs the Inception weights
  converted from the widely used PyTorch FID file ``pt_inception-2015-12-05-6726825d.pth``
  (pytorch-fid): `python -m experiments.convert_checkpoint --format=fid-inception
  --src=pt_inception-2015-12-05-6726825d.pth --out=DIR`, then
  `fid(pretrained.load(DIR).fn, images1, images2)` (kind `fid_inception`: [0, 1] images of
  any size, resized to 299x299 inside): the numbers are then the standard FID. Features from another
  network give a Frechet distance in that network's feature space, comparable only within
  it.

Statistics are host-side float64 numpy (as in pytorch-fid / TTUR): the `F x F` covariance
of thousands of samples loses digits in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "compute_features",
    "fid",
    "penultimate_features",
    "save_statistics",
    "load_statistics",
]


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of a feature set, float64.

    Args:
      features: ``[N, F]`` features, ``N >= 2``.

    Returns:
      ``(mu [F], sigma [F, F])``; `sigma` the unbiased sample covariance (``N - 1``), as in
      the reference FID code.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        _checks.fail("features", "an [N, F] array with N >= 2", f"shape {f.shape}")
    if not np.all(np.isfinite(f)):
        _checks.fail("features", "finite values", f"{int((~np.isfinite(f)).sum())} NaN/Inf")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})``, in float64
    with symmetric eigendecompositions (see the module docstring).

    Args:
      mu1, mu2: ``[F]`` means.
      sigma1, sigma2: ``[F, F]`` covariances (symmetric positive semi-definite).

    Returns:
      The distance, a Python float >= 0 (0 for equal statistics up to round-off).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2,
                                                                                  np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2,
                                                                                   np.float64))
    f = mu1.shape[0]
    for name, a, shape in (("mu1", mu1, (f,)), ("mu2", mu2, (f,)), ("sigma1", s1, (f, f)),
                           ("sigma2", s2, (f, f))):
        if a.shape != shape:
            _checks.fail(name, f"shape {shape}", f"shape {a.shape}")
        if not np.all(np.isfinite(a)):
            _checks.fail(name, "finite values", "NaN/Inf entries")
    root1 = _psd_sqrt(s1)
    inner = np.linalg.eigvalsh((root1 @ s2 @ root1 + (root1 @ s2 @ root1).T) / 2)
    tr_covmean = np.sum(np.sqrt(np.clip(inner, 0.0, None)))
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def fid_from_features(features1, features2) -> float:
    """The Frechet distance between two feature sets ``[N1, F]`` and ``[N2, F]``."""
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    if mu1.shape != mu2.shape:
        _checks.fail("features2", f"{mu1.shape[0]} features per example, as features1",
                     f"{mu2.shape[0]}")
    return frechet_distance(mu1, s1, mu2, s2)


@functools.partial(jax.jit, static_argnums=0)
def _apply_features(features_fn, x):
    # Cached per features_fn (by identity): repeated calls with one extractor compile once.
    return features_fn(x)


def compute_features(features_fn: Callable, images, *, batch_size: int = 256) -> np.ndarray:
    """Features of a set of images, batch by batch, as a float64 numpy array.

    The last batch is padded to `batch_size` (and the padding dropped), so `features_fn` is
    compiled once for all batches.

    Args:
      features_fn: ``features_fn(x) -> [B, F]`` on ``[B, H, W, C]`` images in [0, 1].
      images: ``[N, H, W, C]`` float images in [0, 1] (numpy or JAX).
      batch_size: images per call, >= 1.

    Returns:
      ``[N, F]`` float64 features.
    """
    _checks.check_images(images, "images")
    batch_size = _checks.check_int(batch_size, "batch_size", lo=1)
    if not callable(features_fn):
        _checks.fail("features_fn", "a callable features_fn(x) -> [B, F]",
                     type(features_fn).__name__)
    n = images.shape[0]
    batch_size = min(batch_size, n)
    out = []
    for start in range(0, n, batch_size):
        chunk = jnp.asarray(images[start:start + batch_size])
        valid = chunk.shape[0]
        if valid < batch_size:
            pad = jnp.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)
            chunk = jnp.concatenate([chunk, pad])
        feats = _apply_features(features_fn, chunk)
        if feats.ndim != 2 or feats.shape[0] != batch_size:
            _checks.fail("features_fn", f"an output of shape [{batch_size}, F]",
                         f"shape {tuple(feats.shape)}", "flatten the features per example")
        out.append(np.asarray(feats[:valid], np.float64))
    return np.concatenate(out)


def fid(features_fn: Callable, images1, images2, *, batch_size: int = 256) -> float:
    """The Frechet distance between two image sets in the feature space of `features_fn`.

    Args:
      features_fn: ``features_fn(x) -> [B, F]`` (see the module docstring: the standard FID
        needs InceptionV3 pool features; `penultimate_features` gives a classifier's).
      images1, images2: ``[N, H, W, C]`` float images in [0, 1]; N >= 2 each. FID is biased
        upwards at small N: compare numbers computed at the same N.
      batch_size: images per call of `features_fn`.

    Returns:
      The distance, a Python float.
    """
    return fid_from_features(compute_features(features_fn, images1, batch_size=batch_size),
                             compute_features(features_fn, images2, batch_size=batch_size))


def penultimate_features(logits_fn: Callable) -> Callable:
    """A `features_fn` returning the input of the last `nn.Dense` a Flax classifier calls.

    For the shipped classifiers (digits CNN, WRN-28-10) that is the penultimate layer: the
    CNN's 128-d hidden layer after its ReLU, the WRN's globally pooled 640-d features. The
    features are read with `flax.linen.intercept_methods` while `logits_fn` is traced, so
    nothing in the model has to expose them.

    Args:
      logits_fn: a classifier ``logits_fn(x) -> [B, num_classes]`` built on Flax Linen
        (e.g. `diffjax.pretrained.load(...).logits_fn`). It must not be a `jax.jit`-wrapped
        function already traced elsewhere (a cached trace would skip the interception).

    Returns:
      ``features_fn(x) -> [B, F]``, flattened per example.
    """
    if not callable(logits_fn):
        _checks.fail("logits_fn", "a callable logits_fn(x)", type(logits_fn).__name__)

    def features_fn(x):
        captured = []

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
                captured.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            logits_fn(x)
        if not captured:
            _checks.fail("logits_fn", "a Flax Linen classifier that calls an nn.Dense layer",
                         "no nn.Dense call seen",
                         "pass your own features_fn(x) -> [B, F] instead")
        h = captured[-1]
        return h.reshape(h.shape[0], -1)

    return features_fn


def save_statistics(path, mu, sigma) -> None:
    """Saves feature statistics ``(mu, sigma)`` to an ``.npz`` file (keys ``mu``, ``sigma``,
    as pytorch-fid's precomputed statistics)."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """Loads ``(mu, sigma)`` from an ``.npz`` file with keys ``mu`` and ``sigma`` (no
    pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
