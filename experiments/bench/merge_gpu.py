"""Merges GPU suite runs (e.g. a first run and a second one for the cases the first one's
time budget skipped) into one ``benchmarks.json`` + ``benchmarks.md``, recomputing the
projection from all measured cases.

    python -m experiments.bench.merge_gpu --recount_flops --out=benchmarks/gpu_h100 \\
        benchmarks/gpu_h100/run1 benchmarks/gpu_h100/run2
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from experiments.bench import gpu, models, profile, report


def merge(run_dirs: list[str], recount_flops: bool = False) -> dict:
    """The cases of every run (a later run's case of the same name wins), the first run's
    meta with each run's command, and the projection over all of them."""
    runs = [json.loads((pathlib.Path(d) / "benchmarks.json").read_text()) for d in run_dirs]
    merged = {k: v for run in runs for k, v in run.items() if not k.startswith("_")}
    meta = dict(runs[0]["_meta"])
    meta["commands"] = [r["_meta"].get("command") for r in runs]
    done = set()  # plan names a run was asked for (--gpu_cases) and did not skip
    for r in runs:
        cmd = r["_meta"].get("command") or ""
        asked = [a.split("=", 1)[1].split(",") for a in cmd.split() if
                 a.startswith("--gpu_cases=")]
        done |= set(asked[0] if asked else []) - set(r["_meta"].get("skipped", []))
    meta["skipped"] = sorted({s for r in runs for s in r["_meta"].get("skipped", [])} - done)
    merged["_meta"] = meta
    for key in ("_flops",):
        merged[key] = runs[0].get(key) or next((r[key] for r in runs if key in r), None)
    settings = dict(runs[0]["_meta"]["settings"])
    settings["ddpm"] = models.UNetSize(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in settings["ddpm"].items()})
    settings["ddpmpp"] = tuple(tuple(p) for p in settings["ddpmpp"])
    fields = {f.name for f in dataclasses.fields(gpu.GpuSettings)}
    s = gpu.GpuSettings(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in settings.items() if k in fields})
    merged["_projection"] = gpu.projection(merged, s)
    if recount_flops:
        _recount_flops(merged, s)
    return merged


def _recount_flops(data: dict, s) -> None:
    """Replaces the runs' FLOP counts by the model's (`profile.eps_flops`) and
    rescales each case's achieved TFLOP/s and fractions of peak accordingly.

    Runs made before the suite counted on the CPU took XLA's GPU cost analysis,
    which leaves out the convolutions (cuDNN custom calls).
    """
    from diffjax.models import ncsnpp, unet

    if s.ddpm != models.cifar10_size():
        raise ValueError("--recount_flops: only for the suite's CIFAR-10 U-Net size")
    configs = {"ddpm": ("ddpm_unet", unet.cifar10_config()),
               "ddpmpp": ("ncsnpp", dict(ncsnpp.cifar10_deep_config(), **dict(s.ddpmpp)))}
    old = data.get("_flops") or {}
    new = {}
    for key, (kind, config) in configs.items():
        eps, res, ch, _ = profile.abstract_eps(kind, config)
        new[key] = {**old.get(key, {}), **profile.eps_flops(eps, res, ch),
                    "counted_on": "XLA cost analysis of the unoptimised HLO (profile.eps_flops)",
                    "gpu_cost_analysis": {k: old.get(key, {}).get(k)
                                          for k in ("forward_flops", "grad_flops")}}
    data["_flops"] = new
    for name, r in data.items():
        if name.startswith("_") or r.get("diffjax_tflops") is None or r.get("model") not in new:
            continue
        f = new[r["model"]]
        per_step = f["forward_flops"] if "purify" in name else profile.grad_step_flops(
            f, r.get("remat", "steps"))
        flops = per_step * r.get("steps", s.steps) * r.get("eot", 1)
        scale = flops / r["flops_per_image"]
        r["flops_per_image"] = flops
        r["diffjax_tflops"] *= scale
        r["fraction_of_peak"] = {k: v * scale for k, v in r.get("fraction_of_peak", {}).items()}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories holding benchmarks.json")
    parser.add_argument("--out", required=True, help="where to write the merged files")
    parser.add_argument("--recount_flops", action="store_true",
                        help="count FLOPs on the CPU backend and rescale the achieved TFLOP/s "
                             "(for runs whose GPU cost analysis left out the convolutions)")
    args = parser.parse_args()
    data = merge(args.runs, recount_flops=args.recount_flops)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    (out / "benchmarks.md").write_text(report.gpu_markdown(data))
    print(f"wrote {out / 'benchmarks.json'} and benchmarks.md")


if __name__ == "__main__":
    main()
