r"""Projects the whole study's cost from a short run's measured per-part costs.

    python -m experiments.reproduce --workdir=W --config=experiments/configs/reproduce.py:cifar10 \
        --config.synthetic_data=True --config.num_examples=128 ...   # a few batches
    python -m experiments.project_cost --results=W/results.json \
        --config=experiments/configs/reproduce.py:cifar10 --num_examples=512,10000 --devices=1,8

Reads `costs` of results.json (every part's wall, compile and run seconds, as the study
records them: `diffjax.study.workdir`) and the run's config, and prints, per group of
parts and in total, the projected hours of the target study (`--config`, default the
measured run's own config) at each `--num_examples` and device count.

The model (say what it assumes, so that a reader can judge it):

- each part's RUN time scales with the rows it processes, padded to whole batches (the
  study pads every batch to `batch_size`, so a padded row costs what a real one does):
  seconds per row = measured run s x measured devices / padded measured rows, projected
  run s = seconds per row x padded target rows / devices (ideal data parallelism over the
  `("data",)` mesh: the global batch is split over the devices);
- rows per part: its examples (the attack parts, the compression Jacobians, the gradient
  correlation, the audit), `2 x num_points x num_images` for the randomness measurement
  (eps-ball points and seeds), `fid_reference_examples` for the FID reference; the target
  counts follow the target config with `num_examples` = each `--num_examples` (each
  part's own size capped by it, as the study caps them);
- COMPILE time is counted once (the measured run's total): the number of programs does
  not grow with the examples or the devices;
- everything per example (steps, EOT draws, probes, t* sweep, methods, the models, the
  batch size per device, the hardware) is the measured run's: measure with the target's
  settings on the target's device, over a few batches, and only the example counts are
  extrapolated. Early exit makes an attack's time depend on how many examples stay
  robust: a run on random weights (most examples fooled at once) under-states it.
"""

from __future__ import annotations

import json
import math
import re
import sys

from absl import app, flags

from experiments import common

_RESULTS = flags.DEFINE_string("results", None, "results.json of the measured run (local or "
                               "gs://).")
_SIZES = flags.DEFINE_list("num_examples", ["512", "10000"], "Target test-set sizes.")
_DEVICES = flags.DEFINE_list("devices", ["1", "8"], "Target device counts.")
_PER_PART = flags.DEFINE_bool("per_part", False, "One row per part instead of per group.")

GROUPS = ("undefended attack", "attacks, fixed + transfer (main t*)",
          "attacks, independent EOT (main t*)", "gradient correlation", "randomness",
          "FID reference features", "compression: Jacobian estimates",
          "compression: attacks at other t*", "audit")
_ATTACK = re.compile(r"attack_(?P<method>.+)_t(?P<t>\d+)_(?P<stream>realization|fresh)"
                     r"(?:_n(?P<n>\d+))?(?:_(?P<variant>.+))?$")


def _get(config: dict, path: str):
    for key in path.split("."):
        config = config[key]
    return config


def group_of(part: str, config: dict) -> str:
    """The group of a part name (`diffjax.study.robustness.part_name` and the others)."""
    if part == "attack_undefended":
        return GROUPS[0]
    if part.startswith("gradient_correlation_"):
        return GROUPS[3]
    if part.startswith("randomness_correlation_"):
        return GROUPS[4]
    if part == "fid_reference_features":
        return GROUPS[5]
    if part.startswith("compression_"):
        return GROUPS[6]
    m = _ATTACK.match(part)
    if m is None:
        raise ValueError(f"results.json costs: unknown part {part!r}")
    if m["variant"]:
        return GROUPS[8]
    if int(m["t"]) != int(_get(config, "purifier.t_star")):
        return GROUPS[7]
    if m["n"]:  # the audit's own parts over its first audit.num_examples examples
        return GROUPS[8]
    return GROUPS[1] if m["stream"] == "realization" else GROUPS[2]


def rows_of(group: str, config: dict, num_examples: int) -> int:
    """Rows a part of `group` processes under `config` with `num_examples` test examples."""
    n = int(num_examples)
    if group in GROUPS[:3]:
        return n
    if group == GROUPS[3]:
        return min(int(_get(config, "correlation.num_examples")), n)
    if group == GROUPS[4]:
        return (2 * int(_get(config, "randomness.num_points"))
                * min(int(_get(config, "randomness.num_images")), n))
    if group == GROUPS[5]:
        return int(config["fid_reference_examples"])
    if group == GROUPS[6]:
        return min(int(_get(config, "compression.num_examples")), n)
    if group == GROUPS[7]:
        return min(int(_get(config, "compression.num_attack_examples")), n)
    return min(int(_get(config, "audit.num_examples")), n)


