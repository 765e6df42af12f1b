"""Classifiers in Flax Linen: a small CNN (kind ``cnn``) and RobustBench's WideResNet (``wrn``).

Both take images in [0, 1] (NHWC) and normalise inside (``(x - mean) / std`` from the
config; RobustBench's "Standard" WRN-28-10 uses none), so ``logits_fn(x)`` follows API.md
whatever the model needs.

- ``cnn``: conv3x3-ReLU x2 -> max-pool 2x2 per stage (``widths``), then Dense(``dense``)-
  ReLU-(dropout)-Dense(``num_classes``). The digits preset (~99k parameters) is the
  embedded default's classifier for 8x8 grey digits.
- ``wrn``: `WideResNet`, exactly RobustBench's ``model_zoo/architectures/wide_resnet.py``
  (Zagoruyko & Komodakis 2016, as used by RobustBench's ``Standard`` CIFAR-10 entry):
  conv3x3(16); three `NetworkBlock`s of ``(depth - 4) / 6`` `BasicBlock`s with
  ``16k, 32k, 64k`` channels (``k = widen_factor``, strides 1, 2, 2); BN-ReLU, global
  average pooling, Dense. A `BasicBlock` is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with
  an identity shortcut, or, when the channel count changes, a 1x1 ``convShortcut`` applied
  to the *activated* input (RobustBench's ``equalInOut`` logic, the "activate before
  residual" of its first block of each group). Convolutions have no bias; padding is
  PyTorch's symmetric 1 (Flax's ``"SAME"`` would pad a stride-2 conv asymmetrically).
  BatchNorm has PyTorch's eps 1e-5 and momentum 0.1 (Flax momentum 0.9); in inference
  (``train=False``) it uses the ``batch_stats`` collection.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks
from diffjax.models import ModelSpec, layers

__all__ = [
    "CNN",
    "WideResNet",
    "BasicBlock",
    "digits_cnn_config",
    "wrn_28_10_config",
    "wrn_small_config",
    "build_cnn",
    "build_wrn",
    "init",
    "make_fn",
    "SPECS",
]


# ----------------------------------------------------------------------------- configs


def digits_cnn_config() -> dict:
    """The embedded default's classifier: 8x8 grey digits, 99,178 parameters."""
    return {"resolution": 8, "in_channels": 1, "num_classes": 10, "widths": [32, 64],
            "dense": 128, "dropout": 0.0, "mean": 0.5, "std": 0.5}


def wrn_28_10_config() -> dict:
    """RobustBench's ``Standard`` CIFAR-10 WRN-28-10 (36,479,194 parameters, [0, 1] input)."""
    return {"resolution": 32, "in_channels": 3, "num_classes": 10, "depth": 28,
            "widen_factor": 10, "dropout": 0.0, "mean": None, "std": None}


def wrn_small_config() -> dict:
    """A WRN-10-2 for CPU tests (the size of the converter's reference file)."""
    return dict(wrn_28_10_config(), depth=10, widen_factor=2)


_CNN_KEYS = tuple(digits_cnn_config())
_WRN_KEYS = tuple(wrn_28_10_config())


def _resolve(config: dict, defaults: dict, kind: str) -> dict:
    if not isinstance(config, dict):
        _checks.fail("config", f"a dict of {kind} settings", type(config).__name__)
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        _checks.fail("config", f"{kind} keys among {', '.join(defaults)}",
                     f"unknown keys {unknown}")
    cfg = dict(defaults)
    cfg.update(config)
    for k in ("resolution", "in_channels", "num_classes"):
        cfg[k] = _checks.check_int(cfg[k], f"config[{k!r}]", lo=1)
    cfg["dropout"] = _checks.check_number(cfg["dropout"], "config['dropout']", lo=0.0, hi=1.0)
    if (cfg["mean"] is None) != (cfg["std"] is None):
        _checks.fail("config['mean'], config['std']", "both set or both None",
                     f"mean {cfg['mean']}, std {cfg['std']}")
    return cfg


