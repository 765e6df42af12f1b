"""NCSN++ / DDPM++ (score_sde) in Flax Linen: the CIFAR-10 diffusion model DiffPure uses.

This is Song et al.'s score_sde `NCSNpp` (models/ncsnpp.py of both score_sde and
score_sde_pytorch) for the DDPM++ family of configs, in particular
`vp/cifar10_ddpmpp_deep_continuous` (106.6M parameters): BigGAN residual blocks that also
do the resampling, skip rescaling by 1/sqrt(2), channel self-attention at resolution 16,
a sinusoidal (positional) embedding of the continuous time label `t * 999`, GroupNorm with
`min(C // 4, 32)` groups, swish. Written from the reference architecture, not copied.

Config dicts use score_sde's own `config.model` field names (JSON-able), plus the three
`config.data` fields the network reads: `image_size`, `num_channels` and `centered`.
Supported values are those of the DDPM++ configs (`resblock_type="biggan"`, `fir=False`,
`progressive="none"`, `progressive_input="none"`, `embedding_type="positional"`,
`attention_type="ddpm"`); anything else is rejected by name instead of silently running a
different network.

Parameter names follow the original Flax implementation exactly (`Dense_0`, `Dense_1`,
`Conv_0`, `ResnetBlockBigGANpp_{k}`, `AttnBlockpp_{k}`, `GroupNorm_0`, `Conv_1`; inside a
block `GroupNorm_0`, `Conv_0`, `Dense_0`, ..., attention `NIN_{0..3}` with `W`/`b`), so a
score_sde Flax `params_ema` tree loads as is. `module_layout(config)` lists the top-level
modules in the order of PyTorch's `all_modules` list, which is what the PyTorch converter
maps `all_modules.{i}` through; the network itself draws its submodule names from that same
list, so the two cannot drift apart.

`eps_fn(x_t, t)` (API.md): `t` are int32 timestep indices `i` in `[0, 999]`, fed to the
network as the continuous label `i` (score_sde feeds `labels = t_cont * 999`, so index `i`
is `t_cont = i / 999`), the discrete use DiffPure's DDPM runners make of this checkpoint.
The network's output *is* the noise prediction: score_sde's `get_score_fn` for VP models
computes `score = -model(x, labels) / std(t)` and its loss is
`|score * std + z|^2 = |z - model|^2`, so `eps = model(x, labels)`, unchanged in sign.
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
    "NCSNpp",
    "SPECS",
    "cifar10_deep_config",
    "small_config",
    "default_config",
    "validate_config",
    "module_layout",
    "timestep_embedding",
]

# The full `vp/cifar10_ddpmpp_deep_continuous` config.model (+ the data fields we read).
_DEEP_CONFIG = {
    "name": "ncsnpp",
    "nf": 128,
    "ch_mult": [1, 2, 2, 2],
    "num_res_blocks": 8,
    "attn_resolutions": [16],
    "dropout": 0.1,
    "resamp_with_conv": True,
    "conditional": True,
    "fir": False,
    "fir_kernel": [1, 3, 3, 1],
    "skip_rescale": True,
    "resblock_type": "biggan",
    "progressive": "none",
    "progressive_input": "none",
    "progressive_combine": "sum",
    "attention_type": "ddpm",
    "init_scale": 0.0,
    "embedding_type": "positional",
    "fourier_scale": 16,
    "conv_size": 3,
    "nonlinearity": "swish",
    "normalization": "GroupNorm",
    "scale_by_sigma": False,
    "ema_rate": 0.9999,
    "sigma_min": 0.01,
    "sigma_max": 50,
    "num_scales": 1000,
    "beta_min": 0.1,
    "beta_max": 20.0,
    # config.data fields
    "image_size": 32,
    "num_channels": 3,
    "centered": True,
}

# Fields that must hold one of these values (what this implementation supports).
_SUPPORTED = {
    "name": ("ncsnpp",),
    "fir": (False,),
    "resblock_type": ("biggan",),
    "progressive": ("none",),
    "progressive_input": ("none",),
    "attention_type": ("ddpm",),
    "embedding_type": ("positional",),
    "conv_size": (3,),
    "normalization": ("GroupNorm",),
    "nonlinearity": ("swish", "relu", "elu", "lrelu"),
}

_ACTS = {
    "swish": nn.swish,
    "relu": nn.relu,
    "elu": nn.elu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2),
}


def cifar10_deep_config() -> dict:
    """The full DDPM++ deep config (`vp/cifar10_ddpmpp_deep_continuous`, 106.6M params)."""
    return dict(_DEEP_CONFIG, ch_mult=list(_DEEP_CONFIG["ch_mult"]),
                attn_resolutions=list(_DEEP_CONFIG["attn_resolutions"]),
                fir_kernel=list(_DEEP_CONFIG["fir_kernel"]))


def small_config() -> dict:
    """A tiny config for tests: `nf=16`, `num_res_blocks=2`, no dropout (~0.6M params)."""
    return dict(cifar10_deep_config(), nf=16, num_res_blocks=2, dropout=0.0)


default_config = cifar10_deep_config


def validate_config(config: dict | None) -> dict:
    """Merges `config` over the full deep config and checks every field.

    Args:
      config: score_sde `config.model` fields (plus `image_size`, `num_channels`,
        `centered`) overriding `cifar10_deep_config()`; None means the full config.

    Returns:
      The complete, JSON-able config dict.

    Raises:
      ValueError: an unknown field, or a value this implementation does not support.
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(_DEEP_CONFIG))
    if unknown:
        _checks.fail("config", f"score_sde config.model fields (one of {sorted(_DEEP_CONFIG)})",
                     f"unknown field(s) {unknown}")
    full = cifar10_deep_config()
    full.update(config)
    for key, allowed in _SUPPORTED.items():
        value = full[key].lower() if isinstance(full[key], str) and key != "normalization" \
            else full[key]
        if value not in allowed:
            _checks.fail(f"config[{key!r}]", f"one of {allowed} (the DDPM++ configs)",
                         repr(full[key]))
        full[key] = value
    nf = _checks.check_int(full["nf"], "config['nf']", lo=4)
    _checks.check_int(full["num_res_blocks"], "config['num_res_blocks']", lo=1)
    _checks.check_int(full["num_channels"], "config['num_channels']", lo=1)
    size = _checks.check_int(full["image_size"], "config['image_size']", lo=1)
    ch_mult = [int(m) for m in full["ch_mult"]]
    if not ch_mult or min(ch_mult) < 1:
        _checks.fail("config['ch_mult']", "a non-empty list of positive ints", full["ch_mult"])
    if size % (2 ** (len(ch_mult) - 1)):
        _checks.fail("config['image_size']",
                     f"a multiple of {2 ** (len(ch_mult) - 1)} ({len(ch_mult)} resolutions)",
                     size)
    if min(nf * m for m in ch_mult) // 4 < 1:
        _checks.fail("config['nf']", "at least 4 channels per GroupNorm group", nf)
    _checks.check_number(full["dropout"], "config['dropout']", lo=0.0, hi=1.0)
    full["ch_mult"] = ch_mult
    full["attn_resolutions"] = [int(r) for r in full["attn_resolutions"]]
    return full


