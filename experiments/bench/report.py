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
    mpath = out / "benchmarks.md"
    mpath.write_text("\n".join(md))
    return jpath, mpath
