r"""Before/after of `diffjax.models.layers` on XLA:CPU: the convolutions and the attention.

    python -m experiments.bench.conv_cpu --out=benchmarks/conv_cpu.json      # U-Nets
    python -m experiments.bench.conv_cpu --convs --out=/tmp/convs.json       # one conv

The U-Net mode times, interleaved in one process (so machine load hits both alike), the
digits U-Net of the embedded default (`unet.digits_config()`, batch 48, 8x8x1) and Ho et
al.'s CIFAR-10 U-Net at a quarter width (`cifar10_quarter_size`, batch 4, 32x32x3): one
forward, one input-gradient, purification through 10 steps and the full gradient through
10 steps (``remat``), each compiled ahead of time, under

- ``before``: the layers of commit 3e244f0 (`lax.conv_general_dilated` with the HWOI
  tangent kernel; one-head attention as ``bqhd,bkhd->bhqk`` with `jax.nn.softmax`);
- ``after``: the current `layers.conv2d` / `layers.attention`;
- ``after_no_ynn`` (``--no_ynn``): the current layers compiled with XLA:CPU's YNNPACK
  fusions off (``compiler_options``), the bound that XLA's own kernels allow.

Outputs are checked to agree before anything is timed. ``--convs`` times single 3x3
convolutions (forward and input-gradient) on YNNPACK, on XLA's Eigen kernel (YNNPACK off)
and with the layer, in GFLOP/s, and two formulations as matrix products: ``im2col`` (the
nine shifted copies of the padded input side by side, one ``[B*H*W, 9C] x [9C, O]``
product) and ``shifted`` (nine ``[B*H*W, C] x [C, O]`` products of the shifted input,
summed).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax import diffusion, models
from diffjax.models import layers, unet
from experiments.bench import programs, timing

NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
_DN = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv_before(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


@_conv_before.defjvp
def _conv_before_jvp(strides, padding, primals, tangents):
    x, kernel = primals
    dx, dk = tangents
    swapped = lax.optimization_barrier(jnp.swapaxes(kernel, 2, 3))
    d_out = lax.conv_general_dilated(dx, swapped, strides, padding,
                                     dimension_numbers=("NHWC", "HWOI", "NHWC"))
    d_out = d_out + lax.conv_general_dilated(x, dk, strides, padding, dimension_numbers=_DN)
    return _conv_before(x, kernel, strides, padding), d_out


def _attention_before(q, k, v, num_heads=1):
    b, n, c = q.shape
    d = c // num_heads
    q, k, v = (a.reshape(b, n, num_heads, d) for a in (q, k, v))
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d ** -0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, c)


_AFTER = (layers.conv2d, layers.attention)


def _use(variant: str) -> None:
    layers.conv2d, layers.attention = (
        (_conv_before, _attention_before) if variant == "before" else _AFTER)
    jax.clear_caches()  # the purifier's own jit would otherwise reuse the other trace


def _model(which: str):
    from experiments.bench.models import cifar10_quarter_size

    if which == "digits":
        cfg, batch = dict(unet.digits_config(), dropout=0.0), 48
    else:
        q = cifar10_quarter_size()
        cfg = dict(unet.cifar10_config(), ch=q.ch, num_groups=q.num_groups, dropout=0.0)
        batch = 4
    module = models.build("ddpm_unet", cfg)
    variables = models.get_spec("ddpm_unet").init(module, cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(variables)  # non-zero output layers (random weights)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    variables = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape)
                                          for a, k in zip(leaves, keys, strict=True)])
    return cfg, variables, batch


def _programs(cfg, variables, batch, options):
    r, c = cfg["resolution"], cfg["in_channels"]
    eps = models.make_fn("ddpm_unet", cfg, variables)
    x = jax.random.uniform(jax.random.key(1), (batch, r, r, c))
    t = jnp.full((batch,), 50, jnp.int32)
    keys = jax.random.split(jax.random.key(2), batch)
    sched = diffusion.linear_schedule()
    w = jax.random.normal(jax.random.key(3), (r * r * c, 10)) / np.sqrt(r * r * c)
    labels = jnp.arange(batch) % 10
    pur = programs.Purifier(100, 10)
    cases = {"forward": (lambda e, x, t: e(x, t), (eps, x, t)),
             "input_gradient": (lambda e, x, t: jax.grad(lambda x: jnp.sum(jnp.sin(e(x, t))))(x),
                                (eps, x, t)),
             "purify_10": (pur, (eps, sched, x, keys)),
             "grad_10": (programs.make_grad(pur), (x, eps, sched, keys, w, labels))}
    out = {}
    for name, (fn, args) in cases.items():
        lowered = jax.jit(fn).lower(*args)
        out[name] = (lowered.compile(compiler_options=options) if options
                     else lowered.compile(), args)
    return out


def unets(no_ynn: bool, repeats: int) -> dict:
    """Seconds per call of each program under each variant, and the ratios."""
    variants = ["before", "after"] + (["after_no_ynn"] if no_ynn else [])
    result = {}
    for which in ("digits", "cifar32_quarter"):
        cfg, variables, batch = _model(which)
        compiled = {}
        for v in variants:
            _use("before" if v == "before" else "after")
            compiled[v] = _programs(cfg, variables, batch, NO_YNN if v == "after_no_ynn" else None)
        _use("after")
        for name in compiled["before"]:
            ref = np.asarray(compiled["before"][name][0](*compiled["before"][name][1]))
            for v in variants[1:]:
                got = np.asarray(compiled[v][name][0](*compiled[v][name][1]))
                err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
                if err > 1e-4:
                    raise AssertionError(f"{which} {name} {v}: relative difference {err}")
        times = {(v, n): [] for v in variants for n in compiled["before"]}
        for _ in range(repeats):  # interleaved: load hits every variant alike
            for (v, n), ts in times.items():
                fn, args = compiled[v][n]
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                ts.append(time.perf_counter() - t0)
        rows = {}
        for n in compiled["before"]:
            med = {v: statistics.median(times[(v, n)]) for v in variants}
            rows[n] = {"s": med, "speedup_vs_before": {v: med["before"] / med[v]
                                                       for v in variants[1:]}}
        result[which] = {"batch": batch, "config": cfg, "programs": rows}
        print(json.dumps({which: {n: {k: round(x, 4) for k, x in r["s"].items()}
                                  for n, r in rows.items()}}), flush=True)
    return result


def _shifted_views(x, kh: int, kw: int) -> list:
    """The ``kh * kw`` shifted windows `[B, H, W, C]` of `x` padded for a stride-1 SAME
    convolution, in the kernel's (row, column) order."""
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    return [xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)]


