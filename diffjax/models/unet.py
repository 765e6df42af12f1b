"""The DDPM U-Net of Ho et al. (2020) in Flax Linen (model kind ``ddpm_unet``).

The eps-model of *Denoising Diffusion Probabilistic Models* (Ho, Jain, Abbeel 2020,
Appendix B), laid out exactly as the original TensorFlow code and its PyTorch ports
(pytorch_diffusion, the DDIM repository's ``models/diffusion.py``) and diffusers'
``UNet2DModel`` for google/ddpm-cifar10-32, so that their checkpoints convert one tensor to
one Flax variable (`diffjax.convert.ddpm`):

- a sinusoidal embedding of the timestep (dim ``ch``: half sin, half cos, frequencies
  ``exp(-log(10000) * k / (half - 1))``), Dense(4ch), swish, Dense(4ch);
- ``conv_in``; per level ``i`` (channels ``ch * ch_mult[i]``) ``num_res_blocks`` residual
  blocks (GroupNorm -> swish -> conv3x3 -> + Dense(swish(temb)) -> GroupNorm -> swish ->
  dropout -> conv3x3, a 1x1 ``nin_shortcut`` when the channel count changes), each
  followed by single-head self-attention where the resolution is in ``attn_resolutions``;
  a stride-2 conv3x3 with the original's asymmetric (0, 1) padding (or 2x2 average pooling
  with ``resamp_with_conv=False``) at every level but the last;
- middle: res block, attention, res block;
- the up path: ``num_res_blocks + 1`` blocks per level on the concatenation with the
  matching skip, attention as above, nearest x2 upsampling + conv3x3 at every level but
  the first;
- GroupNorm, swish, ``conv_out``.

Submodule names follow pytorch_diffusion (``down_1_block_0``, ``mid_attn_1``,
``up_3_upsample``, ...). Attention's q/k/v/proj_out are 1x1 convolutions in the original;
here they are the equivalent `nn.Dense` on the channel axis.

Why Linen: see `diffjax.models` (a pure ``apply(variables, ...)`` is what the purifiers,
the attacks and the converters want).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks
from diffjax.models import ModelSpec, layers

__all__ = [
    "UNet",
    "ResnetBlock",
    "AttnBlock",
    "timestep_embedding",
    "cifar10_config",
    "digits_config",
    "tiny_config",
    "default_config",
    "resolve_config",
    "build",
    "init",
    "make_fn",
    "SPECS",
]

_KEYS = ("resolution", "in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks",
         "attn_resolutions", "dropout", "resamp_with_conv", "num_groups", "dtype",
         "attn_head_dim")


# ----------------------------------------------------------------------------- configs


def cifar10_config() -> dict:
    """Ho et al.'s CIFAR-10 model (35,746,307 parameters, google/ddpm-cifar10-32)."""
    return {"resolution": 32, "in_channels": 3, "out_channels": 3, "ch": 128,
            "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16],
            "dropout": 0.1, "resamp_with_conv": True, "num_groups": 32, "dtype": "float32"}


def digits_config() -> dict:
    """The embedded default: 8x8 grey sklearn digits (284,513 parameters, 2 levels).

    ``ch_mult`` is (1, 1), not CIFAR-10's doubling: with (1, 2) the model has 0.7M
    parameters and a forward pass costs about twice as much, for 1,797 training images.
    """
    return {"resolution": 8, "in_channels": 1, "out_channels": 1, "ch": 32,
            "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [4],
            "dropout": 0.1, "resamp_with_conv": True, "num_groups": 8, "dtype": "float32"}


def tiny_config() -> dict:
    """A very small model for CPU tests (8x8x3, ch 16, 2 levels, attention at 4)."""
    return {"resolution": 8, "in_channels": 3, "out_channels": 3, "ch": 16,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
            "dropout": 0.0, "resamp_with_conv": True, "num_groups": 4, "dtype": "float32"}


default_config = cifar10_config


