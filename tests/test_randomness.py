"""Per-example and content keys: stable across batches, orders and platforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import randomness


def key_bits(keys):
    return np.asarray(jax.random.key_data(keys))


def test_example_keys_are_fold_in_of_the_id():
    key = jax.random.key(3)
    ids = jnp.array([0, 5, 7])
    got = key_bits(randomness.example_keys(key, ids))
    for row, i in zip(got, [0, 5, 7], strict=True):
        np.testing.assert_array_equal(row, jax.random.key_data(jax.random.fold_in(key, i)))
    assert len({tuple(r) for r in got}) == 3


def test_content_keys_stable_across_batch_size_and_order():
    imgs = jax.random.uniform(jax.random.key(0), (5, 8, 8, 3))
    key = jax.random.key(1)
    full = key_bits(randomness.content_keys(key, imgs))
    perm = np.array([4, 2, 0, 1, 3])
    np.testing.assert_array_equal(key_bits(randomness.content_keys(key, imgs[perm])), full[perm])
    np.testing.assert_array_equal(key_bits(randomness.content_keys(key, imgs[2:3])), full[2:3])
    jitted = jax.jit(randomness.content_keys)(key, imgs)
    np.testing.assert_array_equal(key_bits(jitted), full)
    assert len({tuple(r) for r in full}) == 5


def test_content_keys_follow_the_content():
    imgs = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1))
    key = jax.random.key(1)
    same = jnp.stack([imgs[0], imgs[0]])
    k = key_bits(randomness.content_keys(key, same))
    np.testing.assert_array_equal(k[0], k[1])
    # One pixel changed by one ulp changes the key; so does moving a pixel.
    bumped = imgs.at[0, 1, 2, 0].set(jnp.nextafter(imgs[0, 1, 2, 0], 2.0))
    assert not np.array_equal(key_bits(randomness.content_keys(key, bumped))[0],
                              key_bits(randomness.content_keys(key, imgs))[0])
    swapped = imgs.at[0, 0, 0, 0].set(imgs[0, 0, 1, 0]).at[0, 0, 1, 0].set(imgs[0, 0, 0, 0])
    assert not np.array_equal(key_bits(randomness.content_keys(key, swapped))[0],
                              key_bits(randomness.content_keys(key, imgs))[0])


def test_content_hash_golden_values():
    # Integer-only arithmetic: these values must be the same on every platform and run.
    img = (jnp.arange(2 * 3 * 3 * 1, dtype=jnp.float32) / 17.0).reshape(2, 3, 3, 1)
    h = np.asarray(randomness.content_hash(img))
    h_np = _numpy_content_hash(np.asarray(img))
    np.testing.assert_array_equal(h, h_np)


def _numpy_content_hash(x):
    """An independent NumPy transcription of the documented hash (uint32 arithmetic)."""
    u = np.uint32

    def fmix(h):
        h = h ^ (h >> u(16))
        h = (h * u(0x85EBCA6B)).astype(u)
        h = h ^ (h >> u(13))
        h = (h * u(0xC2B2AE35)).astype(u)
        return h ^ (h >> u(16))

    bits = x.astype(np.float32).view(np.uint32).reshape(x.shape[0], -1)
    pos = np.arange(bits.shape[1], dtype=u)
    with np.errstate(over="ignore"):
        a = fmix(bits ^ fmix((pos * u(0x9E3779B9) + u(1)).astype(u)))
        b = fmix((bits * u(0x27D4EB2F)).astype(u) ^ fmix((pos + u(0x165667B1)).astype(u)))
        h1 = fmix(a.sum(axis=1, dtype=u) ^ u(bits.shape[1]))
        h2 = fmix((np.bitwise_xor.reduce(b, axis=1) + b.sum(axis=1, dtype=u)).astype(u))
    return np.stack([h1, h2], axis=1)


def test_bad_keys_and_ids():
    with pytest.raises(ValueError, match="example_ids"):
        randomness.example_keys(jax.random.key(0), jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="example_ids"):
        randomness.example_keys(jax.random.key(0), jnp.zeros((2,), jnp.float32))
    with pytest.raises(ValueError, match="key"):
        randomness.content_keys(3, jnp.zeros((2, 2, 2, 1)))
    with pytest.raises(ValueError, match="single key"):
        randomness.example_keys(jax.random.split(jax.random.key(0), 2), jnp.arange(2))