def im2col_conv(x, kernel):
    """A stride-1 SAME convolution (odd kernel) NHWC x HWIO as one matrix product of the
    patches (the shifted windows side by side)."""
    kh, kw, c, o = kernel.shape
    patches = jnp.concatenate(_shifted_views(x, kh, kw), axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * c, o))


def shifted_conv(x, kernel):
    """The same convolution as a sum of ``kh * kw`` matrix products of the shifted windows."""
    kh, kw, c, o = kernel.shape
    return sum(jnp.einsum("bhwc,co->bhwo", v, k) for v, k in
               zip(_shifted_views(x, kh, kw), kernel.reshape(kh * kw, c, o), strict=True))


def convs(repeats: int) -> dict:
    """GFLOP/s of one 3x3 convolution (forward, input-gradient) at the U-Nets' shapes."""
    shapes = [(2, 32, 32, 32), (2, 32, 96, 32), (2, 16, 128, 64), (4, 32, 32, 32),
              (4, 32, 64, 64), (4, 16, 64, 64), (8, 32, 32, 32), (48, 8, 32, 32),
              (48, 8, 64, 32), (48, 4, 32, 32)]
    plain = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                  dimension_numbers=_DN)
    layer = lambda x, k: layers.conv2d(x, k, (1, 1), ((1, 1), (1, 1)))
    forms = {"ynnpack": (plain, None), "eigen": (plain, NO_YNN), "layer": (layer, None),
             "im2col": (im2col_conv, None), "shifted": (shifted_conv, None)}
    out = {}
    for b, h, c, o in shapes:
        x = jax.random.normal(jax.random.key(0), (b, h, h, c))
        k = jax.random.normal(jax.random.key(1), (3, 3, c, o)) / np.sqrt(9 * c)
        g = jax.random.normal(jax.random.key(2), (b, h, h, o))
        flops = 2 * b * h * h * 9 * c * o
        want = plain(x, k)  # every form computes the same convolution
        row = {}
        for name, (f, opts) in forms.items():
            kw = {"compiler_options": opts} if opts else {}
            fwd = jax.jit(f).lower(x, k).compile(**kw)
            bwd = jax.jit(lambda x, k, g, f=f: jax.vjp(lambda x: f(x, k), x)[1](g)[0]).lower(
                x, k, g).compile(**kw)
            if not np.allclose(fwd(x, k), want, rtol=1e-4, atol=1e-4 * float(
                    jnp.max(jnp.abs(want)))):
                raise AssertionError(f"{name} disagrees with lax.conv_general_dilated")
            tf = timing.median_time(functools.partial(fwd, x, k), repeats=repeats,
                                    warmup=2)[0]
            tb = timing.median_time(functools.partial(bwd, x, k, g), repeats=repeats,
                                    warmup=2)[0]
            row[name] = {"forward_gflops": flops / tf / 1e9,
                         "input_gradient_gflops": flops / tb / 1e9}
        out[f"{b}x{h}x{h}x{c}->{o}"] = row
        print(f"{b}x{h}x{h}x{c}->{o}", {n: {k: round(v) for k, v in r.items()}
                                         for n, r in row.items()}, flush=True)
    return out


def main(argv: list[str]) -> None:
    args = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), "1")
                for a in argv[1:])
    unknown = set(args) - {"out", "convs", "no_ynn", "repeats"}
    if unknown:
        raise SystemExit(f"unknown arguments {sorted(unknown)}; see the module docstring")
    repeats = int(args.get("repeats", 10))
    load0 = timing.loadavg()
    data = convs(repeats) if "convs" in args else unets("no_ynn" in args, repeats)
    data = {"_meta": {"command": "python -m experiments.bench.conv_cpu " + " ".join(argv[1:]),
                      "loadavg_before": load0, "loadavg_after": timing.loadavg(),
                      "cpu_count": os.cpu_count(), "jax": jax.__version__,
                      "time_unit": "seconds per call (median, interleaved)"}, **data}
    if "out" in args:
        with open(args["out"], "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args['out']}")


if __name__ == "__main__":
    main(sys.argv)