def resolve_config(config: dict) -> dict:
    """Checks a U-Net config and fills defaults (``num_groups`` 32, ``dtype`` float32).

    Args:
      config: a dict with the keys of `cifar10_config` (JSON-able; lists or tuples).

    Returns:
      A new, complete config dict with lists for the sequence fields.

    Raises:
      ValueError: unknown or missing keys, or values the architecture cannot take
        (non-positive sizes, a group count that does not divide every channel count, a
        resolution not divisible by ``2 ** (len(ch_mult) - 1)``).
    """
    if not isinstance(config, dict):
        _checks.fail("config", "a dict (e.g. unet.cifar10_config())", type(config).__name__)
    unknown = sorted(set(config) - set(_KEYS))
    if unknown:
        _checks.fail("config", f"keys among {', '.join(_KEYS)}", f"unknown keys {unknown}")
    cfg = {"num_groups": 32, "dtype": "float32", "dropout": 0.0, "resamp_with_conv": True,
           "attn_resolutions": [], "attn_head_dim": None}
    cfg.update(config)
    missing = [k for k in _KEYS if k not in cfg]
    if missing:
        _checks.fail("config", f"all of {', '.join(_KEYS)}", f"missing {missing}")
    for k in ("resolution", "in_channels", "out_channels", "ch", "num_res_blocks",
              "num_groups"):
        cfg[k] = _checks.check_int(cfg[k], f"config[{k!r}]", lo=1 if k != "num_res_blocks"
                                   else 0)
    cfg["ch_mult"] = [_checks.check_int(m, "config['ch_mult'][i]", lo=1)
                      for m in cfg["ch_mult"]]
    if not cfg["ch_mult"]:
        _checks.fail("config['ch_mult']", "at least one level", cfg["ch_mult"])
    cfg["attn_resolutions"] = [int(r) for r in cfg["attn_resolutions"]]
    cfg["dropout"] = _checks.check_number(cfg["dropout"], "config['dropout']", lo=0.0, hi=1.0)
    cfg["resamp_with_conv"] = bool(cfg["resamp_with_conv"])
    _checks.check_choice(cfg["dtype"], "config['dtype']", ("float32", "bfloat16"))
    down = 2 ** (len(cfg["ch_mult"]) - 1)
    if cfg["resolution"] % down:
        _checks.fail("config['resolution']", f"a multiple of {down} (2 ** (levels - 1))",
                     cfg["resolution"])
    for c in [cfg["ch"]] + [cfg["ch"] * m for m in cfg["ch_mult"]]:
        if c % cfg["num_groups"]:
            _checks.fail("config['num_groups']", f"a divisor of every channel count ({c})",
                         cfg["num_groups"])
    if cfg["attn_head_dim"] is not None:
        hd = _checks.check_int(cfg["attn_head_dim"], "config['attn_head_dim']", lo=1)
        cfg["attn_head_dim"] = hd
        for c in [cfg["ch"] * m for m in cfg["ch_mult"]]:
            if c % hd:
                _checks.fail("config['attn_head_dim']", f"a divisor of every channel count "
                             f"({c}), or None for one head", hd)
    return cfg


