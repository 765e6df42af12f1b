"""torchvision's ResNet-50 in Flax Linen (kind ``resnet50``): the paper's ImageNet classifier.

The architecture of ``torchvision.models.resnet50`` (He et al. 2016, "v1.5": the stride of
a downsampling bottleneck sits on its 3x3 convolution), NHWC:

    conv1 7x7/2 (64, no bias) - bn1 - ReLU - max-pool 3x3/2 (pad 1)
    layer1..layer4: [3, 4, 6, 3] Bottlenecks with 64, 128, 256, 512 planes (x4 out),
      the first of layer2..4 with stride 2; a Bottleneck is conv1 1x1 - bn1 - ReLU -
      conv2 3x3/stride - bn2 - ReLU - conv3 1x1 - bn3, plus the identity or
      ``downsample`` (conv 1x1/stride - BN) where the shape changes, then ReLU
    global average pool - fc (2048 -> 1000)

Convolutions have no bias and PyTorch's symmetric padding; BatchNorm has eps 1e-5 and
runs in inference mode from the ``batch_stats`` collection (``mean``, ``var``). Flax names
mirror torchvision's (``layer1_0/conv1`` is ``layer1.0.conv1``, ``downsample_0`` /
``downsample_1`` are ``downsample.0`` / ``downsample.1``), see
`diffjax.convert.resnet`. 25,557,032 parameters.

``logits_fn(x)`` takes NHWC images in [0, 1] (API.md) and applies torchvision's ImageNet
normalisation inside: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225). Any spatial
size works (the pooling is global); the weights were trained at 224x224.

Config keys: ``layers`` ([3, 4, 6, 3]), ``num_classes`` (1000), ``width`` (64: the stem
width and the planes of layer1; values other than 64 are not torchvision models and exist
for tiny test models), ``mean``/``std`` (per channel, on [0, 1] inputs), ``resolution``
(224: the image size used for initialisation only).

References:
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
  torchvision/models/resnet.py (``ResNet``, ``Bottleneck``).
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

__all__ = ["ResNet", "Bottleneck", "resnet50_config", "tiny_config", "build", "init",
           "make_fn", "SPECS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resnet50_config() -> dict:
    """torchvision's ``resnet50()`` (ImageNet, 1000 classes, 25,557,032 parameters)."""
    return {"layers": [3, 4, 6, 3], "num_classes": 1000, "width": 64,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resolution": 224}


def tiny_config() -> dict:
    """A tiny model of the same structure (one bottleneck per stage, width 8, 10 classes)."""
    return {**resnet50_config(), "layers": [1, 1, 1, 1], "num_classes": 10, "width": 8,
            "resolution": 32}


def _conv(features: int, kernel: int, stride: int, name: str) -> layers.Conv:
    pad = kernel // 2
    return layers.Conv(features, (kernel, kernel), strides=(stride, stride),
                       padding=((pad, pad), (pad, pad)), use_bias=False, name=name)


def _bn(name: str) -> nn.BatchNorm:
    # PyTorch BatchNorm2d: eps 1e-5, momentum 0.1 (Flax's momentum is 1 - 0.1).
    return nn.BatchNorm(momentum=0.9, epsilon=1e-5, name=name)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (expansion 4, stride on the 3x3 conv)."""

    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        ura = not train
        out = nn.relu(_bn("bn1")(_conv(self.planes, 1, 1, "conv1")(x), use_running_average=ura))
        out = nn.relu(_bn("bn2")(_conv(self.planes, 3, self.stride, "conv2")(out),
                                 use_running_average=ura))
        out = _bn("bn3")(_conv(4 * self.planes, 1, 1, "conv3")(out), use_running_average=ura)
        if self.stride != 1 or x.shape[-1] != 4 * self.planes:
            x = _conv(4 * self.planes, 1, self.stride, "downsample_0")(x)
            x = _bn("downsample_1")(x, use_running_average=ura)
        return nn.relu(out + x)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with Bottleneck blocks (ResNet-50 by default).

    Attributes:
      layers: blocks per stage.
      num_classes: classifier outputs.
      width: stem width / planes of the first stage (64 in torchvision).
      mean, std: per-channel normalisation applied to [0, 1] inputs.
    """

    layers: tuple[int, ...] = (3, 4, 6, 3)
    num_classes: int = 1000
    width: int = 64
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        """Logits `[B, num_classes]` of NHWC images `[B, H, W, 3]` in [0, 1].

        With ``train=True`` BatchNorm uses batch statistics (pass
        ``mutable=["batch_stats"]``); otherwise the stored running statistics.
        """
        h = (x.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        h = nn.relu(_bn("bn1")(_conv(self.width, 7, 2, "conv1")(h),
                               use_running_average=not train))
        h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, n in enumerate(self.layers):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                h = Bottleneck(self.width * 2 ** stage, stride,
                               name=f"layer{stage + 1}_{i}")(h, train)
        h = h.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(h)


def _resolve(config: dict) -> dict:
    if not isinstance(config, dict):
        _checks.fail("config", "a dict (see resnet50_config())", type(config).__name__)
    base = resnet50_config()
    unknown = sorted(set(config) - set(base))
    if unknown:
        _checks.fail("config", f"keys among {', '.join(base)}", f"unknown {', '.join(unknown)}")
    cfg = {**base, **config}
    layers = cfg["layers"]
    if not isinstance(layers, (list, tuple)) or not layers:
        _checks.fail("config['layers']", "a non-empty list of block counts", repr(layers))
    cfg["layers"] = [_checks.check_int(n, "config['layers'][i]", lo=1) for n in layers]
    _checks.check_int(cfg["num_classes"], "config['num_classes']", lo=1)
    _checks.check_int(cfg["width"], "config['width']", lo=1)
    _checks.check_int(cfg["resolution"], "config['resolution']", lo=1)
    for key in ("mean", "std"):
        v = cfg[key]
        if not isinstance(v, (list, tuple)) or len(v) != 3:
            _checks.fail(f"config['{key}']", "3 per-channel numbers", repr(v))
        cfg[key] = [float(a) for a in v]
    if min(cfg["std"]) <= 0:
        _checks.fail("config['std']", "positive values", cfg["std"])
    return cfg


def build(config: dict) -> ResNet:
    """Builds the `ResNet` of a config (keys of `resnet50_config`)."""
    cfg = _resolve(config)
    return ResNet(layers=tuple(cfg["layers"]), num_classes=cfg["num_classes"],
                  width=cfg["width"], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(module, key, x):
    return module.init(key, x)


def init(module: ResNet, config: dict, key) -> dict:
    """Random initial variables ``{"params", "batch_stats"}`` (Flax default initialisers)."""
    res = _resolve(config)["resolution"]
    variables = _jit_init(module, key, jnp.zeros((1, res, res, 3), jnp.float32))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def _apply(module, variables, x):
    # Not jitted here (callers jit): a jitted apply, once traced, is replayed from jit's
    # cache, and `metrics.penultimate_features` (the study's FID features) would no longer
    # see the `fc` layer through `nn.intercept_methods`.
    return module.apply(variables, x, train=False)


@dataclasses.dataclass(frozen=True)
class _LogitsApply:
    """``logits_fn`` body: hashable by module, so jit compiles once per architecture."""

    module: Any

    def __call__(self, variables, x):
        _checks.check_images(x, "x", channels=3)
        return _apply(self.module, variables, x)


def make_fn(module: ResNet, config: dict, variables: dict):
    """``logits_fn(x) -> [B, num_classes]`` (API.md): NHWC images in [0, 1], normalised inside.

    Args:
      module: the `ResNet`.
      config: its config (unused: the module holds the architecture).
      variables: ``{"params", "batch_stats"}``.

    Returns:
      A `jax.tree_util.Partial` (the variables are traced arguments under `jit`);
      BatchNorm in inference mode.
    """
    del config
    return jax.tree_util.Partial(_LogitsApply(module), variables)


SPECS = {
    "resnet50": ModelSpec(kind="resnet50", role="classifier", build=build, init=init,
                          make_fn=make_fn, default_config=resnet50_config),
}
