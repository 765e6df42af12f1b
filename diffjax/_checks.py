"""Input checks shared by every public boundary of diffjax.

Every check raises `ValueError` with one message that names the argument, what was given
and what is expected, e.g. ``x: expected values in [0, 1]; got min -0.2, max 1.0 (map
images to [0, 1] before calling, e.g. x / 255)``.

Shape and dtype checks run always (shapes are static under `jit`). Checks of *values*
(range, NaN/Inf, label range) run only on concrete arrays: under `jit`, `grad` or `vmap`
the values are tracers and the check is skipped, so every checked function stays usable
inside transformations. Value checks sync with the device once; they belong at the
boundary, never inside a loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "is_concrete",
    "check_images",
    "check_keys",
    "check_int",
    "check_number",
    "check_choice",
    "check_labels",
    "fail",
]


def fail(name: str, expected: str, got: Any, hint: str | None = None):
    """Raises the standard error: ``name: expected ...; got ... (hint)``."""
    msg = f"{name}: expected {expected}; got {got}"
    if hint:
        msg += f" ({hint})"
    raise ValueError(msg)


def is_concrete(x) -> bool:
    """True when `x`'s values can be read here: not a tracer inside jit/grad/vmap, and not
    a global array spanning several processes (multi-host: each process checks the rows it
    loaded before assembling the global batch)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return not (isinstance(x, jax.Array) and not x.is_fully_addressable)


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None:
        return f"{type(x).__name__}"
    return f"shape {tuple(shape)} dtype {dtype}"


def check_images(
    x,
    name: str = "x",
    *,
    rank: int | None = 4,
    channels: int | Iterable[int] | None = None,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    hint_range: str = "map images to [0, 1] before calling, e.g. x / 255",
):
    """Checks a batch of images: NHWC, floating point, finite, inside `value_range`.

    Args:
      x: the array to check.
      name: the argument name used in the message.
      rank: the expected rank (4 for NHWC batches); None skips the rank check.
      channels: the allowed channel count(s) of the last axis; None allows any.
      value_range: the allowed closed value range, or None for no range check.
      hint_range: what to tell the user when values fall outside the range.

    Returns:
      `x` unchanged.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        fail(name, "an array", type(x).__name__)
    if rank is not None and x.ndim != rank:
        layout = "NHWC [batch, height, width, channels]" if rank == 4 else f"rank {rank}"
        extra = " (add a batch axis with x[None])" if x.ndim == rank - 1 else ""
        fail(name, f"a rank-{rank} array, {layout}", f"{_describe(x)}{extra}")
    if channels is not None:
        allowed = (channels,) if isinstance(channels, int) else tuple(channels)
        if x.shape[-1] not in allowed:
            hint = "images must be channels-last (NHWC)"
            if x.ndim == 4 and x.shape[1] in allowed:
                hint = "this looks channels-first (NCHW): transpose with x.transpose(0, 2, 3, 1)"
            fail(name, f"{' or '.join(map(str, allowed))} channels on the last axis",
                 f"{_describe(x)}", hint)
    elif (x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3)
          and x.shape[-1] == x.shape[-2]):
        fail(name, "channels-last images (NHWC)", _describe(x),
             "this looks channels-first (NCHW): transpose with x.transpose(0, 2, 3, 1)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        fail(name, "a floating-point array (float32)", f"dtype {x.dtype}",
             "convert with x.astype(jnp.float32) / 255 for uint8 images")
    if is_concrete(x):
        xv = np.asarray(x)
        if not np.all(np.isfinite(xv)):
            n_bad = int(np.size(xv) - np.isfinite(xv).sum())
            fail(name, "finite values", f"{n_bad} NaN/Inf entries")
        if value_range is not None and xv.size:
            lo, hi = value_range
            xmin, xmax = float(xv.min()), float(xv.max())
            if xmin < lo or xmax > hi:
                fail(name, f"values in [{lo:g}, {hi:g}]", f"min {xmin:.4g}, max {xmax:.4g}",
                     hint_range)
    return x


def check_keys(keys, batch: int, name: str = "keys"):
    """Checks per-example keys and returns them as a typed key array `[batch]`.

    Accepts typed keys (`jax.random.key`) of shape `[batch]`, or legacy raw uint32 key
    data of shape `[batch, 2]`, which is wrapped.
    """
    if not hasattr(keys, "dtype"):
        fail(name, f"a key array of shape [{batch}] (one key per example)", type(keys).__name__,
             "build one with diffjax.randomness.example_keys(jax.random.key(0), ids)")
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        typed = keys
    elif keys.dtype == jnp.uint32 and keys.ndim == 2 and keys.shape[-1] == 2:
        typed = jax.random.wrap_key_data(keys)
    else:
        fail(name, "typed PRNG keys (jax.random.key), one per example", _describe(keys),
             "build them with diffjax.randomness.example_keys(jax.random.key(0), ids)")
    if typed.shape != (batch,):
        fail(name, f"one key per example, shape ({batch},)", f"shape {tuple(typed.shape)}",
             "derive per-example keys with diffjax.randomness.example_keys")
    return typed


def check_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """Checks a Python integer in the closed range [lo, hi] and returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        fail(name, "an integer", repr(value))
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        fail(name, f"an integer in [{lo_s}, {hi_s}]", value)
    return value


def check_number(
    value, name: str, *, lo: float | None = None, hi: float | None = None,
    lo_open: bool = False, hint: str | None = None,
) -> float:
    """Checks a finite real number in [lo, hi] (or (lo, hi] with `lo_open`)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        fail(name, "a number", repr(value))
    if not np.isfinite(v):
        fail(name, "a finite number", v, hint)
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and v > hi
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        fail(name, f"a number in {left}{lo_s}, {hi_s}]", v, hint)
    return v


def check_choice(value, name: str, choices: Iterable[str]):
    """Checks that `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        fail(name, f"one of {', '.join(map(repr, choices))}", repr(value))
    return value


def check_labels(labels, batch: int, num_classes: int | None = None, name: str = "labels"):
    """Checks integer labels of shape `[batch]` in `[0, num_classes)`."""
    if not hasattr(labels, "shape"):
        fail(name, f"an int32 array of shape ({batch},)", type(labels).__name__)
    if labels.shape != (batch,):
        fail(name, f"shape ({batch},), one label per example", f"shape {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        fail(name, "integer class indices (int32)", f"dtype {labels.dtype}")
    if num_classes is not None and is_concrete(labels) and labels.size:
        lv = np.asarray(labels)
        if lv.min() < 0 or lv.max() >= num_classes:
            fail(name, f"class indices in [0, {num_classes - 1}]",
                 f"min {int(lv.min())}, max {int(lv.max())}")
    return labels