# ----------------------------------------------------------------------------- layers


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Ho et al.'s sinusoidal timestep embedding (the Transformer's, sin first).

    Args:
      t: `[B]` timesteps (integer indices or floats).
      dim: the embedding size.

    Returns:
      `[B, dim]` float32: ``[sin(t w_k), cos(t w_k)]`` with ``w_k = exp(-log(10000) k /
      (dim / 2 - 1))``, zero-padded when `dim` is odd.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) / max(half - 1, 1) * jnp.arange(half, dtype=jnp.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _norm(num_groups: int, name: str) -> layers.GroupNorm:
    # epsilon 1e-6: tf.contrib.layers.group_norm's, as pytorch_diffusion and diffusers use.
    # `layers.GroupNorm`: flax.linen.GroupNorm's function and parameters, faster on the CPU.
    return layers.GroupNorm(num_groups=num_groups, epsilon=1e-6, name=name)


class ResnetBlock(nn.Module):
    """Ho et al.'s residual block with a timestep-embedding projection."""

    out_channels: int
    dropout: float
    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, train: bool):
        h = nn.swish(_norm(self.num_groups, "norm1")(x))
        h = layers.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        h = h + nn.Dense(self.out_channels, dtype=self.dtype,
                         name="temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(_norm(self.num_groups, "norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = layers.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = layers.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over all positions, with a residual connection.

    One head (Ho et al.) when `head_dim` is None; otherwise ``C // head_dim`` heads of
    `head_dim` channels (diffusers' ``attention_head_dim``).
    """

    num_groups: int
    dtype: Any = jnp.float32
    head_dim: int | None = None

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _norm(self.num_groups, "norm")(x).reshape(b, hh * ww, c)
        q = nn.Dense(c, dtype=self.dtype, name="q")(h)
        k = nn.Dense(c, dtype=self.dtype, name="k")(h)
        v = nn.Dense(c, dtype=self.dtype, name="v")(h)
        h = layers.attention(q, k, v, 1 if self.head_dim is None else c // self.head_dim)
        h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h)
        return x + h.reshape(b, hh, ww, c)


def _upsample_nearest(x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class UNet(nn.Module):
    """Ho et al.'s DDPM eps-model.

    Attributes:
      resolution, in_channels, out_channels, ch, ch_mult, num_res_blocks,
      attn_resolutions, dropout, resamp_with_conv, num_groups: the architecture (see
      `cifar10_config`); sequences are tuples so the module hashes.
      attn_head_dim: channels per attention head; None (Ho et al.) is one head.
      dtype: the computation dtype (parameters stay float32).
    """

    resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_groups: int = 32
    dtype: Any = jnp.float32
    attn_head_dim: int | None = None

    @nn.compact
    def __call__(self, x, t, *, train: bool = False):
        """Predicts the noise in `x`.

        Args:
          x: `[B, H, W, in_channels]` noisy images in [-1, 1] (H, W divisible by
            ``2 ** (len(ch_mult) - 1)``).
          t: `[B]` timesteps (int or float; fed to the sinusoidal embedding as they are).
          train: enables dropout (needs the ``"dropout"`` rng).

        Returns:
          `[B, H, W, out_channels]` float32 eps prediction.
        """
        down = 2 ** (len(self.ch_mult) - 1)
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % down \
                or x.shape[2] % down:
            _checks.fail("x", f"NHWC [B, H, W, {self.in_channels}] with H, W divisible by "
                         f"{down}", f"shape {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            _checks.fail("t", f"one timestep per example, shape ({x.shape[0]},)",
                         f"shape {tuple(t.shape)}")
        dt, groups = self.dtype, self.num_groups
        temb = timestep_embedding(t, self.ch)
        temb = nn.Dense(4 * self.ch, dtype=dt, name="temb_dense0")(temb)
        temb = nn.Dense(4 * self.ch, dtype=dt, name="temb_dense1")(nn.swish(temb))

        hs = [layers.Conv(self.ch, (3, 3), padding=1, dtype=dt, name="conv_in")(x.astype(dt))]
        res = self.resolution
        levels = len(self.ch_mult)
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, self.dropout, groups, dt,
                                name=f"down_{i}_block_{j}")(hs[-1], temb, train)
                if res in self.attn_resolutions:
                    h = AttnBlock(groups, dt, self.attn_head_dim, name=f"down_{i}_attn_{j}")(h)
                hs.append(h)
            if i != levels - 1:
                h = hs[-1]
                if self.resamp_with_conv:
                    h = layers.Conv(h.shape[-1], (3, 3), strides=2, padding=((0, 1), (0, 1)),
                                dtype=dt, name=f"down_{i}_downsample")(h)
                else:
                    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
                hs.append(h)
                res //= 2

        c_mid = self.ch * self.ch_mult[-1]
        h = ResnetBlock(c_mid, self.dropout, groups, dt, name="mid_block_1")(hs[-1], temb, train)
        h = AttnBlock(groups, dt, self.attn_head_dim, name="mid_attn_1")(h)
        h = ResnetBlock(c_mid, self.dropout, groups, dt, name="mid_block_2")(h, temb, train)

        for i in reversed(range(levels)):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = ResnetBlock(self.ch * self.ch_mult[i], self.dropout, groups, dt,
                                name=f"up_{i}_block_{j}")(h, temb, train)
                if res in self.attn_resolutions:
                    h = AttnBlock(groups, dt, self.attn_head_dim, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = _upsample_nearest(h)
                if self.resamp_with_conv:
                    h = layers.Conv(h.shape[-1], (3, 3), padding=1, dtype=dt,
                                name=f"up_{i}_upsample")(h)
                res *= 2
        assert not hs

        h = nn.swish(_norm(groups, "norm_out")(h))
        h = layers.Conv(self.out_channels, (3, 3), padding=1, dtype=dt, name="conv_out")(h)
        return h.astype(jnp.float32)


# ----------------------------------------------------------------------------- registry


def build(config: dict) -> UNet:
    """Builds the U-Net of a config dict (checked by `resolve_config`)."""
    cfg = resolve_config(config)
    return UNet(
        resolution=cfg["resolution"], in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"], ch=cfg["ch"], ch_mult=tuple(cfg["ch_mult"]),
        num_res_blocks=cfg["num_res_blocks"], attn_resolutions=tuple(cfg["attn_resolutions"]),
        dropout=cfg["dropout"], resamp_with_conv=cfg["resamp_with_conv"],
        num_groups=cfg["num_groups"], dtype=jnp.dtype(cfg["dtype"]),
        attn_head_dim=cfg["attn_head_dim"])


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(module, key, *args):
    # One compiled program (cached per architecture: modules compare equal) instead of
    # hundreds of eagerly dispatched initialisers.
    return module.init(key, *args)


def init(module: UNet, config: dict, key) -> dict:
    """Random initial variables (``{"params": ...}``) for a batch of one image."""
    del config
    x = jnp.zeros((1, module.resolution, module.resolution, module.in_channels), jnp.float32)
    return _jit_init(module, key, x, jnp.zeros((1,), jnp.int32))


@dataclasses.dataclass(frozen=True)
class _EpsApply:
    """``apply(variables, x_t, t)``: the module in inference mode (equal per module)."""

    module: UNet

    def __call__(self, variables, x_t, t):
        return self.module.apply(variables, x_t, jnp.asarray(t).astype(jnp.float32),
                                 train=False)


def make_fn(module: UNet, config: dict, variables: dict):
    """The model's ``eps_fn(x_t, t)`` (API.md's convention).

    Args:
      module: the U-Net (`build(config)`).
      config: its config (unused: the module holds the architecture).
      variables: ``{"params": ...}``.

    Returns:
      A `jax.tree_util.Partial` ``eps_fn(x_t, t) -> eps``: x_t `[B, H, W, C]` in [-1, 1],
      t int32 `[B]` timestep indices (fed to the embedding as float32, as in Ho et al.),
      eps `[B, H, W, C]` float32. Two calls for equal configs give equal treedefs, so
      `jit` compiles once per architecture and traces the weights as arguments. NumPy
      weights (the converters' output) are put on the device here, once: left as NumPy
      arrays, every call of a compiled program copied them again (17 ms per call for the
      2.2M-parameter 32x32 benchmark U-Net, a third of its arrays transposed on the host).
    """
    del config
    variables = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a, variables)
    return jax.tree_util.Partial(_EpsApply(module), variables)


SPECS = {
    "ddpm_unet": ModelSpec(kind="ddpm_unet", role="diffusion", build=build, init=init,
                           make_fn=make_fn, default_config=cifar10_config),
}
