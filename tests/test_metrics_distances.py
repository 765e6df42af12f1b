"""Tests of diffjax.metrics.distances against scikit-image and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffjax import metrics


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    clean = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
    noisy = np.clip(clean + rng.normal(scale=0.1, size=clean.shape), 0, 1).astype(np.float32)
    return clean, noisy


def _sk_ssim(a, b, sigma=1.5):
    return structural_similarity(a.astype(np.float64), b.astype(np.float64),
                                 gaussian_weights=True, sigma=sigma,
                                 use_sample_covariance=False, data_range=1.0, channel_axis=-1)


def test_ssim_matches_scikit_image(images):
    clean, noisy = images
    got = np.asarray(metrics.ssim(jnp.asarray(noisy), jnp.asarray(clean)))
    want = [_sk_ssim(n, c) for n, c in zip(noisy, clean, strict=True)]
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Two independent random images: SSIM near 0; symmetric; identical images give 1.
    other = np.random.default_rng(1).uniform(size=clean.shape).astype(np.float32)
    got2 = np.asarray(metrics.ssim(jnp.asarray(other), jnp.asarray(clean)))
    np.testing.assert_allclose(got2, [_sk_ssim(o, c) for o, c in zip(other, clean, strict=True)],
                               atol=1e-4)
    np.testing.assert_allclose(metrics.ssim(jnp.asarray(clean), jnp.asarray(other)), got2,
                               atol=1e-6)
    np.testing.assert_allclose(metrics.ssim(jnp.asarray(clean), jnp.asarray(clean)), 1.0,
                               atol=1e-6)


def test_ssim_small_window_for_8x8_images():
    rng = np.random.default_rng(2)
    a = rng.uniform(size=(2, 8, 8, 1)).astype(np.float32)
    b = np.clip(a + rng.normal(scale=0.2, size=a.shape), 0, 1).astype(np.float32)
    got = metrics.ssim(jnp.asarray(a), jnp.asarray(b), filter_size=7, filter_sigma=0.9)
    want = [_sk_ssim(x, y, sigma=0.9) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="^filter_size: "):
        metrics.ssim(jnp.asarray(a), jnp.asarray(b))


def test_psnr_matches_scikit_image(images):
    clean, noisy = images
    got = np.asarray(metrics.psnr(jnp.asarray(noisy), jnp.asarray(clean)))
    want = [peak_signal_noise_ratio(c.astype(np.float64), n.astype(np.float64), data_range=1.0)
            for n, c in zip(noisy, clean, strict=True)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.all(np.isinf(np.asarray(metrics.psnr(jnp.asarray(clean), jnp.asarray(clean)))))


def test_norms_and_snr_closed_form(images):
    clean, noisy = images
    d = (noisy - clean).reshape(3, -1).astype(np.float64)
    x, c = jnp.asarray(noisy), jnp.asarray(clean)
    np.testing.assert_allclose(metrics.l1_distance(x, c), np.abs(d).sum(1), rtol=1e-5)
    np.testing.assert_allclose(metrics.l2_distance(x, c), np.linalg.norm(d, axis=1), rtol=1e-5)
    np.testing.assert_allclose(metrics.linf_distance(x, c), np.abs(d).max(1), rtol=1e-6)
    signal = np.sum(clean.reshape(3, -1).astype(np.float64) ** 2, axis=1)
    np.testing.assert_allclose(metrics.snr(x, c),
                               10 * np.log10(signal / np.sum(d**2, axis=1)), atol=1e-4)
    # An l_inf-ball perturbation of size eps has l_inf distance eps.
    eps = 8 / 255
    sign = jnp.sign(jax.random.normal(jax.random.key(0), c.shape))
    np.testing.assert_allclose(metrics.linf_distance(c + eps * sign, c), eps, rtol=1e-5)
    everything = metrics.distances_to_clean(x, c)
    assert set(everything) == {"l1", "l2", "linf", "ssim", "psnr", "snr"}
    assert all(v.shape == (3,) for v in everything.values())


def test_jit_vmap_grad(images):
    clean, noisy = images
    x, c = jnp.asarray(noisy), jnp.asarray(clean)
    np.testing.assert_allclose(jax.jit(metrics.ssim)(x, c), metrics.ssim(x, c), atol=1e-6)
    g = jax.grad(lambda z: jnp.sum(metrics.l2_distance(z, c)))(x)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(g).reshape(3, -1), axis=1), 1.0,
                               rtol=1e-5)  # the gradient of a norm is a unit vector
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda z: jnp.sum(metrics.ssim(z, c)))(x))))


def test_errors(images):
    clean, noisy = images
    x, c = jnp.asarray(noisy), jnp.asarray(clean)
    with pytest.raises(ValueError, match="^y: .*shape"):
        metrics.l2_distance(x, c[:2])
    with pytest.raises(ValueError, match="^x: .*rank-4"):
        metrics.ssim(x[0], c[0])
    with pytest.raises(ValueError, match="^x: .*floating"):
        metrics.l2_distance((x * 255).astype(jnp.uint8), c)
    with pytest.raises(ValueError, match="^max_val: "):
        metrics.psnr(x, c, max_val=0.0)
