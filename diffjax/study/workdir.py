"""A resumable work directory, local or in a bucket, that every process agrees on.

Layout::

    WORKDIR/parts/<part>.json         a finished part's JSON result
    WORKDIR/parts/<part>.npz          a finished part's per-example arrays
    WORKDIR/parts/<part>/<name>.npz   progress inside a part (an attack's rounds)

Paths go through `etils.epath` (what orbax and tfds use), so ``gs://bucket/run`` stays a
URL all the way to the writes (with gcsfs installed) and local paths work as usual.
Writes go to a temporary name and are renamed into place, so an interruption never leaves
a half-written file that a rerun would trust (a bucket's object writes are atomic too).

Several processes: process 0 decides. Whether a part is finished, and its content, are
what process 0 reads from ITS work directory, broadcast to every process
(`diffjax.parallel.broadcast_bytes`); the others never look at their own disks, so they
cannot disagree and leave a collective hanging, and a part that only process 0's disk
has is loaded by all. Only process 0 writes.

Costs: every part's wall time, and the time JAX spent tracing, lowering and compiling
while it ran (from `jax.monitoring`'s compile events, counted per thread), are recorded in
`costs`.

Threads: parts may be computed from several threads at once (`run_study`'s concurrent
start, one process only). A part is computed once: a thread asking for a part that another
is computing waits for it and loads it.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Callable

import numpy as np
from etils import epath

from diffjax import parallel

__all__ = ["Workdir", "Interrupted", "compile_seconds"]

_COMPILE_BY_THREAD: dict[int, float] = {}  # thread id -> seconds
_LISTENING = False  # whether the compile-event listener is registered
_LOCK = threading.Lock()
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _on_event(event: str, duration: float, **_kwargs) -> None:
    # JAX reports compile events on the thread that traces and compiles.
    if event in _COMPILE_EVENTS:
        with _LOCK:
            t = threading.get_ident()
            _COMPILE_BY_THREAD[t] = _COMPILE_BY_THREAD.get(t, 0.0) + float(duration)


def compile_seconds() -> float:
    """Seconds JAX has spent tracing, lowering and compiling on this thread so far."""
    global _LISTENING
    with _LOCK:
        if not _LISTENING:
            import jax

            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _LISTENING = True
        return _COMPILE_BY_THREAD.get(threading.get_ident(), 0.0)


class Interrupted(RuntimeError):
    """Raised by the test hook `fail_after_batches` to simulate a killed run."""


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


def as_path(path) -> epath.Path:
    """`path` as an `epath.Path`: a URL (gs://...) stays a URL, a local path is expanded."""
    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _npz_load(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


class _Store:
    """An attack's progress inside a part (the `store` of `attacks.cascade.run_cascade`)."""

    def __init__(self, workdir: Workdir, folder: str):
        self.workdir, self.folder = workdir, folder

    def _path(self, name):
        return self.workdir.path / "parts" / self.folder / f"{name}.npz"

    def load(self, name):
        data = self.workdir.read_agreed(self._path(name))
        return None if data is None else _npz_load(data)

    def save(self, name, arrays):
        self.workdir.write(self._path(name), _npz_bytes(arrays))
        self.workdir.batch_done(f"{self.folder}/{name}")

    def delete(self, name):
        if self.workdir.is_writer:
            path = self._path(name)
            if path.exists():
                path.unlink()


class Workdir:
    """Caches the parts of a long computation under one directory (module docstring).

    Args:
      path: the directory, local or a URL (created).
      fail_after_batches: a test hook: raise `Interrupted` after this many newly saved
        pieces of progress (None: never).
      log: a function that prints one progress line.
    """

    def __init__(self, path, *, fail_after_batches: int | None = None,
                 log: Callable[[str], None] = print):
        self.path = as_path(path)
        self.is_writer = parallel.is_writer()
        self.fail_after_batches = fail_after_batches
        self.new_batches = 0
        self.log = log
        self.loaded_parts: list[str] = []
        self.computed_parts: list[str] = []
        self.costs: dict[str, dict] = {}
        self._part_locks: dict[str, threading.Lock] = {}
        self._costs_lock = threading.Lock()
        compile_seconds()  # start listening to compile events
        if self.is_writer:
            self.check_writable(self.path)

    @staticmethod
    def check_writable(path: epath.Path):
        """Creates `path` and proves it is writable, or raises a one-line error."""
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PermissionError(
                f"workdir: cannot write to {path} ({e.strerror or e}); choose a writable "
                "directory with --workdir") from e

    # -- files ------------------------------------------------------------------------

    def write(self, path: epath.Path, data: bytes) -> None:
        """Writes `data` to `path` through a temporary name (process 0 only)."""
        if not self.is_writer:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(path)

    def read_agreed(self, path: epath.Path) -> bytes | None:
        """Process 0's content of `path` (None if it has none), on every process."""
        data = None
        if self.is_writer and path.exists():
            data = path.read_bytes()
        return parallel.broadcast_bytes(data)

    def batch_done(self, what: str) -> None:
        """Counts one newly saved piece of progress (and fires the test hook)."""
        self.new_batches += 1
        if self.fail_after_batches is not None and self.new_batches >= self.fail_after_batches:
            raise Interrupted(f"test hook: stopped after {self.new_batches} saved pieces of "
                              f"progress (the last: {what})")

    def part_file(self, name: str, suffix: str = ".json") -> epath.Path:
        return self.path / "parts" / f"{name}{suffix}"

    def store(self, name: str) -> _Store:
        """Where part `name` keeps its progress (`attacks.cascade.run_cascade`'s `store`)."""
        return _Store(self, name)

    # -- parts ------------------------------------------------------------------------

    def _run(self, name: str, compute: Callable[[], object]):
        self.log(f"[{name}] computing")
        t0, c0 = time.time(), compile_seconds()
        out = compute()
        wall, comp = time.time() - t0, compile_seconds() - c0
        self.log(f"[{name}] done in {wall:.1f} s ({comp:.1f} s compiling)")
        with self._costs_lock:
            self.costs[name] = {"wall_s": wall, "compile_s": comp,
                                "run_s": max(wall - comp, 0.0)}
            self.computed_parts.append(name)
            # Kept beside the parts, so a resumed run still reports what every part cost.
            path = self.path / "parts" / "_costs.json"
            old = self.read_agreed(path)
            every = {**(json.loads(old) if old else {}), name: self.costs[name]}
            self.write(path, json.dumps(every, indent=2, sort_keys=True).encode())
        return out

    def _lock(self, name: str) -> threading.Lock:
        with _LOCK:
            return self._part_locks.setdefault(name, threading.Lock())

    def all_costs(self) -> dict[str, dict]:
        """The cost of every part computed in this work directory, in this run or before."""
        old = self.read_agreed(self.path / "parts" / "_costs.json")
        return {**(json.loads(old) if old else {}), **self.costs}

    def _loaded(self, name: str, path: epath.Path):
        if name not in self.loaded_parts and name not in self.computed_parts:
            self.loaded_parts.append(name)
            self.log(f"[{name}] loaded from {path}")

    def _get(self, name: str, suffix: str, compute: Callable[[], object], encode, decode):
        """Part `name` (file suffix `suffix`): loaded when finished, else computed, encoded
        and saved; one thread at a time per part."""
        with self._lock(name):
            path = self.part_file(name, suffix)
            data = self.read_agreed(path)
            if data is not None:
                self._loaded(name, path)
                return decode(data)
            result, data = encode(self._run(name, compute))
            self.write(path, data)
            return result

    def part(self, name: str, compute: Callable[[], dict]) -> dict:
        """The JSON result of part `name`: loaded when finished, else computed and saved."""
        def encode(out):
            out = _to_jsonable(out)
            return out, json.dumps(out, indent=2, sort_keys=True).encode()

        return self._get(name, ".json", compute, encode, json.loads)

    def arrays(self, name: str, compute: Callable[[], dict]) -> dict[str, np.ndarray]:
        """The per-example arrays of part `name` (an npz), loaded or computed and saved."""
        def encode(out):
            out = {k: np.asarray(v) for k, v in out.items()}
            return out, _npz_bytes(out)

        return self._get(name, ".npz", compute, encode, _npz_load)

    def load_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        """A finished array part, or None (every process gets process 0's)."""
        data = self.read_agreed(self.part_file(name, ".npz"))
        return None if data is None else _npz_load(data)

    def write_json(self, path: epath.Path, obj) -> None:
        self.write(path, json.dumps(_to_jsonable(obj), indent=2, sort_keys=True,
                                    default=float).encode())
