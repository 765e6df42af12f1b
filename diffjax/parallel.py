"""Data parallelism over all devices of all hosts: a 1-D mesh on the batch axis.

Per-example keys make every result independent of how the batch is split, so the same
code runs on one CPU, 8 GPUs or a TPU pod slice and gives the same numbers. Usage::

    parallel.initialize(distributed)          # jax.distributed.initialize() on pods
    mesh = parallel.data_mesh()               # all devices, axis "data"
    xs, n = parallel.shard_batch(mesh, x)     # padded to a multiple of the device count
    out = parallel.to_host(f(xs))[:n]         # gathered on every process
    if parallel.is_writer(): write(out)       # files written by process 0 only

`shard_batch` takes the *global* batch on every process (fine for small evaluation sets);
`shard_local_batch` takes each process's own rows (a per-host input pipeline, e.g.
`diffjax.data.batches(..., process_index=jax.process_index(), process_count=...)`) and
assembles them with `jax.make_array_from_process_local_data`.

Work owned per process (the study): each process holds only its share of the examples
(`share`), places its rows of every global batch with `put_local` (a global batch of B rows
is P local batches of B / P rows), reads its own rows back with `local_rows`, and agrees
with the others on what to do next: `agree_max` (e.g. the number of batches in a round,
so every process calls every collective program the same number of times),
`broadcast_bytes` (process 0's view of the work directory is the truth: a finished part it
has on its disk is loaded by every process, whether or not their own disks have it) and
`gather_rows` (every process's rows, e.g. per-example results for process 0 to write).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "initialize",
    "data_mesh",
    "pad_rows",
    "shard_batch",
    "shard_local_batch",
    "to_host",
    "is_writer",
    "share",
    "local_batch_size",
    "put_local",
    "local_rows",
    "agree_max",
    "broadcast_bytes",
    "gather_rows",
]

_INITIALIZED = {"done": False}


def initialize(distributed: bool) -> None:
    """Calls `jax.distributed.initialize()` once when `distributed` (multi-host runs).

    On TPU pods and SLURM/Kubernetes GPU clusters JAX discovers the coordinator itself;
    elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (JAX reads
    only the first from the environment; the other two are passed here).
    """
    if distributed and not _INITIALIZED["done"]:
        import os

        kwargs = {}
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)
        _INITIALIZED["done"] = True


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices (of all processes), axis name "data".

    The axis is `AxisType.Auto`: XLA propagates the batch sharding through the models
    (`jax.make_mesh` defaults to Explicit axes, under which reshapes of sharded arrays,
    e.g. a U-Net's nearest-neighbour upsampling, need explicit output shardings).
    """
    n = len(devices) if devices is not None else jax.device_count()
    return jax.make_mesh((n,), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def pad_rows(x: np.ndarray, multiple: int, rows: int = 0) -> np.ndarray:
    """Pads axis 0 by repeating the last row, to at least `rows` rows and to a multiple of
    `multiple`."""
    n = x.shape[0]
    target = -(-max(n, rows) // multiple) * multiple
    if target == n:
        return x
    reps = np.repeat(x[-1:], target - n, axis=0)
    return np.concatenate([x, reps], axis=0)


def _batch_sharding(mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def shard_batch(mesh, *arrays, rows: int = 0):
    """Places global batches on the mesh, split on axis 0; returns (arrays..., n).

    Every process passes the same full batch. Rows are padded (repeating the last row) to
    at least `rows` (so that batches of every size share one compiled program) and to a
    multiple of the device count; drop the padding from results with `[:n]`. Typed key
    arrays are accepted.
    """
    n = arrays[0].shape[0]
    size = mesh.devices.size
    out = []
    for a in arrays:
        if hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = pad_rows(np.asarray(jax.random.key_data(a)), size, rows)
            impl = jax.random.key_impl(a)
            sharded = _put(mesh, data)
            out.append(jax.random.wrap_key_data(sharded, impl=impl))
        else:
            out.append(_put(mesh, pad_rows(np.asarray(a), size, rows)))
    return (*out, n)


def _put(mesh, host: np.ndarray):
    sharding = _batch_sharding(mesh, host.ndim)
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_local_batch(mesh, local: np.ndarray):
    """Assembles each process's own rows into one global array split on axis 0."""
    return jax.make_array_from_process_local_data(_batch_sharding(mesh, local.ndim), local)


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) global array as one NumPy array on every process."""
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def is_writer() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0


# ------------------------------------------------------------------ work owned per process


def share(n: int, index: int | None = None, count: int | None = None) -> np.ndarray:
    """The example indices `0..n-1` that process `index` of `count` owns (a contiguous
    range, the first `n % count` processes holding one more)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    bounds = np.linspace(0, n, count + 1).round().astype(np.int64)
    return np.arange(bounds[index], bounds[index + 1])


def local_batch_size(batch_size: int) -> int:
    """This process's rows of a global batch of `batch_size` (B / P)."""
    p = jax.process_count()
    if batch_size % p:
        raise ValueError(f"batch_size: expected a multiple of the process count {p} (a "
                         f"global batch is split evenly across processes); got {batch_size}")
    return batch_size // p


def put_local(mesh, *arrays, rows: int):
    """Places this process's rows of one global batch; returns (global arrays..., n).

    Each process passes its own rows (at most `rows` = the local batch size), padded by
    repeating the last row to `rows` and to a multiple of its device count; the global
    arrays hold every process's rows in process order. Typed key arrays are accepted.
    `local_rows` reads this process's rows back.
    """
    n = arrays[0].shape[0]
    per = max(1, len(mesh.local_devices))
    target = -(-max(rows, n, 1) // per) * per
    out = []
    for a in arrays:
        is_key = hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
        host = np.asarray(jax.random.key_data(a)) if is_key else np.asarray(a)
        if n == 0:
            host = np.zeros((1, *host.shape[1:]), host.dtype)
        host = pad_rows(host, 1, target)
        if jax.process_count() == 1:
            placed = jax.device_put(host, _batch_sharding(mesh, host.ndim))
        else:
            placed = shard_local_batch(mesh, host)
        out.append(jax.random.wrap_key_data(placed, impl=jax.random.key_impl(a))
                   if is_key else placed)
    return (*out, n)


def local_rows(x) -> np.ndarray:
    """This process's rows of a global array split on axis 0 (what it `put_local`)."""
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:  # replicated dims give duplicate shards: keep one per row range
        start = s.index[0].start or 0
        if start not in seen:
            seen.add(start)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts)


def agree_max(value: int) -> int:
    """The largest of every process's `value` (the same on every process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    vals = multihost_utils.process_allgather(np.asarray([int(value)], np.int64))
    return int(np.max(vals))


def broadcast_bytes(data: bytes | None) -> bytes | None:
    """Process 0's `data` (None: "absent") on every process."""
    if jax.process_count() == 1:
        return data
    from jax.experimental import multihost_utils

    length = -1 if data is None else len(data)
    length = int(multihost_utils.broadcast_one_to_all(np.asarray([length], np.int64))[0])
    if length < 0:
        return None
    buf = np.frombuffer(data, np.uint8) if (is_writer() and data is not None) else \
        np.zeros(length, np.uint8)
    if length == 0:
        return b""
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8))


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of `local` `[n_p, ...]`, concatenated in process order."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    sizes = multihost_utils.process_allgather(np.asarray([local.shape[0]], np.int64))
    sizes = np.asarray(sizes).reshape(-1)
    width = int(sizes.max())
    padded = pad_rows(local, 1, width) if local.shape[0] else np.zeros(
        (width, *local.shape[1:]), local.dtype)
    every = np.asarray(multihost_utils.process_allgather(padded))  # [P, width, ...]
    return np.concatenate([every[p, :sizes[p]] for p in range(len(sizes))])