def _padded(rows: int, batch: int) -> int:
    return math.ceil(rows / batch) * batch if rows else 0


def project(results: dict, target: dict, num_examples: int, devices: int) -> dict:
    """The projected seconds of every part of a measured run (module docstring).

    Args:
      results: a results.json dict with `costs`, `config`, `num_examples` and `devices`.
      target: the target study config (a dict); its `batch_size` is the global batch.
      num_examples: the target's test examples.
      devices: the target's device count.

    Returns:
      `{"parts": {part: {"group", "measured_run_s", "measured_rows", "target_rows",
      "run_s"}}, "compile_s", "run_s", "total_s"}`.
    """
    measured = results["config"]
    m_n, m_dev = int(results["num_examples"]), int(results["devices"]["count"])
    m_batch, t_batch = int(measured["batch_size"]), int(target["batch_size"])
    parts, compile_s = {}, 0.0
    for name, cost in results["costs"]["parts"].items():
        group = group_of(name, measured)
        m_rows = rows_of(group, measured, m_n)
        t_rows = rows_of(group, target, num_examples)
        per_row = cost["run_s"] * m_dev / max(_padded(m_rows, m_batch), 1)
        parts[name] = {"group": group, "measured_run_s": cost["run_s"],
                       "measured_rows": m_rows, "target_rows": t_rows,
                       "run_s": per_row * _padded(t_rows, t_batch) / devices}
        compile_s += cost["compile_s"]
    run_s = sum(p["run_s"] for p in parts.values())
    return {"parts": parts, "compile_s": compile_s, "run_s": run_s,
            "total_s": compile_s + run_s}


def table(results: dict, target: dict, sizes, devices, per_part: bool = False) -> str:
    """A markdown table: measured seconds, then projected hours per (size, devices)."""
    runs = {(n, d): project(results, target, n, d) for n in sizes for d in devices}
    base = next(iter(runs.values()))
    keys = sorted(base["parts"]) if per_part else [
        g for g in GROUPS if any(p["group"] == g for p in base["parts"].values())]

    def rows_in(proj, key):
        return [p for name, p in proj["parts"].items()
                if (name == key if per_part else p["group"] == key)]

    header = ["part" if per_part else "group", "measured run s (rows)"] + [
        f"{n:,} images, {d} device{'s' if d > 1 else ''} (h)" for n, d in runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        got = rows_in(base, key)
        cells = [key, f"{sum(p['measured_run_s'] for p in got):.1f} "
                      f"({sum(p['measured_rows'] for p in got)})"]
        cells += [f"{sum(p['run_s'] for p in rows_in(proj, key)) / 3600:.3g}"
                  for proj in runs.values()]
        lines.append("| " + " | ".join(cells) + " |")
    measured = results["costs"]["total"]
    for label, field in (("compiling (once)", "compile_s"), ("total", "total_s")):
        m = measured["compile_s"] if field == "compile_s" else measured["wall_s"]
        lines.append("| " + " | ".join([f"**{label}**", f"{m:.1f}"] + [
            f"{proj[field] / 3600:.3g}" for proj in runs.values()]) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    with common.one_line_errors():
        from etils import epath

        if not _RESULTS.value:
            raise ValueError("--results: required; e.g. --results=W/results.json")
        path = epath.Path(_RESULTS.value)
        if not path.exists():
            raise FileNotFoundError(f"--results: {path} does not exist")
        results = json.loads(path.read_text())
        if not results.get("costs", {}).get("parts"):
            raise ValueError(f"--results: {path} has no per-part costs (a study run records "
                             "them in results.json 'costs')")
        target = CONFIG.value.to_dict() if CONFIG.value is not None else results["config"]
        sizes = [int(n) for n in _SIZES.value]
        devices = [int(d) for d in _DEVICES.value]
        print(f"measured: {results['dataset']}, {results['num_examples']} examples, "
              f"{results['devices']['count']} {results['devices']['platform']} device(s), "
              f"{results['costs']['total']['wall_s']:.1f} s "
              f"({results['costs']['total']['compile_s']:.1f} s compiling)")
        print(table(results, target, sizes, devices, _PER_PART.value))


def _define_config():
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file(
        "config", None, "Target study config (default: the measured run's own config).")


CONFIG = _define_config()

if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
