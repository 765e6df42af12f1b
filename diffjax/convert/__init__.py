"""Converters from the public pretrained checkpoints the paper uses to diffjax models.

Each format maps to a function `convert(src: str, model_config: dict | None) -> Converted`
in a submodule (imported lazily: PyTorch is needed only to read pickled files, and only
here). `convert_to_dir` runs one and writes a directory that `diffjax.pretrained.load`
reads, with the SHA-256 of the source file. Loading never executes pickled code:
safetensors where available, `torch.load(weights_only=True)` otherwise (see `common`).
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Any

__all__ = ["Converted", "FORMATS", "convert", "convert_to_dir"]


@dataclasses.dataclass
class Converted:
    """The result of a converter.

    Attributes:
      kind: the diffjax model kind (`diffjax.models.KINDS`).
      config: the diffjax architecture config dict.
      variables: the variables dict for `module.apply`.
      schedule: for diffusion models, the noise schedule dict it was trained with.
      meta: anything else worth recording (e.g. the reference config it came from).
    """

    kind: str
    config: dict
    variables: Any
    schedule: dict | None = None
    meta: dict = dataclasses.field(default_factory=dict)


# format name -> "module:function"
FORMATS = {
    "ddpm-diffusers": "diffjax.convert.ddpm:convert_diffusers",
    "ddpm-pytorch-diffusion": "diffjax.convert.ddpm:convert_pytorch_diffusion",
    "score-sde-pytorch": "diffjax.convert.score_sde:convert_pytorch",
    "score-sde-flax": "diffjax.convert.score_sde:convert_flax",
    "guided-diffusion": "diffjax.convert.guided:convert",
    "robustbench-wrn": "diffjax.convert.wrn:convert",
    "torchvision-resnet50": "diffjax.convert.resnet:convert",
    "fid-inception": "diffjax.convert.fid_inception:convert",
}


def _converter(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}; got {fmt!r}")
    mod, fn = FORMATS[fmt].split(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name == "torch":
            raise ModuleNotFoundError(
                f"format {fmt!r} reads a PyTorch pickle and needs PyTorch: "
                "`pip install torch==2.13.0` (CPU build) or `pip install diffjax[convert]`"
            ) from e
        raise
    return getattr(module, fn)


def convert(fmt: str, src, model_config: dict | None = None) -> Converted:
    """Converts the checkpoint at `src` (a file or, for diffusers, a directory)."""
    src = pathlib.Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"src: {src} does not exist; pass the downloaded checkpoint's "
                                "path with --src")
    return _converter(fmt)(str(src), model_config)


def _source_file(src: pathlib.Path) -> pathlib.Path:
    if src.is_file():
        return src
    for folder in (src, src / "unet"):  # a model directory, or a pipeline's unet/
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if (folder / name).is_file():
                return folder / name
    return src


def convert_to_dir(fmt: str, src, out, model_config: dict | None = None,
                   name: str | None = None) -> pathlib.Path:
    """Converts `src` and writes a model directory at `out` (see `diffjax.pretrained`)."""
    from diffjax import pretrained

    src = pathlib.Path(src).expanduser()
    result = convert(fmt, src, model_config)
    file = _source_file(src)
    source = {"format": fmt, "file": str(file.name),
              "sha256": pretrained.sha256_file(file) if file.is_file() else None}
    return pretrained.save(out, kind=result.kind, config=result.config,
                           variables=result.variables, name=name, schedule=result.schedule,
                           source=source, meta=result.meta)
