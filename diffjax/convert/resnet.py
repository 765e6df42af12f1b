"""torchvision ResNet-50 checkpoints -> `diffjax.models.resnet` (format ``torchvision-resnet50``).

The official weights are torchvision's ``resnet50-0676ba61.pth`` (``IMAGENET1K_V1``) or
``resnet50-11ad3fa6.pth`` (``IMAGENET1K_V2``), published at
https://download.pytorch.org/models/ and listed in torchvision's ``ResNet50_Weights``: a
plain ``state_dict`` pickle with the names ``conv1``, ``bn1``,
``layer{1..4}.{i}.conv{1,2,3}``, ``layer{1..4}.{i}.bn{1,2,3}``,
``layer{1..4}.0.downsample.{0,1}``, ``fc``.

    python -m experiments.convert_checkpoint --format=torchvision-resnet50 \
        --src=resnet50-0676ba61.pth --out=DIR

BatchNorm ``running_mean``/``running_var`` go to ``batch_stats`` (inference mode);
``num_batches_tracked`` is ignored. A DataParallel ``module.`` or ``state_dict.`` wrapper is
stripped; ``.safetensors`` copies convert without PyTorch. `--model_config` takes the
keys of `diffjax.models.resnet.resnet50_config` (``layers``, ``num_classes``, ...).

Not verified here against torchvision itself (it is not installable in this
environment); the tests check the layout (names, shapes, the 25,557,032-parameter count)
and numerical agreement with a PyTorch re-statement of torchvision's ``Bottleneck``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from diffjax.convert import Converted, common
from diffjax.models import resnet

__all__ = ["convert", "name_map", "source_shapes", "config_from_model_config"]

_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
         ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
         ("batch_stats", "var"): "running_var"}


def config_from_model_config(model_config: dict | None) -> dict:
    """The `resnet50` config: torchvision's ResNet-50 updated with `model_config`."""
    config = resnet.resnet50_config()
    if model_config:
        if not isinstance(model_config, dict):
            raise ValueError(f"model_config: expected a dict; got {type(model_config).__name__}")
        config.update(model_config)
    resnet.build(config)  # validates (unknown keys, bad values)
    return config


def _flax_shapes(config: dict) -> dict:
    module = resnet.build(config)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return common.flax_param_shapes(module, x)


def _source_name(path: str) -> str:
    parts = path.split("/")
    collection, leaf = parts[0], parts[-1]
    mods = []
    for m in parts[1:-1]:
        g = re.fullmatch(r"(layer\d+|downsample)_(\d+)", m)
        mods.append(f"{g[1]}.{g[2]}" if g else m)
    return ".".join(mods + [_LEAF[(collection, leaf)]])


def name_map(config: dict) -> list[common.MapEntry]:
    """The torchvision-name -> Flax-path map of a config (one entry per variable)."""
    entries = []
    for path, shape in _flax_shapes(config).items():
        transform = "copy"
        if path.endswith("/kernel"):
            transform = "conv" if len(shape) == 4 else "dense"
        entries.append(common.MapEntry(_source_name(path), path, transform))
    return entries


def source_shapes(config: dict | None = None) -> dict[str, tuple]:
    """torchvision's state_dict names and shapes (without ``num_batches_tracked``).

    Args:
      config: a `resnet50` config; None is torchvision's ResNet-50.
    """
    config = config_from_model_config(config)
    return common.expected_source_shapes(name_map(config), _flax_shapes(config))


def convert(src: str, model_config: dict | None = None) -> Converted:
    """Converts a torchvision ResNet-50 state_dict into a ``resnet50`` model.

    Args:
      src: ``resnet50-*.pth`` (read with ``torch.load(weights_only=True)``) or safetensors.
      model_config: overrides of `diffjax.models.resnet.resnet50_config`.

    Returns:
      A `Converted` with kind ``resnet50`` and ``{"params", "batch_stats"}``.

    Raises:
      ValueError: HTML page, truncated file, or tensors of another architecture (listed).
    """
    config = config_from_model_config(model_config)
    state = common.strip_prefix(common.load_state_dict(src), ("state_dict.", "module."))
    what = (f"the torchvision ResNet architecture (layers {config['layers']}, "
            f"{config['num_classes']} classes)")
    variables = common.apply_name_map(state, name_map(config), _flax_shapes(config), what,
                                      ignore=lambda n: n.endswith("num_batches_tracked"))
    return Converted(kind="resnet50", config=config, variables=variables, schedule=None,
                     meta={"reference": "torchvision.models.resnet50",
                           "normalisation": {"mean": config["mean"], "std": config["std"]}})
