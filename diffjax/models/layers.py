"""Layers shared by the models: a convolution whose gradient stays fast inside loops.

Why not `flax.linen.Conv` as is: the input-gradient of a convolution is a convolution with
the kernel's input/output axes swapped. Outside loops XLA materialises the swapped kernel
once; inside a `while` loop (the `lax.scan` over purification steps, and the PGD loop
around it), the kernel is a loop-invariant operand and XLA:CPU keeps the swapped
`01oi` kernel layout, which its convolution runtime executes on a slow generic path. We
measured a 6-layer 3x3 conv net, gradient through a 4-step scan, batch 48 at 8x8x32:
1.54 s with `nn.Conv` vs 0.029 s with this layer, gradients equal to 3e-8 (the
diffusion U-Net of the embedded default: see BENCHMARKS.md).

`Conv` computes the same function with the same parameters (`kernel` HWIO, `bias`), so
checkpoints and converters are unchanged; only its derivative rule differs (a `custom_jvp`,
so forward mode, reverse mode, `vmap` and higher orders all work): the tangent in the input
goes through a convolution whose kernel was explicitly stored as HWOI behind an
`optimization_barrier`, so the transpose rule (reverse mode) swaps it back to the standard
`01io` layout that the fast path handles.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Conv", "conv2d"]

_DN = ("NHWC", "HWIO", "NHWC")
_DN_SWAPPED = ("NHWC", "HWOI", "NHWC")


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
    """`lax.conv_general_dilated` NHWC x HWIO with loop-friendly derivatives (module doc).

    Args:
      x: `[B, H, W, C_in]`.
      kernel: `[kh, kw, C_in, C_out]`.
      strides: the window strides.
      padding: explicit `((lo, hi), (lo, hi))` padding.

    Returns:
      `[B, H', W', C_out]`.
    """
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


@conv2d.defjvp
def _conv_jvp(strides, padding, primals, tangents):
    # The tangent in x goes through a convolution with the kernel stored as HWOI behind an
    # optimization barrier; reverse mode transposes that linear map into a convolution
    # with the standard 01io kernel layout (the fast path), and forward mode (jvp, the
    # Jacobian's basis products) works as for any convolution.
    x, kernel = primals
    dx, dk = tangents
    out = conv2d(x, kernel, strides, padding)
    swapped = lax.optimization_barrier(jnp.swapaxes(kernel, 2, 3))
    d_out = lax.conv_general_dilated(dx, swapped, strides, padding,
                                     dimension_numbers=_DN_SWAPPED)
    d_out = d_out + lax.conv_general_dilated(x, dk, strides, padding, dimension_numbers=_DN)
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
        return y
