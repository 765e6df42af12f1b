"""The standard FID InceptionV3 in Flax Linen (kind ``fid_inception``, role ``"features"``).

This is the network of pytorch-fid (``pytorch_fid.inception.InceptionV3([3],
resize_input=True, normalize_input=True, use_fid_inception=True)``), itself a port of the
TensorFlow graph ``inception-2015-12-05`` used by the original FID code (TTUR, Heusel et al.
2017). Its 2048-d final-average-pool features are what every published FID number is
computed from; the paper's FID comparison (Sec. 3.1) uses them. diffjax ships no weights:
convert pytorch-fid's file (no download happens at run time):

    python -m experiments.convert_checkpoint --format=fid-inception \
        --src=pt_inception-2015-12-05-6726825d.pth --out=DIR

then, in Python::

    from diffjax import metrics, pretrained
    features_fn = pretrained.load(DIR).fn          # [B, H, W, 3] in [0, 1] -> [B, 2048]
    score = metrics.fid(features_fn, images1, images2)

``pt_inception-2015-12-05-6726825d.pth`` is published at
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/ (see
`diffjax.convert.fid_inception`).

Forward pass of ``features_fn(x)``, NHWC, ``x`` in [0, 1] of any spatial size:

1. bilinear resize to ``resolution`` x ``resolution`` (299), exactly as
   ``F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)`` (half-pixel
   centres, no antialiasing, also when shrinking), then ``2 x - 1`` into [-1, 1];
2. torchvision's ``Inception3`` trunk: ``Conv2d_1a_3x3`` (3x3/2) ... ``Conv2d_4a_3x3``,
   two 3x3/2 max-pools, ``Mixed_5b..5d`` (InceptionA), ``Mixed_6a`` (InceptionB),
   ``Mixed_6b..6e`` (InceptionC), ``Mixed_7a`` (InceptionD), ``Mixed_7b``/``Mixed_7c``
   (InceptionE), each convolution a ``BasicConv2d``: conv without bias, BatchNorm
   (eps 1e-3, inference mode from ``batch_stats``), ReLU;
3. pytorch-fid's FID patches: the pool branch of every InceptionA/C/E averages a 3x3/1
   window *without counting the zero padding* (``count_include_pad=False``, as TensorFlow
   does), and the pool branch of ``Mixed_7c`` (``FIDInceptionE_2``) is a 3x3/1 *max*-pool;
4. global average pool -> ``[B, 2048]``. The ``fc`` layer (1008 classes) is not part of
   the model.

Flax module names mirror the PyTorch names (``Mixed_6b/branch7x7_2/conv``,
``.../bn``), so the converter is a renaming. 21,785,568 parameters (conv kernels and
BatchNorm scales/offsets) plus 2 x 17,216 BatchNorm statistics. The function is
differentiable with respect to the images and `jit`/`vmap`-able.

Config keys: ``resolution`` (299: the side images are resized to inside; 299 is the
standard, anything else gives non-standard features and exists for experiments; >= 75).

References:
  Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016.
  Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", NeurIPS 2017 (FID).
  mseitzer/pytorch-fid, ``src/pytorch_fid/inception.py``; torchvision
  ``models/inception.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax import _checks
from diffjax.models import ModelSpec, layers

__all__ = ["FIDInceptionV3", "BasicConv2d", "fid_inception_config", "resize_bilinear",
           "build", "init", "make_fn", "SPECS", "FEATURE_DIM"]

FEATURE_DIM = 2048


def fid_inception_config() -> dict:
    """pytorch-fid's ``InceptionV3([3])``: inputs resized to 299x299 inside."""
    return {"resolution": 299}


