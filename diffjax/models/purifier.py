"""A deterministic purifier designed for compression (the paper's open question 1).

The paper finds that what is left of diffusion purification's robustness under fixed
randomness follows the compression rate of the input space around the anchor (Sec. 5), and
asks whether a purifier can be built to maximise compression while keeping the anchor
accurate (Sec. 6). `PurifierNet` is that purifier for small images: a convolutional
encoder, a dense bottleneck and a convolutional decoder,

    x [H, W, C] in [0, 1] -> conv 3x3 (w0) -> conv 3x3 stride 2 (w1) -> dense (latent)
      -> dense (H/2 x W/2 x w1) -> conv 3x3 (w0) -> upsample x2 -> conv 3x3 (C) -> o,
    x' = clip(o, 0, 1),

with smooth (GELU) activations, trained by `diffjax.train_purifier` against a frozen
classifier. It is deterministic: `purify_fn(x, keys)` takes per-example keys only to fit
the `Defense` convention (`diffjax.defense.Defense`) and ignores them ("keyed nowhere"), so
there is no randomness to hide behind under any protocol.

Why these choices:

- the bottleneck bounds the Jacobian's rank by `latent` (a map through a `latent`-dim code
  cannot move the output along more directions), and the Jacobian penalty of the training
  objective does the rest;
- GELU, not ReLU or a saturating output: the map stays smooth, its gradient is informative
  everywhere (the later audit runs gradient-free attacks and BPDA against it);
- the only non-smooth part is the final clip to [0, 1] (as in the diffusion purifiers).
  The training penalises the Jacobian of the *pre-clip* output `o` (`apply_logits`), which
  bounds that of the clipped map (clip is 1-Lipschitz): a pixel cannot hide a steep `o`
  behind the clip.

Config keys: `resolution` (H = W), `in_channels`, `widths` (two conv widths), `latent`
(the bottleneck size).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax import _checks
from diffjax.models import ModelSpec, layers

__all__ = ["PurifierNet", "digits_purifier_config", "build", "init", "make_fn", "SPECS"]


def digits_purifier_config() -> dict:
    """The 8x8x1 digits purifier's architecture (about 0.2M parameters)."""
    return {"resolution": 8, "in_channels": 1, "widths": [32, 64], "latent": 64}


class PurifierNet(nn.Module):
    """The purifier's network; `__call__` returns the pre-clip output `o` (module doc).

    Attributes:
      resolution: the image size H = W (even).
      in_channels: C.
      widths: the two convolution widths `(w0, w1)`.
      latent: the bottleneck size.
    """

    resolution: int = 8
    in_channels: int = 1
    widths: tuple = (32, 64)
    latent: int = 64

    @nn.compact
    def __call__(self, x):
        """Pre-clip outputs `[B, H, W, C]` of images `[B, H, W, C]` in [0, 1]."""
        w0, w1 = self.widths
        h = 2.0 * x.astype(jnp.float32) - 1.0
        h = nn.gelu(layers.Conv(w0, (3, 3), name="enc0")(h))
        h = nn.gelu(layers.Conv(w1, (3, 3), strides=2, name="enc1")(h))
        b, s = h.shape[0], self.resolution // 2
        h = nn.gelu(nn.Dense(self.latent, name="code")(h.reshape(b, -1)))
        h = nn.gelu(nn.Dense(s * s * w1, name="expand")(h)).reshape(b, s, s, w1)
        h = nn.gelu(layers.Conv(w0, (3, 3), name="dec0")(h))
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        h = layers.Conv(self.in_channels, (3, 3), name="dec1")(h)
        return 0.5 * (h + 1.0)  # back to the [0, 1] scale (unclipped)


def build(config: dict) -> PurifierNet:
    """Builds the `PurifierNet` of a config (keys of `digits_purifier_config`)."""
    cfg = {**digits_purifier_config(), **config}
    unknown = sorted(set(config) - set(digits_purifier_config()))
    if unknown:
        _checks.fail("config", f"keys among {sorted(digits_purifier_config())}", unknown)
    res = _checks.check_int(cfg["resolution"], "config['resolution']", lo=2)
    if res % 2:
        _checks.fail("config['resolution']", "an even image size", res)
    widths = tuple(int(w) for w in cfg["widths"])
    if len(widths) != 2:
        _checks.fail("config['widths']", "two convolution widths", cfg["widths"])
    return PurifierNet(resolution=res,
                       in_channels=_checks.check_int(cfg["in_channels"],
                                                     "config['in_channels']", lo=1),
                       widths=widths,
                       latent=_checks.check_int(cfg["latent"], "config['latent']", lo=1))


def init(module: PurifierNet, config: dict, key) -> dict:
    """Random initial variables `{"params": ...}`."""
    del config
    x = jnp.zeros((1, module.resolution, module.resolution, module.in_channels), jnp.float32)
    return jax.jit(module.init)(key, x)


def apply_logits(module: PurifierNet, variables, x):
    """The pre-clip output `o` of `x` (what the training's Jacobian penalty sees)."""
    return module.apply(variables, x)


@dataclasses.dataclass(frozen=True)
class _PurifyApply:
    """``purify(variables, x, keys) -> clip(o, 0, 1)``; the keys are ignored (equal per
    module, so `jit` compiles once per architecture)."""

    module: Any

    def __call__(self, variables, x, keys):
        del keys  # deterministic: keyed nowhere
        return jnp.clip(self.module.apply(variables, x), 0.0, 1.0)


def make_fn(module: PurifierNet, config: dict, variables: dict):
    """The purifier's ``purify_fn(x, keys) -> x'`` (the `Defense` convention).

    Args:
      module: the `PurifierNet`.
      config: its config (unused: the module holds the architecture).
      variables: ``{"params": ...}``.

    Returns:
      A `jax.tree_util.Partial` ``purify_fn(x [B,H,W,C] in [0, 1], keys [B]) -> [B,H,W,C]
      in [0, 1]``; deterministic, the keys are accepted and ignored.
    """
    del config
    return jax.tree_util.Partial(_PurifyApply(module), variables)


SPECS = {
    "purifier_net": ModelSpec(kind="purifier_net", role="purifier", build=build, init=init,
                              make_fn=make_fn, default_config=digits_purifier_config),
}
