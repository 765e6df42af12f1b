"""Merges GPU suite runs (e.g. a first run and a second one for the cases the first one's
time budget skipped) into one ``benchmarks.json`` + ``benchmarks.md``, recomputing the
projection from all measured cases.

    python -m experiments.bench.merge_gpu --out=benchmarks/gpu_h100 \\
        benchmarks/gpu_h100/run1 benchmarks/gpu_h100/run2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from experiments.bench import gpu, models


def merge(run_dirs: list[str]) -> dict:
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
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories holding benchmarks.json")
    parser.add_argument("--out", required=True, help="where to write the merged files")
    args = parser.parse_args()
    data = merge(args.runs)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    (out / "benchmarks.md").write_text(gpu.markdown(data))
    print(f"wrote {out / 'benchmarks.json'} and benchmarks.md")


if __name__ == "__main__":
    main()
