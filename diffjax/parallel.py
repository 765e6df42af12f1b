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
