"""Explicit-mode sharding at the attacks' boundary.

`jax.make_mesh` makes meshes whose axes are `Explicit` by default, and arrays placed on
them carry their sharding in their types. Some per-example code is not written for that
(e.g. `vmap` over EOT draws of a convolution folds the draw axis into the sharded batch
axis with a reshape, which explicit mode refuses). The attacks therefore move inputs that
live on an explicit mesh onto the same devices with `Auto` axes (the same layout, no
copy of data between devices) and let the compiler propagate the batch sharding.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding


def _concrete(a) -> bool:
    """A placed array (not a tracer: inside a caller's jit the caller owns the sharding)."""
    return isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same mesh with every axis `Auto`."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def to_auto(tree):
    """Re-places every array of `tree` that lives on an explicit mesh onto its `Auto` twin."""

    def one(a):
        s = getattr(a, "sharding", None) if _concrete(a) else None
        if _concrete(a) and isinstance(s, NamedSharding) and any(
                t == AxisType.Explicit for t in s.mesh.axis_types):
            return jax.device_put(a, NamedSharding(auto_mesh(s.mesh), s.spec))
        return a

    return jax.tree.map(one, tree)


def restore(tree, like):
    """Puts the arrays of `tree` back on the explicit mesh of `like` (the caller's input)."""
    s = getattr(like, "sharding", None) if _concrete(like) else None
    if not (isinstance(s, NamedSharding) and any(
            t == AxisType.Explicit for t in s.mesh.axis_types)):
        return tree
    mesh = s.mesh

    def one(a):
        sa = getattr(a, "sharding", None) if _concrete(a) else None
        if isinstance(sa, NamedSharding) and \
                sa.mesh.devices.shape == mesh.devices.shape:
            return jax.device_put(a, NamedSharding(mesh, sa.spec))
        return a

    return jax.tree.map(one, tree)
