r"""Where one U-Net input-gradient spends its time on XLA:CPU, by layer kind.

    python -m experiments.bench.unet_cpu_profile [--size=quarter|tiny] [--batch=8] \
        [--peer] [--out=FILE.json]

Compiles ``x -> grad(sum(eps(x, t)^2))`` for the suite's U-Net (``quarter``: Ho et al.'s
CIFAR-10 architecture at a quarter width, 32x32x3, the ``grad_32`` model; ``tiny``: the
8x8 suite model), times it (median of 5), then traces 3 calls with `jax.profiler`
(``create_perfetto_trace``) and splits each call's time by the layer its XLA:CPU op
events came from (the optimised HLO's ``op_name`` metadata): convolutions, attention,
GroupNorm, SiLU, other. A kind's own time is the union of its events (an op split over
threads emits one event per thread). An op event can end before its work does: XLA:CPU's
convolution thunk hands the convolution to Eigen's thread pool and returns (one 3x3
convolution at 8x32x32x64: a 28-44 us event, then 4-5 ms until the next op starts), so a
stretch with no op event running is charged to the kind of the op that ended last before
it (``after``). The kinds' totals cover the traced call (more, where independent ops of
two kinds run at once on two threads). A reading, not a test: the shares say where work
would pay, not what a change would save.

``--peer`` profiles the eager PyTorch peer's same computation too (the suite's diffusers
U-Net, 2 torch threads, ``torch.profiler``), its aten ops' self time grouped into the same
kinds (``mkldnn_convolution``/``convolution_backward``; scaled-dot-product attention and
the projections' ``bmm``; ``native_group_norm``; ``silu``), so each kind's time can be set
beside PyTorch's. With ``--peer`` the two gradients are also timed in alternating calls
(``alternating``), since separate timings drift apart on a shared machine.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import re
import tempfile

from absl import app, flags

KINDS = ("convolution", "attention", "group norm", "silu", "other")
_WAIT = "ThunkExecutor::Execute (wait for completion)"  # one per call, to its end
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


@functools.cache
def _pair(size: str):
    """`(unet size, Pair)`: the suite's U-Net on both sides, built once per process."""
    from experiments.bench import cases, models

    s = cases.quick_settings()
    unet = models.cifar10_quarter_size() if size == "quarter" else s.size
    return unet, cases.Bench(s, log=lambda m: None).pair(unet)


def _inputs(unet, batch: int):
    """The same images for both sides (NHWC; transpose for the peer) and t = 50."""
    import numpy as np

    x = np.random.RandomState(0).rand(batch, unet.resolution, unet.resolution,
                                      unet.channels).astype(np.float32)
    return x, np.full((batch,), 50, np.int32)


def unet_programs(size: str, batch: int):
    """``(grad, forward, x)``: diffjax's U-Net input-gradient ``x -> grad(sum(eps(x, t)^2))``
    and U-Net call ``x -> eps(x, t)`` as fresh `jax.jit` functions (not compiled, so a
    caller can compile them under its own options or patched layers), and the inputs."""
    import jax
    import jax.numpy as jnp

    unet, pair = _pair(size)
    x, t = (jnp.asarray(a) for a in _inputs(unet, batch))
    eps = pair.eps_fn
    grad = jax.jit(lambda z: jax.grad(lambda v: jnp.sum(eps(v, t) ** 2))(z))
    return grad, jax.jit(lambda z: eps(z, t)), x


@functools.cache
def _jax_grad(size: str, batch: int):
    """``(compiled input-gradient, x)``: diffjax's side, compiled once per process."""
    grad, _, x = unet_programs(size, batch)
    return grad.lower(x).compile(), x


def define_ab_flags(batch: int, repeats: int) -> None:
    """--size, --batch, --repeats, --out: the flags of the one-process U-Net A/B scripts
    (`group_norm_ab`, `xla_options_ab`), with their default batch and rounds."""
    flags.DEFINE_enum("size", "quarter", ["quarter", "tiny"], "The U-Net.")
    flags.DEFINE_integer("batch", batch, "Images per call.", lower_bound=1)
    flags.DEFINE_integer("repeats", repeats, "Timed calls of each program.", lower_bound=1)
    flags.DEFINE_string("out", "", "Write the result here as JSON too.")


