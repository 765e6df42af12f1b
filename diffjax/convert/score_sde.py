"""score_sde's NCSN++/DDPM++ checkpoints (PyTorch `checkpoint_8.pth`, Flax msgpack) -> diffjax.

Two official files hold the `vp/cifar10_ddpmpp_deep_continuous` model that DiffPure uses:

- score_sde_pytorch's `checkpoint_8.pth`: ``{'model': DataParallel state_dict ('module.'
  prefix), 'ema': {'decay', 'num_updates', 'shadow_params'}, 'optimizer', 'step'}``.
  We use the EMA weights (what DiffPure and score_sde sample with). `shadow_params` is an
  *unnamed* list in `model.parameters()` order; `name_map(config)` lists the parameters in
  exactly that order (derived from the architecture: `all_modules` in construction order,
  each module's parameters in registration order), so the list is matched by position,
  with its length and every shape checked. The file's `model` state_dict, when present, is
  checked by name first, so a file of another architecture is reported tensor by tensor.
  A plain state_dict (a `.safetensors` or `.pth` of `model.state_dict()`, with or without
  `module.`) is accepted too and used as is.
- score_sde's (Flax) msgpack checkpoint (`checkpoint_N`): ``{'optimizer', 'params_ema',
  'model_state', 'step', 'lr', 'ema_rate', 'rng'}``; we use `params_ema`. Our Flax module
  keeps score_sde's parameter names, so the tree is checked name by name and copied.

Loading never executes code: `torch.load(weights_only=True)` / safetensors via
`diffjax.convert.common`, and `flax.serialization.msgpack_restore` for msgpack, which
decodes plain data only.

`model_config` overrides the full deep config in score_sde's own `config.model` terms
(plus `image_size`, `num_channels`, `centered`); see `diffjax.models.ncsnpp`.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.convert import Converted, common
from diffjax.models import ncsnpp

__all__ = [
    "convert_pytorch",
    "convert_flax",
    "name_map",
    "flax_shapes",
    "schedule_of",
]

_WHAT = "the score_sde NCSN++/DDPM++ architecture"
# Buffers in score_sde_pytorch's state_dict that are not parameters (`sigmas`: the SMLD
# noise levels, unused by the positional-embedding VP model).
_BUFFERS = ("sigmas",)
# Submodules of a block in their PyTorch registration (= `parameters()`) order.
_SUBMODULES = {
    "resblock": ("GroupNorm_0", "Conv_0", "Dense_0", "GroupNorm_1", "Conv_1", "Conv_2"),
    "attn": ("GroupNorm_0", "NIN_0", "NIN_1", "NIN_2", "NIN_3"),
}
# Flax leaf name -> (PyTorch leaf name, transform) per layer type, in PyTorch order.
_LEAVES = {
    "Conv": (("kernel", "weight", "conv"), ("bias", "bias", "copy")),
    "Dense": (("kernel", "weight", "dense"), ("bias", "bias", "copy")),
    "GroupNorm": (("scale", "weight", "copy"), ("bias", "bias", "copy")),
    "NIN": (("W", "W", "copy"), ("b", "b", "copy")),
}


def flax_shapes(config: dict) -> dict[str, tuple]:
    """Every Flax variable of the model, ``"params/..." -> shape`` (via `jax.eval_shape`).

    Args:
      config: a (partial) ncsnpp config dict.

    Returns:
      The flat path -> shape table; nothing is allocated, so the full model costs nothing.
    """
    cfg = ncsnpp.validate_config(config)
    module = ncsnpp.build(cfg)
    size, ch = cfg["image_size"], cfg["num_channels"]
    x = jax.ShapeDtypeStruct((1, size, size, ch), jnp.float32)
    labels = jax.ShapeDtypeStruct((1,), jnp.float32)
    return common.flax_param_shapes(module, x, labels)


def name_map(config: dict, shapes: dict | None = None) -> list[common.MapEntry]:
    """PyTorch `NCSNpp` parameter names -> Flax paths, in `model.parameters()` order.

    Args:
      config: a (partial) ncsnpp config dict.
      shapes: `flax_shapes(config)`, when already computed.

    Returns:
      One `common.MapEntry` per PyTorch parameter (``all_modules.{i}.<sub>.<leaf>`` ->
      ``params/<FlaxName>/<sub>/<leaf>``), in the order of `model.parameters()`, which is
      the order of the EMA's unnamed `shadow_params` list.
    """
    shapes = flax_shapes(config) if shapes is None else shapes
    entries = []
    for idx, (flax_name, kind) in enumerate(ncsnpp.module_layout(config)):
        subs = _SUBMODULES.get(kind, (None,))
        for sub in subs:
            layer = (sub or flax_name).rsplit("_", 1)[0]
            for flax_leaf, torch_leaf, transform in _LEAVES[layer]:
                src = f"all_modules.{idx}." + (f"{sub}." if sub else "") + torch_leaf
                dst = f"params/{flax_name}/" + (f"{sub}/" if sub else "") + flax_leaf
                if dst in shapes:  # Dense_0 (conditional) and Conv_2 (shape change) may not be
                    entries.append(common.MapEntry(src, dst, transform))
    return entries


def schedule_of(config: dict) -> dict:
    """The discrete DDPM schedule of a VP model: betas linear in `[beta_min, beta_max] / N`.

    score_sde's `get_ddpm_params`: 1000 steps from `beta_min / num_scales` to
    `beta_max / num_scales` (1e-4 to 2e-2 for the CIFAR-10 VP configs).
    """
    cfg = ncsnpp.validate_config(config)
    n = float(cfg["num_scales"])
    return {"name": "linear", "num_timesteps": 1000,
            "beta_start": float(cfg["beta_min"]) / n, "beta_end": float(cfg["beta_max"]) / n}


def _ema_tensors(state: dict) -> list | None:
    prefix = "ema.shadow_params."
    idx = sorted(int(k[len(prefix):]) for k in state if k.startswith(prefix))
    if not idx:
        return None
    if idx != list(range(len(idx))):
        raise ValueError("ema.shadow_params: the list has gaps; the file is corrupt")
    return [state[f"{prefix}{i}"] for i in idx]


def _scalar(value):
    try:
        return float(np.asarray(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def convert_pytorch(src: str, model_config: dict | None = None) -> Converted:
    """Converts score_sde_pytorch's `checkpoint_8.pth` (EMA weights) or a state_dict.

    Args:
      src: the `.pth` checkpoint (``{'model', 'ema', 'step', ...}``), or a `.safetensors` /
        `.pth` holding `NCSNpp.state_dict()` (``module.`` prefixes allowed).
      model_config: score_sde `config.model` fields overriding the full deep CIFAR-10
        config (e.g. ``{"nf": 16, "num_res_blocks": 2}``); None for the official model.

    Returns:
      `Converted(kind="ncsnpp", config, variables={"params": ...}, schedule, meta)`.

    Raises:
      ValueError: another architecture (missing/unexpected/mismatched tensors, or an EMA
        list of the wrong length or shapes), a truncated or HTML file (via `common`).
    """
    cfg = ncsnpp.validate_config(model_config)
    state = common.load_state_dict(src)  # a bad file fails here, before any tracing
    shapes = flax_shapes(cfg)
    entries = name_map(cfg, shapes)
    ema = _ema_tensors(state)
    meta = {"reference_config": cfg}
    if ema is None:
        model_sd = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if model_sd and any(k.startswith("module.") for k in model_sd):
            # A training checkpoint without its EMA: fall back to the raw weights, say so.
            sd, meta["weights"] = common.strip_prefix(model_sd), "model (no EMA in the file)"
        else:
            sd, meta["weights"] = common.strip_prefix(state), "state_dict"
        variables = common.apply_name_map(sd, entries, shapes, _WHAT,
                                          ignore=lambda k: k in _BUFFERS)
    else:
        model_sd = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if model_sd:  # check the architecture by name before trusting the EMA's positions
            model_sd = common.strip_prefix(model_sd)
            expected = common.expected_source_shapes(entries, shapes)
            common.check_names_and_shapes(
                expected, {k: v for k, v in model_sd.items() if k not in _BUFFERS}, _WHAT)
        if len(ema) != len(entries):
            raise ValueError(
                f"checkpoint does not match {_WHAT}: ema.shadow_params holds {len(ema)} "
                f"tensors, the model has {len(entries)} parameters; is --format right, or "
                "does the file need --model_config?")
        named = {e.source: t for e, t in zip(entries, ema, strict=True)}
        try:
            variables = common.apply_name_map(named, entries, shapes, _WHAT)
        except ValueError as e:
            raise ValueError(f"ema.shadow_params (matched by position to model.parameters()):"
                             f" {e}") from e
        meta.update(weights="ema", ema_decay=_scalar(state.get("ema.decay")),
                    ema_num_updates=_scalar(state.get("ema.num_updates")),
                    step=_scalar(state.get("step")))
    return Converted(kind="ncsnpp", config=cfg, variables=variables,
                     schedule=schedule_of(cfg), meta=meta)


def _read_msgpack(path: pathlib.Path) -> dict:
    from flax import serialization

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass the checkpoint with --src")
    with open(path, "rb") as f:
        head = f.read(512)
    common.check_not_html_or_lfs(path, head)
    data = path.read_bytes()
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types on truncated/garbage input
        raise ValueError(f"{path}: not a readable Flax msgpack checkpoint: the file is "
                         f"truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); download "
                         "it again") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a msgpack dict (a score_sde checkpoint state); got "
                         f"{type(state).__name__}")
    return state


def convert_flax(src: str, model_config: dict | None = None) -> Converted:
    """Converts score_sde's Flax msgpack checkpoint (its `params_ema`).

    Args:
      src: a `checkpoint_N` file written by score_sde's `flax.training.checkpoints`
        (``{'optimizer', 'params_ema', 'model_state', 'step', ...}``); a msgpack file of the
        bare parameter tree is accepted too.
      model_config: score_sde `config.model` fields overriding the full deep config.

    Returns:
      `Converted(kind="ncsnpp", config, variables={"params": ...}, schedule, meta)`.

    Raises:
      ValueError: no `params_ema`, another architecture (names/shapes listed), a
        truncated or HTML file.
    """
    cfg = ncsnpp.validate_config(model_config)
    path = pathlib.Path(src).expanduser()
    state = _read_msgpack(path)
    shapes = flax_shapes(cfg)
    if "params_ema" in state:
        params = state["params_ema"]
    elif "Conv_0" in state:  # a bare parameter tree
        params = state
    else:
        raise ValueError(f"{path}: no 'params_ema' in the checkpoint (top-level keys: "
                         f"{sorted(state)[:8]}); expected a score_sde Flax checkpoint")
    flat = {f"params/{k}": np.asarray(v) for k, v in common.flatten(params).items()}
    common.check_names_and_shapes(shapes, flat, _WHAT)
    variables = common.unflatten({k: v.astype(np.float32) for k, v in flat.items()})
    meta = {"reference_config": cfg, "weights": "params_ema", "step": _scalar(state.get("step")),
            "ema_rate": _scalar(state.get("ema_rate"))}
    return Converted(kind="ncsnpp", config=cfg, variables=variables,
                     schedule=schedule_of(cfg), meta=meta)
