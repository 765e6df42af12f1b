"""Shared pieces of the checkpoint converters: safe loading, name maps, layout changes.

A converter reads a flat ``name -> array`` table from the source file (`load_state_dict`,
which never executes pickled code), strips wrapper prefixes (`strip_prefix`), builds a
*name map* from the reference implementation's tensor names to our Flax parameter paths
(a list of `MapEntry`), and calls `apply_name_map`, which

1. derives the table of tensor names and shapes the file must hold from the Flax model's
   own parameter shapes (`flax_param_shapes`, via `jax.eval_shape`: nothing is allocated),
2. compares it with the file (`check_names_and_shapes`: missing, unexpected and
   mismatched tensors are listed with their shapes),
3. converts each tensor's layout (PyTorch OIHW conv kernels -> Flax HWIO, ``(out, in)``
   linear weights -> ``(in, out)``) and fills every Flax parameter exactly once, raising if
   one is left unfilled, filled twice or filled with the wrong shape.

The same name map gives the manifest tests their expected table
(`expected_source_shapes`), so the full-size official layout is checked without the
multi-GB file.

PyTorch is imported lazily, only to read pickles (``.pt``, ``.pth``, ``.ckpt``, ``.bin``),
always with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "load_state_dict",
    "check_not_html_or_lfs",
    "strip_prefix",
    "check_names_and_shapes",
    "conv_kernel",
    "dense_kernel",
    "conv1x1_dense_kernel",
    "set_nested",
    "unflatten",
    "flatten",
    "flax_param_shapes",
    "MapEntry",
    "TRANSFORMS",
    "expected_source_shapes",
    "apply_name_map",
    "read_json",
]

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar")
_SAFETENSORS_SUFFIXES = (".safetensors",)


# ----------------------------------------------------------------------------- loading


def _sniff(path: pathlib.Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(512)


def check_not_html_or_lfs(path: pathlib.Path, head: bytes) -> None:
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise ValueError(
            f"{path}: this is an HTML page, not a checkpoint: the download link returned a web "
            "page; download the raw file (e.g. the 'resolve'/'raw' URL, or `wget` with the "
            "direct link) and pass that with --src")
    if text.startswith(b"version https://git-lfs"):
        raise ValueError(
            f"{path}: this is a Git-LFS pointer file, not the checkpoint: the repository was "
            "cloned without LFS; run `git lfs pull` in it (or download the raw file) and pass "
            "the real file with --src")
    if not head:
        raise ValueError(f"{path}: the file is empty; the download failed: download it again")


def _to_numpy(t) -> Any:
    """A torch tensor -> numpy (bfloat16 -> float32); other leaves unchanged."""
    try:
        import torch
    except ModuleNotFoundError:  # pragma: no cover - only reached when torch loaded the file
        return t
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return t


def _flatten_leaves(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten_leaves(v, f"{prefix}{k}.", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten_leaves(v, f"{prefix}{i}.", out)
    else:
        out[prefix[:-1]] = _to_numpy(obj)


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except SafetensorError as e:
        raise ValueError(
            f"{path}: the safetensors file is truncated or corrupt ({e}); download it again"
        ) from e
    except TypeError as e:  # e.g. a dtype numpy lacks (bfloat16): read through torch
        try:
            from safetensors.torch import load_file as load_torch
        except ModuleNotFoundError:
            raise ValueError(f"{path}: cannot read this safetensors file with numpy ({e}); "
                             "install PyTorch to read it") from e
        return {k: _to_numpy(v) for k, v in load_torch(str(path)).items()}


def _load_pickle(path: pathlib.Path) -> dict[str, Any]:
    import pickle

    try:
        import torch
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"{path}: reading a PyTorch pickle needs PyTorch: `pip install torch` (the CPU "
            "build is enough) or `pip install diffjax[convert]`", name="torch") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise ValueError(
                f"{path}: the pickle holds Python objects other than tensors and plain "
                "containers; diffjax never executes pickled code (torch.load with "
                "weights_only=True). Re-save it as a plain state_dict or as safetensors"
            ) from e
        raise ValueError(f"{path}: the file is truncated or corrupt ({str(e)[:200]}); "
                         "download it again") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: the file is truncated or corrupt, not a readable PyTorch "
                         f"checkpoint ({type(e).__name__}: {str(e)[:200]}); download it "
                         "again") from e
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        _flatten_leaves(obj, "", out)
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        _flatten_leaves(obj, "", out)
        return out
    raise ValueError(f"{path}: expected a dict of tensors (a state_dict); got a "
                     f"{type(obj).__name__}")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into a flat ``name -> numpy array`` dict, safely.

    ``.safetensors`` files are read with `safetensors.numpy`; PyTorch pickles (``.pt``,
    ``.pth``, ``.ckpt``, ``.bin``) with ``torch.load(path, map_location="cpu",
    weights_only=True)``, which never executes pickled code. Other extensions are sniffed
    (zip or pickle header -> PyTorch, else safetensors). Nested dicts are flattened with
    ``"."`` (``{"state_dict": {"a": t}}`` gives ``"state_dict.a"``: strip with
    `strip_prefix`), lists by index (``ema.shadow_params.0``, ``.1``, ...). Tensors become
    numpy arrays in their own dtype (bfloat16 becomes float32); other leaves (ints,
    floats, strings) are kept as they are.

    Args:
      path: the file.

    Returns:
      The flat dict.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: an HTML page or Git-LFS pointer saved in place of the weights; a
        truncated/corrupt file; a pickle holding arbitrary Python objects.
      ModuleNotFoundError: a pickle, and PyTorch is not installed.
    """
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file; pass the downloaded checkpoint with --src")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory; expected a checkpoint file")
    head = _sniff(p)
    check_not_html_or_lfs(p, head)
    suffix = p.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        return _load_safetensors(p)
    if suffix in _PICKLE_SUFFIXES:
        return _load_pickle(p)
    # Unknown extension: zip (torch >= 1.6) or raw pickle (protocol 2+ starts with 0x80).
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return _load_pickle(p)
    try:
        return _load_safetensors(p)
    except ValueError as e:
        raise ValueError(f"{p}: neither a safetensors file nor a PyTorch pickle (unknown "
                         f"extension {suffix or '(none)'!r}); check the file ({e})") from e


