r"""Benchmarks: diffjax against the PyTorch way (diffusers + a Python loop), on this CPU.

Usage::

    python -m experiments.benchmarks --out=/tmp/bench --quick   # < 3 minutes, 2 cores
    python -m experiments.benchmarks --out=/tmp/bench           # the full CPU suite
    python -m experiments.benchmarks --out=/tmp/gpu --settings=gpu --time_budget_s=420
    python -m experiments.benchmarks --out=/tmp/smoke --settings=gpu_smoke  # CPU, seconds

Writes ``OUT/benchmarks.json`` (``{case: {"diffjax_s", "peer_s", "ratio", ...}}``, see
`experiments.bench.report`) and ``OUT/benchmarks.md``; prints one line per case. The cases
and how each figure is measured: `experiments.bench.cases`, `experiments.bench.timing`;
the results and what limits them: BENCHMARKS.md.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Directory for benchmarks.json and benchmarks.md.",
                           required=True)
flags.register_validator(
    "out", lambda v: v is None or bool(v.strip()),
    "--out: expected a directory for benchmarks.json and benchmarks.md, e.g. "
    "--out=benchmarks/run1; got an empty value")
_QUICK = flags.DEFINE_boolean("quick", False, "The quick suite (< 3 minutes on 2 cores).")
_PROFILE = flags.DEFINE_boolean(
    "profile", None, "Also profile: FLOPs of the CIFAR-10 models (XLA cost analysis), the "
    "peer's top ops (torch.profiler), achieved FLOP/s, the GPU projection. Default: on for "
    "the full suite, off for --quick.")
_THREADS = flags.DEFINE_integer(
    "torch_threads", 2, "torch.set_num_threads for the peer (XLA uses the machine's cores).")
_SIZE = flags.DEFINE_enum("settings", None, ["quick", "full", "tiny", "gpu", "gpu_smoke"],
                          "Overrides --quick: the named settings. 'gpu': the CIFAR-10 35.7M "
                          "DDPM and DDPM++ deep on the GPU (experiments.bench.gpu); "
                          "'gpu_smoke': the same code path at tiny sizes (any device).")
_GPU_CASES = flags.DEFINE_list(
    "gpu_cases", None, "gpu settings: run only these cases of the plan, in this order "
    "(their models' setups are added), e.g. ddpmpp_eot_bf16,ddpm_grad_memory.")
_GPU_SET = flags.DEFINE_list(
    "gpu_set", None, "gpu settings: override GpuSettings integer fields, e.g. "
    "eot_batch=16,pp_eot_batch=8.")
_GPU_REMAT = flags.DEFINE_enum(
    "gpu_remat", None, ["steps", "save_conv"], "gpu settings: what diffjax's gradients keep "
    "of each step (diffusion.REMAT_MODES; default 'steps', as the peers' checkpointing).")
_COMPILED = flags.DEFINE_list(
    "compiled_peer", None, "CPU suites: the cases that also time the compiled peer "
    "(torch.compile); 'none' for none. Default: the settings' (purify_t100, grad_t10, "
    "purify_32, grad_32).")
_COMPILE_MODE = flags.DEFINE_string(
    "compile_mode", None, "CPU suites: torch.compile mode of the compiled peer ('default', "
    "'max-autotune', ...). Default: the settings' (the default mode).")
_BUDGET = flags.DEFINE_float(
    "time_budget_s", None, "gpu settings: skip the remaining cases once this many seconds "
    "have passed (results are written after every case).")


def main(argv):
    del argv
    try:  # before minutes of cases: an output directory that cannot be made fails now
        pathlib.Path(_OUT.value).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out: cannot create the directory {_OUT.value!r} ({e}); give a "
              "writable directory, e.g. --out=benchmarks/run1", file=sys.stderr, flush=True)
        sys.exit(1)
    if _SIZE.value in ("gpu", "gpu_smoke"):
        return _main_gpu(_SIZE.value)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    from experiments.bench import cases, report, timing

    name = _SIZE.value or ("quick" if _QUICK.value else "full")
    settings = {"quick": cases.quick_settings, "full": cases.full_settings,
                "tiny": cases.tiny_settings}[name]()
    import dataclasses

    if _COMPILED.value is not None:
        chosen = tuple(c for c in _COMPILED.value if c and c != "none")
        settings = dataclasses.replace(settings, compiled_peer=chosen)
    if _COMPILE_MODE.value is not None:
        mode = None if _COMPILE_MODE.value == "default" else _COMPILE_MODE.value
        settings = dataclasses.replace(settings, compile_mode=mode)
    load0 = timing.loadavg()
    print(f"benchmarks ({name}); load average {load0}", flush=True)
    t0 = time.perf_counter()
    results, info = cases.run_all(settings, log=lambda s: print(s, flush=True),
                                  torch_threads=_THREADS.value)
    total = time.perf_counter() - t0
    meta = {"command": "python -m experiments.benchmarks " + " ".join(sys.argv[1:]),
            "settings": dataclasses.asdict(settings), "machine": report.machine_info(),
            "models": info, "loadavg_before": load0, "loadavg_after": timing.loadavg(),
            "total_s": total,
            "time_unit": "seconds per image (median over rounds alternating diffjax and its "
                         "peers)",
            "memory": "diffjax_peak_mb: XLA memory_analysis temp+output of the compiled "
                      "program; peer_peak_mb: ru_maxrss growth during one gradient in a fresh "
                      "subprocess; peer_saved_mb: tensors saved by autograd"}
    do_profile = _PROFILE.value if _PROFILE.value is not None else name == "full"
    if do_profile:
        print("profiling ...", flush=True)
        try:
            meta["profile"] = _profile(settings, results, info)
        except Exception as e:  # noqa: BLE001 - the cases' results are still written
            print(f"profile FAILED: {type(e).__name__}: {e}", flush=True)
            meta["profile_error"] = f"{type(e).__name__}: {e}"
        meta["total_with_profile_s"] = time.perf_counter() - t0
    jpath, mpath = report.write(_OUT.value, results, meta)
    print(f"wrote {jpath} and {mpath} in {total:.1f} s; load average {meta['loadavg_after']}")


def _main_gpu(name: str) -> None:
    """The GPU suite (`experiments.bench.gpu`); imports nothing the GPU machine lacks."""
    # JAX must not take 75% of the GPU up front: the PyTorch peer runs in this process too.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from experiments.bench import gpu

    if name == "gpu" and jax.devices()[0].platform not in ("gpu", "cuda", "rocm"):
        raise SystemExit(f"--settings=gpu needs a GPU; JAX sees {jax.devices()} "
                         "(use --settings=gpu_smoke for the tiny CPU run)")
    jax.devices()  # initialise JAX's CUDA libraries before torch loads its own
    if name == "gpu_smoke":
        import torch

        if not torch.cuda.is_available():  # a CPU peer on a loaded machine: one thread
            torch.set_num_threads(1)
    settings = gpu.gpu_settings() if name == "gpu" else gpu.gpu_smoke_settings()
    if _GPU_SET.value:
        import dataclasses

        try:
            pairs = dict(item.split("=", 1) for item in _GPU_SET.value)
            settings = dataclasses.replace(settings, **{k: int(v) for k, v in pairs.items()})
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: --gpu_set: expected field=integer pairs of GpuSettings; "
                             f"got {_GPU_SET.value} ({e})") from None
    if _GPU_REMAT.value:
        import dataclasses

        settings = dataclasses.replace(settings, remat=_GPU_REMAT.value)
    gpu.run_gpu(settings, _OUT.value, log=lambda s: print(s, flush=True),
                time_budget_s=_BUDGET.value, only=_GPU_CASES.value,
                command="python -m experiments.benchmarks " + " ".join(sys.argv[1:]))


def _profile(settings, results, info) -> dict:
    """FLOPs, the peer's top ops, achieved FLOP/s and the GPU projection (see bench.profile)."""
    from diffjax.diffusion import respaced_timesteps
    from diffjax.models import ncsnpp, unet
    from experiments.bench import cases, peer, profile

    b = cases.Bench(settings, log=lambda s: None)
    pair = b.pair(settings.size)
    x, keys, _, _ = b.inputs(settings.size, settings.purify_batch)
    ppur = peer.PeerPurifier(pair.torch_model, b.acp, settings.t_star,
                             respaced_timesteps(settings.t_star, 10))
    out = {"peer_top_ops_purify_10_steps": profile.peer_top_ops(
        ppur, peer.to_nchw(x), b.noises(keys, settings.size, 10))}
    bench_flops = profile.model_flops("ddpm_unet", pair.config)
    out["bench_model_flops"] = bench_flops
    mult = 1.0 + bench_flops["grad_flops"] / bench_flops["forward_flops"]
    out["achieved"] = profile.xla_achieved(results, bench_flops["forward_flops"], mult)
    for key, kind, cfg in (("ddpm_cifar10_35.7M", "ddpm_unet", unet.cifar10_config()),
                           ("ddpmpp_deep_106.6M", "ncsnpp", ncsnpp.cifar10_deep_config())):
        fl = profile.model_flops(kind, cfg)
        out[key] = {"flops": fl, "projection": profile.projection(fl["forward_flops"],
                                                                  fl["grad_flops"])}
        print(f"  {key}: {fl['forward_flops'] / 1e9:.2f} GFLOPs per forward", flush=True)
    return out


if __name__ == "__main__":
    from experiments import common

    app.run(main, flags_parser=common.parse_flags)
