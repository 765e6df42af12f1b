"""guided-diffusion's ImageNet U-Net (Dhariwal & Nichol 2021) in Flax Linen, kind `guided_unet`.

A clean re-implementation of openai/guided-diffusion's `UNetModel` for the checkpoints the
paper uses on ImageNet (`256x256_diffusion_uncond.pt`, the purifier of DiffPure and of the
paper's ImageNet experiments). Features: learned sigma (6 output channels: 0-2 the
predicted noise eps, 3-5 the variance interpolation `v` of Nichol & Dhariwal 2021, eq. 15),
FiLM-style scale-shift normalisation, residual blocks that up/downsample, multi-head
self-attention at chosen resolutions with either the legacy (`QKVAttentionLegacy`: heads
split before q/k/v) or the new channel order, and guided-diffusion's sinusoidal timestep
embedding (cosines first, then sines).

Layout: NHWC throughout (the PyTorch original is NCHW). Group normalisation is
guided-diffusion's `GroupNorm32`: 32 groups, eps 1e-5, computed in float32.

The config dict uses `guided_diffusion.script_util.create_model`'s own argument names, so a
published flag set can be pasted as it is:

    image_size, num_channels, num_res_blocks, channel_mult ("" = the default of image_size,
    or "1,1,2,2,4,4"), learn_sigma, class_cond (must be False: unconditional only),
    use_checkpoint (ignored), attention_resolutions ("32,16,8": image *resolutions*,
    turned into downsample rates image_size // res like create_model does), num_heads,
    num_head_channels (-1: use num_heads), num_heads_upsample (-1: num_heads),
    use_scale_shift_norm, dropout (inference only: never applied), resblock_updown,
    use_fp16 (ignored: we compute in float32), use_new_attention_order.

Parameter names mirror the PyTorch module tree (`diffjax.convert.guided.torch_name` maps
every Flax leaf to its state_dict entry): `time_embed_0`, `input_blocks_{i}_{j}`,
`middle_block_{j}`, `output_blocks_{i}_{j}` (the `j`-th layer of the `i`-th
`TimestepEmbedSequential`), `out_norm` / `out_conv` (`out.0` / `out.2`); inside a residual
block `in_norm`, `in_conv`, `emb_dense`, `out_norm`, `out_conv`, `skip` (`in_layers.0`,
`in_layers.2`, `emb_layers.1`, `out_layers.0`, `out_layers.3`, `skip_connection`).

References:
  Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021.
  Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021.
  https://github.com/openai/guided-diffusion (guided_diffusion/unet.py, nn.py, script_util.py)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks
from diffjax.models import ModelSpec, layers

__all__ = [
    "GuidedUNet",
    "SPECS",
    "default_config",
    "imagenet256_uncond_config",
    "small_config",
    "resolve_config",
    "timestep_embedding",
    "make_eps_fn",
    "make_output_fn",
    "param_shapes",
]

# create_model's defaults of channel_mult per image size (script_util.create_model).
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def imagenet256_uncond_config() -> dict:
    """The flags of `256x256_diffusion_uncond.pt` (552,814,086 parameters).

    From guided-diffusion's README: ``--attention_resolutions 32,16,8 --class_cond False
    --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear
    --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True
    --use_fp16 True --use_scale_shift_norm True`` (fp16 is ignored here: float32).
    """
    return {
        "image_size": 256,
        "num_channels": 256,
        "num_res_blocks": 2,
        "channel_mult": "",
        "learn_sigma": True,
        "class_cond": False,
        "use_checkpoint": False,
        "attention_resolutions": "32,16,8",
        "num_heads": 4,
        "num_head_channels": 64,
        "num_heads_upsample": -1,
        "use_scale_shift_norm": True,
        "dropout": 0.0,
        "resblock_updown": True,
        "use_fp16": False,
        "use_new_attention_order": False,
    }


default_config = imagenet256_uncond_config


def small_config() -> dict:
    """The small random-weight reference configuration (`guided_diffusion_small_config.json`).

    The 256x256 model's flags at image size 32, 32 channels, one residual block per level,
    `channel_mult=1,2,2`, attention at resolutions 16 and 8, 16 channels per head.
    """
    cfg = imagenet256_uncond_config()
    cfg.update(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
               attention_resolutions="16,8", num_head_channels=16)
    return cfg


def _parse_numbers(value, name: str, kind=float) -> tuple:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return tuple(kind(float(p)) if kind is int else kind(p) for p in parts)
        except ValueError:
            _checks.fail(name, "comma-separated numbers, e.g. '32,16,8'", repr(value))
    if isinstance(value, (list, tuple)):
        return tuple(kind(v) for v in value)
    _checks.fail(name, "a comma-separated string or a list of numbers", repr(value))


def resolve_config(config: dict) -> dict:
    """Checks a `create_model`-style config and fills in the derived architecture.

    Args:
      config: `create_model` arguments; missing ones take the 256x256-uncond values of
        `imagenet256_uncond_config()`.

    Returns:
      The full config (every `create_model` argument) plus the derived keys
      `channel_mult_tuple`, `attention_ds` (downsample rates, `image_size // res`),
      `out_channels` (6 with learned sigma, else 3).

    Raises:
      ValueError: unknown keys, class-conditional models, or inconsistent sizes.
    """
    if not isinstance(config, dict):
        _checks.fail("config", "a dict of guided-diffusion create_model arguments",
                     type(config).__name__)
    base = imagenet256_uncond_config()
    unknown = sorted(set(config) - set(base) - {"channel_mult_tuple", "attention_ds",
                                                 "out_channels"})
    if unknown:
        _checks.fail("config", f"guided-diffusion create_model arguments ({', '.join(base)})",
                     f"unknown key(s) {', '.join(unknown)}")
    cfg = {**base, **{k: config[k] for k in base if k in config}}
    image_size = _checks.check_int(cfg["image_size"], "config['image_size']", lo=1)
    _checks.check_int(cfg["num_channels"], "config['num_channels']", lo=1)
    _checks.check_int(cfg["num_res_blocks"], "config['num_res_blocks']", lo=1)
    if cfg["class_cond"]:
        _checks.fail("config['class_cond']", "False (diffjax's eps_fn is unconditional)",
                     cfg["class_cond"], "use the unconditional checkpoint, e.g. "
                     "256x256_diffusion_uncond.pt")
    if cfg["channel_mult"] in ("", None, ()):
        if image_size not in _DEFAULT_CHANNEL_MULT:
            _checks.fail("config['channel_mult']", "an explicit value for this image_size "
                         f"(defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)})",
                         repr(cfg["channel_mult"]))
        mult = _DEFAULT_CHANNEL_MULT[image_size]
    else:
        mult = _parse_numbers(cfg["channel_mult"], "config['channel_mult']", float)
    res = _parse_numbers(cfg["attention_resolutions"], "config['attention_resolutions']", int)
    for r in res:
        if r <= 0 or image_size % r:
            _checks.fail("config['attention_resolutions']",
                         f"resolutions dividing image_size {image_size}", repr(r))
    num_head_channels = int(cfg["num_head_channels"])
    for m in mult:
        ch = int(m * cfg["num_channels"])
        if ch % 32:
            _checks.fail("config['num_channels']", "channel counts divisible by 32 (GroupNorm32)",
                         f"{ch} channels at multiplier {m}")
        if num_head_channels != -1 and ch % num_head_channels:
            _checks.fail("config['num_head_channels']", f"a divisor of every width ({ch})",
                         num_head_channels)
    cfg["channel_mult_tuple"] = tuple(float(m) for m in mult)
    cfg["attention_ds"] = tuple(sorted({image_size // r for r in res}))
    cfg["out_channels"] = 6 if cfg["learn_sigma"] else 3
    return cfg


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """guided-diffusion's sinusoidal timestep embedding: ``[cos(t f), sin(t f)]``.

    Args:
      t: `[B]` timesteps (integers or fractions; guided-diffusion feeds the raw index).
      dim: embedding width (the model's `num_channels`).
      max_period: the lowest frequency is `1 / max_period`.

    Returns:
      `[B, dim]` float32, cosines in the first half (the reverse of Ho et al.'s order),
      frequencies `exp(-log(max_period) * k / (dim // 2))`, a zero column when `dim` is odd.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _norm(name: str) -> nn.Module:
    # guided-diffusion's GroupNorm32: 32 groups, eps 1e-5, statistics in float32 (the
    # two-pass variance, not E[x^2] - E[x]^2, to match PyTorch to ~1e-6).
    return nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False,
                        dtype=jnp.float32, name=name)


def _upsample(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _conv3(features: int, name: str, stride: int = 1) -> layers.Conv:
    return layers.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                       name=name)


class ResBlock(nn.Module):
    """Residual block with timestep conditioning (guided-diffusion `ResBlock`).

    `h = in_conv(updown(silu(in_norm(x))))`; with scale-shift norm
    `h = out_conv(silu(out_norm(h) * (1 + scale) + shift))` where `[scale, shift] =
    emb_dense(silu(emb))`, else `h = out_conv(silu(out_norm(h + emb_dense(silu(emb)))))`;
    returns `skip(updown(x)) + h`.
    """

    out_channels: int
    use_scale_shift_norm: bool = True
    up: bool = False
    down: bool = False

    @nn.compact
    def __call__(self, x, emb):
        in_ch = x.shape[-1]
        h = nn.silu(_norm("in_norm")(x))
        if self.up:
            h, x = _upsample(h), _upsample(x)
        elif self.down:
            h, x = _avg_pool(h), _avg_pool(x)
        h = _conv3(self.out_channels, "in_conv")(h)
        emb_out = nn.Dense(2 * self.out_channels if self.use_scale_shift_norm
                           else self.out_channels, name="emb_dense")(nn.silu(emb))
        emb_out = emb_out[:, None, None, :].astype(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = _norm("out_norm")(h) * (1 + scale) + shift
        else:
            h = _norm("out_norm")(h + emb_out)
        h = _conv3(self.out_channels, "out_conv")(nn.silu(h))
        if in_ch != self.out_channels:
            x = layers.Conv(self.out_channels, (1, 1), name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention (guided-diffusion `AttentionBlock`).

    `qkv` is a 1x1 projection to `3C` channels. With `legacy=True` (`QKVAttentionLegacy`,
    the order of the released checkpoints) the channels are laid out `[heads, 3, ch]`;
    otherwise (`QKVAttention`) `[3, heads, ch]`. Logits `(q / ch^1/4) . (k / ch^1/4)`,
    softmax over keys in float32, then a 1x1 `proj_out` and the residual.
    """

    num_heads: int
    legacy: bool = True

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        heads = self.num_heads
        ch = c // heads
        seq = x.reshape(b, hh * ww, c)
        qkv = nn.Dense(3 * c, name="qkv")(_norm("norm")(seq))
        if self.legacy:
            qkv = qkv.reshape(b, hh * ww, heads, 3, ch)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        else:
            qkv = qkv.reshape(b, hh * ww, 3, heads, ch)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        logits = jnp.einsum("blhc,bmhc->bhlm", q * scale, k * scale)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
        a = jnp.einsum("bhlm,bmhc->blhc", weights, v).reshape(b, hh * ww, c)
        out = nn.Dense(c, name="proj_out")(a)
        return (seq + out).reshape(b, hh, ww, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`) or 2x2 average pooling (used when `resblock_updown=False`)."""

    use_conv: bool = True

    @nn.compact
    def __call__(self, x):
        if self.use_conv:
            return _conv3(x.shape[-1], "op", stride=2)(x)
        return _avg_pool(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv (`conv`)."""

    use_conv: bool = True

    @nn.compact
    def __call__(self, x):
        x = _upsample(x)
        if self.use_conv:
            x = _conv3(x.shape[-1], "conv")(x)
        return x


def _heads(cfg: dict, ch: int, upsample: bool) -> int:
    if int(cfg["num_head_channels"]) != -1:
        return ch // int(cfg["num_head_channels"])
    n = int(cfg["num_heads"])
    if upsample and int(cfg["num_heads_upsample"]) != -1:
        n = int(cfg["num_heads_upsample"])
    return n


def _layout(cfg: dict) -> tuple[list, list, list]:
    """The U-Net as lists of (layer kind, args) per TimestepEmbedSequential.

    Mirrors `UNetModel.__init__` so that block indices `i, j` equal the PyTorch ones.
    """
    mc = int(cfg["num_channels"])
    mult = cfg["channel_mult_tuple"]
    nrb = int(cfg["num_res_blocks"])
    attn_ds = set(cfg["attention_ds"])
    legacy = not cfg["use_new_attention_order"]
    updown = bool(cfg["resblock_updown"])
    ch = int(mult[0] * mc)
    inputs = [[("conv_in", ch)]]
    chans = [ch]
    ds = 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            ch = int(m * mc)
            layers = [("res", dict(out_channels=ch))]
            if ds in attn_ds:
                layers.append(("attn", dict(num_heads=_heads(cfg, ch, False), legacy=legacy)))
            inputs.append(layers)
            chans.append(ch)
        if level != len(mult) - 1:
            inputs.append([("res", dict(out_channels=ch, down=True)) if updown
                           else ("down", dict(use_conv=True))])
            chans.append(ch)
            ds *= 2
    middle = [("res", dict(out_channels=ch)),
              ("attn", dict(num_heads=_heads(cfg, ch, False), legacy=legacy)),
              ("res", dict(out_channels=ch))]
    outputs = []
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            chans.pop()
            ch = int(mc * m)
            layers = [("res", dict(out_channels=ch))]
            if ds in attn_ds:
                layers.append(("attn", dict(num_heads=_heads(cfg, ch, True), legacy=legacy)))
            if level and i == nrb:
                layers.append(("res", dict(out_channels=ch, up=True)) if updown
                              else ("up", dict(use_conv=True)))
                ds //= 2
            outputs.append(layers)
    return inputs, middle, outputs


class GuidedUNet(nn.Module):
    """guided-diffusion's `UNetModel` (unconditional), NHWC.

    Attributes:
      config_items: the `create_model`-style config (see the module docstring) as a sorted
        tuple of `(key, value)` pairs, so that the module is hashable and `jit` caches
        compiled code per architecture; `build(config_dict)` makes it.

    Call: `module.apply(variables, x, t)` with `x` `[B, H, W, 3]` (the model's [-1, 1]
    space; `H`, `W` divisible by `2 ** (len(channel_mult) - 1)`) and `t` `[B]` timestep
    indices; returns `[B, H, W, out_channels]` (6 with learned sigma: eps then `v`).
    """

    config_items: tuple

    @property
    def config(self) -> dict:
        """The config as a dict (lists were stored as tuples)."""
        return dict(self.config_items)

    @staticmethod
    def _layer(cfg: dict, kind: str, args, emb, h, name: str):
        if kind == "conv_in":
            return _conv3(args, name)(h)
        if kind == "res":
            return ResBlock(use_scale_shift_norm=bool(cfg["use_scale_shift_norm"]), name=name,
                            **args)(h, emb)
        if kind == "attn":
            return AttentionBlock(name=name, **args)(h)
        if kind == "down":
            return Downsample(name=name, **args)(h)
        return Upsample(name=name, **args)(h)

    @nn.compact
    def __call__(self, x, t):
        cfg = resolve_config(self.config)
        mc = int(cfg["num_channels"])
        inputs, middle, outputs = _layout(cfg)
        emb = timestep_embedding(t, mc)
        emb = nn.Dense(4 * mc, name="time_embed_0")(emb)
        emb = nn.Dense(4 * mc, name="time_embed_2")(nn.silu(emb))
        hs = []
        h = x.astype(jnp.float32)
        for i, block in enumerate(inputs):
            for j, (kind, args) in enumerate(block):
                h = self._layer(cfg, kind, args, emb, h, f"input_blocks_{i}_{j}")
            hs.append(h)
        for j, (kind, args) in enumerate(middle):
            h = self._layer(cfg, kind, args, emb, h, f"middle_block_{j}")
        for i, block in enumerate(outputs):
            h = jnp.concatenate([h, hs.pop()], axis=-1)
            for j, (kind, args) in enumerate(block):
                h = self._layer(cfg, kind, args, emb, h, f"output_blocks_{i}_{j}")
        h = nn.silu(_norm("out_norm")(h))
        return _conv3(cfg["out_channels"], "out_conv")(h)


# ----------------------------------------------------------------------------------------
# Registry hooks.


def build(config: dict) -> GuidedUNet:
    """Builds the Flax module (the config is checked here, before any tracing)."""
    resolve_config(config)
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))
    return GuidedUNet(config_items=items)


def _min_size(cfg: dict) -> int:
    return 2 ** (len(cfg["channel_mult_tuple"]) - 1)


def init(module: GuidedUNet, config: dict, key) -> dict:
    """Random weights `{"params": ...}` with Flax's default initialisers' distributions.

    Kernels are LeCun-normal (`N(0, 1 / fan_in)`, as `nn.Dense` / `nn.Conv` default to),
    biases zero, GroupNorm scales one. The shapes come from `jax.eval_shape` and the noise
    from one `jax.random.normal` draw cut into pieces: compiling `module.init` itself (a
    threefry per tensor and the whole forward pass) takes tens of seconds on a CPU. The
    same key gives the same weights.

    Args:
      module: a `GuidedUNet` (from `build`).
      config: its config dict.
      key: a `jax.random.key`.

    Returns:
      `{"params": nested dict of float32 arrays}`.
    """
    shapes = param_shapes(module, config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    names = [path[-1].key for path, _ in leaves]
    dims = [tuple(leaf.shape) for _, leaf in leaves]
    sizes = [math.prod(d) for d in dims]
    # Per-element scale of the single noise draw: 1/sqrt(fan_in) on kernels, 0 elsewhere.
    scale = np.concatenate([
        np.full(n, 1.0 / math.sqrt(math.prod(d[:-1])) if name == "kernel" else 0.0, np.float32)
        for name, d, n in zip(names, dims, sizes, strict=True)])

    noise = jax.random.normal(key, (scale.size,), jnp.float32) * scale
    cuts = np.cumsum(sizes)[:-1]
    # Cut on the host when the values are concrete (XLA compiles a 200-way split slowly);
    # under eval_shape / jit, cut with jnp.
    if _checks.is_concrete(noise):
        pieces = [jnp.asarray(p) for p in np.split(np.asarray(noise), cuts)]
    else:
        pieces = jnp.split(noise, cuts)
    out = [jnp.ones(d, jnp.float32) if name == "scale" else p.reshape(d)
           for name, d, p in zip(names, dims, pieces, strict=True)]
    return {"params": jax.tree.unflatten(treedef, out)}


def param_shapes(module: GuidedUNet, config: dict) -> dict:
    """The `params` tree as `jax.ShapeDtypeStruct`s, without computing anything.

    Parameters do not depend on the image size, so the smallest valid image is traced.
    """
    s = _min_size(resolve_config(config))
    x = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), x, t)["params"]


def _check_inputs(x_t, t, cfg: dict):
    _checks.check_images(x_t, "x_t", channels=3, value_range=None)
    s = _min_size(cfg)
    if x_t.shape[1] % s or x_t.shape[2] % s:
        _checks.fail("x_t", f"height and width divisible by {s} (the U-Net downsamples "
                     f"{len(cfg['channel_mult_tuple']) - 1} times)", f"shape {x_t.shape}",
                     f"resize to the model's image_size {cfg['image_size']}")
    if not hasattr(t, "shape") or t.shape != (x_t.shape[0],):
        _checks.fail("t", f"timestep indices of shape ({x_t.shape[0]},), one per example",
                     f"shape {getattr(t, 'shape', type(t).__name__)}")
    if not jnp.issubdtype(t.dtype, jnp.integer):
        _checks.fail("t", "integer timestep indices (int32)", f"dtype {t.dtype}")
    if _checks.is_concrete(t) and t.size and int(np.min(np.asarray(t))) < 0:
        _checks.fail("t", "timestep indices >= 0", f"min {int(np.min(np.asarray(t)))}")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(module: GuidedUNet, eps_only: bool, variables, x_t, t):
    # Compiled once per (architecture, input shape): calling eps_fn outside jit does not
    # dispatch the ~1000 ops of the U-Net one by one. Inside an outer jit it is inlined.
    out = module.apply(variables, x_t.astype(jnp.float32), t)
    return out[..., :3] if eps_only else out


@dataclasses.dataclass(frozen=True)
class _Apply:
    """The body of `eps_fn` / `out_fn`: hashable (by module), so jit caches it per model."""

    module: GuidedUNet
    eps_only: bool

    def __call__(self, variables, x_t, t):
        _check_inputs(x_t, t, resolve_config(self.module.config))
        return _apply(self.module, self.eps_only, variables, x_t, t)


def make_output_fn(module: GuidedUNet, config: dict, variables: dict):
    """The full model output, for samplers that use the learned variance.

    Args:
      module: a `GuidedUNet` (from `build`).
      config: its config dict (unused; the module carries it).
      variables: `{"params": ...}`.

    Returns:
      A `jax.tree_util.Partial` `out_fn(x_t, t) -> [B, H, W, out_channels]`: x_t NHWC in
      [-1, 1], t int32 `[B]` timestep indices in `[0, T-1]` (guided-diffusion's raw index,
      no rescaling). With `learn_sigma` channels 0-2 are eps and 3-5 the interpolation
      `v` in roughly [-1, 1]; the variance is ``exp(frac * log(beta_t) + (1 - frac) *
      log(beta_tilde_t))`` with ``frac = (v + 1) / 2`` (Nichol & Dhariwal 2021, eq. 15).
    """
    del config
    return jax.tree_util.Partial(_Apply(module, eps_only=False), variables)


def make_eps_fn(module: GuidedUNet, config: dict, variables: dict):
    """`eps_fn(x_t, t) -> eps` per API.md: channels 0-2 of the model output.

    Args:
      module: a `GuidedUNet` (from `build`).
      config: its config dict (unused; the module carries it).
      variables: `{"params": ...}`.

    Returns:
      A `jax.tree_util.Partial` (the variables are its traced arguments): x_t NHWC
      `[B, H, W, 3]` in [-1, 1] (values outside are allowed: noisy inputs), t int32 `[B]`
      timestep indices -> eps of the shape of x_t. The learned variance is dropped (see
      `make_output_fn` for it).
    """
    del config
    return jax.tree_util.Partial(_Apply(module, eps_only=True), variables)


SPECS = {
    "guided_unet": ModelSpec(kind="guided_unet", role="diffusion", build=build, init=init,
                             make_fn=make_eps_fn, default_config=imagenet256_uncond_config),
}
