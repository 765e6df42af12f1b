"""Shipped and converted checkpoints: one on-disk format, one loader.

A model directory holds:

    DIR/model.json   {"format": "diffjax-model/1", "name", "kind", "role", "config",
                      "schedule" (diffusion models: how their timesteps were trained),
                      "source" {"format", "file", "sha256"} (converted models),
                      "files" {relative path: sha256} of every file under params/,
                      "meta" {anything: the command that produced it, its numbers, ...}}
    DIR/params/      an orbax checkpoint of the variables dict (`module.apply`'s first arg)

`load(name_or_dir)` verifies every file's SHA-256 against `files` before restoring, so a
missing, truncated or corrupted file is reported by name instead of surfacing as a
tensorstore error. The checkpoints shipped inside the package live in
`diffjax/assets/<name>/` in the same format; `available()` lists them together with the
models found in the local checkpoint directory (`$DIFFJAX_CHECKPOINTS`, default
`~/.cache/diffjax/checkpoints`), where `experiments.convert_checkpoint --out` may write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from diffjax import models

__all__ = [
    "LoadedModel",
    "available",
    "load",
    "save",
    "checkpoint_dir",
    "sha256_file",
    "ASSETS_DIR",
    "FORMAT",
]

FORMAT = "diffjax-model/1"
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"


@dataclasses.dataclass
class LoadedModel:
    """A loaded checkpoint.

    Attributes:
      name: the registry name or the directory's name.
      kind: the model kind (see `diffjax.models.KINDS`).
      role: "diffusion", "classifier", "features" (a feature extractor, e.g. FID's
        InceptionV3) or "purifier" (a deterministic purifier, `.purify_fn`).
      config: the architecture config dict.
      params: the variables dict passed to `module.apply` (`{"params": ...}`, plus
        `"batch_stats"` for BatchNorm models).
      module: the Flax module.
      fn: `eps_fn`, `logits_fn`, `features_fn` or `purify_fn` (the properties below).
      meta: everything else from model.json (source, command, numbers, schedule).
      path: the directory it was loaded from.
    """

    name: str
    kind: str
    role: str
    config: dict
    params: Any
    module: Any
    fn: Callable
    meta: dict
    path: pathlib.Path

    def _fn_of(self, role: str, name: str) -> Callable:
        if self.role != role:
            have = {"diffusion": "eps_fn", "classifier": "logits_fn",
                    "features": "features_fn", "purifier": "purify_fn"}.get(self.role, "fn")
            raise AttributeError(f"{self.name!r} is a {self.role} model; it has .{have}, "
                                 f"not .{name}")
        return self.fn

    @property
    def eps_fn(self) -> Callable:
        """`eps_fn(x_t, t)`: x_t NHWC in [-1, 1], t int32 [B] timestep indices."""
        return self._fn_of("diffusion", "eps_fn")

    @property
    def logits_fn(self) -> Callable:
        """`logits_fn(x)`: x NHWC in [0, 1] -> logits [B, num_classes]."""
        return self._fn_of("classifier", "logits_fn")

    @property
    def purify_fn(self) -> Callable:
        """`purify_fn(x, keys)`: x NHWC in [0, 1], keys [B] -> purified [0, 1] images."""
        return self._fn_of("purifier", "purify_fn")

    @property
    def features_fn(self) -> Callable:
        """`features_fn(x)`: x NHWC in [0, 1] -> features [B, F] (e.g. FID's InceptionV3)."""
        return self._fn_of("features", "features_fn")

    def schedule(self):
        """The noise schedule the diffusion model was trained with (a `Schedule`)."""
        from diffjax import diffusion

        sched = dict(self.meta.get("schedule") or {"name": "linear"})
        name = sched.pop("name", "linear")
        if name == "linear":
            return diffusion.linear_schedule(**sched)
        if name == "cosine":
            return diffusion.cosine_schedule(**sched)
        raise ValueError(f"{self.path}/model.json: unknown schedule {name!r}")


def checkpoint_dir() -> pathlib.Path:
    """The local directory scanned by `available()` and `load(name)`."""
    env = os.environ.get("DIFFJAX_CHECKPOINTS")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "diffjax" / "checkpoints"


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hash_tree(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _is_model_dir(path: pathlib.Path) -> bool:
    return (path / "model.json").is_file()


def available() -> list[str]:
    """Names of the shipped checkpoints and of the models in `checkpoint_dir()`."""
    names = []
    for root in (ASSETS_DIR, checkpoint_dir()):
        if root.is_dir():
            names += sorted(p.name for p in root.iterdir() if _is_model_dir(p))
    return list(dict.fromkeys(names))


def _resolve(name_or_dir) -> pathlib.Path:
    path = pathlib.Path(name_or_dir).expanduser()
    if _is_model_dir(path):
        return path
    for root in (ASSETS_DIR, checkpoint_dir()):
        if _is_model_dir(root / str(name_or_dir)):
            return root / str(name_or_dir)
    if path.exists():
        raise FileNotFoundError(
            f"{path}: not a diffjax model directory (no model.json inside); write one with "
            "`python -m experiments.convert_checkpoint --format=... --src=... --out=DIR`")
    raise FileNotFoundError(
        f"{name_or_dir!r}: no such checkpoint; available: {', '.join(available()) or 'none'} "
        f"(shipped in {ASSETS_DIR}, converted ones in {checkpoint_dir()} or any directory "
        "written by `python -m experiments.convert_checkpoint`)")


def save(
    out_dir,
    *,
    kind: str,
    config: dict,
    variables,
    name: str | None = None,
    schedule: dict | None = None,
    source: dict | None = None,
    meta: dict | None = None,
    overwrite: bool = True,
) -> pathlib.Path:
    """Writes a model directory (model.json + orbax params) that `load` reads.

    Args:
      out_dir: the directory to write (created; replaced when `overwrite`).
      kind: a model kind from `diffjax.models.KINDS`.
      config: the architecture config dict (JSON-able).
      variables: the variables dict for `module.apply`.
      name: the model's name (default: the directory's name).
      schedule: for diffusion models, e.g. {"name": "linear", "num_timesteps": 1000,
        "beta_start": 1e-4, "beta_end": 2e-2}.
      source: for converted models, {"format", "file", "sha256"} of the source file.
      meta: anything else worth keeping (the command, the numbers it reached).
      overwrite: replace an existing directory.

    Returns:
      The directory path.
    """
    import jax
    import orbax.checkpoint as ocp

    spec = models.get_spec(kind)
    out = pathlib.Path(out_dir).expanduser().resolve()
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    host = jax.tree.map(lambda a: np.asarray(a), variables)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(out / "params", host)
    ckpt.wait_until_finished()
    info = {
        "format": FORMAT,
        "name": name or out.name,
        "kind": kind,
        "role": spec.role,
        "config": config,
        "schedule": schedule,
        "source": source,
        "files": _hash_tree(out / "params"),
        "meta": meta or {},
    }
    (out / "model.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return out


def _read_info(path: pathlib.Path) -> dict:
    try:
        info = json.loads((path / "model.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'model.json'}: not valid JSON ({e}); the file is corrupt, "
                         "re-create the directory") from e
    if info.get("format") != FORMAT:
        raise ValueError(f"{path / 'model.json'}: format {info.get('format')!r}, expected "
                         f"{FORMAT!r}")
    return info


def verify(path) -> dict:
    """Checks every file's SHA-256 against model.json; returns the parsed model.json."""
    path = _resolve(path)
    info = _read_info(path)
    params = path / "params"
    expected = info.get("files") or {}
    missing = [f for f in expected if not (params / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path}: {len(missing)} checkpoint file(s) missing, e.g. params/{missing[0]}; "
            "the copy is incomplete: re-install diffjax or re-run the conversion")
    for rel, digest in expected.items():
        got = sha256_file(params / rel)
        if got != digest:
            raise ValueError(
                f"{path}/params/{rel}: SHA-256 {got[:12]}... does not match the recorded "
                f"{digest[:12]}...; the file is corrupt or was modified: re-install diffjax or "
                "re-run the conversion")
    return info


def load(name_or_dir, *, verify_hashes: bool = True) -> LoadedModel:
    """Loads a shipped checkpoint by name, or any model directory.

    Args:
      name_or_dir: a name from `available()` or a directory written by `save` /
        `experiments.convert_checkpoint`.
      verify_hashes: check every file's SHA-256 first (cheap for the shipped models).

    Returns:
      A `LoadedModel` with `.config`, `.params` and `.eps_fn` or `.logits_fn`.
    """
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    path = _resolve(name_or_dir)
    info = verify(path) if verify_hashes else _read_info(path)
    spec = models.get_spec(info["kind"])
    module = spec.build(info["config"])
    try:
        raw = ocp.StandardCheckpointer().restore(path / "params")
    except Exception as e:  # orbax/tensorstore errors are long; name the directory
        raise ValueError(f"{path}/params: cannot be restored ({type(e).__name__}: "
                         f"{str(e)[:200]}); re-create the directory") from e
    import jax

    variables = jax.tree.map(jnp.asarray, raw)
    fn = spec.make_fn(module, info["config"], variables)
    meta = {k: v for k, v in info.items() if k not in ("config", "kind", "role", "name")}
    return LoadedModel(
        name=info.get("name") or path.name,
        kind=info["kind"],
        role=spec.role,
        config=info["config"],
        params=variables,
        module=module,
        fn=fn,
        meta=meta,
        path=path,
    )
