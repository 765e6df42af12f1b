"""RobustBench WideResNet checkpoints -> `diffjax.models.classifiers.WideResNet` (kind ``wrn``).

RobustBench's CIFAR-10 ``Standard`` model (WRN-28-10, inputs in [0, 1], no normalisation)
is saved as ``{'state_dict': {'module.conv1.weight': ...}}``; bare state_dicts and names
without ``module.`` load too. BatchNorm's ``running_mean``/``running_var`` go to the
``batch_stats`` collection (inference mode); ``num_batches_tracked`` is ignored, and so
is TRADES' unused ``sub_block1`` (never called in ``forward``) when a file carries it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from diffjax.convert import Converted, common
from diffjax.models import classifiers

__all__ = ["convert", "config_from_robustbench", "name_map", "source_shapes"]

_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
         ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
         ("batch_stats", "var"): "running_var"}
_RB_KEYS = ("depth", "widen_factor", "num_classes", "in_channels", "mean", "std", "dropout")


def config_from_robustbench(model_config: dict | None) -> dict:
    """A `wrn` config from RobustBench's ``WideResNet`` arguments (default WRN-28-10).

    Args:
      model_config: None, or a dict with ``depth``, ``widen_factor``, ``num_classes``
        (also accepted: ``in_channels``, ``mean``/``std`` for [0, 1] normalisation,
        ``dropout``).

    Returns:
      The `diffjax.models.classifiers` WRN config.
    """
    config = classifiers.wrn_28_10_config()
    if model_config:
        if not isinstance(model_config, dict):
            raise ValueError(f"model_config: expected a dict; got {type(model_config).__name__}")
        mc = dict(model_config)
        if "dropRate" in mc:
            mc["dropout"] = mc.pop("dropRate")
        unknown = sorted(set(mc) - set(_RB_KEYS))
        if unknown:
            raise ValueError(f"model_config: unknown keys {unknown}; expected RobustBench "
                             f"WideResNet's {', '.join(_RB_KEYS)}")
        config.update(mc)
    classifiers.build_wrn(config)  # validates
    return config


def _flax_shapes(config: dict) -> dict:
    module = classifiers.build_wrn(config)
    x = jax.ShapeDtypeStruct((1, 32, 32, module.in_channels), jnp.float32)
    return common.flax_param_shapes(module, x)


def _source_name(path: str) -> str:
    parts = path.split("/")
    collection, leaf = parts[0], parts[-1]
    mods = []
    for m in parts[1:-1]:
        g = re.fullmatch(r"block(\d+)_layer_(\d+)", m)
        mods.append(f"block{g[1]}.layer.{g[2]}" if g else m)
    return ".".join(mods + [_LEAF[(collection, leaf)]])


def name_map(config: dict) -> list[common.MapEntry]:
    """The RobustBench-name -> Flax-path map of a WRN config (one entry per variable)."""
    entries = []
    for path, shape in _flax_shapes(config).items():
        leaf = path.split("/")[-1]
        transform = "copy"
        if leaf == "kernel":
            transform = "conv" if len(shape) == 4 else "dense"
        entries.append(common.MapEntry(_source_name(path), path, transform))
    return entries


def source_shapes(config: dict) -> dict[str, tuple]:
    """The tensor name -> shape table (without ``num_batches_tracked``) of a WRN config."""
    return common.expected_source_shapes(name_map(config), _flax_shapes(config))


def _ignored(name: str) -> bool:
    return name.endswith("num_batches_tracked") or name.startswith("sub_block1.")


def convert(src: str, model_config: dict | None = None) -> Converted:
    """Converts a RobustBench WideResNet checkpoint (``Standard.pt``) to a ``wrn`` model.

    Args:
      src: the ``.pt`` file (read with ``torch.load(weights_only=True)``) or safetensors.
      model_config: see `config_from_robustbench`; None is WRN-28-10 with 10 classes.

    Returns:
      A `Converted` with kind ``wrn`` and ``{"params", "batch_stats"}``.
    """
    config = config_from_robustbench(model_config)
    state = common.strip_prefix(common.load_state_dict(src), ("state_dict.", "module.",
                                                              "model."))
    what = (f"the robustbench-wrn architecture (WRN-{config['depth']}-"
            f"{config['widen_factor']}, {config['num_classes']} classes)")
    variables = common.apply_name_map(state, name_map(config), _flax_shapes(config), what,
                                      ignore=_ignored)
    return Converted(kind="wrn", config=config, variables=variables, schedule=None,
                     meta={"robustbench_args": model_config or {"depth": 28,
                                                                "widen_factor": 10,
                                                                "num_classes": 10}})
