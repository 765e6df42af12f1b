"""Compression rate of a map and its Jacobian spectrum (paper Sec. 5, "compression rate").

The paper measures how strongly a purifier `f` (with its randomness fixed) shrinks the input
space around a clean image `x0`:

- **sample-based** (the paper's definition): the mean over 50 perturbations `delta`, uniform
  on the l2 sphere of radius `r` around `x0`, of ``||f(x0 + delta) - f(x0)|| / ||delta||``;
- **Jacobian-based**: the singular values of ``J = df/dx`` at `x0` (the paper: over 90% of
  them are below 0.25 at clean CIFAR-10 images). Their root-mean-square,
  ``||J||_F / sqrt(d)`` (`d` = input size), is the rate an isotropic infinitesimal
  perturbation sees: for `u` uniform on the unit sphere, ``E ||J u||^2 = ||J||_F^2 / d``.

Everything here works on *any* JAX function of one example (not only our purifiers). A
purifier is measured in ONE call over a batch with its per-example keys: pass the batched
``purify_fn(x, keys)`` (a `Defense`'s, `diffjax.diffusion.make_purifier`'s, or your own)
and ``keys=``: each example is measured under its own key, e.g. the realization the fixed
attack used::

    rate = metrics.compression_rate(defense.purify_fn, x, keys=protocols.realization(ek))

The weights inside a `jax.tree_util.Partial` and the keys are traced, so new keys, new
examples or new weights of the same shapes reuse the compiled program. All functions are
`vmap`ped over the batch and `jit`-compiled; they also run inside the caller's `jit`.

How the Jacobian is reached (the cost unit is one `jvp`, about 1-3 forward passes of `f`):

- ``estimator="exact"``: `d` Jacobian-vector products against the standard basis, `vmap`ped
  in chunks of `chunk_size` under `lax.map`, so memory is `chunk_size` tangents at a time
  (forward mode streams through `lax.scan`, storing no per-step residuals). The rate needs
  only the squared column norms; `jacobian_singular_values` keeps the `[d, d_out]` matrix
  and takes its SVD.
- ``estimator="hutchinson"`` (matrix-free): ``||J||_F^2 = E ||J v||^2`` for Rademacher
  probes `v` (Hutchinson's trace estimator applied to ``J^T J``); `num_probes` `jvp`s, and
  the standard error of the mean is returned with ``return_stderr=True``.
- ``estimator="auto"`` picks exact for ``d <= EXACT_MAX_DIM`` (1024) and Hutchinson above.
  Why 1024: the exact path costs `d` `jvp`s against the default 64 probes, so up to 16x the
  matrix-free cost buys a result without statistical error (and the full spectrum); it
  covers the embedded 8x8 digits (64 dims) and 32x32 grey images, while CIFAR-10
  (3,072 dims, 48x the probes) and ImageNet (196,608) go matrix-free.
- `jacobian_top_singular_values`: the top-k singular values by Golub-Kahan-Lanczos
  bidiagonalisation with full reorthogonalisation, through `jvp` and its transpose (`vjp`).

``ad_mode="reverse"`` builds the same quantities from `vjp`s (rows of `J` instead of
columns), for functions that forward mode cannot differentiate (e.g. a `jax.custom_vjp`).

Purifiers take [0, 1] images; a perturbed point ``x0 + delta`` may leave [0, 1]. Nothing is
clipped by default (the user decides); ``clip_to_unit=True`` clips the perturbed point and
then divides by the distance actually travelled, ``||clip(x0 + delta) - x0||``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks

__all__ = [
    "EXACT_MAX_DIM",
    "compression_rate",
    "jacobian_singular_values",
    "jacobian_top_singular_values",
    "fraction_below",
]

# Largest input size for which `estimator="auto"` takes the exact path (module docstring).
EXACT_MAX_DIM = 1024

_METHODS = ("jacobian", "sample")
_ESTIMATORS = ("auto", "exact", "hutchinson")
_AD_MODES = ("forward", "reverse")
_REDUCTIONS = ("mean", "rms")


# --------------------------------------------------------------------------------------
# Input checks and compile caching.
# --------------------------------------------------------------------------------------


def _check_x0(x0):
    if not hasattr(x0, "shape") or not hasattr(x0, "dtype"):
        _checks.fail("x0", "a batch of examples as an array [B, ...]", type(x0).__name__)
    if x0.ndim < 2:
        _checks.fail("x0", "a batch of examples, rank >= 2 [B, ...] (e.g. NHWC images)",
                     f"shape {tuple(x0.shape)}",
                     "add a batch axis with x0[None]" if x0.ndim == 1 else None)
    if x0.shape[0] < 1:
        _checks.fail("x0", "at least one example", f"shape {tuple(x0.shape)}")
    _checks.check_images(x0, "x0", rank=None, value_range=None)
    return x0


def _check_args(args, batch: int) -> tuple:
    """Per-example extra arguments of `f`: a tuple of pytrees with leading axis `batch`."""
    if not isinstance(args, (tuple, list)):
        _checks.fail("args", "a tuple of per-example arguments of f (each [B, ...])",
                     type(args).__name__, "e.g. args=(keys,) for f(x, key)")
    for leaf in jax.tree.leaves(tuple(args)):
        if not hasattr(leaf, "shape") or leaf.ndim < 1 or leaf.shape[0] != batch:
            _checks.fail("args", f"arrays with one row per example (leading axis {batch})",
                         f"shape {tuple(getattr(leaf, 'shape', ()))}")
    return tuple(args)


def _one_row(args):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), args)


def _check_f(f, x0, *, same_shape: bool, args=()):
    """Traces `f` on one example (no FLOPs) and checks its output; returns its shape/dtype."""
    if not callable(f):
        _checks.fail("f", "a callable of one example", type(f).__name__)
    example = jax.ShapeDtypeStruct(x0.shape[1:], x0.dtype)
    try:
        out = jax.eval_shape(f, example, *_one_row(args))
    except Exception as e:  # noqa: BLE001 - re-raised with the contract in the message
        raise ValueError(
            f"f: expected a function of ONE example of shape {tuple(x0.shape[1:])}; calling it "
            f"failed with {type(e).__name__}: {e} (for a batched function g use "
            "f = lambda x: g(x[None])[0])") from e
    if not hasattr(out, "shape") or not jnp.issubdtype(out.dtype, jnp.floating):
        _checks.fail("f", "a floating-point array output", out)
    if same_shape and tuple(out.shape) != tuple(x0.shape[1:]):
        hint = "pass same_shape=False for a map into another space"
        if tuple(out.shape) == (1, *x0.shape[1:]):
            hint = ("f returned a batch of one: f must act on one example; for a batched g use "
                    "f = lambda x: g(x[None])[0]")
        _checks.fail("f", f"an output of the input example's shape {tuple(x0.shape[1:])}",
                     f"shape {tuple(out.shape)}", hint)
    return out


def _example_keys(key, batch: int, name: str = "key"):
    """One key per example: a single key is folded with the example's batch index."""
    if not hasattr(key, "dtype"):
        _checks.fail(name, "a jax.random.key or one key per example [B]", type(key).__name__)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return _example_keys(jax.random.wrap_key_data(key), batch, name)
    return _checks.check_keys(key, batch, name)