def read_json(path) -> dict:
    """Reads a JSON config file with a clear error (naming the file) when it is not JSON."""
    import json

    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    head = _sniff(p)
    check_not_html_or_lfs(p, head)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e


def strip_prefix(
    state: Mapping[str, Any],
    prefixes: Iterable[str] = ("module.", "state_dict.", "model."),
) -> dict[str, Any]:
    """Removes wrapper prefixes (DataParallel's ``module.``, ``state_dict.``, ...).

    Prefixes are stripped repeatedly in any order (``state_dict.module.conv1.weight`` ->
    ``conv1.weight``), but only when *every* name carries the prefix, so a checkpoint with
    a real top-level ``model`` submodule next to others is left alone.

    Args:
      state: a flat name -> value dict.
      prefixes: the prefixes to strip.

    Returns:
      A new dict with the prefixes removed.
    """
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for pre in prefixes:
            if all(k.startswith(pre) for k in out):
                out = {k[len(pre):]: v for k, v in out.items()}
                changed = True
    return out


def _shape(v) -> tuple:
    if isinstance(v, tuple):
        return v
    return tuple(np.shape(v))


def check_names_and_shapes(
    expected: Mapping[str, tuple], got: Mapping[str, Any], what: str, *, show: int = 3,
) -> None:
    """Raises ValueError unless `got` has exactly the names and shapes of `expected`.

    The message lists how many tensors are missing, unexpected or mismatched, with a few
    of each and their shapes, e.g. ``checkpoint does not match the ddpm-diffusers
    architecture: 3 missing (e.g. conv_in.bias (32,)), 1 shape mismatch (conv_in.weight:
    file (64, 3, 3, 3), model (32, 3, 3, 3)); is --format right, or does the file need
    --model_config?``.

    Args:
      expected: name -> shape the model needs.
      got: name -> array (or shape tuple) found in the file.
      what: the architecture's description, e.g. ``"the ddpm-diffusers architecture"``.
      show: how many examples of each kind to list.
    """
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    mismatch = [k for k in expected if k in got and tuple(expected[k]) != _shape(got[k])]
    if not (missing or extra or mismatch):
        return
    parts = []
    if missing:
        ex = ", ".join(f"{k} {tuple(expected[k])}" for k in missing[:show])
        parts.append(f"{len(missing)} missing (e.g. {ex})")
    if extra:
        ex = ", ".join(f"{k} {_shape(got[k])}" for k in extra[:show])
        parts.append(f"{len(extra)} unexpected (e.g. {ex})")
    if mismatch:
        ex = ", ".join(f"{k}: file {_shape(got[k])}, model {tuple(expected[k])}"
                       for k in mismatch[:show])
        s = "" if len(mismatch) == 1 else "es"
        parts.append(f"{len(mismatch)} shape mismatch{s} ({ex})")
    raise ValueError(f"checkpoint does not match {what}: {', '.join(parts)}; is --format "
                     "right, or does the file need --model_config?")


