r"""Makes ``tests/data/fid_inception_reference.npz`` with pytorch-fid itself and random weights.

Run by hand, never by the tests, in a throwaway venv that has pytorch-fid (which needs
torchvision; neither belongs in diffjax's environment), from the repository root:

    python3 -m venv /tmp/fidref
    /tmp/fidref/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid numpy
    /tmp/fidref/bin/python experiments/make_fid_reference.py \
        --out=tests/data/fid_inception_reference.npz

It builds pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True,
use_fid_inception=True)`` through pytorch-fid's own ``fid_inception_v3`` (so the FID
patches, FIDInceptionA/C/E_1/E_2, are pytorch-fid's code), except that the weights file is
not downloaded: ``load_state_dict_from_url`` is replaced by a function returning
`random_state` of the network being built (every parameter and BatchNorm buffer drawn from
``numpy.random.default_rng(0)`` in ``state_dict`` order), which pytorch-fid then loads with
its usual strict ``load_state_dict``. The file holds only:

- ``images``: 2 NHWC float32 images 32x32x3 in [0, 1] (``default_rng(1)``);
- ``features``: pytorch-fid's 2048-d pool features of those images, ``[2, 2048]``;
- ``names``, ``shapes``: the names and shapes (``"32,3,3,3"``; ``""`` for scalars) of the
  ``state_dict`` of pytorch-fid's Inception network, in order: the layout of
  ``pt_inception-2015-12-05-6726825d.pth`` (``fc`` included);
- ``versions``: the torch, torchvision and pytorch-fid versions used.

`tests/test_fid_inception.py` regenerates the same weights with `random_state` from
``names``/``shapes``, converts them with `diffjax.convert.fid_inception` and compares the
Flax features with ``features``. `random_state` imports only numpy so that the tests can
import it from diffjax's environment.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

SEED = 0
IMAGE_SEED = 1


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32,3,3,3"`` -> ``(32, 3, 3, 3)``; ``""`` -> ``()``."""
    return tuple(int(s) for s in text.split(",")) if text else ()


def format_shape(shape) -> str:
    """``(32, 3, 3, 3)`` -> ``"32,3,3,3"`` (the inverse of `parse_shape`)."""
    return ",".join(str(int(s)) for s in shape)


def random_state(names, shapes, seed: int = SEED) -> dict[str, np.ndarray]:
    """Random weights for an Inception state_dict, drawn in the given order.

    Scaled so that activations stay O(1) through the 20-odd layers of ReLU convolutions:
    conv weights N(0, 2 / fan_in) (He), BatchNorm weight U(0.8, 1.2), bias U(-0.1, 0.1),
    running_mean U(-0.1, 0.1), running_var U(0.8, 1.2); ``fc.weight`` N(0, 1 / fan_in),
    ``fc.bias`` U(-0.1, 0.1). ``num_batches_tracked`` is 0 and draws nothing.

    Args:
      names: the state_dict names, in order.
      shapes: their shapes (tuples), in the same order.
      seed: the `numpy.random.default_rng` seed.

    Returns:
      name -> float32 array (int64 for ``num_batches_tracked``).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in zip(names, shapes, strict=True):
        shape = tuple(shape)
        if name.endswith("num_batches_tracked"):
            out[name] = np.zeros(shape, np.int64)
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if name.endswith(".weight") and len(shape) == 4:
            v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name.endswith(".weight") and len(shape) == 2:
            v = rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)
        elif name.endswith(("running_var", ".weight")):  # BatchNorm scale / variance
            v = rng.uniform(0.8, 1.2, shape)
        elif name.endswith(("running_mean", ".bias")):
            v = rng.uniform(-0.1, 0.1, shape)
        else:
            raise ValueError(f"{name} {shape}: no rule for this tensor")
        out[name] = v.astype(np.float32)
    return out


def reference_images() -> np.ndarray:
    """The 2 NHWC 32x32x3 float32 test images in [0, 1]."""
    return np.random.default_rng(IMAGE_SEED).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/data/fid_inception_reference.npz")
    args = parser.parse_args(argv)

    import inspect

    import pytorch_fid
    import pytorch_fid.inception as pfi
    import torch
    import torchvision

    recorded = {}

    def no_download(url, progress=True, **kwargs):
        # Called from inside pytorch-fid's fid_inception_v3, right before
        # `inception.load_state_dict(state_dict)`: fill the network being built.
        del progress, kwargs
        assert url == pfi.FID_WEIGHTS_URL, url
        inception = inspect.currentframe().f_back.f_locals["inception"]
        state = inception.state_dict()
        names, shapes = list(state), [tuple(v.shape) for v in state.values()]
        recorded["names"], recorded["shapes"] = names, shapes
        return {k: torch.from_numpy(v) for k, v in random_state(names, shapes).items()}

    pfi.load_state_dict_from_url = no_download
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                            normalize_input=True, use_fid_inception=True).eval()
    assert recorded, "pytorch-fid did not call load_state_dict_from_url"
    images = reference_images()
    with torch.no_grad():
        pool = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))[0]
    features = pool.squeeze(-1).squeeze(-1).numpy().astype(np.float32)
    assert features.shape == (2, 2048) and np.all(np.isfinite(features)), features.shape
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = (f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                f"pytorch-fid {pytorch_fid.__version__}")
    np.savez_compressed(out, images=images, features=features,
                        names=np.array(recorded["names"]),
                        shapes=np.array([format_shape(s) for s in recorded["shapes"]]),
                        versions=np.array(versions))
    n_params = sum(int(np.prod(s)) for k, s in zip(recorded["names"], recorded["shapes"],
                                                    strict=True)
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    print(f"wrote {out}: {len(recorded['names'])} state_dict entries, {n_params:,} parameters "
          f"(fc included); features mean {features.mean():.4g} std {features.std():.4g}; "
          f"{versions}")


if __name__ == "__main__":
    main()
