"""pytorch-fid's Inception weights -> `diffjax.models.fid_inception` (format ``fid-inception``).

The standard FID network's weights are pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
(a port of TensorFlow's ``inception-2015-12-05`` graph used by the original FID code),
published at
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth.
Download it once by hand; nothing is downloaded at run time:

    python -m experiments.convert_checkpoint --format=fid-inception \
        --src=pt_inception-2015-12-05-6726825d.pth --out=DIR

and use it as ``diffjax.metrics.fid(diffjax.pretrained.load(DIR).fn, images1, images2)``.

The file is the plain ``state_dict`` of torchvision's ``Inception3`` (``aux_logits=False``,
1008 classes) with pytorch-fid's FID blocks: every ``BasicConv2d`` stores
``<block>.conv.weight`` (no bias) and ``<block>.bn.{weight,bias,running_mean,running_var}``
(plus ``num_batches_tracked`` where the saving PyTorch had it), e.g.
``Conv2d_1a_3x3.conv.weight`` ``(32, 3, 3, 3)``, ``Mixed_5b.branch1x1.bn.running_var``
``(64,)``, ..., ``Mixed_7c.branch_pool.conv.weight`` ``(192, 2048, 1, 1)``, and
``fc.{weight,bias}`` ``(1008, 2048)``/``(1008,)``. The FID blocks (FIDInceptionA/C/E_1/E_2)
differ from torchvision's only in their pooling, which has no weights; the model implements
it (see `diffjax.models.fid_inception`). ``fc`` is not used by FID and is dropped (when
present it must have the FID network's 1008 classes: torchvision's own ImageNet Inception,
1000 classes and ``AuxLogits``, gives other features and is rejected).

BatchNorm ``running_mean``/``running_var`` go to ``batch_stats`` (inference mode). A
DataParallel ``module.`` or ``state_dict.`` wrapper is stripped; ``.safetensors`` copies
convert without PyTorch. 21,785,568 parameters are converted (23,850,960 with ``fc``).

Verified against pytorch-fid 0.3.0 itself (torchvision 0.29.1) with random weights in the
full-size layout: ``tests/test_fid_inception.py`` with the data made by
``experiments/make_fid_reference.py``. Not verified against the real weights file (not
downloadable here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.convert import Converted, common
from diffjax.models import fid_inception

__all__ = ["convert", "name_map", "source_shapes", "config_from_model_config",
           "FC_SHAPES", "WHAT"]

# The unused classifier of the FID network: 1008 classes (TF's inception-2015-12-05).
FC_SHAPES = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
WHAT = "the pytorch-fid FID InceptionV3 architecture (pt_inception-2015-12-05)"

_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
         ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
         ("batch_stats", "var"): "running_var"}


def config_from_model_config(model_config: dict | None) -> dict:
    """The `fid_inception` config: pytorch-fid's (299x299 inputs) updated with `model_config`.

    Args:
      model_config: overrides of `diffjax.models.fid_inception.fid_inception_config`
        (``resolution``); None for the standard network.
    """
    config = fid_inception.fid_inception_config()
    if model_config:
        if not isinstance(model_config, dict):
            raise ValueError(f"model_config: expected a dict; got {type(model_config).__name__}")
        config.update(model_config)
    fid_inception.build(config)  # validates (unknown keys, bad values)
    return config


def _flax_shapes(config: dict) -> dict:
    module = fid_inception.build(config)
    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    return common.flax_param_shapes(module, x)


def _source_name(path: str) -> str:
    parts = path.split("/")
    return ".".join(parts[1:-1] + [_LEAF[(parts[0], parts[-1])]])


def name_map(config: dict | None = None) -> list[common.MapEntry]:
    """The pytorch-fid-name -> Flax-path map (one entry per Flax variable, ``fc`` excluded).

    E.g. ``Mixed_6b.branch7x7_2.conv.weight`` -> ``params/Mixed_6b/branch7x7_2/conv/kernel``
    (OIHW -> HWIO), ``Mixed_6b.branch7x7_2.bn.running_var`` ->
    ``batch_stats/Mixed_6b/branch7x7_2/bn/var``.
    """
    config = config_from_model_config(config)
    entries = []
    for path, shape in _flax_shapes(config).items():
        transform = "conv" if path.endswith("/kernel") and len(shape) == 4 else "copy"
        entries.append(common.MapEntry(_source_name(path), path, transform))
    return entries


def source_shapes(config: dict | None = None) -> dict[str, tuple]:
    """The state_dict names and shapes the converter uses (no ``fc``, no
    ``num_batches_tracked``): 470 tensors."""
    config = config_from_model_config(config)
    return common.expected_source_shapes(name_map(config), _flax_shapes(config))


def _check_fc(state: dict) -> None:
    for name, shape in FC_SHAPES.items():
        if name in state and tuple(np.shape(state[name])) != shape:
            raise ValueError(
                f"checkpoint does not match {WHAT}: {name} has shape "
                f"{tuple(np.shape(state[name]))}, the FID network's is {shape}; this looks like "
                "another Inception (e.g. torchvision's ImageNet inception_v3, whose features "
                "are not the standard FID's): use pt_inception-2015-12-05-6726825d.pth")


def convert(src: str, model_config: dict | None = None) -> Converted:
    """Converts pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` into ``fid_inception``.

    Args:
      src: the ``.pth`` file (read with ``torch.load(weights_only=True)``) or a
        ``.safetensors`` copy with the same names.
      model_config: overrides of `diffjax.models.fid_inception.fid_inception_config`
        (None: the standard 299x299 network).

    Returns:
      A `Converted` with kind ``fid_inception`` and ``{"params", "batch_stats"}``; its
      ``fn`` (after `diffjax.pretrained.load`) is ``features_fn(x) -> [B, 2048]``.

    Raises:
      ValueError: an HTML page or truncated file, or tensors of another architecture
        (missing/unexpected/mismatched names listed, e.g. torchvision's ``AuxLogits``).
    """
    config = config_from_model_config(model_config)
    state = common.strip_prefix(common.load_state_dict(src), ("state_dict.", "module."))
    _check_fc(state)
    variables = common.apply_name_map(
        state, name_map(config), _flax_shapes(config), WHAT,
        ignore=lambda n: n.endswith("num_batches_tracked") or n in FC_SHAPES)
    return Converted(kind="fid_inception", config=config, variables=variables, schedule=None,
                     meta={"reference": "pytorch_fid.inception.InceptionV3([3], "
                                        "resize_input=True, normalize_input=True, "
                                        "use_fid_inception=True)",
                           "features": "2048-d final average pool (pool3)"})
