"""diffjax: diffusion purification and adversarial robustness, measured exactly.

A JAX/Flax reimplementation of *How Do Diffusion Models Improve Adversarial
Robustness?* (Liu & Wei, arXiv 2505.22839). Submodules:

- `diffjax.diffusion`: schedules, the forward process and pure-function purifiers.
- `diffjax.randomness`: per-example keys (from example ids or clean-image content).
- `diffjax.models`: Flax models (DDPM U-Net, DDPM++, guided-diffusion U-Net, classifiers).
- `diffjax.pretrained`: shipped and converted checkpoints.
- `diffjax.attacks`, `diffjax.metrics`, `diffjax.analysis`, `diffjax.data`, `diffjax.train`.

Submodules are imported lazily so that `import diffjax` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "analysis",
    "attacks",
    "convert",
    "data",
    "defense",
    "diffusion",
    "metrics",
    "models",
    "parallel",
    "pretrained",
    "randomness",
    "study",
    "train",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"diffjax.{name}")
    raise AttributeError(f"module 'diffjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
