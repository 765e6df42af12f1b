"""Flax models: diffusion eps-models and classifiers, picked by a kind name.

Why Flax Linen and not NNX: diffjax is built on pure functions over explicit state. A Linen
module is a stateless description whose `apply(variables, ...)` is a pure function of a
plain pytree of arrays, which is exactly what the purifiers (`eps_fn(x_t, t)`), the attacks
(`grad` through 100 scanned steps), orbax checkpoints, optax optimisers and the checkpoint
converters (a renaming of a flat name -> tensor table into a nested dict) want. NNX's mutable
objects would have to be split back into (graphdef, state) at every one of those
boundaries. Linen remains supported by Flax; if we ever move, only the `build`/`make_fn`
hooks below change.

Every model kind registers a `ModelSpec` (in a module-level `SPECS` dict of the module
named in `_KIND_MODULES`; no import side effects):

- `build(config: dict) -> flax.linen.Module`
- `init(module, config, key) -> variables` (the dict passed to `module.apply`:
  `{"params": ...}` plus `"batch_stats"` where the model has BatchNorm)
- `make_fn(module, config, variables) -> fn`: for `role == "diffusion"` an
  `eps_fn(x_t, t)` following API.md (x_t NHWC in [-1, 1], t int32 [B] timestep indices),
  for `role == "classifier"` a `logits_fn(x)` on [0, 1] images (normalisation inside),
  for `role == "features"` a `features_fn(x) -> [B, F]` on [0, 1] images.
  The returned function is a `jax.tree_util.Partial` whose arguments hold the variables, so
  passing it through `jit` traces the weights instead of baking them in as constants, and
  the compiled code is cached per model.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["ModelSpec", "KINDS", "get_spec", "build", "init", "make_fn", "param_count"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build, initialise and call one kind of model (see the module docstring)."""

    kind: str
    role: str  # "diffusion", "classifier" or "features"
    build: Callable[[dict], Any]
    init: Callable[[Any, dict, Any], dict]
    make_fn: Callable[[Any, dict, dict], Callable]
    default_config: Callable[[], dict] | None = None


# kind -> module holding `SPECS[kind]`.
_KIND_MODULES = {
    "ddpm_unet": "diffjax.models.unet",
    "cnn": "diffjax.models.classifiers",
    "wrn": "diffjax.models.classifiers",
    "ncsnpp": "diffjax.models.ncsnpp",
    "guided_unet": "diffjax.models.guided",
    "resnet50": "diffjax.models.resnet",
    "fid_inception": "diffjax.models.fid_inception",
    "purifier_net": "diffjax.models.purifier",
}
KINDS = tuple(_KIND_MODULES)


def get_spec(kind: str) -> ModelSpec:
    """The `ModelSpec` of a model kind, e.g. ``get_spec("ddpm_unet")``."""
    if kind not in _KIND_MODULES:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    module = importlib.import_module(_KIND_MODULES[kind])
    return module.SPECS[kind]


def build(kind: str, config: dict):
    """Builds the Flax module of `kind` from a JSON-able config dict."""
    return get_spec(kind).build(config)


def init(kind: str, config: dict, key):
    """Builds and randomly initialises a model; returns `(module, variables)`."""
    spec = get_spec(kind)
    module = spec.build(config)
    return module, spec.init(module, config, key)


def make_fn(kind: str, config: dict, variables: dict, module=None) -> Callable:
    """`eps_fn` (diffusion kinds) or `logits_fn` (classifier kinds) of given weights."""
    spec = get_spec(kind)
    module = spec.build(config) if module is None else module
    return spec.make_fn(module, config, variables)


def param_count(variables) -> int:
    """Number of trainable parameters (the `params` collection) in a variables dict."""
    import jax
    import numpy as np

    params = variables.get("params", variables) if isinstance(variables, dict) else variables
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