def _resolutions(config: dict) -> list[int]:
    return [config["image_size"] // 2**i for i in range(len(config["ch_mult"]))]


def module_layout(config: dict) -> list[tuple[str, str]]:
    """The top-level modules in the order of score_sde_pytorch's `all_modules` list.

    Args:
      config: a config dict (validated here).

    Returns:
      `[(flax_name, kind), ...]`; entry `i` is PyTorch's `all_modules.{i}`. `kind` is one
      of "dense", "conv", "groupnorm", "resblock", "attn".
    """
    config = validate_config(config)
    out: list[tuple[str, str]] = []
    counters: dict[str, int] = {}

    def add(prefix: str, kind: str):
        k = counters.get(prefix, 0)
        counters[prefix] = k + 1
        out.append((f"{prefix}_{k}", kind))

    if config["conditional"]:
        add("Dense", "dense")
        add("Dense", "dense")
    add("Conv", "conv")
    res = _resolutions(config)
    levels = len(config["ch_mult"])
    for level in range(levels):
        for _ in range(config["num_res_blocks"]):
            add("ResnetBlockBigGANpp", "resblock")
            if res[level] in config["attn_resolutions"]:
                add("AttnBlockpp", "attn")
        if level != levels - 1:
            add("ResnetBlockBigGANpp", "resblock")  # downsampling block
    add("ResnetBlockBigGANpp", "resblock")
    add("AttnBlockpp", "attn")
    add("ResnetBlockBigGANpp", "resblock")
    for level in reversed(range(levels)):
        for _ in range(config["num_res_blocks"] + 1):
            add("ResnetBlockBigGANpp", "resblock")
        if res[level] in config["attn_resolutions"]:
            add("AttnBlockpp", "attn")
        if level != 0:
            add("ResnetBlockBigGANpp", "resblock")  # upsampling block
    add("GroupNorm", "groupnorm")
    add("Conv", "conv")
    return out


def timestep_embedding(labels, dim: int, max_positions: int = 10000):
    """Sinusoidal embedding of (continuous) time labels, as in DDPM / score_sde.

    Args:
      labels: float `[B]` time labels (score_sde VP models: `t * 999`).
      dim: the embedding width.
      max_positions: the longest period's scale (10000).

    Returns:
      `[B, dim]`: `[sin(labels * f), cos(labels * f)]`, `f_k = max_positions^(-k/(half-1))`.
    """
    half = dim // 2
    scale = math.log(max_positions) / (half - 1)
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)
    args = labels.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _default_init(scale: float = 1.0):
    """DDPM's initialiser: variance scaling, fan_avg, uniform (0 means 1e-10)."""
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def _group_norm(name: str):
    """score_sde's GroupNorm: `min(C // 4, 32)` groups, epsilon 1e-6 (`scale`, `bias`)."""

    def apply(x):
        groups = min(x.shape[-1] // 4, 32)
        # Two-pass variance: closer to PyTorch's GroupNorm than E[x^2] - E[x]^2.
        return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False,
                            name=name)(x)

    return apply


