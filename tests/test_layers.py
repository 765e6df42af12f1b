"""`layers.Conv` equals `flax.linen.Conv` in value and gradient, and keeps a fast layout."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import layers


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), 1, "SAME"), ((3, 3), 2, ((0, 1), (0, 1))), ((1, 1), 1, "VALID"),
    ((3, 3), 2, "SAME"), ((4, 4), 2, 1)])
def test_conv_matches_flax_conv(kernel, strides, padding):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 5))
    ours = layers.Conv(7, kernel, strides=strides, padding=padding)
    ref = nn.Conv(7, kernel, strides=strides, padding=padding)
    params = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-5)
    loss = lambda m: (lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))))
    gp_o, gx_o = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    gp_r, gx_r = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(gx_o, gx_r, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), gp_o, gp_r)


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


def test_forward_mode_and_second_order_work():
    conv = layers.Conv(3)
    ref = nn.Conv(3, (3, 3))
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 2))
    params = ref.init(jax.random.key(1), x)
    v = jax.random.normal(jax.random.key(2), x.shape)
    _, t_ours = jax.jvp(lambda x: conv.apply(params, x), (x,), (v,))
    _, t_ref = jax.jvp(lambda x: ref.apply(params, x), (x,), (v,))
    np.testing.assert_allclose(t_ours, t_ref, atol=1e-5)
    hvp = lambda m: jax.jvp(jax.grad(lambda x: jnp.sum(jnp.tanh(m.apply(params, x)))), (x,),
                            (v,))[1]
    np.testing.assert_allclose(hvp(conv), hvp(ref), atol=1e-4)