def _norm_constants(cfg: dict):
    if cfg["mean"] is None:
        return None
    c = cfg["in_channels"]
    try:
        mean = tuple(float(m) for m in np.broadcast_to(np.asarray(cfg["mean"], float), (c,)))
        std = tuple(float(s) for s in np.broadcast_to(np.asarray(cfg["std"], float), (c,)))
    except ValueError:
        _checks.fail("config['mean'], config['std']", f"a number or {c} numbers each",
                     f"mean {cfg['mean']}, std {cfg['std']}")
    if min(std) <= 0:
        _checks.fail("config['std']", "positive values", std)
    return mean, std


def _normalise(x, norm):
    if norm is None:
        return x
    mean, std = norm
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def _check_x(x, in_channels: int, name: str = "x"):
    if x.ndim != 4 or x.shape[-1] != in_channels:
        _checks.fail(name, f"NHWC images [B, H, W, {in_channels}] in [0, 1]",
                     f"shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- CNN


class CNN(nn.Module):
    """Small conv net: per width two conv3x3-ReLU and a 2x2 max-pool; then two Dense.

    Attributes:
      in_channels, num_classes: the input channels and classes.
      widths: channels of each conv stage.
      dense: the hidden Dense width.
      dropout: dropout rate before the last layer (``train=True`` only).
      norm: ``(mean, std)`` per channel, applied to [0, 1] inputs, or None.
    """

    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64)
    dense: int = 128
    dropout: float = 0.0
    norm: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        """Logits `[B, num_classes]` of images `[B, H, W, in_channels]` in [0, 1]."""
        _check_x(x, self.in_channels)
        h = _normalise(x.astype(jnp.float32), self.norm)
        for s, w in enumerate(self.widths):
            for k in range(2):
                h = nn.relu(layers.Conv(w, (3, 3), padding=1, name=f"conv_{s}_{k}")(h))
            h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(self.dense, name="dense")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(self.num_classes, name="out")(h)


def build_cnn(config: dict) -> CNN:
    """Builds the `CNN` of a config (keys of `digits_cnn_config`)."""
    cfg = _resolve(config, digits_cnn_config(), "cnn")
    widths = tuple(_checks.check_int(w, "config['widths'][i]", lo=1) for w in cfg["widths"])
    if cfg["resolution"] % (2 ** len(widths)):
        _checks.fail("config['resolution']", f"a multiple of {2 ** len(widths)} "
                     "(one 2x2 pool per width)", cfg["resolution"])
    return CNN(in_channels=cfg["in_channels"], num_classes=cfg["num_classes"], widths=widths,
               dense=_checks.check_int(cfg["dense"], "config['dense']", lo=1),
               dropout=cfg["dropout"], norm=_norm_constants(cfg))


# ----------------------------------------------------------------------------- WRN


def _bn(name: str):
    return nn.BatchNorm(momentum=0.9, epsilon=1e-5, name=name)


def _conv(features: int, kernel: int, stride: int, name: str):
    pad = kernel // 2
    return layers.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                       use_bias=False, name=name)


class BasicBlock(nn.Module):
    """RobustBench's WRN BasicBlock (pre-activation; see the module docstring)."""

    out_planes: int
    stride: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        equal_in_out = x.shape[-1] == self.out_planes
        act = nn.relu(_bn("bn1")(x, use_running_average=not train))
        if not equal_in_out:
            x = act  # the shortcut sees the activated input, as in RobustBench
        out = _conv(self.out_planes, 3, self.stride, "conv1")(act)
        out = nn.relu(_bn("bn2")(out, use_running_average=not train))
        out = nn.Dropout(self.dropout, deterministic=not train)(out)
        out = _conv(self.out_planes, 3, 1, "conv2")(out)
        shortcut = x if equal_in_out else _conv(self.out_planes, 1, self.stride,
                                                "convShortcut")(x)
        return shortcut + out


