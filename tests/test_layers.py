"""`layers.Conv` equals `flax.linen.Conv` in value and every derivative, and stays on
XLA:CPU's fast kernels; `layers.attention` equals the textbook formula."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import layers

_SMALL, _GROWN = ((8, 8), 5, 7), ((10, 9), 20, 24)


# 8x8 with 5 -> 7 channels keeps the plain convolution; 10x9 with 20 -> 24 channels at
# stride 1 takes the CPU's one-row-taller path (layers module doc).
@pytest.mark.parametrize("kernel,strides,padding,hw,c_in,c_out", [
    ((3, 3), 1, "SAME", *_SMALL), ((3, 3), 2, ((0, 1), (0, 1)), *_SMALL),
    ((1, 1), 1, "VALID", *_SMALL), ((3, 3), 2, "SAME", *_SMALL), ((4, 4), 2, 1, *_SMALL),
    ((3, 3), 1, "SAME", *_GROWN), ((1, 1), 1, "VALID", *_GROWN), ((3, 3), 1, 1, *_GROWN),
    ((3, 3), (1, 2), "SAME", *_GROWN), ((3, 3), 2, ((0, 1), (0, 1)), *_GROWN)])
def test_conv_matches_flax_conv(kernel, strides, padding, hw, c_in, c_out):
    x = jax.random.normal(jax.random.key(0), (2, *hw, c_in))
    ours = layers.Conv(c_out, kernel, strides=strides, padding=padding)
    ref = nn.Conv(c_out, kernel, strides=strides, padding=padding)
    params = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-5)
    loss = lambda m: (lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))))
    gp_o, gx_o = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    gp_r, gx_r = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(gx_o, gx_r, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5), gp_o,
                 gp_r)


def test_input_gradient_inside_scan_uses_standard_kernel_layout():
    conv = layers.Conv(8)
    x = jnp.ones((2, 8, 8, 8))
    params = conv.init(jax.random.key(0), x)

    def chain(x):
        return jax.lax.scan(lambda h, _: (jnp.tanh(conv.apply(params, h)), None), x, None,
                            length=3)[0]

    hlo = jax.jit(jax.grad(lambda x: chain(x).sum())).lower(x).compile().as_text()
    labels = set(re.findall(r"dim_labels=\w+_(\w+)->", hlo))
    assert labels and all(lab.endswith("io") for lab in labels), labels


@pytest.mark.parametrize("channels", [2, 24])
def test_forward_mode_vmap_and_second_order_work(channels):
    conv = layers.Conv(channels)
    ref = nn.Conv(channels, (3, 3))
    x = jax.random.normal(jax.random.key(0), (1, 9, 8, channels))
    params = ref.init(jax.random.key(1), x)
    v = jax.random.normal(jax.random.key(2), x.shape)
    _, t_ours = jax.jvp(lambda x: conv.apply(params, x), (x,), (v,))
    _, t_ref = jax.jvp(lambda x: ref.apply(params, x), (x,), (v,))
    np.testing.assert_allclose(t_ours, t_ref, atol=1e-5)
    hvp = lambda m: jax.jvp(jax.grad(lambda x: jnp.sum(jnp.tanh(m.apply(params, x)))), (x,),
                            (v,))[1]
    np.testing.assert_allclose(hvp(conv), hvp(ref), atol=1e-4)
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.vmap(lambda x: conv.apply(params, x))(xs),
                               jax.vmap(lambda x: ref.apply(params, x))(xs), atol=1e-5)


def _ynn_convolutions(hlo: str) -> int:
    """Convolutions inside XLA:CPU's YNNPACK fusions of a compiled program."""
    called = set(re.findall(r'calls=%([\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo))
    blocks = re.split(r"\n(?=\S)", hlo)
    return sum(b.count(" convolution(") for b in blocks
               if b.split(" ", 1)[0].lstrip("%") in called)


def test_cpu_convolutions_leave_ynnpack_inside_a_scan_with_standard_layouts():
    """The 3x3 convolution (32 channels, 8x8) and its input-gradient, through a scan: on
    XLA:CPU both run one row taller than the input (``pad=1_2``), which XLA's YNNPACK
    matcher declines (its kernels ran these at 1.4-1.8x the time), with ``01io`` kernels.

    Depends on this XLA's matcher (layers module doc): if a new jaxlib fails here,
    re-measure (experiments/bench/conv_cpu.py) before changing the layer.
    """
    conv = layers.Conv(32)
    x = jnp.ones((2, 8, 8, 32))
    params = conv.init(jax.random.key(0), x)

    def chain(x):
        return jax.lax.scan(lambda h, _: (jnp.tanh(conv.apply(params, h)), None), x, None,
                            length=2)[0]

    hlo = jax.jit(jax.grad(lambda x: chain(x).sum())).lower(x).compile().as_text()
    windows = re.findall(r"convolution\([^\n]*window=\{size=3x3 pad=(\w+)x", hlo)
    assert windows and set(windows) == {"1_2"}, windows
    labels = set(re.findall(r"dim_labels=\w+_(\w+)->", hlo))
    assert labels and all(lab.endswith("io") for lab in labels), labels
    assert _ynn_convolutions(hlo) == 0


def test_gpu_lowering_is_the_plain_convolution():
    """Off the CPU (lowered for CUDA here, no GPU needed) the layer is the plain
    convolution: no extra row, no slice."""
    x, k = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
    f = jax.grad(lambda x: jnp.sum(layers.conv2d(x, k, (1, 1), ((1, 1), (1, 1))) ** 2))
    text = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "pad = [[1, 2]" not in text and "stablehlo.slice" not in text
    assert text.count("stablehlo.convolution") == 2


def _reference_attention(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads
    q, k, v = (a.reshape(b, n, heads, d) for a in (q, k, v))
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, c)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_matches_the_formula_in_every_mode(heads):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 8)) for i in range(3))
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, heads))))

    @jax.jit
    def everything(f, q, k, v):
        hvp = jax.jvp(jax.grad(lambda q: loss(f)(q, k, v)), (q,), (v,))[1]
        return (f(q, k, v, heads), jax.grad(loss(f), (0, 1, 2))(q, k, v),
                jax.jvp(lambda *a: f(*a, heads), (q, k, v), (q, k, v))[1], hvp)

    ours = everything(jax.tree_util.Partial(layers.attention), q, k, v)
    ref = everything(jax.tree_util.Partial(_reference_attention), q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), ours, ref)