def resize_bilinear(x, size: int):
    """PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)`` on NHWC images.

    Half-pixel centres and no antialiasing (also when shrinking), as pytorch-fid resizes;
    ``jax.image.resize(..., antialias=False)`` computes that (equal to PyTorch's to float32
    round-off, tested for up- and down-sampling).

    Args:
      x: ``[B, H, W, C]``.
      size: the output height and width.

    Returns:
      ``[B, size, size, C]`` in the dtype of `x`.
    """
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size, size, c), method="linear", antialias=False)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BasicConv2d(nn.Module):
    """torchvision's ``BasicConv2d``: conv (no bias) - BatchNorm (eps 1e-3) - ReLU.

    Attributes:
      features: output channels.
      kernel_size: an int or ``(kh, kw)``.
      strides: an int or ``(sh, sw)``.
      padding: an int or ``(ph, pw)``, symmetric as in PyTorch.
    """

    features: int
    kernel_size: Any = 1
    strides: Any = 1
    padding: Any = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = layers.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                        padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        # PyTorch BatchNorm2d(eps=0.001), inference mode (running statistics).
        x = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    # F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False): TensorFlow's average.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    """pytorch-fid's ``FIDInceptionA`` (torchvision's ``InceptionA``, TF average pool)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's ``InceptionB`` (``Mixed_6a``: the 35 -> 17 grid reduction)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """pytorch-fid's ``FIDInceptionC`` (torchvision's ``InceptionC``, TF average pool)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's ``InceptionD`` (``Mixed_7a``: the 17 -> 8 grid reduction)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """pytorch-fid's ``FIDInceptionE_1`` (average pool) / ``FIDInceptionE_2`` (max pool).

    Attributes:
      pool: ``"avg"`` (``Mixed_7b``: TF average without the padding) or ``"max"``
        (``Mixed_7c``: the 3x3/1 max-pool of the FID graph).
    """

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 up to the final average pool (module docstring).

    Attributes:
      resolution: the side images are resized to (299).
    """

    resolution: int = 299

    @nn.compact
    def __call__(self, x):
        """Pool features ``[B, 2048]`` of NHWC images ``[B, H, W, 3]`` in [0, 1]."""
        h = resize_bilinear(x.astype(jnp.float32), self.resolution)
        h = 2.0 * h - 1.0
        h = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(h)
        h = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(h)
        h = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(h)
        h = _max_pool_3x3_s2(h)
        h = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(h)
        h = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(h)
        h = _max_pool_3x3_s2(h)
        h = FIDInceptionA(32, name="Mixed_5b")(h)
        h = FIDInceptionA(64, name="Mixed_5c")(h)
        h = FIDInceptionA(64, name="Mixed_5d")(h)
        h = InceptionB(name="Mixed_6a")(h)
        h = FIDInceptionC(128, name="Mixed_6b")(h)
        h = FIDInceptionC(160, name="Mixed_6c")(h)
        h = FIDInceptionC(160, name="Mixed_6d")(h)
        h = FIDInceptionC(192, name="Mixed_6e")(h)
        h = InceptionD(name="Mixed_7a")(h)
        h = FIDInceptionE("avg", name="Mixed_7b")(h)
        h = FIDInceptionE("max", name="Mixed_7c")(h)
        return h.mean(axis=(1, 2))


def _resolve(config: dict) -> dict:
    if not isinstance(config, dict):
        _checks.fail("config", "a dict (see fid_inception_config())", type(config).__name__)
    base = fid_inception_config()
    unknown = sorted(set(config) - set(base))
    if unknown:
        _checks.fail("config", f"keys among {', '.join(base)}", f"unknown {', '.join(unknown)}")
    cfg = {**base, **config}
    # 75 is the smallest input whose feature map survives the stride-2 stages.
    cfg["resolution"] = _checks.check_int(cfg["resolution"], "config['resolution']", lo=75)
    return cfg


def build(config: dict) -> FIDInceptionV3:
    """Builds the `FIDInceptionV3` of a config (keys of `fid_inception_config`)."""
    return FIDInceptionV3(resolution=_resolve(config)["resolution"])


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(module, key, x):
    return module.init(key, x)


def init(module: FIDInceptionV3, config: dict, key) -> dict:
    """Random initial variables ``{"params", "batch_stats"}`` (Flax's initialisers).

    Only useful for tests: FID needs the converted standard weights.
    """
    del config  # the input is resized inside: any size initialises the same shapes
    variables = _jit_init(module, key, jnp.zeros((1, 75, 75, 3), jnp.float32))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, x):
    return module.apply(variables, x)


@dataclasses.dataclass(frozen=True)
class _FeaturesApply:
    """``features_fn`` body: hashable by module, so jit compiles once per architecture."""

    module: Any

    def __call__(self, variables, x):
        _checks.check_images(x, "x", channels=3)
        return _apply(self.module, variables, x)


def make_fn(module: FIDInceptionV3, config: dict, variables: dict):
    """``features_fn(x) -> [B, 2048]``: the FID pool features of NHWC images in [0, 1].

    Args:
      module: the `FIDInceptionV3`.
      config: its config (unused: the module holds the resolution).
      variables: ``{"params", "batch_stats"}``.

    Returns:
      A `jax.tree_util.Partial` (the variables are traced arguments under `jit`) taking
      ``x`` ``[B, H, W, 3]`` float in [0, 1], any ``H, W`` (resized to 299x299 inside), and
      returning float32 ``[B, 2048]``; pass it to `diffjax.metrics.fid`.
    """
    del config
    return jax.tree_util.Partial(_FeaturesApply(module), variables)


SPECS = {
    "fid_inception": ModelSpec(kind="fid_inception", role="features", build=build, init=init,
                               make_fn=make_fn, default_config=fid_inception_config),
}
