"""Layers shared by the models: a convolution that stays on XLA:CPU's fast kernels.

`Conv` computes the same function as `flax.linen.Conv` with the same parameters
(``kernel`` HWIO, ``bias``), so checkpoints and converters are unchanged; only how XLA is
asked to compute it differs, and only on the CPU (`jax.lax.platform_dependent`: on GPUs
and TPUs the convolution is the plain `lax.conv_general_dilated`).

Why, measured on a 2-core AVX2 CPU (jax 0.10.2; BENCHMARKS.md, "The CPU convolution"):

1. **YNNPACK.** XLA:CPU hands every float32 NHWC x HWIO 2-D convolution with more than 16
   channels to YNNPACK (``__ynn_fusion``), which ran the U-Nets' 3x3 convolutions (8x8 to
   32x32 images, 32-64 channels) at 53-76 GFLOP/s, on one core. XLA's own Eigen
   convolution runs the same convolutions on both cores at 90-139 GFLOP/s (1.4-1.8x).
   XLA's YNNPACK matcher declines a convolution whose output is larger than its input.
   So, at stride 1 and where the output keeps the input's height (``SAME``), the primal
   convolution is computed with one more row of bottom padding and that extra output row
   is sliced off (``_grown``): one row of extra work (1/H, 3% at 32x32, 12.5% at 8x8) for
   the fast kernel. Below 8 rows, and at 16 channels or fewer (YNNPACK takes those
   anyway), the convolution is left as it is.
2. **The input-gradient.** Reverse mode transposes the convolution's tangent map. The
   tangent is written as an explicit one-row pad of ``dx`` and a convolution whose output
   is one row *shorter* than its (padded) input (``_shrunk``), so its transpose, the
   input-gradient, is again a convolution that grows by one row (YNNPACK declines it; the
   pad's transpose is a slice). Forward mode computes that tangent as it is (XLA folds
   the pad back into the window): correct, on YNNPACK's kernel.
3. **The kernel layout inside loops.** The input-gradient is a convolution with the
   kernel's input/output axes swapped. Inside a `while` loop (the `lax.scan` over
   purification steps, the PGD loop around it) the kernel is loop-invariant and XLA:CPU
   kept the swapped ``01oi`` layout, which ran on a slow generic path (a 6-layer 3x3
   conv net, gradient through a 4-step scan, batch 48 at 8x8x32: 1.54 s with `nn.Conv`
   against 0.029 s). The tangent therefore takes the kernel stored as HWOI behind an
   `optimization_barrier`, so that its transpose has the standard ``01io`` layout.

The derivative rule is a `custom_jvp`, so forward mode, reverse mode, `vmap` and higher
orders all work. The tricks depend on this XLA:CPU's YNNPACK matcher: a later XLA that
also sends grown convolutions to YNNPACK would compute the same values at YNNPACK's speed
(`tests/test_layers.py` checks the compiled program, so such a change shows up).

`attention` is the U-Nets' softmax attention over positions, written for the same CPU:
three-dimensional contractions (``bqc,bkc->bqk``; the four-dimensional ``bqhd,bkhd->bhqk``
of one head made XLA transpose its operands around every product), and on the CPU a
softmax whose max and sum are single variadic reductions (XLA's own reduction emitter;
YNNPACK took the one-operand reductions at 1.5 ms for a 4 x 256 x 256 max). The
attention core (batch 4, 256 positions, 64 channels) went from 1.74 / 3.83 ms (forward /
input-gradient) to 0.87 / 2.07 ms; PyTorch's fused CPU attention takes 0.70 / 2.07. Inside
the 32x32 U-Net's input-gradient, though, XLA hands YNNPACK one fusion of the ``QK^T``
product, the scale, the max (there a one-operand reduce) and the exponential
(BENCHMARKS.md, "Where the 32x32 gradient's time goes on the EPYC").

`GroupNorm` is `flax.linen.GroupNorm`'s function (fast variance, float32 statistics) with
the same parameters, its statistics taken as per-channel sums over the positions first and
then per group, and the normalisation applied with per-channel factors: flax reshapes to
a five-dimensional ``[B, H, W, G, C/G]`` layout, whose reductions and broadcasts ran as
slow loops (GroupNorm + SiLU at 4 x 32 x 32 x 32: 0.60 ms against 0.26 ms, alone; the
32x32 U-Net's purification about 10% faster with it and device-resident weights). The
normalisation is one multiply-add per element, ``x * m_c + a_c``, with both factors per
example and channel: written as ``(x - mean) * m_c + bias``, XLA:CPU kept ``x - mean`` as a
full-size tensor for the backward pass and recomputed the group-to-channel repeat of the
mean inside each elementwise loop; the 32x32 U-Net's input-gradient (batch 8, AMD EPYC)
spent 16-18 ms in GroupNorm ops that way and 7-12 ms this way (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

__all__ = ["CONV_CHECKPOINT_NAME", "Conv", "conv2d", "attention", "softmax", "GroupNorm",
           "group_norm", "group_stats"]

# `Conv`'s output carries this name (`jax.ad_checkpoint.checkpoint_name`; the identity
# otherwise): a remat policy that saves it (the purifier's ``remat="save_conv"``) keeps the
# convolutions' outputs and recomputes only the cheap elementwise ops and attention.
CONV_CHECKPOINT_NAME = "conv"

_DN = ("NHWC", "HWIO", "NHWC")
_DN_SWAPPED = ("NHWC", "HWOI", "NHWC")
# XLA:CPU's YNNPACK matcher takes float32 convolutions with more than this many channels.
_YNN_MAX_SKIPPED_CHANNELS = 16
# Below this output height the extra row costs more than the faster kernel saves
# (measured: 4x4 at 32 channels was even).
_GROW_MIN_HEIGHT = 8


def _conv(x, kernel, strides, padding, dn=_DN):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dn)


def _grows(x, kernel, strides, padding, swapped: bool = False) -> bool:
    """Whether the one-row trick applies: CPU float32, stride 1 in H, the output as tall
    as the input (SAME), at least `_GROW_MIN_HEIGHT` rows, more than 16 channels."""
    kh = kernel.shape[0]
    c_in, c_out = (kernel.shape[3], kernel.shape[2]) if swapped else kernel.shape[2:]
    (lo, hi), _ = padding
    h = x.shape[1]
    return (x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and strides[0] == 1
            and h + lo + hi - kh + 1 == h and h >= _GROW_MIN_HEIGHT
            and max(c_in, c_out) > _YNN_MAX_SKIPPED_CHANNELS)


def _grown(x, kernel, strides, padding):
    """The convolution, computed one output row taller than its input and sliced back."""
    if not _grows(x, kernel, strides, padding):
        return _conv(x, kernel, strides, padding)
    (lo, hi), pw = padding
    return _conv(x, kernel, strides, ((lo, hi + 1), pw))[:, :x.shape[1]]


def _shrunk(dx, swapped, strides, padding):
    """The same convolution of `dx` (kernel given as HWOI), written as an explicit one-row
    pad and a convolution one row shorter than its input: its transpose grows."""
    if not _grows(dx, swapped, strides, padding, swapped=True):
        return _conv(dx, swapped, strides, padding, _DN_SWAPPED)
    (lo, hi), pw = padding
    padded = jnp.pad(dx, ((0, 0), (0, 1), (0, 0), (0, 0)))
    return _conv(padded, swapped, strides, ((lo, hi - 1), pw), _DN_SWAPPED)


def _on_cpu(cpu_fn, default_fn, *args):
    # Both branches compute the same function; XLA compiles only the current platform's.
    return lax.platform_dependent(*args, cpu=cpu_fn, default=default_fn)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
    """`lax.conv_general_dilated` NHWC x HWIO on XLA:CPU's fast kernels (module doc).

    Args:
      x: `[B, H, W, C_in]`.
      kernel: `[kh, kw, C_in, C_out]`.
      strides: the window strides.
      padding: explicit `((lo, hi), (lo, hi))` padding.

    Returns:
      `[B, H', W', C_out]`, equal to ``lax.conv_general_dilated(x, kernel, strides,
      padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))``.
    """
    return _on_cpu(functools.partial(_grown, strides=strides, padding=padding),
                   functools.partial(_conv, strides=strides, padding=padding), x, kernel)


@conv2d.defjvp
def _conv_jvp(strides, padding, primals, tangents):
    # The tangent in x: a convolution with the kernel stored as HWOI behind an optimization
    # barrier, written so that its transpose (reverse mode's input-gradient) has the
    # standard 01io kernel layout and, on the CPU, an output one row taller than its input.
    x, kernel = primals
    dx, dk = tangents
    out = conv2d(x, kernel, strides, padding)
    swapped = lax.optimization_barrier(jnp.swapaxes(kernel, 2, 3))
    d_out = _on_cpu(functools.partial(_shrunk, strides=strides, padding=padding),
                    functools.partial(_conv, strides=strides, padding=padding,
                                      dn=_DN_SWAPPED), dx, swapped)
    d_out = d_out + _conv(x, dk, strides, padding)
    return out, d_out


def _explicit_padding(padding, kernel_size, strides, in_hw):
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        if padding.upper() == "SAME":
            return tuple(lax.padtype_to_pads(in_hw, kernel_size, strides, "SAME"))
        raise ValueError(f"padding: expected 'SAME', 'VALID', an int or pairs; got {padding!r}")
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    out = []
    for p in padding:
        out.append((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])))
    return tuple(out)


class Conv(nn.Module):
    """A 2-D convolution, a drop-in for `flax.linen.Conv` (NHWC, HWIO kernel, bias).

    Attributes:
      features: output channels.
      kernel_size: `(kh, kw)`.
      strides: `(sh, sw)` or an int.
      padding: "SAME", "VALID", an int, or `((lo, hi), (lo, hi))`.
      use_bias: add a bias.
      dtype: the computation dtype (None: the input's).
      param_dtype: the parameters' dtype.
      kernel_init, bias_init: initialisers (Flax's defaults).
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence = "SAME"
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        kh, kw = tuple(self.kernel_size)
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                            self.param_dtype)
        dtype = self.dtype or x.dtype
        pads = _explicit_padding(self.padding, (kh, kw), strides, x.shape[1:3])
        y = conv2d(x.astype(dtype), kernel.astype(dtype), strides, pads)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return checkpoint_name(y, CONV_CHECKPOINT_NAME)


# ------------------------------------------------------------------------------ attention


def _sum_last(x):
    # One variadic reduction (XLA's own emitter; YNNPACK takes only one-operand ones).
    return lax.reduce((x, x), (jnp.zeros((), x.dtype),) * 2,
                      lambda a, b: (a[0] + b[0], a[1] + b[1]), (x.ndim - 1,))[0]


def _max_last(x):
    init = jnp.array(-jnp.inf, x.dtype)
    return lax.reduce((x, x), (init, init),
                      lambda a, b: (lax.max(a[0], b[0]), lax.max(a[1], b[1])), (x.ndim - 1,))[0]


@jax.custom_jvp
def _softmax_cpu(x):
    e = jnp.exp(x - lax.stop_gradient(_max_last(x))[..., None])
    return e / _sum_last(e)[..., None]


@_softmax_cpu.defjvp
def _softmax_cpu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _softmax_cpu(x)
    return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


def softmax(x):
    """`jax.nn.softmax` over the last axis; on the CPU with variadic reductions (module doc)."""
    return lax.platform_dependent(x, cpu=_softmax_cpu,
                                  default=functools.partial(jax.nn.softmax, axis=-1))


def attention(q, k, v, num_heads: int = 1):
    """Softmax attention of every position over all positions (Ho et al.'s ``AttnBlock``).

    ``softmax(q k^T / sqrt(d)) v`` per head, with the channels split into `num_heads`
    heads of ``d = C / num_heads``; the softmax is taken in float32.

    Args:
      q, k, v: `[B, N, C]` queries, keys and values.
      num_heads: heads (1: Ho et al.'s single head).

    Returns:
      `[B, N, C]` in `v`'s dtype.
    """
    b, n, c = q.shape
    d = c // num_heads
    if num_heads == 1:
        w = jnp.einsum("bqc,bkc->bqk", q, k) * (d ** -0.5)
        w = softmax(w.astype(jnp.float32)).astype(v.dtype)
        return jnp.einsum("bqk,bkc->bqc", w, v)
    qh, kh, vh = (a.reshape(b, n, num_heads, d).transpose(0, 2, 1, 3) for a in (q, k, v))
    w = jnp.einsum("bhqd,bhkd->bhqk", qh, kh) * (d ** -0.5)
    w = softmax(w.astype(jnp.float32)).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", w, vh)
    return out.transpose(0, 2, 1, 3).reshape(b, n, c)


# ------------------------------------------------------------------------------ group norm


def group_stats(x, num_groups: int, epsilon: float):
    """``(x in float32 or wider, mean_g, rsqrt(var_g + epsilon))`` of `group_norm`, the
    statistics `[B, G]` of groups of ``C / num_groups`` consecutive channels (fast variance
    ``E[x^2] - E[x]^2``, as flax's)."""
    b, c = x.shape[0], x.shape[-1]
    g = num_groups
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(1, x.ndim - 1))
    n = math.prod(x.shape[1:-1]) * (c // g)
    # Per-channel sums over the positions ([B, C]: plain reductions over the leading axes,
    # no five-dimensional group layout), then the few per-group sums.
    s1 = jnp.sum(xf, axes).reshape(b, g, c // g).sum(-1)
    s2 = jnp.sum(xf * xf, axes).reshape(b, g, c // g).sum(-1)
    mean = s1 / n
    var = jnp.maximum(0.0, s2 / n - mean * mean)
    return xf, mean, lax.rsqrt(var + epsilon)


def group_norm(x, scale, bias, num_groups: int, epsilon: float):
    """`flax.linen.GroupNorm`'s function (fast variance, float32 statistics), with the
    statistics taken per channel first (module doc).

    Args:
      x: `[B, ..., C]`, the channels last.
      scale, bias: `[C]`.
      num_groups: groups of ``C / num_groups`` consecutive channels.
      epsilon: added to the variance.

    Returns:
      ``(x - mean_g) * rsqrt(var_g + epsilon) * scale + bias`` in the dtype `flax.linen.GroupNorm`
      returns (the promotion of `x`'s and the parameters' dtypes), computed as
      ``x * m_c + a_c`` with ``m_c = rsqrt(var_g + epsilon) * scale`` and
      ``a_c = bias - mean_g * m_c`` per example and channel.
    """
    b, c = x.shape[0], x.shape[-1]
    g = num_groups
    xf, mean, inv = group_stats(x, g, epsilon)
    shape = (b,) + (1,) * (x.ndim - 2) + (c,)
    # One multiply-add per element with per-channel factors ([B, C]), not
    # ``(x - mean) * mul + bias``: XLA:CPU saved ``x - mean`` as a full-size tensor for the
    # backward pass and rebuilt the group-to-channel repeat inside every elementwise loop
    # (module doc).
    mul = jnp.repeat(inv, c // g, axis=1) * scale
    add = bias - jnp.repeat(mean, c // g, axis=1) * mul
    y = xf * mul.reshape(shape) + add.reshape(shape)
    return y.astype(jnp.result_type(x.dtype, scale.dtype, bias.dtype))


class GroupNorm(nn.Module):
    """A drop-in for `flax.linen.GroupNorm` (parameters ``scale`` and ``bias``, `[C]`) with
    its defaults (fast variance, float32 statistics, scale and bias), faster on the CPU.

    Attributes:
      num_groups: groups of consecutive channels.
      epsilon: added to the variance.
      param_dtype: the parameters' dtype.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {c} channels")
        scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon)
