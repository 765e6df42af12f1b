"""Ho et al.'s DDPM U-Net checkpoints -> `diffjax.models.unet` (kind ``ddpm_unet``).

Two layouts of the same architecture:

- ``ddpm-diffusers`` (`convert_diffusers`): diffusers' ``UNet2DModel``, e.g.
  google/ddpm-cifar10-32 (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
  ``.bin``). Both attention naming schemes load: the current ``to_q``/``to_k``/``to_v``/
  ``to_out.0`` and the legacy ``query``/``key``/``value``/``proj_attn`` of older saves.
  diffusers orders its up blocks from the lowest resolution (``up_blocks.0`` is Ho's
  ``up.{L-1}``).
- ``ddpm-pytorch-diffusion`` (`convert_pytorch_diffusion`): pytorch_diffusion's port of
  the original TF code (``model-790000.ckpt``: ``temb.dense.0``, ``down.{i}.block.{j}``,
  ``down.{i}.attn.{j}``, ``mid.attn_1``, ``up.{i}.upsample.conv``, ...), whose attention
  q/k/v/proj_out are 1x1 convolutions.

The name map is built from our Flax model's own variables (every Flax path translated to
the source name), so `common.apply_name_map` fills each Flax variable exactly once and
reports a file of another architecture by its missing/unexpected/mismatched tensors.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp

from diffjax.convert import Converted, common
from diffjax.models import unet

__all__ = [
    "convert_diffusers",
    "convert_pytorch_diffusion",
    "config_from_diffusers",
    "config_from_pytorch_diffusion",
    "name_map",
    "source_shapes",
    "DDPM_SCHEDULE",
]

DDPM_SCHEDULE = {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                 "beta_end": 2e-2}

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# Flax sub-module name -> source name, per layout.
_SUB_PD = {}
_SUB_DIFFUSERS = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut",
                  "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}
_SUB_DIFFUSERS_LEGACY = dict(_SUB_DIFFUSERS, q="query", k="key", v="value",
                             proj_out="proj_attn")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _top_pd(name: str, levels: int) -> str:
    del levels
    fixed = {"temb_dense0": "temb.dense.0", "temb_dense1": "temb.dense.1",
             "mid_block_1": "mid.block_1", "mid_block_2": "mid.block_2",
             "mid_attn_1": "mid.attn_1"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", name)
    if m:
        return f"{m[1]}.{m[2]}.{m[3]}.{m[4]}"
    m = re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", name)
    if m:
        return f"{m[1]}.{m[2]}.{m[3]}.conv"
    return name  # conv_in, norm_out, conv_out


def _top_diffusers(name: str, levels: int) -> str:
    fixed = {"temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
             "mid_block_1": "mid_block.resnets.0", "mid_block_2": "mid_block.resnets.1",
             "mid_attn_1": "mid_block.attentions.0", "norm_out": "conv_norm_out"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", name)
    if m:
        i = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        part = "resnets" if m[3] == "block" else "attentions"
        return f"{m[1]}_blocks.{i}.{part}.{m[4]}"
    m = re.fullmatch(r"down_(\d+)_downsample", name)
    if m:
        return f"down_blocks.{m[1]}.downsamplers.0.conv"
    m = re.fullmatch(r"up_(\d+)_upsample", name)
    if m:
        return f"up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv"
    return name  # conv_in, conv_out


_STYLES = {
    "pytorch_diffusion": (_top_pd, _SUB_PD),
    "diffusers": (_top_diffusers, _SUB_DIFFUSERS),
    "diffusers_legacy": (_top_diffusers, _SUB_DIFFUSERS_LEGACY),
}


def _flax_shapes(config: dict) -> tuple[unet.UNet, dict]:
    module = unet.build(config)
    r, c = module.resolution, module.in_channels
    shapes = common.flax_param_shapes(module, jax.ShapeDtypeStruct((1, r, r, c), jnp.float32),
                                      jax.ShapeDtypeStruct((1,), jnp.float32))
    return module, shapes


def name_map(config: dict, style: str) -> list[common.MapEntry]:
    """The source-name -> Flax-path map of a U-Net config in one layout.

    Args:
      config: a `diffjax.models.unet` config.
      style: ``"pytorch_diffusion"``, ``"diffusers"`` or ``"diffusers_legacy"``.

    Returns:
      One `common.MapEntry` per Flax parameter.
    """
    top_fn, subs = _STYLES[style]
    levels = len(config["ch_mult"])
    _, shapes = _flax_shapes(config)
    entries = []
    for path, shape in shapes.items():
        parts = path.split("/")  # params/<top>[/<sub>]/<leaf>
        top, leaf = parts[1], parts[-1]
        src = [top_fn(top, levels)]
        if len(parts) == 4:
            src.append(subs.get(parts[2], parts[2]))
        src.append(_LEAF[leaf])
        if leaf == "kernel" and len(shape) == 4:
            transform = "conv"
        elif leaf == "kernel":
            is_attn = len(parts) == 4 and parts[2] in ("q", "k", "v", "proj_out")
            transform = "conv1x1_dense" if (is_attn and style == "pytorch_diffusion") \
                else "dense"
        else:
            transform = "copy"
        entries.append(common.MapEntry(".".join(src), path, transform))
    return entries


def source_shapes(config: dict, style: str) -> dict[str, tuple]:
    """The tensor name -> shape table a checkpoint of `config` holds in one layout.

    The manifest tests compare it with the official full-size file's layout.
    """
    _, shapes = _flax_shapes(config)
    return common.expected_source_shapes(name_map(config, style), shapes)


def _convert(state: dict, config: dict, style: str, what: str) -> dict:
    _, shapes = _flax_shapes(config)
    return common.apply_name_map(state, name_map(config, style), shapes, what)


# ----------------------------------------------------------------------------- diffusers

# diffusers UNet2DModel settings our U-Net implements (Ho et al.'s architecture).
_DIFFUSERS_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "time_embedding_type": "positional",
    "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
    "downsample_type": "conv", "upsample_type": "conv", "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default", "class_embed_type": None, "num_class_embeds": None,
    "add_attention": True, "time_embedding_dim": None,
}


def config_from_diffusers(dcfg: dict) -> dict:
    """Maps a diffusers ``UNet2DModel`` config.json to a `diffjax.models.unet` config.

    Args:
      dcfg: the parsed config.json (missing keys take diffusers' defaults).

    Returns:
      The U-Net config.

    Raises:
      ValueError: the config describes something other than Ho et al.'s U-Net (another
        class, attention heads, time embedding, resampling, ...).
    """
    what = "config.json"
    cls = dcfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"{what}: _class_name {cls!r}; the ddpm-diffusers format reads "
                         "diffusers' UNet2DModel (the unet of a DDPMPipeline)")
    for key, want in _DIFFUSERS_FIXED.items():
        got = dcfg.get(key, want)
        if got != want and not (key == "mid_block_scale_factor" and float(got) == want):
            raise ValueError(f"{what}: {key}={got!r} is not supported (Ho et al.'s U-Net "
                             f"has {want!r})")
    eps = float(dcfg.get("norm_eps", 1e-5))  # diffusers' default when absent
    if abs(eps - 1e-6) > 1e-9:
        raise ValueError(f"{what}: norm_eps={eps:g} is not supported (Ho et al.'s GroupNorm "
                         "eps is 1e-6)")
    boc = [int(c) for c in dcfg.get("block_out_channels", (224, 448, 672, 896))]
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ValueError(f"{what}: block_out_channels {boc} are not multiples of the first")
    levels = len(boc)
    down = list(dcfg.get("down_block_types", ()))
    up = list(dcfg.get("up_block_types", ()))
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"{what}: {len(down)} down_block_types and {len(up)} up_block_types "
                         f"for {levels} block_out_channels")
    size = dcfg.get("sample_size", 32)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    attn = []
    for i, (d, u) in enumerate(zip(down, reversed(up), strict=True)):
        if d not in ("DownBlock2D", "AttnDownBlock2D"):
            raise ValueError(f"{what}: down_block_types[{i}]={d!r} is not supported "
                             "(DownBlock2D or AttnDownBlock2D)")
        has_attn = d == "AttnDownBlock2D"
        if u != ("AttnUpBlock2D" if has_attn else "UpBlock2D"):
            raise ValueError(f"{what}: up_block_types {up} do not mirror down_block_types "
                             f"{down} as Ho et al.'s U-Net does")
        if has_attn:
            attn.append(size // 2 ** i)
    groups = int(dcfg.get("norm_num_groups", 32))
    attn_groups = dcfg.get("attn_norm_num_groups")
    if attn_groups is not None and int(attn_groups) != groups:
        raise ValueError(f"{what}: attn_norm_num_groups={attn_groups} differs from "
                         f"norm_num_groups={groups}: not supported")
    # diffusers: attention_head_dim null means one head per block (Ho et al.); a number is
    # the channels per head (UNet2DModel's default is 8).
    head_dim = dcfg.get("attention_head_dim", 8)
    if head_dim is not None:
        head_dim = int(head_dim)
        attn_ch = [boc[i] for i, d in enumerate(down) if d.startswith("Attn")] + [boc[-1]]
        if all(c == head_dim for c in attn_ch):
            head_dim = None
        elif any(c % head_dim for c in attn_ch):
            raise ValueError(f"{what}: attention_head_dim={head_dim} does not divide the "
                             f"attention channel counts {attn_ch}")
    return {"resolution": size, "in_channels": int(dcfg.get("in_channels", 3)),
            "out_channels": int(dcfg.get("out_channels", 3)), "ch": ch,
            "ch_mult": [c // ch for c in boc],
            "num_res_blocks": int(dcfg.get("layers_per_block", 2)),
            "attn_resolutions": attn, "dropout": float(dcfg.get("dropout", 0.0)),
            "resamp_with_conv": True, "num_groups": groups, "dtype": "float32",
            "attn_head_dim": head_dim}


def _diffusers_schedule(model_dir: pathlib.Path) -> tuple[dict, str | None]:
    for cand in (model_dir / "scheduler_config.json",
                 model_dir.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            s = common.read_json(cand)
            kind = s.get("beta_schedule", "linear")
            if kind != "linear":
                raise ValueError(f"{cand}: beta_schedule {kind!r} is not supported for "
                                 "ddpm-diffusers (linear only)")
            return ({"name": "linear",
                     "num_timesteps": int(s.get("num_train_timesteps", 1000)),
                     "beta_start": float(s.get("beta_start", 1e-4)),
                     "beta_end": float(s.get("beta_end", 2e-2))}, str(cand))
    return dict(DDPM_SCHEDULE), None


def _diffusers_files(src: str) -> tuple[pathlib.Path, pathlib.Path]:
    p = pathlib.Path(src).expanduser()
    if p.is_dir():
        weights = next((p / n for n in _DIFFUSERS_WEIGHTS if (p / n).is_file()), None)
        if weights is None and (p / "unet").is_dir():  # a whole DDPMPipeline directory
            return _diffusers_files(str(p / "unet"))
        if weights is None:
            raise FileNotFoundError(
                f"{p}: no {' or '.join(_DIFFUSERS_WEIGHTS)} inside; pass the directory that "
                "holds config.json and the weights (google/ddpm-cifar10-32's files)")
        folder = p
    else:
        weights, folder = p, p.parent
    return weights, folder


def convert_diffusers(src: str, model_config: dict | None = None) -> Converted:
    """Converts a diffusers ``UNet2DModel`` (google/ddpm-cifar10-32) to a ``ddpm_unet``.

    Args:
      src: the directory with ``config.json`` and ``diffusion_pytorch_model.safetensors``
        (or ``.bin``), a DDPMPipeline directory (with ``unet/``), or the weights file with
        ``config.json`` beside it.
      model_config: a diffusers config.json dict to use instead of the one beside the
        weights.

    Returns:
      A `Converted` with kind ``ddpm_unet``, the U-Net config, ``{"params": ...}``, the
      linear schedule (from ``scheduler_config.json`` when present, else DDPM's 1000 steps,
      1e-4..2e-2) and meta with the diffusers config.
    """
    weights, folder = _diffusers_files(src)
    if model_config is None:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder}: no config.json beside {weights.name}; download the model's "
                "config.json too, or pass it with --model_config")
        model_config = common.read_json(folder / "config.json")
    config = config_from_diffusers(model_config)
    state = common.strip_prefix(common.load_state_dict(str(weights)), ("module.",))
    style = "diffusers_legacy" if any(".query." in k or ".proj_attn." in k for k in state) \
        else "diffusers"
    variables = _convert(state, config, style,
                         "the ddpm-diffusers architecture (UNet2DModel of config.json)")
    schedule, sched_file = _diffusers_schedule(folder)
    meta = {"diffusers_config": model_config, "attention_names": style,
            "scheduler_config": sched_file}
    return Converted(kind="ddpm_unet", config=config, variables=variables, schedule=schedule,
                     meta=meta)


# ----------------------------------------------------------------------------- pytorch_diffusion

_PD_KEYS = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
            "resamp_with_conv", "in_channels", "resolution")
_PD_CIFAR10 = {"ch": 128, "out_ch": 3, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2,
               "attn_resolutions": [16], "dropout": 0.1, "resamp_with_conv": True,
               "in_channels": 3, "resolution": 32}


def config_from_pytorch_diffusion(model_config: dict | None) -> tuple[dict, dict]:
    """Maps pytorch_diffusion / DDIM terms to a U-Net config and a schedule.

    Args:
      model_config: None (Ho et al.'s CIFAR-10 model), a flat dict of pytorch_diffusion's
        ``Model`` arguments (``ch, out_ch, ch_mult, num_res_blocks, attn_resolutions,
        dropout, resamp_with_conv, in_channels, resolution``; missing ones take the CIFAR-10
        values), or the DDIM repository's nested config (``{"model": {...}, "data":
        {"image_size", "channels"}, "diffusion": {...}}``).

    Returns:
      ``(unet_config, schedule)``.
    """
    cfg = dict(_PD_CIFAR10)
    schedule = dict(DDPM_SCHEDULE)
    if model_config:
        if not isinstance(model_config, dict):
            raise ValueError(f"model_config: expected a dict; got {type(model_config).__name__}")
        mc = dict(model_config)
        if isinstance(mc.get("model"), dict):  # DDIM-style nested config
            data, diff = mc.get("data", {}), mc.get("diffusion", {})
            mc = dict(mc["model"])
            if "image_size" in data:
                mc["resolution"] = data["image_size"]
            if "channels" in data:
                mc.setdefault("in_channels", data["channels"])
            if diff.get("beta_schedule", "linear") != "linear":
                raise ValueError(f"model_config: beta_schedule {diff['beta_schedule']!r} is not "
                                 "supported (linear only)")
            schedule = {"name": "linear",
                        "num_timesteps": int(diff.get("num_diffusion_timesteps", 1000)),
                        "beta_start": float(diff.get("beta_start", 1e-4)),
                        "beta_end": float(diff.get("beta_end", 2e-2))}
            for k in ("type", "var_type", "ema_rate", "ema"):  # training-only settings
                mc.pop(k, None)
        unknown = sorted(set(mc) - set(_PD_KEYS))
        if unknown:
            raise ValueError(f"model_config: unknown keys {unknown}; expected "
                             f"pytorch_diffusion's {', '.join(_PD_KEYS)}")
        cfg.update(mc)
    config = {"resolution": int(cfg["resolution"]), "in_channels": int(cfg["in_channels"]),
              "out_channels": int(cfg["out_ch"]), "ch": int(cfg["ch"]),
              "ch_mult": [int(m) for m in cfg["ch_mult"]],
              "num_res_blocks": int(cfg["num_res_blocks"]),
              "attn_resolutions": [int(r) for r in cfg["attn_resolutions"]],
              "dropout": float(cfg["dropout"]), "resamp_with_conv": bool(cfg["resamp_with_conv"]),
              "num_groups": 32, "dtype": "float32"}
    return unet.resolve_config(config), schedule


def convert_pytorch_diffusion(src: str, model_config: dict | None = None) -> Converted:
    """Converts pytorch_diffusion's ``model-790000.ckpt`` layout to a ``ddpm_unet``.

    Args:
      src: the ``.ckpt`` file (a state_dict pickle, read with ``weights_only=True``) or a
        safetensors file with the same names.
      model_config: see `config_from_pytorch_diffusion`; None is the CIFAR-10 model.

    Returns:
      A `Converted` with kind ``ddpm_unet`` and DDPM's linear schedule.
    """
    config, schedule = config_from_pytorch_diffusion(model_config)
    state = common.strip_prefix(common.load_state_dict(src), ("module.", "state_dict.",
                                                              "model."))
    variables = _convert(state, config, "pytorch_diffusion",
                         "the ddpm-pytorch-diffusion architecture "
                         f"(ch={config['ch']}, ch_mult={config['ch_mult']}, "
                         f"num_res_blocks={config['num_res_blocks']})")
    return Converted(kind="ddpm_unet", config=config, variables=variables, schedule=schedule,
                     meta={"pytorch_diffusion_config": model_config or dict(_PD_CIFAR10)})
