"""Converter: openai/guided-diffusion `UNetModel` -> diffjax `guided_unet` (`guided-diffusion`).

The official file is `256x256_diffusion_uncond.pt` (a plain `state_dict` pickle of
`UNetModel`: `time_embed.{0,2}`, `input_blocks.{i}.{j}...`, `middle_block.{j}...`,
`output_blocks.{i}.{j}...`, `out.{0,2}`), published with guided-diffusion's README
(https://github.com/openai/guided-diffusion, "Download pre-trained models"). A
`.safetensors` copy of the same state_dict converts too, and needs no PyTorch.

    python -m experiments.convert_checkpoint --format=guided-diffusion \
        --src=256x256_diffusion_uncond.pt --out=DIR

Other sizes take `--model_config=FILE.json` with guided-diffusion's `create_model`
arguments (e.g. the README's `MODEL_FLAGS`), overriding the 256x256-uncond values. Two
diffusion flags are understood there as well: `diffusion_steps` (default 1000) and
`noise_schedule` (`"linear"`, the default, or `"cosine"`); they set the recorded schedule
and are not part of the architecture.

The schedule recorded with the model is guided-diffusion's `get_named_beta_schedule`:
"linear" is `linspace(1e-4 * 1000 / T, 2e-2 * 1000 / T, T)`, i.e. the standard DDPM linear
schedule for T = 1000, which is how the 256x256 model was trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from diffjax import _checks
from diffjax.convert import Converted, common
from diffjax.models import guided

__all__ = ["convert", "name_table", "torch_name", "DIFFUSION_KEYS"]

# Flags of create_model_and_diffusion that describe the diffusion, not the network.
DIFFUSION_KEYS = ("diffusion_steps", "noise_schedule")


def _split_config(model_config: dict | None) -> tuple[dict, dict]:
    if model_config is None:
        model_config = {}
    if not isinstance(model_config, dict):
        _checks.fail("model_config", "a dict of guided-diffusion create_model arguments",
                     type(model_config).__name__)
    diffusion = {k: model_config[k] for k in DIFFUSION_KEYS if k in model_config}
    arch = {k: v for k, v in model_config.items() if k not in DIFFUSION_KEYS}
    cfg = {**guided.imagenet256_uncond_config(), **arch}
    resolved = guided.resolve_config(cfg)  # raises on unknown keys / bad values
    config = {k: resolved[k] for k in guided.imagenet256_uncond_config()}
    return config, diffusion


def _schedule(diffusion: dict) -> dict:
    steps = _checks.check_int(diffusion.get("diffusion_steps", 1000),
                              "model_config['diffusion_steps']", lo=1)
    name = _checks.check_choice(diffusion.get("noise_schedule", "linear"),
                                "model_config['noise_schedule']", ("linear", "cosine"))
    if name == "cosine":
        return {"name": "cosine", "num_timesteps": steps}
    scale = 1000.0 / steps
    return {"name": "linear", "num_timesteps": steps, "beta_start": scale * 1e-4,
            "beta_end": scale * 2e-2}


# Flax submodule -> PyTorch submodule, inside a ResBlock.
_RES_NAMES = {"in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb_dense": "emb_layers.1",
              "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection"}
_TOP_NAMES = {"out_norm": "out.0", "out_conv": "out.2"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_SEQUENTIALS = ("input_blocks", "output_blocks", "middle_block", "time_embed")
# Flax Dense layers that are 1-D convolutions (weight [out, in, 1]) in PyTorch.
_CONV1D = ("qkv", "proj_out")


def torch_name(path: Sequence[str]) -> str:
    """The PyTorch state_dict name of a Flax parameter path of `GuidedUNet`.

    Example: ``("input_blocks_1_0", "in_conv", "kernel")`` ->
    ``"input_blocks.1.0.in_layers.2.weight"``.
    """
    top, *mid, leaf = path
    if top in _TOP_NAMES:
        parts = [_TOP_NAMES[top]]
    else:
        prefix = next(p for p in _SEQUENTIALS if top.startswith(p + "_"))
        parts = [prefix + "." + top[len(prefix) + 1:].replace("_", ".")]
    parts += [_RES_NAMES.get(m, m) for m in mid]
    return ".".join(parts + [_LEAF_NAMES[leaf]])


def _torch_shape(path: Sequence[str], shape: tuple) -> tuple:
    if path[-1] != "kernel":
        return tuple(shape)
    if len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-2] in _CONV1D:  # Dense [in, out] <- Conv1d [out, in, 1]
        return (shape[1], shape[0], 1)
    return (shape[1], shape[0])  # Dense [in, out] <- Linear [out, in]


def _from_torch(path: Sequence[str], tensor) -> np.ndarray:
    if path[-1] != "kernel":
        out = np.asarray(tensor)
    elif np.ndim(tensor) == 4:
        out = common.conv_kernel(tensor)
    elif np.ndim(tensor) == 3:
        out = common.conv1x1_dense_kernel(tensor)
    else:
        out = common.dense_kernel(tensor)
    return np.asarray(out, dtype=np.float32)


def _param_shapes(config: dict) -> dict[tuple[str, ...], tuple]:
    shapes = guided.param_shapes(guided.build(config), config)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in kp): tuple(leaf.shape) for kp, leaf in flat}



def name_table(config: dict) -> dict[str, tuple]:
    """The PyTorch names and shapes a checkpoint of `config` must hold (allocation-free).

    Args:
      config: `create_model` arguments (missing ones take the 256x256-uncond values).

    Returns:
      `{state_dict name: shape}`; for the default config, the 552,814,086-parameter layout
      of `256x256_diffusion_uncond.pt`.
    """
    config, _ = _split_config(config)
    return {torch_name(p): _torch_shape(p, s) for p, s in _param_shapes(config).items()}


def _describe(config: dict) -> str:
    keys = ("image_size", "num_channels", "num_res_blocks", "channel_mult",
            "attention_resolutions", "num_head_channels", "learn_sigma")
    return ("the guided-diffusion UNetModel architecture ("
            + ", ".join(f"{k}={config[k]!r}" for k in keys) + ")")


def convert(src: str, model_config: dict | None = None) -> Converted:
    """Converts a guided-diffusion `UNetModel` state_dict into a `guided_unet` model.

    Args:
      src: a `.pt` state_dict pickle (read with `torch.load(weights_only=True)`; a
        `{"state_dict": ...}` or DataParallel `module.` wrapper is stripped) or a
        `.safetensors` file of the same names.
      model_config: `create_model` arguments overriding the 256x256-uncond defaults
        (`guided.imagenet256_uncond_config()`), plus optionally `diffusion_steps` and
        `noise_schedule` for the recorded schedule.

    Returns:
      `Converted(kind="guided_unet", config, variables={"params": ...} (float32 numpy),
      schedule (linear, 1000 steps by default), meta)`.

    Raises:
      ValueError: an HTML page or truncated file (from `common.load_state_dict`), or a
        file whose tensors do not match the architecture (missing, unexpected and
        mismatched tensors are listed with their shapes).
    """
    config, diffusion = _split_config(model_config)
    schedule = _schedule(diffusion)
    state = common.strip_prefix(common.load_state_dict(src))
    state = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    what = _describe(config)
    shapes = _param_shapes(config)
    expected = {torch_name(p): _torch_shape(p, s) for p, s in shapes.items()}
    common.check_names_and_shapes(expected, state, what)
    flat = {}
    for path, shape in shapes.items():
        value = _from_torch(path, state[torch_name(path)])
        if value.shape != shape:  # cannot happen once the table matched; guard the mapping
            raise ValueError(f"{what}: {torch_name(path)} converts to {value.shape}, but "
                             f"params/{'/'.join(path)} has shape {shape}")
        flat["/".join(("params",) + path)] = value
    variables = common.unflatten(flat)
    n = int(sum(v.size for v in flat.values()))
    meta = {"reference": "openai/guided-diffusion UNetModel (guided_diffusion/unet.py)",
            "create_model_args": config, "num_params": n,
            "output_channels": "0-2 eps, 3-5 variance interpolation v" if config["learn_sigma"]
            else "0-2 eps"}
    return Converted(kind="guided_unet", config=config, variables=variables,
                     schedule=schedule, meta=meta)