def _split_fn(f):
    """Splits `f` (a plain callable or a pytree such as `jax.tree_util.Partial`) into its
    array leaves, traced by `jit`, and a hashable static rest, so that one compiled program
    serves every call with the same function (and weights are not baked in as constants)."""
    leaves, treedef = jax.tree.flatten(f)
    is_arr = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    dynamic = [leaf if a else None for leaf, a in zip(leaves, is_arr, strict=True)]
    static = (treedef, tuple(None if a else leaf for leaf, a in zip(leaves, is_arr, strict=True)))
    try:
        hash(static)
    except TypeError:
        return None, None
    return dynamic, static


def _merge_fn(dynamic, static):
    treedef, static_leaves = static
    leaves = [d if s is None else s for d, s in zip(dynamic, static_leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def _call_jitted(core: Callable, f, *args, **static_kwargs):
    """Runs `core(f, *args, **static_kwargs)` under a `jit` cached per function."""
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
        # Inside another jit (e.g. the study's `_measure`, which carries the same options):
        # that program compiles this one; a nested jit may not take compiler_options.
        return core(f, *args, **static_kwargs)
    dynamic, static = _split_fn(f)
    if static is None:  # an unhashable callable: compile a closure for this call
        return jax.jit(functools.partial(core, f, **static_kwargs),
                       compiler_options=COMPILER_OPTIONS)(*args)
    return _jitted_core(core, dynamic, static, *args, **static_kwargs)


# XLA's constant folding spends minutes on these programs (vmapped products through a
# purifier's scan): the Hutchinson rate of a 2-step DDPM++ purifier on 32x32x3 compiled in
# 409 s with it and 42 s without (same run time, 0.35-0.40 s). Every Jacobian program of
# diffjax is compiled without it.
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "constant_folding"}


@functools.partial(jax.jit, static_argnums=(0, 2), static_argnames=(
    "method", "estimator", "ad_mode", "num_samples", "num_probes", "chunk_size",
    "clip_to_unit", "reduction", "k", "num_iterations"), compiler_options=COMPILER_OPTIONS)
def _jitted_core(core, dynamic, static, *args, **static_kwargs):
    return core(_merge_fn(dynamic, static), *args, **static_kwargs)


def _batched_as_one(g, x, key, *args):
    """`g(x[None], key[None])[0]`: one example of a batched `g(x, keys)`."""
    return g(x[None], key[None], *args)[0]


def _with_keys(f, x0, keys, args):
    """`(f of one example, args)` for a batched `f(x, keys)` measured under `keys` `[B]`."""
    if keys is None:
        return f, args
    from diffjax.defense import Defense

    if isinstance(f, Defense):
        f = f.purify_fn
    if not callable(f):
        _checks.fail("f", "a batched function f(x, keys) when keys= is given",
                     type(f).__name__)
    keys = _checks.check_keys(keys, x0.shape[0], "keys")
    if not isinstance(f, jax.tree_util.Partial):
        f = jax.tree_util.Partial(f)
    return jax.tree_util.Partial(_batched_as_one, f), (keys, *args)


def _probe_keys(key, batch: int, estimator: str):
    """The keys of a stochastic estimator: explicit, one per example or one folded by row."""
    if key is None:
        _checks.fail("key", f"a jax.random.key, or one key per example [{batch}], for the "
                     f"{estimator} estimator (its probes are random)", None,
                     "e.g. key=jax.random.key(0); per-example keys make the result "
                     "independent of the example's position in the batch")
    return _example_keys(key, batch)


# --------------------------------------------------------------------------------------
# Per-example kernels (one example `x`, unbatched; vmapped by the callers).
# --------------------------------------------------------------------------------------


def _flat(f, shape):
    return lambda v: jnp.ravel(f(v.reshape(shape)))


def _all_finite(*arrays):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def _chunked_map(fn: Callable, n: int, chunk_size: int):
    """``stack([fn(i) for i in range(n)])``, `vmap`ped over chunks of at most `chunk_size`
    under `lax.map`. The chunks are balanced and the index range padded to a whole number
    of them (padded results are dropped), so the body is compiled once, not twice as
    `lax.map(batch_size=...)` does for a remainder."""
    num_chunks = -(-n // chunk_size)
    size = -(-n // num_chunks)
    idx = jnp.arange(num_chunks * size)
    if num_chunks == 1:
        out = jax.vmap(fn)(idx)
    else:
        out = jax.lax.map(jax.vmap(fn), idx.reshape(num_chunks, size))
        out = jax.tree.map(lambda a: a.reshape(num_chunks * size, *a.shape[2:]), out)
    return jax.tree.map(lambda a: a[:n], out)


def _basis_products(g, xf, d_out: int, chunk_size: int, ad_mode: str, fn_of_vec: Callable):
    """Applies `fn_of_vec` to every column (forward) or row (reverse) of the Jacobian of `g`
    at `xf`, `chunk_size` products at a time; returns the stacked results."""
    d_in = xf.shape[0]
    if ad_mode == "forward":
        def one(i):
            e = jax.nn.one_hot(i, d_in, dtype=xf.dtype)
            return fn_of_vec(jax.jvp(g, (xf,), (e,))[1])
        n = d_in  # one_hot of a padded index is zero: harmless, and dropped
    else:
        y, vjp_fn = jax.vjp(g, xf)

        def one(i):
            e = jax.nn.one_hot(i, d_out, dtype=y.dtype)
            return fn_of_vec(vjp_fn(e)[0])
        n = d_out
    return _chunked_map(one, n, chunk_size)


def _rate_exact(g, xf, key, *, d_out, chunk_size, ad_mode, **_):
    del key  # deterministic
    y = g(xf)
    sq = _basis_products(g, xf, d_out, chunk_size, ad_mode, lambda c: jnp.sum(jnp.square(c)))
    rate = jnp.sqrt(jnp.sum(sq) / xf.shape[0])
    return rate, jnp.zeros_like(rate), _all_finite(y, sq)


def _rate_hutchinson(g, xf, key, *, d_out, chunk_size, ad_mode, num_probes, **_):
    d_in = xf.shape[0]
    if ad_mode == "forward":
        y = g(xf)
        product = lambda v: jax.jvp(g, (xf,), (v,))[1]
        dim = d_in
    else:
        y, vjp_fn = jax.vjp(g, xf)
        product = lambda u: vjp_fn(u)[0]
        dim = d_out

    def probe(i):
        v = jax.random.rademacher(jax.random.fold_in(key, i), (dim,), dtype=xf.dtype)
        return jnp.sum(jnp.square(product(v)))

    est = _chunked_map(probe, num_probes, chunk_size)
    frob2 = jnp.mean(est)
    se_frob2 = jnp.std(est, ddof=1) / math.sqrt(num_probes)
    rate = jnp.sqrt(frob2 / d_in)
    # Delta method: d sqrt(F/d) / dF = 1 / (2 d rate).
    se = se_frob2 / (2.0 * d_in * jnp.maximum(rate, jnp.finfo(rate.dtype).tiny))
    return rate, se, _all_finite(y, est)


def _rate_sample(g, xf, key, *, num_samples, radius, chunk_size, clip_to_unit, reduction, **_):
    y0 = g(xf)

    def one(i):
        z = jax.random.normal(jax.random.fold_in(key, i), xf.shape, xf.dtype)
        xp = xf + radius * z / jnp.linalg.norm(z)
        if clip_to_unit:
            xp = jnp.clip(xp, 0.0, 1.0)
        dist = jnp.maximum(jnp.linalg.norm(xp - xf), jnp.finfo(xf.dtype).tiny)
        return jnp.linalg.norm(g(xp) - y0) / dist

    ratios = _chunked_map(one, num_samples, chunk_size)
    sqrt_n = math.sqrt(num_samples)
    if reduction == "mean":
        rate = jnp.mean(ratios)
        se = jnp.std(ratios, ddof=1) / sqrt_n if num_samples > 1 else jnp.zeros_like(rate)
    else:
        rate = jnp.sqrt(jnp.mean(jnp.square(ratios)))
        se2 = (jnp.std(jnp.square(ratios), ddof=1) / sqrt_n if num_samples > 1
               else jnp.zeros_like(rate))
        se = se2 / (2.0 * jnp.maximum(rate, jnp.finfo(rate.dtype).tiny))
    return rate, se, _all_finite(y0, ratios)


def _rate_core(f, x0, keys, radius, args, *, method, estimator, **kw):
    shape = x0.shape[1:]
    d_out = math.prod(jax.eval_shape(f, jax.ShapeDtypeStruct(shape, x0.dtype),
                                     *_one_row(args)).shape)
    kernel = {"sample": _rate_sample, "exact": _rate_exact,
              "hutchinson": _rate_hutchinson}[method if method == "sample" else estimator]

    def per_example(x, k, a):
        g = _flat(lambda v: f(v, *a), shape)
        return kernel(g, jnp.ravel(x), k, d_out=d_out, radius=radius, **kw)

    return jax.vmap(per_example)(x0, keys, args)


def _raise_if_nonfinite(finite):
    if _checks.is_concrete(finite):
        ok = np.asarray(finite)
        if not ok.all():
            bad = np.flatnonzero(~ok)[:10].tolist()
            _checks.fail("f", "finite outputs and derivatives at x0",
                         f"NaN/Inf for examples {bad}",
                         "check f at these inputs (e.g. a division by zero or a log of 0)")


def compression_rate(
    f: Callable,
    x0,
    *,
    keys=None,
    method: str = "jacobian",
    key=None,
    num_samples: int = 50,
    radius: float | None = None,
    estimator: str = "auto",
    num_probes: int = 64,
    chunk_size: int = 32,
    ad_mode: str = "forward",
    clip_to_unit: bool = False,
    reduction: str = "mean",
    same_shape: bool = True,
    return_stderr: bool = False,
    args=(),
):
    """The compression rate of `f` around each example of `x0` (paper Sec. 5).

    Args:
      f: with ``keys=``: a batched purifier ``f(x [B, ...], keys [B]) -> [B, ...]`` (a
        `Defense` is taken as its ``purify_fn``), measured at each example under that
        example's key. Without: a deterministic JAX function of ONE example
        (``[H, W, C] -> [H, W, C]``, or any array shape). A `jax.tree_util.Partial` has its
        array arguments traced (not baked into the program); passing the same `f` object
        again reuses the compiled program.
      x0: the points of measurement, a floating batch ``[B, ...]`` (clean images, NHWC in
        [0, 1] for our purifiers; any values are accepted here).
      keys: ``[B]`` typed keys, one per example, passed to a batched `f` (e.g.
        ``diffjax.protocols.realization(example_keys)``: the realization the `Fixed`
        protocol attacks); None for a deterministic `f` of one example.
      method: ``"jacobian"``: the RMS singular value of the Jacobian at each `x0`,
        ``||J||_F / sqrt(d)``, `d` the input size. ``"sample"``: the paper's estimate, the
        mean over `num_samples` draws of ``||f(x0 + delta) - f(x0)|| / ||delta||``, `delta`
        uniform on the l2 sphere of radius `radius`; needs `key` and `radius`.
      key: the probes' randomness: a `jax.random.key`, or one key per example ``[B]``
        (e.g. ``fold_in`` of the example keys, which makes results independent of batch
        position; a single key is folded with the batch index). Required by the
        stochastic estimators (``"sample"`` and Hutchinson); the exact path uses none.
      num_samples: perturbations per example for ``"sample"`` (the paper: 50), >= 1.
      radius: the l2 radius of the perturbations for ``"sample"``, > 0 (the paper's
        eps-neighbourhood: about 1.0 on CIFAR-10).
      estimator: for ``"jacobian"``: ``"exact"`` (`d` basis products), ``"hutchinson"``
        (matrix-free, `num_probes` random products) or ``"auto"``: exact when
        ``d <= EXACT_MAX_DIM`` (1024), else Hutchinson.
      num_probes: Rademacher probes of the Hutchinson estimator, >= 2.
      chunk_size: products (or perturbed evaluations of `f`) computed at once per example;
        bounds memory at `chunk_size` times one evaluation of `f` per example.
      ad_mode: ``"forward"`` (`jvp`, streams through `lax.scan`) or ``"reverse"``
        (`vjp`; for functions with a `custom_vjp`).
      clip_to_unit: ``"sample"`` only: clip ``x0 + delta`` to [0, 1] and divide by the
        distance actually travelled. Off by default: purifiers take [0, 1] images, and
        whether perturbed points may leave [0, 1] is the caller's decision.
      reduction: ``"sample"`` only: ``"mean"`` of the ratios (the paper) or ``"rms"``,
        their root mean square, which tends to the Jacobian rate exactly as the radius
        shrinks (the mean is at most the RMS, by Jensen).
      same_shape: require the output of `f` to have the input example's shape (catches
        batched functions passed by mistake); False allows maps into another space.
      return_stderr: also return the standard error of each rate (zero for the exact path).
      args: per-example extra arguments of `f`, a tuple of arrays (or pytrees) with
        leading axis `B`: `f(x, *args_b)` for example `b`, not differentiated. E.g. a
        purifier under each example's own fixed key in one batched call:
        ``f = lambda x, k: purify(eps_fn, x[None], k[None], ...)[0]`` with
        ``args=(keys,)``.

    Returns:
      ``rate`` ``[B]`` float, or ``(rate, stderr)`` with ``return_stderr=True``. A linear
      ``f(x) = A x`` gives the RMS singular value of `A` (with ``"jacobian"``).

    Raises:
      ValueError: naming the argument: bad `x0` rank/dtype, `f` failing on one example or
        changing its shape, `f` returning NaN/Inf (checked on concrete values, i.e. outside
        `jit`), ``radius <= 0``, ``num_samples < 1``, a missing key for ``"sample"``.
    """
    _check_x0(x0)
    _checks.check_choice(method, "method", _METHODS)
    _checks.check_choice(estimator, "estimator", _ESTIMATORS)
    _checks.check_choice(ad_mode, "ad_mode", _AD_MODES)
    _checks.check_choice(reduction, "reduction", _REDUCTIONS)
    chunk_size = _checks.check_int(chunk_size, "chunk_size", lo=1)
    args = _check_args(args, x0.shape[0])
    f, args = _with_keys(f, x0, keys, args)
    _check_f(f, x0, same_shape=same_shape, args=args)
    batch = x0.shape[0]
    d = math.prod(x0.shape[1:])
    kw = dict(chunk_size=chunk_size)
    if method == "sample":
        num_samples = _checks.check_int(num_samples, "num_samples", lo=1)
        if radius is None:
            _checks.fail("radius", "a positive l2 radius for method='sample'", None,
                         "the paper uses the eps-neighbourhood, about 1.0 on CIFAR-10")
        radius = _checks.check_number(radius, "radius", lo=0.0, lo_open=True)
        probe = _probe_keys(key, batch, "sample")
        kw.update(method="sample", estimator="auto", num_samples=num_samples,
                  clip_to_unit=bool(clip_to_unit), reduction=reduction)
    else:
        if estimator == "auto":
            estimator = "exact" if d <= EXACT_MAX_DIM else "hutchinson"
        num_probes = _checks.check_int(num_probes, "num_probes", lo=2)
        probe = (_probe_keys(key, batch, "Hutchinson") if estimator == "hutchinson"
                 else _example_keys(jax.random.key(0), batch))  # unused by the exact path
        kw.update(method="jacobian", estimator=estimator, ad_mode=ad_mode)
        if estimator == "hutchinson":
            kw.update(num_probes=num_probes)
    radius = jnp.asarray(1.0 if radius is None else radius, x0.dtype)  # traced: no retrace
    rate, se, finite = _call_jitted(_rate_core, f, x0, probe, radius, args, **kw)
    _raise_if_nonfinite(finite)
    return (rate, se) if return_stderr else rate


# --------------------------------------------------------------------------------------
# Spectra.
# --------------------------------------------------------------------------------------


def _sv_core(f, x0, args, *, chunk_size, ad_mode):
    shape = x0.shape[1:]
    d_out = math.prod(jax.eval_shape(f, jax.ShapeDtypeStruct(shape, x0.dtype),
                                     *_one_row(args)).shape)

    def per_example(x, a):
        g = _flat(lambda v: f(v, *a), shape)
        xf = jnp.ravel(x)
        mat = _basis_products(g, xf, d_out, chunk_size, ad_mode, lambda c: c)
        s = jnp.linalg.svd(mat, compute_uv=False)
        return s, _all_finite(g(xf), mat)

    return jax.vmap(per_example)(x0, args)


def jacobian_singular_values(f: Callable, x0, *, keys=None, chunk_size: int = 64,
                             ad_mode: str = "forward", args=()):
    """All singular values of the Jacobian of `f` at each example of `x0`, descending.

    The exact path: the Jacobian is built from `d_in` `jvp`s against the standard basis
    (``ad_mode="forward"``) or `d_out` `vjp`s (``"reverse"``), `chunk_size` at a time,
    then its singular values are taken (paper Sec. 5: over 90% of them are below 0.25 at
    clean CIFAR-10 images; see `fraction_below`). Memory per example: the ``d_out x d_in``
    Jacobian; for large inputs use `jacobian_top_singular_values`.

    Args:
      f: a batched ``f(x, keys)`` with ``keys=``, else a deterministic JAX function of ONE
        example, any output shape (see `compression_rate`).
      x0: a floating batch ``[B, ...]``.
      keys: ``[B]`` per-example keys for a batched `f` (see `compression_rate`).
      chunk_size: products computed at once, >= 1.
      ad_mode: ``"forward"`` or ``"reverse"``.
      args: per-example extra arguments of `f`, a tuple of arrays (or pytrees) with
        leading axis `B`: `f(x, *args_b)` for example `b` (e.g. ``args=(keys,)`` to measure
        each example's purifier under its own key in one batched call); not differentiated.

    Returns:
      ``[B, min(d_out, d_in)]`` singular values, descending.

    Raises:
      ValueError: bad `x0`, `f` failing on one example or returning NaN/Inf (checked on
        concrete values).
    """
    _check_x0(x0)
    _checks.check_choice(ad_mode, "ad_mode", _AD_MODES)
    chunk_size = _checks.check_int(chunk_size, "chunk_size", lo=1)
    args = _check_args(args, x0.shape[0])
    f, args = _with_keys(f, x0, keys, args)
    _check_f(f, x0, same_shape=False, args=args)
    s, finite = _call_jitted(_sv_core, f, x0, args, chunk_size=chunk_size, ad_mode=ad_mode)
    _raise_if_nonfinite(finite)
    return s


def _safe_normalize(w, scale):
    n = jnp.linalg.norm(w)
    ok = n > 1e3 * jnp.finfo(w.dtype).eps * scale
    return jnp.where(ok, w / jnp.where(ok, n, 1.0), 0.0), jnp.where(ok, n, 0.0)


def _reorth(w, basis):
    # Classical Gram-Schmidt twice ("twice is enough"); unused rows of `basis` are zero.
    # Full float32 precision: TPU/GPU default matmul precision (bf16/TF32 passes) would
    # lose the orthogonality the Ritz values rely on.
    dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)
    w = w - dot(basis.T, dot(basis, w))
    return w - dot(basis.T, dot(basis, w))


def _lanczos_example(g, xf, key, *, k, num_iterations):
    """Golub-Kahan-Lanczos bidiagonalisation with full reorthogonalisation.

    ``J V_m = U_m B_m`` with `B_m` upper bidiagonal (diagonal alpha, super-diagonal beta);
    the singular values of `B_m` approximate the extreme singular values of `J`, the
    largest converging first. A breakdown (an exactly invariant subspace, rank(J) < m)
    leaves zero vectors, hence extra zero Ritz values, and the found ones exact.
    """
    m = num_iterations
    y, jvp_fn = jax.linearize(g, xf)
    vjp_fn = jax.linear_transpose(jvp_fn, xf)
    d_in, d_out = xf.shape[0], y.shape[0]
    dt = xf.dtype
    v0 = jax.random.normal(key, (d_in,), dt)
    v0 = v0 / jnp.linalg.norm(v0)
    u0 = jvp_fn(v0)
    alpha0 = jnp.linalg.norm(u0)
    scale = jnp.maximum(alpha0, jnp.finfo(dt).tiny)
    u0, alpha0 = _safe_normalize(u0, scale)
    V = jnp.zeros((m + 1, d_in), dt).at[0].set(v0)
    U = jnp.zeros((m + 1, d_out), dt).at[0].set(u0)
    alphas = jnp.zeros((m + 1,), dt).at[0].set(alpha0)
    betas = jnp.zeros((m,), dt)

    def body(j, carry):
        V, U, alphas, betas = carry
        w = vjp_fn(U[j])[0] - alphas[j] * V[j]
        v, beta = _safe_normalize(_reorth(w, V), scale)
        V = V.at[j + 1].set(v)
        z = jvp_fn(v) - beta * U[j]
        u, alpha = _safe_normalize(_reorth(z, U), scale)
        return V, U.at[j + 1].set(u), alphas.at[j + 1].set(alpha), betas.at[j].set(beta)

    V, U, alphas, betas = jax.lax.fori_loop(0, m, body, (V, U, alphas, betas))
    bidiag = jnp.diag(alphas[:m]) + jnp.diag(betas[: m - 1], 1)
    p, s, _ = jnp.linalg.svd(bidiag)
    # Residual bound: J^T U p = sigma V q + beta_m p_m v_{m+1}, so each Ritz value lies
    # within |beta_m p_m| of a singular value of J.
    bounds = jnp.abs(betas[m - 1] * p[m - 1, :k])
    return s[:k], bounds, _all_finite(y, alphas, betas)


def _topk_core(f, x0, keys, args, *, k, num_iterations):
    shape = x0.shape[1:]

    def per_example(x, key, a):
        g = _flat(lambda v: f(v, *a), shape)
        return _lanczos_example(g, jnp.ravel(x), key, k=k, num_iterations=num_iterations)

    return jax.vmap(per_example)(x0, keys, args)


def jacobian_top_singular_values(f: Callable, x0, k: int, *, keys=None, key=None,
                                 num_iterations: int | None = None,
                                 return_error_bounds: bool = False, args=()):
    """The `k` largest singular values of the Jacobian of `f` at each `x0`, matrix-free.

    Golub-Kahan-Lanczos bidiagonalisation (with full reorthogonalisation) of ``J = df/dx``
    through `jvp` and its transpose: `num_iterations + 1` `jvp`s and `num_iterations`
    `vjp`s per example, never forming `J`. For large inputs (CIFAR-10, ImageNet) where
    `jacobian_singular_values` would need one `jvp` per input dimension.

    Args:
      f: a batched ``f(x, keys)`` with ``keys=``, else a deterministic JAX function of ONE
        example (see `compression_rate`); it must support `jax.linearize` and its
        transpose.
      x0: a floating batch ``[B, ...]``.
      k: how many singular values, ``1 <= k <= min(d_in, d_out)``.
      keys: ``[B]`` per-example keys for a batched `f` (see `compression_rate`).
      key: the start vector's key (one key, or ``[B]``); defaults to ``jax.random.key(0)``
        (the converged values do not depend on it; the error bounds say how far they are).
      num_iterations: Lanczos steps `m` (``k <= m <= min(d_in, d_out)``); the default
        is ``min(max(2k, k + 20), min(d_in, d_out))``. Top values well separated from the
        rest converge in a few steps; a flat top of the spectrum converges slowly (and a
        not yet converged Ritz value can sit between two true ones): check the error
        bounds and raise `num_iterations` when they are large.
      return_error_bounds: also return, per value, the residual bound
        ``|beta_m p_m|``: each returned value lies within it of a true singular value.
      args: per-example extra arguments of `f` (see `compression_rate`).

    Returns:
      ``[B, k]`` singular values, descending; with ``return_error_bounds=True``,
      ``(values, bounds)``, both ``[B, k]``.
    """
    _check_x0(x0)
    args = _check_args(args, x0.shape[0])
    f, args = _with_keys(f, x0, keys, args)
    out = _check_f(f, x0, same_shape=False, args=args)
    n = min(math.prod(x0.shape[1:]), math.prod(out.shape))
    k = _checks.check_int(k, "k", lo=1, hi=n)
    if num_iterations is None:
        num_iterations = min(max(2 * k, k + 20), n)
    num_iterations = _checks.check_int(num_iterations, "num_iterations", lo=k, hi=n)
    start = _example_keys(jax.random.key(0) if key is None else key, x0.shape[0])
    s, bounds, finite = _call_jitted(_topk_core, f, x0, start, args, k=k,
                                     num_iterations=num_iterations)
    _raise_if_nonfinite(finite)
    return (s, bounds) if return_error_bounds else s


def fraction_below(singular_values, threshold: float = 0.25, *, total: int | None = None):
    """The fraction of singular values below `threshold`, per example (paper Sec. 5).

    Args:
      singular_values: ``[B, n]`` descending (from `jacobian_singular_values`, or the top
        `n` from `jacobian_top_singular_values`).
      threshold: the paper uses 0.25 ("over 90% below 0.25").
      total: the full number of singular values, ``min(d_in, d_out)``, when only the top
        `n < total` are given. The values not given are at most the smallest given one, so
        when that is below `threshold` the fraction is exact; otherwise it is undetermined
        and NaN is returned for that example.

    Returns:
      ``[B]`` fractions in [0, 1] (NaN where undetermined).
    """
    s = jnp.asarray(singular_values)
    if s.ndim != 2:
        _checks.fail("singular_values", "a [B, n] array", f"shape {tuple(s.shape)}")
    threshold = _checks.check_number(threshold, "threshold")
    n = s.shape[1]
    total = n if total is None else _checks.check_int(total, "total", lo=n)
    below = jnp.sum(s < threshold, axis=1) + (total - n)
    frac = below / total
    if total > n:
        frac = jnp.where(s[:, -1] < threshold, frac, jnp.nan)
    return frac