# ----------------------------------------------------------------------------- layouts


def conv_kernel(w_oihw: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight ``[out, in, kh, kw]`` -> Flax Conv kernel ``[kh, kw, in, out]``."""
    return np.transpose(np.asarray(w_oihw), (2, 3, 1, 0))


def dense_kernel(w_out_in: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight ``[out, in]`` -> Flax Dense kernel ``[in, out]``."""
    return np.transpose(np.asarray(w_out_in))


def conv1x1_dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch 1x1 Conv2d ``[out, in, 1, 1]`` (or Conv1d ``[out, in, 1]``) -> Dense ``[in, out]``.

    A 1x1 convolution over NHWC is a Dense layer on the channel axis.
    """
    w = np.asarray(w)
    return np.transpose(w.reshape(w.shape[0], w.shape[1]))


# ----------------------------------------------------------------------------- trees


def set_nested(tree: dict, path: tuple[str, ...], value) -> dict:
    """Sets ``tree[path[0]][path[1]]...`` = value, creating dicts; raises if already set."""
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"{'/'.join(path)}: {p} is a leaf, not a dict")
    if path[-1] in node:
        raise ValueError(f"{'/'.join(path)}: set twice")
    node[path[-1]] = value
    return tree


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """``{"a/b/c": v}`` -> ``{"a": {"b": {"c": v}}}``."""
    tree: dict = {}
    for k, v in flat.items():
        set_nested(tree, tuple(k.split(sep)), v)
    return tree


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": {"c": v}}}`` -> ``{"a/b/c": v}`` (inverse of `unflatten`)."""
    out: dict[str, Any] = {}

    def rec(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(v, f"{prefix}{k}{sep}")
        else:
            out[prefix[: -len(sep)]] = node

    rec(tree, "")
    return out


def flax_param_shapes(module, *init_args, **init_kwargs) -> dict[str, tuple]:
    """Every variable of a Flax module, ``"collection/path/name" -> shape``, allocation-free.

    Runs ``module.init`` under `jax.eval_shape`, so even the 550M-parameter models cost
    nothing. Keys include the collection, e.g. ``"params/conv_in/kernel"`` or
    ``"batch_stats/bn1/mean"``.

    Args:
      module: a Flax Linen module.
      *init_args: example inputs (arrays or `jax.ShapeDtypeStruct`) for ``module.init``.
      **init_kwargs: static keyword inputs for ``module.init`` (e.g. ``train=False``).

    Returns:
      The flat path -> shape dict.
    """
    import jax

    # Array inputs are traced (abstractly); keyword inputs are static flags (train=False).
    shapes = jax.eval_shape(
        lambda *args: module.init(jax.random.key(0), *args, **init_kwargs), *init_args)
    return {k: tuple(v.shape) for k, v in flatten(dict(shapes)).items()}


# ----------------------------------------------------------------------------- name maps


@dataclasses.dataclass(frozen=True)
class MapEntry:
    """One source tensor -> one Flax variable.

    Attributes:
      source: the tensor name in the source file, e.g. ``"conv_in.weight"``.
      target: the Flax variable path with its collection, e.g. ``"params/conv_in/kernel"``.
      transform: a key of `TRANSFORMS`: ``"conv"`` (OIHW -> HWIO), ``"dense"`` (``[out,
        in]`` -> ``[in, out]``), ``"conv1x1_dense"`` (1x1 conv -> Dense) or ``"copy"``.
    """

    source: str
    target: str
    transform: str = "copy"


# transform -> (array converter, Flax shape -> source shape)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (np.asarray, lambda s: tuple(s)),
    "conv": (conv_kernel, lambda s: (s[3], s[2], s[0], s[1])),
    "dense": (dense_kernel, lambda s: (s[1], s[0])),
    "conv1x1_dense": (conv1x1_dense_kernel, lambda s: (s[1], s[0], 1, 1)),
}


def expected_source_shapes(
    name_map: Iterable[MapEntry], flax_shapes: Mapping[str, tuple],
) -> dict[str, tuple]:
    """The source name -> shape table that a name map and a Flax model imply.

    This is what a file must hold to fill the model; the manifest tests compare it with
    the official full-size layout.
    """
    out = {}
    for e in name_map:
        if e.target not in flax_shapes:
            raise KeyError(f"name map targets {e.target!r}, which the Flax model does not have")
        out[e.source] = TRANSFORMS[e.transform][1](flax_shapes[e.target])
    return out


def apply_name_map(
    state: Mapping[str, Any],
    name_map: Iterable[MapEntry],
    flax_shapes: Mapping[str, tuple],
    what: str,
    *,
    ignore: Callable[[str], bool] | None = None,
    dtype=np.float32,
) -> dict:
    """Converts a flat source state into a Flax variables dict through a name map.

    Args:
      state: the source's flat name -> array dict (prefixes already stripped).
      name_map: one `MapEntry` per source tensor.
      flax_shapes: `flax_param_shapes` of the target module.
      what: the architecture's description for error messages.
      ignore: source names to skip (e.g. BatchNorm's ``num_batches_tracked``).
      dtype: the dtype of the converted arrays.

    Returns:
      The nested variables dict (``{"params": ..., "batch_stats": ...}``) of numpy arrays.

    Raises:
      ValueError: the file's names/shapes differ from what the model needs; or the name
        map leaves a Flax variable unfilled, fills one twice or with the wrong shape.
    """
    name_map = list(name_map)
    ignore = ignore or (lambda name: False)
    got = {k: v for k, v in state.items() if not ignore(k)}
    check_names_and_shapes(expected_source_shapes(name_map, flax_shapes), got, what)
    flat: dict[str, np.ndarray] = {}
    for e in name_map:
        if e.target in flat:
            raise ValueError(f"{what}: Flax variable {e.target} filled twice (second time from "
                             f"{e.source}); the name map is wrong")
        value = np.asarray(TRANSFORMS[e.transform][0](got[e.source]), dtype=dtype)
        if value.shape != tuple(flax_shapes[e.target]):
            raise ValueError(f"{what}: {e.source} converts to shape {value.shape}, but Flax "
                             f"variable {e.target} has shape {tuple(flax_shapes[e.target])}")
        flat[e.target] = value
    unfilled = [k for k in flax_shapes if k not in flat]
    if unfilled:
        raise ValueError(f"{what}: {len(unfilled)} Flax variable(s) left unfilled by the name "
                         f"map, e.g. {', '.join(unfilled[:3])}")
    return unflatten(flat)
