"""One U-Net, two frameworks: the same random weights in diffusers and in diffjax.

The peer's model is diffusers' ``UNet2DModel`` in the layout of google/ddpm-cifar10-32
(Ho et al.'s U-Net: single-head attention, ``flip_sin_to_cos=False``, ``freq_shift=1``,
GroupNorm eps 1e-6), at a small size so the suite runs in minutes on a 2-core CPU. Its
random weights are saved with ``save_pretrained`` and read back through diffjax's own
``ddpm-diffusers`` converter, so both sides run identical weights and any disagreement is
either float error or a bug in one of them (checked before every timing).

Also: random weights for any diffjax model kind (`random_variables`, for models without a
peer), the bf16 variant of an ``eps_fn`` (`bf16_eps_fn`) and a check of the operand dtypes
its convolutions and matmuls get (`op_dtypes`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["UNetSize", "Pair", "diffusers_config", "make_pair", "cifar10_size",
           "cifar10_quarter_size", "random_variables", "bf16_eps_fn", "op_dtypes"]


@dataclasses.dataclass(frozen=True)
class UNetSize:
    """A U-Net size in Ho et al.'s terms (the diffjax ``ddpm_unet`` config fields).

    Attributes:
      resolution: image height = width.
      ch: channels of the first level.
      ch_mult: channel multiplier per level.
      num_res_blocks: residual blocks per level (diffusers' ``layers_per_block``).
      attn_levels: the levels (0 = full resolution) with self-attention.
      num_groups: GroupNorm groups.
      channels: image channels.
    """

    resolution: int = 8
    ch: int = 16
    ch_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attn_levels: tuple[int, ...] = (1,)
    num_groups: int = 4
    channels: int = 3

    def label(self) -> str:
        """A short description, e.g. ``8x8x3 ch16 (1, 2)``."""
        r = self.resolution
        return f"{r}x{r}x{self.channels} ch{self.ch} x{list(self.ch_mult)}"


def cifar10_size() -> UNetSize:
    """Ho et al.'s CIFAR-10 model (35.7M parameters, google/ddpm-cifar10-32)."""
    return UNetSize(resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_levels=(1,), num_groups=32, channels=3)


def cifar10_quarter_size() -> UNetSize:
    """Ho et al.'s CIFAR-10 architecture at a quarter of its width: the CPU suite's 32x32x3
    cases (``purify_32``, ``grad_32``).

    ``ch`` 32 instead of 128 (and 8 GroupNorm groups instead of 32, so each group keeps the
    original's 4 and 8 channels); four levels (1, 2, 2, 2), two residual blocks per level,
    attention at 16x16: 2,245,763 parameters, 0.80 GFLOPs per forward per image (the full
    model: 35.7M, 11.66).
    """
    return UNetSize(resolution=32, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_levels=(1,), num_groups=8, channels=3)


def diffusers_config(size: UNetSize) -> dict:
    """The ``UNet2DModel`` keyword arguments of a size, in google/ddpm-cifar10-32's layout."""
    levels = len(size.ch_mult)
    down = ["AttnDownBlock2D" if i in size.attn_levels else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if i in size.attn_levels else "UpBlock2D"
          for i in reversed(range(levels))]
    return dict(
        sample_size=size.resolution, in_channels=size.channels, out_channels=size.channels,
        block_out_channels=tuple(size.ch * m for m in size.ch_mult),
        layers_per_block=size.num_res_blocks, down_block_types=tuple(down),
        up_block_types=tuple(up), norm_num_groups=size.num_groups, norm_eps=1e-6,
        attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
        act_fn="silu", time_embedding_type="positional", center_input_sample=False,
        mid_block_scale_factor=1, dropout=0.0)


@dataclasses.dataclass
class Pair:
    """The same U-Net on both sides.

    Attributes:
      size: the architecture.
      torch_model: the diffusers ``UNet2DModel`` (eval mode, float32, gradients off for
        its parameters).
      eps_fn: diffjax's ``eps_fn(x_t, t)`` (a `jax.tree_util.Partial` holding the
        converted weights).
      config: the diffjax ``ddpm_unet`` config the converter produced.
      num_params: parameter count (diffusers).
      model_dir: where ``save_pretrained`` wrote the weights (kept for subprocesses).
    """

    size: UNetSize
    torch_model: Any
    eps_fn: Any
    config: dict
    num_params: int
    model_dir: str


def _randomize(model, seed: int) -> None:
    """Replaces diffusers' initial weights by N(0, s^2) draws with s = 1 / sqrt(fan_in).

    diffusers' default initialisation already is random; this also makes the GroupNorm
    scales/biases non-trivial, so a mapping bug in any tensor changes the outputs.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def make_pair(size: UNetSize, *, seed: int = 0, workdir: str | None = None) -> Pair:
    """Builds a random diffusers U-Net, saves it, and converts it to diffjax.

    Args:
      size: the architecture.
      seed: the torch generator seed of the random weights.
      workdir: where to write the ``save_pretrained`` directory (a temp dir if None).

    Returns:
      A `Pair` with identical weights on both sides.
    """
    import torch
    from diffusers import UNet2DModel

    from diffjax import convert, models

    torch.manual_seed(seed)
    model = UNet2DModel(**diffusers_config(size))
    _randomize(model, seed)
    model.eval().requires_grad_(False)
    root = pathlib.Path(workdir or tempfile.mkdtemp(prefix="diffjax_bench_"))
    out = root / (f"unet_{size.resolution}_{size.ch}_{len(size.ch_mult)}x{size.num_res_blocks}"
                  f"_{seed}")
    model.save_pretrained(str(out))
    converted = convert.convert("ddpm-diffusers", out)
    eps_fn = models.make_fn(converted.kind, converted.config, converted.variables)
    num_params = int(sum(p.numel() for p in model.parameters()))
    return Pair(size=size, torch_model=model, eps_fn=eps_fn, config=converted.config,
                num_params=num_params, model_dir=str(out))


# ------------------------------------------------------------ diffjax-only helpers


def random_variables(kind: str, config: dict, seed: int = 0) -> dict:
    """Random weights for a model kind (host NumPy draws from the shapes alone).

    Kernels (rank >= 2) ~ N(0, 1 / fan_in) with fan_in = prod(shape[:-1]) (Flax's HWIO and
    (in, out) layouts); norm scales 1 + 0.1 N(0, 1); other vectors 0.05 N(0, 1). Unlike the
    DDPM initialisers (zero output layers), every layer then changes the output.
    """
    from diffjax import models

    spec = models.get_spec(kind)
    module = spec.build(config)
    shapes = jax.eval_shape(lambda k: spec.init(module, config, k), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if len(s.shape) >= 2:
            v = rng.standard_normal(s.shape, np.float32) / math.sqrt(np.prod(s.shape[:-1]))
        elif name == "scale":
            v = 1.0 + 0.1 * rng.standard_normal(s.shape, np.float32)
        else:
            v = 0.05 * rng.standard_normal(s.shape, np.float32)
        return v.astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _cast_first_arg_bf16(next_fun, args, kwargs, context):
    del context
    if args and isinstance(args[0], jax.Array) and jnp.issubdtype(args[0].dtype, jnp.floating):
        args = (args[0].astype(jnp.bfloat16),) + tuple(args[1:])
    return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Bf16Eps:
    """``eps_fn`` body in bf16: every Flax layer's input cast to bf16 (hashable by func)."""

    func: Callable

    def __call__(self, variables, x_t, t):
        import flax.linen as nn

        with nn.intercept_methods(_cast_first_arg_bf16):
            eps = self.func(variables, x_t, t)
        return eps.astype(jnp.float32)


def bf16_eps_fn(kind: str, config: dict, variables: dict):
    """The model's ``eps_fn`` with bf16 weights and bf16 layer inputs, eps in float32.

    Convolutions and matmuls then take bf16 operands (float32 accumulation inside cuDNN /
    cuBLAS); the purifier's chain stays float32 (`purify` casts eps to the chain's dtype).
    The time input stays float32 (the embedding is cast at the first Dense). The U-Net's own
    ``dtype`` field is set to bfloat16 too (its layers would otherwise cast back).

    Args:
      kind: a diffusion model kind (``"ddpm_unet"``, ``"ncsnpp"``).
      config: its config.
      variables: float32 variables (cast here).

    Returns:
      A `jax.tree_util.Partial` ``eps_fn(x_t, t) -> eps`` (API.md's convention).
    """
    from diffjax import models

    cfg = dict(config, dtype="bfloat16") if kind == "ddpm_unet" else config
    vb = jax.tree.map(lambda a: a.astype(jnp.bfloat16)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, variables)
    inner = models.make_fn(kind, cfg, vb)
    return jax.tree_util.Partial(_Bf16Eps(inner.func), *inner.args)


def op_dtypes(eps_fn, resolution: int, channels: int) -> dict:
    """Operand dtypes of the convolutions and matmuls of one ``eps_fn`` call (its jaxpr).

    Returns:
      ``{"conv_general_dilated": {dtype: count}, "dot_general": {dtype: count}}`` over the
      first operand of each, sub-jaxprs (custom_vjp, pjit) included.
    """
    x = jnp.zeros((1, resolution, resolution, channels), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda e, x: e(x, jnp.zeros((1,), jnp.int32)))(eps_fn, x).jaxpr
    out: dict[str, dict[str, int]] = {"conv_general_dilated": {}, "dot_general": {}}

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name in out:
                dt = str(eqn.invars[0].aval.dtype)
                out[eqn.primitive.name][dt] = out[eqn.primitive.name].get(dt, 0) + 1
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr)
    return out
