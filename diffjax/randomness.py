"""Per-example keys: randomness that belongs to an example, not to a batch.

The paper fixes the purifier's randomness per example with a hash so that the attack and
the evaluation see the same randomness (arXiv 2505.22839, sec. 4). Two ways to name an
example:

- `example_keys(key, ids)`: `fold_in(key, id)` with the example's index in its split;
  independent of batch size, batch order and device count.
- `content_keys(key, images)`: from a hash of the *clean* image's float32 bits, for data
  without stable ids. Call it on the clean images, never on perturbed inputs (a key that
  changed with the perturbation would silently turn a fixed-randomness evaluation into an
  independent one).

The content hash is computed in JAX with 32-bit integer arithmetic only (a MurmurHash3-style
mix of each pixel's float32 bit pattern with its position, combined with wrapping sums), so
it is `jit`-able, exact on every platform, and independent of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax import _checks

__all__ = ["example_keys", "content_keys", "content_hash"]


def example_keys(key, example_ids):
    """Per-example keys `fold_in(key, id)`.

    Args:
      key: a typed PRNG key (`jax.random.key(seed)`).
      example_ids: int `[B]` example identities (e.g. index within the split).

    Returns:
      `[B]` typed keys.
    """
    example_ids = jnp.asarray(example_ids)
    if example_ids.ndim != 1 or not jnp.issubdtype(example_ids.dtype, jnp.integer):
        _checks.fail("example_ids", "an integer array of shape [B]",
                     f"shape {example_ids.shape} dtype {example_ids.dtype}")
    key = _as_typed_key(key)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids.astype(jnp.uint32))


def _as_typed_key(key):
    if not hasattr(key, "dtype"):
        _checks.fail("key", "a PRNG key (jax.random.key(seed))", type(key).__name__)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            _checks.fail("key", "a single key, shape ()", f"shape {key.shape}")
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    _checks.fail("key", "a PRNG key (jax.random.key(seed))", f"dtype {key.dtype}")


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (uint32 wrap-around arithmetic)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def content_hash(images):
    """Two uint32 hashes per image of its float32 bits, `[B, 2]`.

    Args:
      images: `[B, ...]` float images (converted to float32 first).

    Returns:
      uint32 `[B, 2]`; equal images give equal hashes on every platform.
    """
    x = jnp.asarray(images)
    if x.ndim < 1:
        _checks.fail("images", "a batch [B, ...]", f"shape {x.shape}")
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = bits.reshape(x.shape[0], -1)
    pos = jnp.arange(bits.shape[1], dtype=jnp.uint32)
    # Mix every pixel with its position, then combine with two order-free reductions
    # (sum and xor) of differently seeded mixes: position-aware, batch-independent.
    a = _fmix32(bits ^ _fmix32(pos * jnp.uint32(0x9E3779B9) + jnp.uint32(1)))
    b = _fmix32(bits * jnp.uint32(0x27D4EB2F) ^ _fmix32(pos + jnp.uint32(0x165667B1)))
    h1 = _fmix32(jnp.sum(a, axis=1, dtype=jnp.uint32) ^ jnp.uint32(bits.shape[1]))
    h2 = _fmix32(jax.lax.reduce(b, jnp.uint32(0), jax.lax.bitwise_xor, (1,))
                 + jnp.sum(b, axis=1, dtype=jnp.uint32))
    return jnp.stack([h1, h2], axis=1)


def content_keys(key, images):
    """Per-example keys from a hash of each clean image's bytes.

    Args:
      key: a typed PRNG key.
      images: `[B, H, W, C]` *clean* images (float; any range).

    Returns:
      `[B]` typed keys, `fold_in(fold_in(key, h1), h2)` with the image's two hashes.
    """
    key = _as_typed_key(key)
    h = content_hash(images)
    return jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(key, a), b))(
        h[:, 0], h[:, 1])