def run_ab(compare, summary) -> None:
    """An A/B script's main: ``--out`` checked before any work, ``compare(size, batch,
    repeats)``, `summary` (result -> text) printed, the result written to ``--out``; any
    error one line."""
    from experiments import common
    from experiments.bench import report

    with common.one_line_errors():
        f = flags.FLAGS
        report.check_out_file(f.out)
        r = compare(f.size, f.batch, f.repeats)
        print(summary(r))
        report.write_json(f.out, r)


def _peer_grad(size: str, batch: int):
    """The eager peer's input-gradient on the same images, as a call."""
    import torch

    unet, pair = _pair(size)
    x, t = _inputs(unet, batch)
    x, t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t).long()

    def grad():
        z = x.clone().requires_grad_(True)
        (pair.torch_model(z, t).sample ** 2).sum().backward()
        return z.grad

    return grad


def alternating_walls(size: str = "quarter", batch: int = 8, repeats: int = 9,
                      threads: int = 2) -> dict:
    """Median ms per call of diffjax's and the eager peer's input-gradient, their calls
    alternating (`timing.interleaved_medians`), so that the ratio does not take in the
    machine's drift between the two profiles (10-30% between minutes on a shared 2-core
    machine). The peer runs on `threads` torch threads."""
    import torch

    from experiments.bench import timing

    compiled, x = _jax_grad(size, batch)
    peer_grad = _peer_grad(size, batch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = timing.interleaved_medians(
            {"diffjax": lambda: compiled(x), "peer": peer_grad}, repeats=repeats)
    finally:
        torch.set_num_threads(before)
    return {"diffjax_ms": t["diffjax"][0] * 1e3, "peer_ms": t["peer"][0] * 1e3,
            "ratio": t["peer"][0] / t["diffjax"][0], "repeats": repeats}


def profile(size: str = "quarter", batch: int = 8, calls: int = 3) -> dict:
    """Times and profiles one U-Net input-gradient; returns ms per call by layer kind."""
    import jax

    from experiments.bench import timing

    compiled, x = _jax_grad(size, batch)
    op_names = dict(re.findall(r"^\s+%(\S+) = .*?op_name=\"([^\"]*)\"", compiled.as_text(),
                               re.M))
    wall_s, _ = timing.median_time(lambda: compiled(x), repeats=5)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                compiled(x).block_until_ready()
        trace = json.load(gzip.open(glob.glob(f"{d}/**/perfetto_trace.json.gz",
                                              recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    r = attribute(events, lambda name: _kind(op_names.get(name, "")))
    return {"size": size, "batch": batch, "wall_ms": wall_s * 1e3, **r,
            "jax": jax.__version__}


def _peer_kind(aten_name: str) -> str:
    if "convolution" in aten_name:
        return "convolution"
    if any(k in aten_name for k in ("scaled_dot_product", "bmm", "softmax")):
        return "attention"
    if "group_norm" in aten_name:
        return "group norm"
    if "silu" in aten_name:
        return "silu"
    return "other"


def peer_profile(size: str = "quarter", batch: int = 8, calls: int = 3,
                 threads: int = 2) -> dict:
    """The eager peer's input-gradient: its median time and its aten ops' self time per
    call by kind (`_peer_kind`), on `threads` torch threads."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from experiments.bench import timing

    grad = _peer_grad(size, batch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        wall_s, _ = timing.median_time(grad, repeats=5, sync=lambda out: out)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                grad()
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)  # a test's worker keeps its own setting
    ms = dict.fromkeys(KINDS, 0.0)
    for a in prof.key_averages():
        ms[_peer_kind(a.key)] += a.self_cpu_time_total / calls / 1e3
    return {"wall_ms": wall_s * 1e3, "ms_per_call": ms, "torch_threads": used,
            "torch": torch.__version__}


def attribute(events, kind_of) -> dict:
    """Splits the traced calls' time by layer kind (module doc); `kind_of(event name)`.

    Each call spans from its first op event to the end of the executor's wait for
    completion. ``ms_per_call[kind]``: the union of that kind's op events. An op event
    can end before its work does: XLA:CPU's convolution thunk hands the convolution to
    Eigen's thread pool and returns, and the next op starts when it completes. So each
    stretch of a call with no op event running is charged to the kind of the op event
    that ended last before it (``after_ms_per_call``); ``total_ms_per_call`` is the sum.
    ``covered_ms + between_ops_ms == traced_ms``; the kinds' totals add up to at least
    ``traced_ms`` (more where ops of two kinds run at once)."""
    ops, waits = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if e["name"].startswith(_WAIT):
            waits.append(span)
        elif not e["name"].startswith(_SKIP) and span[1] > span[0]:
            ops.append((*span, kind_of(e["name"])))
    ops.sort()
    waits.sort()
    calls = []  # (start, end, ops)
    prev_end = -float("inf")
    for _, w_end in waits:
        mine = [o for o in ops if prev_end < o[0] <= w_end]
        if mine:
            calls.append((mine[0][0], w_end, mine))
        prev_end = w_end
    if not calls:
        raise ValueError("the trace has no XLA:CPU executor wait with op events in it: "
                         "profile on the CPU backend (JAX_PLATFORMS=cpu)")
    n = len(calls)
    ms = {k: _union([o[:2] for _, _, c in calls for o in c if o[2] == k]) / n / 1e3
          for k in KINDS}
    after = dict.fromkeys(KINDS, 0.0)
    traced = between = 0.0
    for start, end, c in calls:
        traced += end - start
        last_end, last_kind = start, c[0][2]
        for a, b, k in c:
            if a > last_end:  # nothing running: the last op to end is still finishing
                after[last_kind] += a - last_end
                between += a - last_end
            if b >= last_end:
                last_end, last_kind = b, k
        after[last_kind] += end - last_end  # to the end of the executor's wait
        between += end - last_end
    after = {k: v / n / 1e3 for k, v in after.items()}
    covered = _union([o[:2] for _, _, c in calls for o in c]) / n / 1e3
    return {"traced_ms": traced / n / 1e3, "calls": n, "ms_per_call": ms,
            "after_ms_per_call": after,
            "total_ms_per_call": {k: ms[k] + after[k] for k in KINDS},
            "covered_ms": covered, "between_ops_ms": between / n / 1e3,
            "op_events_per_call": sum(len(c) for _, _, c in calls) // n}


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
    flags.DEFINE_bool("peer", False, "Profile the eager PyTorch peer too (needs torch).")
    flags.DEFINE_string("out", "", "Write the result here as JSON too.")


def main(argv):
    del argv
    from experiments import common

    with common.one_line_errors():
        _main(flags.FLAGS.out)


def _main(out: str) -> None:
    import importlib.util

    from experiments.bench import report

    if flags.FLAGS.peer and importlib.util.find_spec("torch") is None:
        raise ModuleNotFoundError("--peer needs PyTorch: pip install torch==2.13.0 (the CPU "
                                  "build) and diffjax's convert extra, or leave out --peer")
    report.check_out_file(out)
    r = profile(flags.FLAGS.size, flags.FLAGS.batch)
    peer = peer_profile(flags.FLAGS.size, flags.FLAGS.batch) if flags.FLAGS.peer else None
    print(f"U-Net input-gradient ({r['size']}, batch {r['batch']}): {r['wall_ms']:.1f} ms per "
          f"call ({r['traced_ms']:.1f} ms traced), {r['op_events_per_call']} op events"
          + (f"; eager peer {peer['wall_ms']:.1f} ms" if peer else ""))
    if peer:
        r["alternating"] = alternating_walls(flags.FLAGS.size, flags.FLAGS.batch)
        a = r["alternating"]
        print(f"  alternating calls ({a['repeats']} rounds): diffjax {a['diffjax_ms']:.1f} ms, "
              f"eager peer {a['peer_ms']:.1f} ms (peer / diffjax {a['ratio']:.2f})")
    print(f"  {'':12s} {'events':>8s} {'after':>8s} {'total':>8s} {'share':>6s}"
          + (f" {'peer':>8s}" if peer else ""))
    for k in KINDS:
        own, aft, tot = (r[f][k] for f in ("ms_per_call", "after_ms_per_call",
                                            "total_ms_per_call"))
        print(f"  {k:12s} {own:8.1f} {aft:8.1f} {tot:8.1f} {100 * tot / r['traced_ms']:5.1f}%"
              + (f" {peer['ms_per_call'][k]:8.1f}" if peer else ""))
    if peer:
        r["peer"] = peer
    report.write_json(out, r)


if __name__ == "__main__":
    from experiments import common

    _define_flags()
    app.run(main, flags_parser=common.parse_flags)