class WideResNet(nn.Module):
    """RobustBench's WideResNet (depth = 6n + 4, widen_factor k).

    Attributes:
      depth, widen_factor, num_classes, in_channels, dropout: the architecture.
      norm: ``(mean, std)`` per channel applied to [0, 1] inputs, or None (Standard).
    """

    depth: int = 28
    widen_factor: int = 10
    num_classes: int = 10
    in_channels: int = 3
    dropout: float = 0.0
    norm: Any = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        """Logits `[B, num_classes]` of images `[B, H, W, in_channels]` in [0, 1].

        With ``train=True`` BatchNorm uses batch statistics and updates ``batch_stats``
        (pass ``mutable=["batch_stats"]``); otherwise it uses the stored statistics.
        """
        _check_x(x, self.in_channels)
        n = (self.depth - 4) // 6
        k = self.widen_factor
        channels = (16, 16 * k, 32 * k, 64 * k)
        h = _normalise(x.astype(jnp.float32), self.norm)
        h = _conv(channels[0], 3, 1, "conv1")(h)
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                h = BasicBlock(channels[g + 1], stride if i == 0 else 1, self.dropout,
                               name=f"block{g + 1}_layer_{i}")(h, train)
        h = nn.relu(_bn("bn1")(h, use_running_average=not train))
        h = h.mean(axis=(1, 2))  # F.avg_pool2d(out, 8) on the 8x8 map of a 32x32 input
        return nn.Dense(self.num_classes, name="fc")(h)


def build_wrn(config: dict) -> WideResNet:
    """Builds the `WideResNet` of a config (keys of `wrn_28_10_config`)."""
    cfg = _resolve(config, wrn_28_10_config(), "wrn")
    depth = _checks.check_int(cfg["depth"], "config['depth']", lo=10)
    if (depth - 4) % 6:
        _checks.fail("config['depth']", "6n + 4 (10, 16, 22, 28, 34, 40, ...)", depth)
    return WideResNet(depth=depth,
                      widen_factor=_checks.check_int(cfg["widen_factor"],
                                                     "config['widen_factor']", lo=1),
                      num_classes=cfg["num_classes"], in_channels=cfg["in_channels"],
                      dropout=cfg["dropout"], norm=_norm_constants(cfg))


# ----------------------------------------------------------------------------- registry


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(module, key, *args):
    # One compiled program (cached per architecture: modules compare equal) instead of
    # hundreds of eagerly dispatched initialisers.
    return module.init(key, *args)


def init(module, config: dict, key) -> dict:
    """Random initial variables (``params``, plus ``batch_stats`` for the WRN)."""
    res = int(config.get("resolution", 32))
    x = jnp.zeros((1, res, res, module.in_channels), jnp.float32)
    return _jit_init(module, key, x)


@dataclasses.dataclass(frozen=True)
class _LogitsApply:
    """``apply(variables, x)``: the module in inference mode (equal per module)."""

    module: Any

    def __call__(self, variables, x):
        return self.module.apply(variables, x, train=False)


def make_fn(module, config: dict, variables: dict):
    """The classifier's ``logits_fn(x)`` (API.md's convention).

    Args:
      module: the `CNN` or `WideResNet`.
      config: its config (unused: the module holds the architecture).
      variables: ``{"params": ...}`` (plus ``"batch_stats"`` for the WRN).

    Returns:
      A `jax.tree_util.Partial` ``logits_fn(x) -> [B, num_classes]`` on NHWC images in
      [0, 1]; BatchNorm in inference mode; normalisation inside. Equal modules give equal
      treedefs, so `jit` compiles once per architecture.
    """
    del config
    return jax.tree_util.Partial(_LogitsApply(module), variables)


SPECS = {
    "cnn": ModelSpec(kind="cnn", role="classifier", build=build_cnn, init=init,
                     make_fn=make_fn, default_config=digits_cnn_config),
    "wrn": ModelSpec(kind="wrn", role="classifier", build=build_wrn, init=init,
                     make_fn=make_fn, default_config=wrn_28_10_config),
}
