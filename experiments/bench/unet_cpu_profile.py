r"""Where one U-Net input-gradient spends its time on XLA:CPU, by layer kind.

    python -m experiments.bench.unet_cpu_profile [--size=quarter|tiny] [--batch=8] \
        [--out=FILE.json]

Compiles ``x -> grad(sum(eps(x, t)^2))`` for the suite's U-Net (``quarter``: Ho et al.'s
CIFAR-10 architecture at a quarter width, 32x32x3, the ``grad_32`` model; ``tiny``: the
8x8 suite model), times it (median of 5), then traces 3 calls with `jax.profiler`
(``create_perfetto_trace``) and sums the duration of every XLA:CPU op event by the layer
its HLO op came from (the optimised HLO's ``op_name`` metadata): convolutions, attention,
GroupNorm, SiLU, other: the time during which at least one op of that kind runs (an op
split over threads emits one event per thread). ``between ops`` is the wall time per
call that no op event covers: time between ops or between the parallel pieces of one op,
which this reading cannot tell apart. A reading, not a test: the shares say where
work would pay, not what a change would save.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time

from absl import app, flags

KINDS = ("convolution", "attention", "group norm", "silu", "other")
_SKIP = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "CommonPjRt",
         "ThreadpoolListener", "end: ")  # executor spans and zero-length markers


def _kind(op_name: str) -> str:
    if "attn" in op_name:
        return "attention"
    if "conv_general_dilated" in op_name or "/rev" in op_name:
        return "convolution"
    if "silu" in op_name:
        return "silu"
    if re.search(r"/norm[0-9_]*/|norm_out/", op_name):
        return "group norm"
    return "other"


def profile(size: str = "quarter", batch: int = 8, calls: int = 3) -> dict:
    """Times and profiles one U-Net input-gradient; returns ms per call by layer kind."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench import cases, models

    s = cases.quick_settings()
    unet = models.cifar10_quarter_size() if size == "quarter" else s.size
    eps = cases.Bench(s, log=lambda m: None).pair(unet).eps_fn
    x = jnp.asarray(np.random.RandomState(0).rand(batch, unet.resolution, unet.resolution,
                                                   unet.channels).astype(np.float32))
    t = jnp.full((batch,), 50, jnp.int32)
    grad = jax.jit(lambda z: jax.grad(lambda v: jnp.sum(eps(v, t) ** 2))(z))
    compiled = grad.lower(x).compile()
    op_names = dict(re.findall(r"^\s+%(\S+) = .*?op_name=\"([^\"]*)\"", compiled.as_text(),
                               re.M))
    compiled(x).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        compiled(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                compiled(x).block_until_ready()
        trace = json.load(gzip.open(glob.glob(f"{d}/**/perfetto_trace.json.gz",
                                              recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    spans = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or e["name"].startswith(_SKIP):
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        spans[_kind(op_names.get(e["name"], ""))].append(span)
        spans["any"].append(span)
    wall_ms = float(np.median(times)) * 1e3
    # An op split over threads gives one event per thread: count the time during which at
    # least one op event of a kind runs (the union of its intervals), not their sum.
    ms = {k: _union(spans[k]) / calls / 1e3 for k in KINDS}
    covered = _union(spans["any"]) / calls / 1e3
    return {"size": size, "batch": batch, "wall_ms": wall_ms, "ms_per_call": ms,
            "covered_ms": covered, "between_ops_ms": wall_ms - covered,
            "op_events_per_call": len(spans["any"]) // calls, "jax": jax.__version__}


def _union(spans) -> float:
    """The total length of the union of `(start, end)` intervals."""
    total, end = 0.0, -float("inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _define_flags() -> None:
    # Only when run as a script: the tests import `profile` beside other scripts' flags.
    flags.DEFINE_enum("size", "quarter", ["quarter", "tiny"], "The U-Net.")
    flags.DEFINE_integer("batch", 8, "Images per call.", lower_bound=1)
    flags.DEFINE_string("out", "", "Write the result here as JSON too.")


def main(argv):
    del argv
    out = flags.FLAGS.out
    r = profile(flags.FLAGS.size, flags.FLAGS.batch)
    print(f"U-Net input-gradient ({r['size']}, batch {r['batch']}): {r['wall_ms']:.1f} ms per "
          f"call, {r['op_events_per_call']} op events")
    for k, v in (*r["ms_per_call"].items(), ("any op", r["covered_ms"]),
                 ("between ops", r["between_ops_ms"])):
        print(f"  {k:12s} {v:7.1f} ms  {100 * v / r['wall_ms']:5.1f}%")
    if out:
        with open(out, "w") as f:
            json.dump(r, f, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    from experiments import common

    _define_flags()
    app.run(main, flags_parser=common.parse_flags)
