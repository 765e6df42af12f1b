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

__all__ = ["REQUIRED_FIELDS", "machine_info", "write", "markdown_table", "cases_of",
           "gpu_markdown", "gpu_versions", "device_peak_mb", "check_out_file", "write_json"]

REQUIRED_FIELDS = ("diffjax_s", "peer_s", "ratio", "diffjax_peak_mb", "peer_peak_mb",
                   "max_abs_diff")


def check_out_file(out: str) -> None:
    """Stops a script before any work when its ``--out`` file cannot be written: its
    directory does not exist (empty `out`: no file asked for)."""
    if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"--out={out}: its directory does not exist; create it or "
                                "name another file (checked before any work)")


def write_json(out: str, data: dict) -> None:
    """Writes a script's result to its ``--out`` file (if any) and says so."""
    if out:
        with open(out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {out}")


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
    head = ("| case | what | diffjax s/img | peer s/img | ratio peer/diffjax | compiled peer "
            "s/img | ratio compiled/diffjax | peer+ckpt s/img | diffjax MB | peer MB (ckpt) | "
            "compile s | max abs diff |")
    lines = [head, "|" + "---|" * 12]
    for name, r in cases_of(results).items():
        if "error" in r:
            lines.append(f"| `{name}` | FAILED: {r['error'][:200]} |" + " - |" * 10)
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
        for mode, label in (("save_conv", 'remat="save_conv"'), ("noremat", "no remat")):
            if r.get(f"diffjax_{mode}_s") is not None:
                what += (f"; diffjax with {label}: {_fmt(r[f'diffjax_{mode}_s'])} s/img, "
                         f"ratio {_fmt(r.get(f'ratio_{mode}'))}, compiled ratio "
                         f"{_fmt(r.get(f'ratio_compiled_{mode}'))}, "
                         f"{_fmt(r.get(f'diffjax_{mode}_peak_mb'))} MB")
        if r.get("peer_extrapolated_from_rows"):
            what += f"; peer time extrapolated from {r['peer_extrapolated_from_rows']} rows"
        compiled = _fmt(r.get("peer_compiled_s"))
        if r.get("peer_compiled_whole_rel_diff") is not None:
            compiled += (f" (compiled per block: as one graph it was wrong by "
                         f"{_fmt(100 * r['peer_compiled_whole_rel_diff'])}% of the max)")
        if r.get("peer_compiled_agrees") is False:
            compiled += (f" (WRONG: max abs diff {_fmt(r['peer_compiled_max_abs_diff'])}, "
                         f"{_fmt(100 * r['peer_compiled_rel_diff'])}% of the output's max)")
        if r.get("peer_compiled_error"):
            compiled = f"failed: {r['peer_compiled_error'][:120]}"
        lines.append(
            f"| `{name}` | {what} | {_fmt(r.get('diffjax_s'))} | {_fmt(r.get('peer_s'))} | "
            f"{_fmt(r.get('ratio'))} | {compiled} | {_fmt(r.get('ratio_compiled'))} | "
            f"{_fmt(r.get('peer_ckpt_s'))} | "
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


def gpu_versions() -> dict:
    """Device and library versions (whatever is importable)."""
    import importlib
    import sys

    import jax

    out = {"python": sys.version.split()[0], "jax_devices": str(jax.devices()),
           "jax_backend": jax.default_backend(),
           "device_kind": jax.devices()[0].device_kind,
           "env": {k: v for k, v in os.environ.items()
                   if k.startswith(("XLA_", "JAX_", "TF_GPU", "CUDA_VISIBLE"))}}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "diffusers", "huggingface_hub"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            out[name] = f"unavailable: {type(e).__name__}"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        out.update(torch_device=torch.cuda.get_device_name(), torch_cuda=torch.version.cuda,
                   torch_cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return out


def device_peak_mb(dev) -> float | None:
    """Peak MB a JAX device has had in use (None where it keeps no statistics: CPU)."""
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices have none
        return None
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats \
        else None


def gpu_markdown(data: dict) -> str:
    """``benchmarks.md`` of a GPU run: setup, the case table, throughput, memory, projection."""
    meta, cases = data["_meta"], cases_of(data)
    v, p = meta.get("versions", {}), meta.get("precision", {})
    lines = [f"# diffjax GPU benchmarks ({meta.get('settings', {}).get('name')})", "",
             f"Device: {v.get('device_kind')} ({v.get('torch_device', '-')}, "
             f"{_fmt(v.get('gpu_memory_gb'))} GB); jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
             f"flax {v.get('flax')}, torch {v.get('torch')} (CUDA {v.get('torch_cuda', '-')}, "
             f"cuDNN {v.get('torch_cudnn', '-')}), diffusers {v.get('diffusers')}.", "",
             f"Command: `{meta.get('command')}`; elapsed {_fmt(meta.get('elapsed_s'))} s; "
             f"skipped (time budget): {', '.join(meta.get('skipped', [])) or 'none'}.", "",
             f"Precision: `jax_default_matmul_precision` = "
             f"{p.get('jax_default_matmul_precision')!r}; f32 matmul relative error, JAX "
             f"default {_fmt(p.get('jax_matmul_rel_err_default'))} vs 'highest' "
             f"{_fmt(p.get('jax_matmul_rel_err_highest'))} (TF32-like: "
             f"{p.get('jax_default_f32_matmul_is_tf32_like')}); conv default vs highest "
             f"{_fmt(p.get('jax_conv_rel_err_default_vs_highest'))}; torch TF32 flags "
             f"{p.get('torch_tf32_flags')}, torch matmul relative error "
             f"{_fmt(p.get('torch_matmul_rel_err_default'))}, conv vs JAX highest "
             f"{_fmt(p.get('torch_conv_rel_err_default_vs_jax_highest'))}. "
             f"Matmul probe: bf16 {_fmt(p.get('jax_bf16_matmul_tflops'))} TFLOP/s, f32 default "
             f"{_fmt(p.get('jax_f32_default_matmul_tflops'))} TFLOP/s.", "",
             "## All cases (seconds per image)", "", markdown_table(data), "",
             "## Throughput and achieved FLOP/s", "",
             "| case | dtype | batch | diffjax img/s | peer img/s | peer/diffjax | diffjax "
             "TFLOP/s | of bf16 989 | of tf32 494 | compile s | XLA MB | peer MB | bf16 vs "
             "fp32 max diff (diffjax; peer) |", "|" + "---|" * 13]
    for name, r in cases.items():
        if r.get("diffjax_tflops") is None:
            continue
        fr = r.get("fraction_of_peak", {})
        lines.append(
            f"| `{name}` | {r.get('dtype')} | {r.get('batch')} | "
            f"{_fmt(r.get('diffjax_images_per_s'))} | {_fmt(r.get('peer_images_per_s'))} | "
            f"{_fmt(r.get('ratio'))} | {_fmt(r.get('diffjax_tflops'))} | "
            f"{_fmt(fr.get('bf16 989 (datasheet)'))} | {_fmt(fr.get('tf32 494 (datasheet)'))} | "
            f"{_fmt(r.get('compile_s'))} | {_fmt(r.get('diffjax_peak_mb'))} | "
            f"{_fmt(r.get('peer_peak_mb'))} | {_fmt(r.get('bf16_vs_fp32_max_abs_diff'))}; "
            f"{_fmt(r.get('peer_bf16_vs_fp32_max_abs_diff'))} |")
    lines += ["", "## FLOPs per image (XLA cost analysis)", "",
              "| model | parameters | forward GFLOPs | input-gradient GFLOPs | bf16 convs |",
              "|---|---|---|---|---|"]
    for k, fl in data.get("_flops", {}).items():
        lines.append(f"| {k} | {fl['params']:,} | {fl['forward_flops'] / 1e9:.4g} | "
                     f"{fl['grad_flops'] / 1e9:.4g} | "
                     f"{fl['op_dtypes']['bf16']['conv_general_dilated']} |")
    mem = cases.get("ddpm_grad_memory", {})
    if mem.get("diffjax_peak_mb_by_steps"):
        lines += ["", "## Gradient memory against steps (MB)", "",
                  f"diffjax (XLA temp + output, batch {mem.get('batch')}): "
                  f"{mem['diffjax_peak_mb_by_steps']}; peer without checkpointing (CUDA peak "
                  f"growth, batch {mem.get('peer_batch')}): {mem.get('peer_peak_mb_by_steps')}; "
                  f"with: {mem.get('peer_ckpt_peak_mb_by_steps')}."]
    proj = data.get("_projection", {})
    if proj.get("by_model"):
        a = proj["assumptions"]
        lines += ["", f"## Projected wall time of the paper's evaluation (PGD-{a['iterations']}"
                  f" x EOT-{a['eot']}, {a['steps']} steps, one GPU), days", "",
                  "| model, dtype, side | EOT gradient s/img (source) | purify s/img | 512 | "
                  "1000 | 10000 | 10000 vs paper's 10 days |", "|---|---|---|---|---|---|---|"]
        for k, r in proj["by_model"].items():
            d = r["days"]
            lines.append(f"| {k} | {_fmt(r['eot_grad_s_per_image'])} ({r['eot_source']}) | "
                         f"{_fmt(r['purify_s_per_image'])} | {_fmt(d.get('512'))} | "
                         f"{_fmt(d.get('1000'))} | {_fmt(d.get('10000'))} | "
                         f"{_fmt(r['vs_paper_10_days'].get('10000'))}x |")
    return "\n".join(lines) + "\n"