def test_softmax_matches_jax_and_handles_large_logits():
    x = jnp.array([[1.0, 2.0, 3.0, 1000.0], [-5.0, 0.0, 5.0, 2.0]])
    np.testing.assert_allclose(layers.softmax(x), jax.nn.softmax(x, axis=-1), rtol=1e-6)
    v = jnp.ones_like(x)
    np.testing.assert_allclose(jax.jvp(layers.softmax, (x,), (v,))[1],
                               jax.jvp(lambda x: jax.nn.softmax(x, axis=-1), (x,), (v,))[1],
                               atol=1e-7)


@pytest.mark.parametrize("shape,groups,dtype", [
    ((2, 8, 8, 32), 8, jnp.float32), ((3, 4, 5, 12), 3, jnp.float32),
    ((2, 6, 16), 4, jnp.float32), ((2, 4, 4, 8), 2, jnp.bfloat16)])
def test_group_norm_matches_flax_group_norm(shape, groups, dtype):
    # Off-centre inputs: the fast variance E[x^2] - E[x]^2 is flax's too.
    x = (2.0 * jax.random.normal(jax.random.key(0), shape) + 0.5).astype(dtype)
    ours = layers.GroupNorm(num_groups=groups, epsilon=1e-6)
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    params = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, params)
    c = shape[-1]
    params = {"params": {"scale": 1.0 + 0.1 * jax.random.normal(jax.random.key(2), (c,)),
                         "bias": 0.1 * jax.random.normal(jax.random.key(3), (c,))}}
    y_ours, y_ref = ours.apply(params, x), ref.apply(params, x)
    assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape
    np.testing.assert_allclose(y_ours, y_ref, atol=2e-5 if dtype == jnp.float32 else 1e-2)
    if dtype != jnp.float32:
        return
    cot = jax.random.normal(jax.random.key(4), shape)
    loss = lambda m: lambda p, x: jnp.sum(jnp.tanh(m.apply(p, x)) * cot)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # Forward mode and a second derivative go through the same formula.
    t = jax.random.normal(jax.random.key(5), shape)
    _, jv_ours = jax.jvp(lambda x: ours.apply(params, x), (x,), (t,))
    _, jv_ref = jax.jvp(lambda x: ref.apply(params, x), (x,), (t,))
    np.testing.assert_allclose(jv_ours, jv_ref, atol=1e-4, rtol=1e-4)
    hv = lambda m: jax.jvp(jax.grad(lambda x: loss(m)(params, x)), (x,), (t,))[1]
    np.testing.assert_allclose(hv(ours), hv(ref), atol=1e-3, rtol=1e-3)


def test_group_norm_rejects_groups_that_do_not_divide_the_channels():
    with pytest.raises(ValueError, match="do not divide"):
        layers.GroupNorm(num_groups=3).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
