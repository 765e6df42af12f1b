"""A resumable work directory: finished parts are loaded, interrupted parts resume.

Layout::

    WORKDIR/parts/<part>.json           a finished part's JSON result
    WORKDIR/parts/<part>/batch_<i>.npz  per-batch arrays of a part in progress (and after)

Every file is written to a temporary name and renamed into place, so an interruption
never leaves a half-written file that a rerun would trust. Only process 0 writes (multi-host
runs compute on every process and write once).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np

__all__ = ["Workdir", "Interrupted"]


class Interrupted(RuntimeError):
    """Raised by the test hook `fail_after_batches` to simulate a killed run."""


def _atomic_write(path: pathlib.Path, write: Callable[[str], None]):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class Workdir:
    """Caches the parts of a long computation under one directory.

    Args:
      path: the directory (created).
      is_writer: whether this process writes (process 0 of a multi-host run).
      fail_after_batches: a test hook: raise `Interrupted` after this many newly computed
        batches (None: never).
      log: a function that prints one progress line.
    """

    def __init__(self, path, *, is_writer: bool = True, fail_after_batches: int | None = None,
                 log: Callable[[str], None] = print):
        self.path = pathlib.Path(path).expanduser().resolve()
        self.is_writer = is_writer
        self.fail_after_batches = fail_after_batches
        self.new_batches = 0
        self.log = log
        self.loaded_parts: list[str] = []
        self.computed_parts: list[str] = []
        if is_writer:
            self.check_writable(self.path)

    @staticmethod
    def check_writable(path: pathlib.Path):
        """Creates `path` and proves it is writable, or raises a one-line error."""
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PermissionError(
                f"workdir: cannot write to {path} ({e.strerror}); choose a writable "
                "directory with --workdir") from e

    def part_file(self, name: str) -> pathlib.Path:
        return self.path / "parts" / f"{name}.json"

    def has(self, name: str) -> bool:
        return self.part_file(name).is_file()

    def write_json(self, path: pathlib.Path, obj):
        if not self.is_writer:
            return
        text = json.dumps(_to_jsonable(obj), indent=2, sort_keys=True)
        _atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))

    def part(self, name: str, compute: Callable[[], dict]) -> dict:
        """The JSON result of part `name`: loaded when finished, else computed and saved."""
        path = self.part_file(name)
        if path.is_file():
            self.loaded_parts.append(name)
            self.log(f"[{name}] loaded from {path.relative_to(self.path)}")
            return json.loads(path.read_text())
        self.log(f"[{name}] computing")
        result = _to_jsonable(compute())
        self.write_json(path, result)
        self.computed_parts.append(name)
        return result

    def batched(self, name: str, num_batches: int, compute: Callable[[int], dict],
                progress: Iterable | None = None) -> dict[str, np.ndarray]:
        """Per-batch arrays of part `name`, concatenated over batches.

        Each batch's dict of arrays is saved to `parts/<name>/batch_<i>.npz` as soon as it
        is computed; a rerun loads the saved batches and computes only the missing ones.
        """
        folder = self.path / "parts" / name
        results = []
        loaded = 0
        for i in range(num_batches):
            file = folder / f"batch_{i:05d}.npz"
            if file.is_file():
                with np.load(file) as z:
                    results.append({k: z[k] for k in z.files})
                loaded += 1
                continue
            if self.fail_after_batches is not None and self.new_batches >= self.fail_after_batches:
                raise Interrupted(f"test hook: stopped after {self.new_batches} new batches "
                                  f"(in {name}, batch {i})")
            t0 = time.time()
            out = {k: np.asarray(v) for k, v in compute(i).items()}
            if self.is_writer:
                _atomic_write(file, lambda tmp, out=out: np.savez(open(tmp, "wb"), **out))
            self.new_batches += 1
            self.log(f"[{name}] batch {i + 1}/{num_batches} done in {time.time() - t0:.1f} s")
            results.append(out)
            if progress is not None:
                progress.update(1)
        if loaded:
            self.log(f"[{name}] resumed: {loaded}/{num_batches} batches loaded")
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}