def _conv(features: int, size: int, name: str, init_scale: float = 1.0):
    pad = size // 2
    return layers.Conv(features, (size, size), padding=((pad, pad), (pad, pad)), name=name,
                       kernel_init=_default_init(init_scale))


def _dense(features: int, name: str):
    return nn.Dense(features, name=name, kernel_init=_default_init())


def _upsample(x):
    """Nearest-neighbour 2x upsampling, NHWC (score_sde's `naive_upsample_2d`)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample(x):
    """2x2 mean pooling, NHWC (score_sde's `naive_downsample_2d`)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class NIN(nn.Module):
    """A 1x1 "network in network" layer: `x @ W + b` over the channel axis (params `W`, `b`)."""

    features: int
    init_scale: float = 0.1

    @nn.compact
    def __call__(self, x):
        w = self.param("W", _default_init(self.init_scale), (x.shape[-1], self.features))
        b = self.param("b", nn.initializers.zeros, (self.features,))
        return jnp.einsum("...c,cd->...d", x, w) + b


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all positions, with a residual (score_sde `AttnBlockpp`).

    `q, k, v` are 1x1 projections of `GroupNorm(x)`; weights `softmax(q.k / sqrt(C))` over
    the `H*W` positions; output `(x + NIN_3(attn @ v)) / sqrt(2)` with `skip_rescale`.
    """

    skip_rescale: bool = True
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _group_norm("GroupNorm_0")(x)
        q = NIN(c, name="NIN_0")(y)
        k = NIN(c, name="NIN_1")(y)
        v = NIN(c, name="NIN_2")(y)
        logits = jnp.einsum("bhwc,bijc->bhwij", q, k) * (c ** -0.5)
        weights = jax.nn.softmax(logits.reshape(b, h, w, h * w), axis=-1)
        y = jnp.einsum("bhwn,bnc->bhwc", weights, v.reshape(b, h * w, c))
        y = NIN(c, init_scale=self.init_scale, name="NIN_3")(y)
        return (x + y) / np.sqrt(2.0) if self.skip_rescale else x + y


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block; resamples inside the block when `up` / `down`.

    `h = Conv_1(drop(act(GN_1(Conv_0(resample(act(GN_0(x)))) + Dense_0(act(temb))))))`,
    the skip is `Conv_2` (1x1) of the resampled `x` when the shape changes, and the sum is
    scaled by `1/sqrt(2)` with `skip_rescale`.
    """

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    skip_rescale: bool = True
    init_scale: float = 0.0
    act: str = "swish"

    @nn.compact
    def __call__(self, x, temb=None, train: bool = False):
        act = _ACTS[self.act]
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = act(_group_norm("GroupNorm_0")(x))
        if self.up:
            h, x = _upsample(h), _upsample(x)
        elif self.down:
            h, x = _downsample(h), _downsample(x)
        h = _conv(out_ch, 3, "Conv_0")(h)
        if temb is not None:
            h = h + _dense(out_ch, "Dense_0")(act(temb))[:, None, None, :]
        h = act(_group_norm("GroupNorm_1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train, name="Dropout_0")(h)
        h = _conv(out_ch, 3, "Conv_1", init_scale=self.init_scale)(h)
        if in_ch != out_ch or self.up or self.down:
            x = _conv(out_ch, 1, "Conv_2")(x)
        return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ score network (score_sde `NCSNpp`, DDPM++ configs).

    Attributes:
      config: a tuple of `(field, value)` pairs of a validated config dict (a tuple keeps
        the module hashable, so jit caches one compilation per architecture); build it with
        `NCSNpp.from_config(config)`.
    """

    config: tuple

    @classmethod
    def from_config(cls, config: dict | None) -> NCSNpp:
        """The module of a (partial) config dict, validated and completed."""
        full = validate_config(config)
        return cls(tuple((k, tuple(v) if isinstance(v, list) else v)
                         for k, v in sorted(full.items())))

    @property
    def cfg(self) -> dict:
        """The config as a dict (lists as tuples)."""
        return dict(self.config)

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        """Runs the network.

        Args:
          x: `[B, H, W, C]` images; in [-1, 1] when `centered` (else [0, 1], mapped inside).
          labels: float `[B]` continuous time labels (`t * 999` for VP models).
          train: enables dropout (needs a `"dropout"` rng).

        Returns:
          `[B, H, W, C]`: the network output (for VP models the noise prediction eps).
        """
        cfg = self.cfg
        layout = iter(module_layout({k: list(v) if isinstance(v, tuple) else v
                                     for k, v in cfg.items()}))

        def name(kind: str) -> str:
            got_name, got_kind = next(layout)
            assert got_kind == kind, (got_name, kind)
            return got_name

        act = _ACTS[cfg["nonlinearity"]]
        nf = cfg["nf"]
        ch_mult = cfg["ch_mult"]
        levels = len(ch_mult)
        res = [cfg["image_size"] // 2**i for i in range(levels)]
        attn_res = cfg["attn_resolutions"]
        block = dict(dropout=cfg["dropout"], skip_rescale=cfg["skip_rescale"],
                     init_scale=cfg["init_scale"], act=cfg["nonlinearity"])

        def resblock(h, out_ch=None, **kw):
            return ResnetBlockBigGANpp(out_ch=out_ch, name=name("resblock"), **block, **kw)(
                h, temb, train)

        def attn(h):
            return AttnBlockpp(skip_rescale=cfg["skip_rescale"], init_scale=cfg["init_scale"],
                               name=name("attn"))(h)

        temb = None
        if cfg["conditional"]:
            temb = timestep_embedding(labels, nf)
            temb = _dense(4 * nf, name("dense"))(temb)
            temb = _dense(4 * nf, name("dense"))(act(temb))
        if not cfg["centered"]:
            x = 2.0 * x - 1.0

        hs = [_conv(nf, 3, name("conv"))(x)]
        for level in range(levels):
            for _ in range(cfg["num_res_blocks"]):
                h = resblock(hs[-1], nf * ch_mult[level])
                if res[level] in attn_res:
                    h = attn(h)
                hs.append(h)
            if level != levels - 1:
                hs.append(resblock(hs[-1], down=True))

        h = resblock(hs[-1])
        h = attn(h)
        h = resblock(h)

        for level in reversed(range(levels)):
            for _ in range(cfg["num_res_blocks"] + 1):
                h = resblock(jnp.concatenate([h, hs.pop()], axis=-1), nf * ch_mult[level])
            if res[level] in attn_res:
                h = attn(h)
            if level != 0:
                h = resblock(h, up=True)
        assert not hs

        h = act(_group_norm(name("groupnorm"))(h))
        h = _conv(x.shape[-1], 3, name("conv"), init_scale=cfg["init_scale"])(h)
        assert next(layout, None) is None
        if cfg["scale_by_sigma"]:
            sigmas = np.exp(np.linspace(np.log(cfg["sigma_max"]), np.log(cfg["sigma_min"]),
                                        cfg["num_scales"])).astype(np.float32)
            h = h / jnp.asarray(sigmas)[labels.astype(jnp.int32)][:, None, None, None]
        return h


def build(config: dict) -> NCSNpp:
    """The `NCSNpp` module of a config dict (score_sde `config.model` fields)."""
    return NCSNpp.from_config(config)


@functools.partial(jax.jit, static_argnums=0)
def _init(module: NCSNpp, key) -> dict:
    cfg = module.cfg
    x = jnp.zeros((1, cfg["image_size"], cfg["image_size"], cfg["num_channels"]), jnp.float32)
    return {"params": module.init(key, x, jnp.zeros((1,), jnp.float32))["params"]}


def init(module: NCSNpp, config: dict, key) -> dict:
    """Random DDPM-style initial variables `{"params": ...}` (compiled: fast for 106M params).

    Args:
      module: the `NCSNpp` module (its own config is used; `config` is accepted for the
        `ModelSpec` contract).
      config: the config dict it was built from.
      key: a `jax.random.key`.

    Returns:
      `{"params": ...}`.
    """
    del config
    return _init(module, key)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: NCSNpp, variables, x, labels):
    # Jitted (and cached per architecture) so that calling eps_fn outside jit is not run
    # op by op; inside an outer jit this is simply inlined.
    return module.apply(variables, x, labels, train=False)


@dataclasses.dataclass(frozen=True)
class _EpsFn:
    """`eps_fn` body; hashable (by module), so jit caches it per architecture."""

    module: NCSNpp

    def __call__(self, variables, x_t, t):
        cfg = self.module.cfg
        size, ch = cfg["image_size"], cfg["num_channels"]
        _checks.check_images(x_t, "x_t", channels=ch, value_range=None)
        if x_t.shape[1:3] != (size, size):
            _checks.fail("x_t", f"images of {size}x{size} (the model's image_size)",
                         f"shape {tuple(x_t.shape)}")
        t = jnp.asarray(t)
        if t.shape != (x_t.shape[0],) or not jnp.issubdtype(t.dtype, jnp.integer):
            _checks.fail("t", f"int32 timestep indices of shape ({x_t.shape[0]},)",
                         f"shape {tuple(t.shape)} dtype {t.dtype}")
        if _checks.is_concrete(t) and t.size:
            tv = np.asarray(t)
            if tv.min() < 0 or tv.max() > 999:
                _checks.fail("t", "timestep indices in [0, 999]",
                             f"min {int(tv.min())}, max {int(tv.max())}")
        # Index i -> continuous time i / 999 -> score_sde's label (i / 999) * 999 = i.
        labels = t.astype(jnp.float32)
        return _apply(self.module, variables, x_t.astype(jnp.float32), labels)


def make_fn(module: NCSNpp, config: dict, variables: dict):
    """`eps_fn(x_t, t)` per API.md (see the module docstring for the time and sign mapping).

    Args:
      module: the `NCSNpp` module.
      config: its config dict.
      variables: `{"params": ...}`.

    Returns:
      A `jax.tree_util.Partial`: `eps_fn(x_t [B, H, W, C] in the [-1, 1] space, t int32 [B]
      in [0, 999]) -> eps [B, H, W, C]`.
    """
    if not module.cfg["centered"]:
        _checks.fail("config['centered']", "True (eps_fn takes x_t in [-1, 1])", False,
                     "a model trained on [0, 1] data has no [-1, 1] eps_fn")
    return jax.tree_util.Partial(_EpsFn(module), variables)


SPECS = {
    "ncsnpp": ModelSpec(kind="ncsnpp", role="diffusion", build=build, init=init,
                        make_fn=make_fn, default_config=cifar10_deep_config),
}
