"""The suite's outputs: ``benchmarks.json`` and a Markdown table.

JSON schema: ``{case name: {"diffjax_s", "peer_s", "ratio", "diffjax_peak_mb",
"peer_peak_mb", "max_abs_diff", "what", ...}}`` (seconds per image; ``ratio = peer_s /
diffjax_s``, so > 1 means diffjax is faster; MB; None where not measured), plus one
``"_meta"`` entry (not a case: its name starts with an underscore) with the machine, the
versions, the command, the settings and the load average before and after the run.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform

__all__ = ["REQUIRED_FIELDS", "machine_info", "write", "markdown_table", "cases_of"]

REQUIRED_FIELDS = ("diffjax_s", "peer_s", "ratio", "diffjax_peak_mb", "peer_peak_mb",
                   "max_abs_diff")


def machine_info() -> dict:
    """CPU model, core count, Python and library versions."""
    import diffusers
    import flax
    import jax
    import jaxlib
    import numpy
    import torch

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       None)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "numpy": numpy.__version__,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "torch_threads": torch.get_num_threads(), "jax_devices": str(jax.devices())}


def cases_of(results: dict) -> dict:
    """The case entries of a results dict (without ``_meta``)."""
    return {k: v for k, v in results.items() if not k.startswith("_")}


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) < 1e-3 or abs(v) >= 1e5:
            return f"{v:.2e}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(results: dict) -> str:
    """One row per case: times per image, ratio, memory, compile time, agreement."""
    head = ("| case | what | diffjax s/img | peer s/img | ratio peer/diffjax | peer+ckpt s/img "
            "| diffjax MB | peer MB (ckpt) | compile s | max abs diff |")
    lines = [head, "|" + "---|" * 10]
    for name, r in cases_of(results).items():
        if "error" in r:
            lines.append(f"| `{name}` | FAILED: {r['error'][:200]} |" + " - |" * 8)
            continue
        peer_mb = _fmt(r.get("peer_peak_mb"))
        if r.get("peer_ckpt_peak_mb") is not None:
            peer_mb += f" ({_fmt(r['peer_ckpt_peak_mb'])})"
        elif r.get("peer_saved_mb") is not None:
            peer_mb = (f"{peer_mb}; saved {_fmt(r['peer_saved_mb'])} "
                       f"({_fmt(r.get('peer_ckpt_saved_mb'))})")
        what = r.get("what", "")
        if "rel_error" in r:
            what += (f"; rate {_fmt(r['rate'])} vs exact {_fmt(r['rate_exact'])}, rel. error "
                     f"{_fmt(r['rel_error'])}, {_fmt(r['speedup_vs_exact'])}x faster than "
                     "diffjax exact")
        if r.get("peer_extrapolated_from_rows"):
            what += f"; peer time extrapolated from {r['peer_extrapolated_from_rows']} rows"
        lines.append(
            f"| `{name}` | {what} | {_fmt(r.get('diffjax_s'))} | {_fmt(r.get('peer_s'))} | "
            f"{_fmt(r.get('ratio'))} | {_fmt(r.get('peer_ckpt_s'))} | "
            f"{_fmt(r.get('diffjax_peak_mb'))} | {peer_mb} | {_fmt(r.get('compile_s'))} | "
            f"{_fmt(r.get('max_abs_diff'))} |")
    return "\n".join(lines) + "\n"


def profile_markdown(prof: dict) -> str:
    """The profile section: the peer's top ops, achieved GFLOP/s, FLOPs and projection."""
    lines = ["## Profile", ""]
    top = prof.get("peer_top_ops_purify_10_steps")
    if top:
        lines += [f"Peer, 10 purification steps: {_fmt(top['aten_ops_per_step'])} aten ops "
                  f"per step, {_fmt(top['self_cpu_us_per_aten_op'])} us self CPU per op.", "",
                  "| op | self CPU s | count | share |", "|---|---|---|---|"]
        lines += [f"| `{r['op']}` | {_fmt(r['self_cpu_s'])} | {r['count']} | "
                  f"{r['share']:.0%} |" for r in top["top"]]
        lines.append("")
    ach = prof.get("achieved")
    if ach:
        lines += ["| case | diffjax GFLOP/s | peer GFLOP/s |", "|---|---|---|"]
        lines += [f"| `{k}` | {_fmt(v['diffjax_gflops'])} | {_fmt(v['peer_gflops'])} |"
                  for k, v in ach.items()]
        lines.append("")
    for key, v in prof.items():
        if not isinstance(v, dict) or "projection" not in v:
            continue
        fl, pr = v["flops"], v["projection"]
        lines += [f"### {key}: {fl['params']:,} parameters, "
                  f"{fl['forward_flops'] / 1e9:.2f} GFLOPs per forward per image "
                  f"(XLA cost analysis); PROJECTED GPU-days of PGD-200 x EOT-20 x 100 steps "
                  f"({pr['flops_per_image']:.3g} FLOPs per image)", "",
                  "| GPU, assumed sustained fraction of peak | 512 images | 1000 images | "
                  "10000 images |", "|---|---|---|---|"]
        for gpu, by_frac in pr["gpu_days"].items():
            for frac, days in by_frac.items():
                lines.append(f"| {gpu} at {frac} | " + " | ".join(
                    f"{_fmt(days[n])}" for n in ("512", "1000", "10000")) + " |")
        lines.append("")
    return "\n".join(lines)


def write(out_dir, results: dict, meta: dict) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes ``benchmarks.json`` and ``benchmarks.md`` into `out_dir` (created)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"_meta": meta, **cases_of(results)}
    jpath = out / "benchmarks.json"
    jpath.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    m = meta
    md = [f"# diffjax vs PyTorch peer ({m.get('settings', {}).get('name', '?')})", "",
          f"Machine: {m.get('machine', {}).get('cpu')}, {m.get('machine', {}).get('cores')} "
          f"cores; load average before {m.get('loadavg_before')}, after "
          f"{m.get('loadavg_after')}; total {_fmt(m.get('total_s'))} s.", "",
          f"Command: `{m.get('command')}`", "", markdown_table(results)]
    if m.get("profile"):
        md += ["", profile_markdown(m["profile"])]
    mpath = out / "benchmarks.md"
    mpath.write_text("\n".join(md))
    return jpath, mpath
