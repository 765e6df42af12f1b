"""Timing and memory measurement for both sides.

- Times are medians over `repeats` runs after `warmup` runs (`time.perf_counter`; JAX
  results are waited for with ``block_until_ready``). The CPU suite times diffjax and
  its peers in alternation (`interleaved_medians`), so that their ratio does not take in
  the machine's drift between one side's runs and the other's. diffjax's compile time is measured
  apart: each diffjax function is compiled ahead of time (``jit(f).lower(*args)
  .compile()``) and only the compiled executable is timed.
- diffjax memory: XLA's own buffer assignment for the compiled program
  (``compiled.memory_analysis()``): ``temp_size_in_bytes`` (all intermediates alive at
  the peak, residuals of the backward pass included) plus ``output_size_in_bytes``; the
  arguments (weights, inputs) are excluded, as they exist anyway.
- Peer memory, two figures: the bytes of the distinct tensors autograd saves for the
  backward pass (`peer.saved_tensor_mb`, in process, exact, parameters excluded), and the
  growth of the process's peak RSS (``ru_maxrss``) during one gradient in a fresh
  subprocess (`experiments.bench.memprobe`), which also sees the transient buffers.
- FLOPs: XLA's ``cost_analysis()`` of one U-Net call (`profile.eps_flops`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

__all__ = ["median_time", "interleaved_medians", "compile_jax", "unet_flops", "rss_probe",
           "loadavg"]


def _block(out):
    import jax

    return jax.block_until_ready(out)


def median_time(fn, *, repeats: int, warmup: int = 1,
                sync=None) -> tuple[float, list[float]]:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls.

    Args:
      fn: the call to time.
      repeats: timed calls.
      warmup: untimed calls first.
      sync: called on each result before the clock stops; default: JAX's
        ``block_until_ready`` (torch on CPU is synchronous; on a GPU pass one that calls
        ``torch.cuda.synchronize``, e.g. `peer.cuda_sync`).
    """
    sync = _block if sync is None else sync
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved_medians(fns: dict, *, repeats: int, warmup: int = 1,
                        sync=None) -> dict:
    """Median wall time of each of `fns` (``{name: fn}``), their calls alternating.

    Each round calls every function once, the order rotated from round to round; so a
    change in the machine's speed during the measurement (another process, a frequency
    step: on a shared 2-core machine runs of the same program moved by 10-20% between
    minutes) reaches every side alike, and ratios of these medians are steadier than
    ratios of medians taken one after the other.

    Args:
      fns: the calls to time.
      repeats: rounds (timed calls of each function).
      warmup: untimed rounds first.
      sync: as in `median_time`, applied to every result.

    Returns:
      ``{name: (median seconds, [seconds of each call])}``.
    """
    sync = _block if sync is None else sync
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            sync(fns[n]())
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sync(fns[n]())
            times[n].append(time.perf_counter() - t0)
    return {n: (statistics.median(t), t) for n, t in times.items()}


def compile_jax(fn, *args, static_argnames=()):
    """Compiles `fn` for `args` ahead of time.

    Returns:
      (compiled, compile_s, peak_mb): the executable (call it with `args`), the seconds
      that lowering + compiling took, and XLA's temp + output buffer size in MB.
    """
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnames=static_argnames).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
    return compiled, compile_s, peak


def unet_flops(eps_fn, batch: int, resolution: int, channels: int) -> float | None:
    """FLOPs of one U-Net call on `batch` images (the model's: `profile.eps_flops`)."""
    from experiments.bench import profile

    return batch * profile.eps_flops(eps_fn, resolution, channels)["forward_flops"]


def rss_probe(model_dir: str, arrays: dict, *, t_star: int, num_steps: int,
              checkpoint: bool, timeout: float = 600.0) -> float | None:
    """Peak-RSS growth (MB) of one peer gradient, measured in a fresh subprocess.

    Args:
      model_dir: the ``save_pretrained`` directory of the peer's U-Net.
      arrays: NumPy arrays ``x`` (NHWC), ``noises`` (`[S+1, B, H, W, C]`), ``w``, ``labels``
        and ``alphas_cumprod``.
      t_star, num_steps: the purifier.
      checkpoint: ``torch.utils.checkpoint`` per step.

    Returns:
      MB, or None if the subprocess failed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "arrays.npz")
        np.savez(path, **arrays)
        cmd = [sys.executable, "-m", "experiments.bench.memprobe", model_dir, path,
               str(t_star), str(num_steps), str(int(checkpoint))]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                 os.path.abspath(__file__)))))
    if res.returncode != 0:
        print(f"  rss_probe failed: {res.stderr[-500:]}", flush=True)
        return None
    return float(json.loads(res.stdout.strip().splitlines()[-1])["rss_delta_mb"])


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (/proc/loadavg), or None."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None
