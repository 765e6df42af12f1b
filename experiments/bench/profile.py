"""Where the time goes, and what the paper's evaluation costs: FLOPs, peaks, projections.

Shared by the CPU suite (`experiments.bench.cases`) and the GPU suite (`experiments.bench.gpu`):

- `eps_flops` / `model_flops`: FLOPs of one U-Net call (forward) and of its input gradient,
  from XLA's cost analysis of the HLO lowered for CUDA, on any machine (a multiply-add
  counts 2 FLOPs; a GPU's compiled cost analysis leaves out the cuDNN convolutions, and the
  CPU's program computes a few extra rows), with abstract weights (``jax.eval_shape`` of
  the init: no memory, no weights needed).
- `peer_top_ops`: ``torch.profiler`` of the peer's purification loop, the top operators
  by self CPU time and how many operators one step dispatches.
- `xla_achieved` / `achieved`: achieved FLOP/s of timed cases, and their fractions of
  `GPU_PEAKS` / `H100_PEAKS`.
- `projection`: the paper's full-gradient CIFAR-10 evaluation (PGD-200, EOT-20, 100 steps)
  from FLOPs and an ASSUMED sustained fraction of a GPU's peak (arithmetic).
- `measured_projection`: the same evaluation from MEASURED per-image times (the GPU suite).
"""

from __future__ import annotations

import contextlib
import math

__all__ = ["GPU_PEAKS", "H100_PEAKS", "PAPER_DAYS", "eps_flops", "grad_step_flops",
           "abstract_eps",
           "model_flops", "peer_top_ops", "xla_achieved", "achieved", "projection",
           "measured_projection", "precision_probe", "jax_precision"]

# Dense peak FLOP/s from the vendors' data sheets (SXM parts, no sparsity).
GPU_PEAKS = {
    "A100 bf16 tensor": 312e12,
    "A100 tf32 tensor": 156e12,
    "A100 fp32": 19.5e12,
    "H100 bf16 tensor": 989e12,
    "H100 tf32 tensor": 494e12,
    "H100 fp32": 67e12,
}
# The GPU suite's fractions of peak (keys as in the committed results), with the bf16
# matmul measured on the lent H100 (798 TFLOP/s at 16384^3).
H100_PEAKS = {"bf16 989 (datasheet)": GPU_PEAKS["H100 bf16 tensor"],
              "bf16 798 (measured matmul)": 798e12,
              "tf32 494 (datasheet)": GPU_PEAKS["H100 tf32 tensor"],
              "fp32 67 (datasheet)": GPU_PEAKS["H100 fp32"]}
PAPER_DAYS = 10.0  # the paper's full-gradient CIFAR-10 evaluation, one GPU (PAPER_NOTES)


def eps_flops(eps_fn, resolution: int, channels: int) -> dict:
    """FLOPs per image of one ``eps_fn`` call and of its input gradient (batch 1).

    The model's FLOPs: XLA's cost analysis of the unoptimised HLO lowered for CUDA (no
    GPU needed, nothing compiled), where the convolutions are the plain ones. The CPU's
    own program computes 1/H more rows in its larger convolutions (`layers.conv2d`), and a
    GPU's compiled cost analysis leaves out the convolutions (cuDNN custom calls: 1.06
    instead of 11.66 GFLOPs for the 35.7M U-Net's forward, H100 run 1). Falls back to the
    CPU lowering, then to the compiled CPU program.

    Args:
      eps_fn: a `jax.tree_util.Partial` ``eps_fn(x_t, t)``; its leaves may be arrays or
        ``jax.ShapeDtypeStruct`` (`abstract_eps`).
      resolution, channels: the image shape.

    Returns:
      ``{"forward_flops", "grad_flops"}`` (the gradient: ``d sum(eps) / d x``, one forward
      and one backward, no remat).
    """
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, resolution, resolution, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                            eps_fn)

    def fwd(e, x, t):
        return e(x, t)

    def grad(e, x, t):
        return jax.grad(lambda x: jnp.sum(e(x, t)))(x)

    def flops(f):
        cost = None
        with jax.default_device(jax.devices("cpu")[0]):
            for platform in ("cuda", "cpu"):
                try:
                    lowered = jax.jit(f).trace(abstract, x, t).lower(
                        lowering_platforms=(platform,))
                    cost = lowered.cost_analysis()
                except Exception:  # noqa: BLE001 - an older/newer JAX: the next way
                    cost = None
                if cost and "flops" in (cost[0] if isinstance(cost, list) else cost):
                    break
            else:
                cost = jax.jit(f).lower(abstract, x, t).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])

    return {"forward_flops": flops(fwd), "grad_flops": flops(grad)}


def grad_step_flops(flops: dict, remat: str = "steps") -> float:
    """FLOPs one reverse step costs a full gradient, from `eps_flops`' counts: the
    forward pass and the input-gradient (``grad_flops``: one forward and one backward),
    plus, with ``remat="steps"``, the forward recomputed on the backward pass.
    ``"save_conv"`` recomputes only elementwise ops, dense layers and attention (no
    convolution), ``"none"`` nothing: their count is ``grad_flops``."""
    extra = flops["forward_flops"] if remat == "steps" else 0.0
    return extra + flops["grad_flops"]


def abstract_eps(kind: str, config: dict):
    """``(eps_fn, resolution, channels, params)`` of a model with abstract weights.

    ``eps_fn`` is a `jax.tree_util.Partial` whose weights are ``jax.ShapeDtypeStruct``s
    (``jax.eval_shape`` of the init): enough for `eps_flops`, nothing allocated.
    """
    import jax

    from diffjax import models

    module = models.build(kind, config)
    spec = models.get_spec(kind)
    variables = jax.eval_shape(lambda k: spec.init(module, config, k), jax.random.key(0))
    params = int(sum(math.prod(v.shape) for v in jax.tree.leaves(variables["params"])))
    eps = jax.tree_util.Partial(
        lambda v, x, t, m=module, c=config, sp=spec: sp.make_fn(m, c, v)(x, t), variables)
    res = config.get("resolution", config.get("image_size", 32))
    ch = config.get("in_channels", config.get("num_channels", 3))
    return eps, res, ch, params


def _cost(fn, *args) -> dict:
    import jax

    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return {"flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan")))}


def model_flops(kind: str, config: dict) -> dict:
    """FLOPs per image of one forward call and of one input-gradient call (`eps_flops`).

    Args:
      kind: ``"ddpm_unet"`` or ``"ncsnpp"``.
      config: the model config.

    Returns:
      ``{"params", "forward_flops", "forward_bytes", "grad_flops"}`` per image; the grad
      is ``d sum(eps) / d x`` (one forward + one backward, no remat); the bytes are the
      compiled CPU program's.
    """
    import jax
    import jax.numpy as jnp

    eps, res, ch, params = abstract_eps(kind, config)
    x = jax.ShapeDtypeStruct((1, res, res, ch), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    f = _cost(lambda e, x, t: e(x, t), eps, x, t)
    return {"params": params, **eps_flops(eps, res, ch), "forward_bytes": f["bytes_accessed"]}


def peer_top_ops(ppur, x, noises, top: int = 8) -> dict:
    """``torch.profiler`` of one peer purification (no grad): top ops by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        ppur(x, noises)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ppur(x, noises)
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    n_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    steps = len(ppur.taus)
    return {"total_self_cpu_s": total_self / 1e6,
            "aten_ops_per_step": n_ops / steps,
            "self_cpu_us_per_aten_op": total_self / max(n_ops, 1),
            "top": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "count": e.count,
                     "share": e.self_cpu_time_total / total_self} for e in rows]}


def xla_achieved(results: dict, forward_flops_per_image: float, grad_mult: float = 3.0) -> dict:
    """Achieved GFLOP/s of diffjax's purification/gradient cases (forward-equivalents).

    A gradient with remat costs `grad_mult` forward passes per step (forward, then the
    recomputed forward and the input-gradient backward: 1 + grad_flops / forward_flops,
    about 3); purification 1.
    """
    out = {}
    for name, r in results.items():
        if name.startswith("_") or r.get("diffjax_s") is None or "steps" not in r:
            continue
        if name.startswith("purify") or name.endswith("_purify"):
            mult = 1.0
        elif "grad" in name:
            mult = grad_mult * r.get("eot", 1)
        else:
            continue
        flops = forward_flops_per_image * r["steps"] * mult
        if r.get("resolution") and "res" in name:
            continue  # other image sizes: other FLOPs
        out[name] = {"diffjax_gflops": flops / r["diffjax_s"] / 1e9,
                     "peer_gflops": flops / r["peer_s"] / 1e9 if r.get("peer_s") else None}
    return out


def projection(forward_flops: float, grad_flops: float, *, iterations: int = 200,
               eot: int = 20, steps: int = 100, images=(512, 1000, 10000),
               fractions=(0.25, 0.5)) -> dict:
    """Projected GPU days of the full-gradient PGD-EOT evaluation (ARITHMETIC, not measured).

    Each attack iteration takes `eot` full gradients through `steps` U-Net calls; with
    remat a gradient costs per step one forward plus one forward-and-backward
    (`grad_flops`, the input gradient only: no weight gradients); the evaluation adds one
    purification per EOT draw.

    Args:
      forward_flops: FLOPs of one U-Net forward per image (`model_flops`).
      grad_flops: FLOPs of one U-Net input-gradient call per image (`model_flops`).

    Returns:
      ``{"flops_per_image", "assumptions", "gpu_days": {gpu: {fraction: {images: days}}}}``.
    """
    per_step_grad = forward_flops + grad_flops
    per_image = steps * (per_step_grad * eot * iterations + forward_flops * eot)
    gpu = {}
    for name, peak in GPU_PEAKS.items():
        gpu[name] = {f"{frac:.0%}": {str(n): per_image * n / (peak * frac) / 86400
                                     for n in images} for frac in fractions}
    return {"flops_per_image": per_image, "assumptions": {
        "iterations": iterations, "eot": eot, "steps": steps,
        "forward_equivalents_per_step_of_a_gradient": per_step_grad / forward_flops},
        "gpu_days": gpu}


def achieved(flops_per_image: float, s_per_image: float, peaks: dict | None = None) -> dict:
    """Achieved TFLOP/s of a timed case and its fraction of each of `peaks` (FLOP/s).

    Returns:
      ``{"flops_per_image", "diffjax_tflops", "fraction_of_peak": {peak name: fraction}}``.
    """
    tf = flops_per_image / s_per_image / 1e12
    peaks = H100_PEAKS if peaks is None else peaks
    return {"flops_per_image": flops_per_image, "diffjax_tflops": tf,
            "fraction_of_peak": {k: tf * 1e12 / v for k, v in peaks.items()}}


def measured_projection(results: dict, *, iterations: int, eot: int, steps: int,
                        t_star: int, images=(512, 1000, 10000),
                        paper_days: float = PAPER_DAYS) -> dict:
    """Projected days of the paper's evaluation from MEASURED per-image times (one GPU).

    Per image: `iterations` EOT-`eot` gradients through `steps` steps (the measured
    ``{model}_eot*`` time, else `eot` x the measured ``{model}_grad_t*`` time) plus `eot`
    evaluation purifications (the measured ``{model}_purify*`` time at the largest batch).
    The classifier (a WRN-28-10 gradient is under 1% of one purifier gradient) is left out.

    Args:
      results: the GPU suite's cases, named ``{model}_{purify|grad_t|eot}..._{dtype}``
        with ``batch``, ``diffjax_s`` and, where the peer ran, ``peer_s``.

    Returns:
      ``{"assumptions", "by_model": {"{model}_{dtype}_{side}": {"eot_grad_s_per_image",
      "eot_source", "purify_s_per_image", "s_per_image", "days", "vs_paper_10_days",
      "within_1_day"}}}``.
    """
    from experiments.bench import report

    cases = report.cases_of(results)
    out = {}
    for model in ("ddpm", "ddpmpp"):
        for dt in ("fp32", "bf16"):
            for side, field in (("diffjax", "diffjax_s"), ("peer", "peer_s")):
                def pick(prefix, _dt=dt, _field=field, _model=model):
                    c = [(r.get("batch", 0), r[_field]) for n, r in cases.items()
                         if n.startswith(f"{_model}_{prefix}") and n.endswith(_dt)
                         and r.get(_field)]
                    return max(c)[1] if c else None

                pur, grad, eot_s = pick("purify"), pick("grad_t"), pick("eot")
                if side == "peer":
                    eot_s = None  # never timed: a Python loop of `eot` checkpointed gradients
                if pur is None or (grad is None and eot_s is None):
                    continue
                src = f"measured {model}_eot{eot}_grad" if eot_s else \
                    f"{eot} x measured {model}_grad_t{steps}"
                eot_s = eot_s if eot_s else eot * grad
                per_image = iterations * eot_s + eot * pur
                days = {str(n): n * per_image / 86400 for n in images}
                out[f"{model}_{dt}_{side}"] = {
                    "eot_grad_s_per_image": eot_s, "eot_source": src,
                    "purify_s_per_image": pur, "s_per_image": per_image, "days": days,
                    "vs_paper_10_days": {n: d / paper_days for n, d in days.items()},
                    "within_1_day": {n: d <= 1.0 for n, d in days.items()}}
    return {"assumptions": {"iterations": iterations, "eot": eot, "steps": steps,
                            "t_star": t_star, "gpus": 1, "paper_days": paper_days},
            "by_model": out}


@contextlib.contextmanager
def jax_precision(value):
    """``jax_default_matmul_precision`` set to `value` inside the block."""
    import jax

    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", value)
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", old)


def precision_probe(dev, probe_n: int) -> dict:
    """JAX's and torch's default float32 precision (TF32?) and matmul throughput on `dev`.

    The relative error of a float32 matmul (at most 1024^2, against a float64 host
    reference) and of a 3x3 convolution (128 channels, 32x32) at the default precision
    against 'highest', torch's TF32 flags and errors, and the TFLOP/s of a `probe_n`^3
    matmul in bf16 and default-precision float32.
    """
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench import timing

    n = min(probe_n, 1024)  # the float64 reference is computed on the host
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    rel = lambda c: float(np.abs(np.asarray(c, np.float64) - ref).max() / np.abs(ref).max())
    ad, bd = jax.device_put((a, b), dev)
    mm = lambda a, b: a @ b
    out = {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
           "jax_matmul_rel_err_default": rel(jax.jit(mm)(ad, bd))}
    with jax_precision("highest"):
        out["jax_matmul_rel_err_highest"] = rel(jax.jit(mm)(ad, bd))
    out["jax_default_f32_matmul_is_tf32_like"] = out["jax_matmul_rel_err_default"] > 1e-5
    # A 3x3 convolution, 128 -> 128 channels, the U-Net's typical layer.
    xc = rng.standard_normal((8, 32, 32, 128), np.float32)
    kc = rng.standard_normal((3, 3, 128, 128), np.float32) / math.sqrt(9 * 128)
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with jax_precision("highest"):
        c_hi = np.asarray(jax.jit(conv)(xc, kc), np.float64)
    c_def = np.asarray(jax.jit(conv)(xc, kc), np.float64)
    out["jax_conv_rel_err_default_vs_highest"] = float(
        np.abs(c_def - c_hi).max() / np.abs(c_hi).max())
    big = probe_n
    ab = jax.random.normal(jax.random.key(0), (2, big, big), jnp.float32)
    for dt, key in ((jnp.bfloat16, "jax_bf16_matmul_tflops"),
                    (jnp.float32, "jax_f32_default_matmul_tflops")):
        f = functools.partial(jax.jit(mm), ab[0].astype(dt), ab[1].astype(dt))
        t = timing.median_time(f, repeats=10, warmup=2)[0]
        out[key] = 2 * big ** 3 / t / 1e12
    out["matmul_probe_n"] = big
    del ab
    try:
        import torch

        from experiments.bench import peer
    except ImportError as e:
        out["torch"] = f"unavailable: {e}"
    else:
        out["torch_tf32_flags"] = peer.tf32_flags()
        out["torch_cudnn_benchmark"] = torch.backends.cudnn.benchmark
        if torch.cuda.is_available():
            at, bt = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
            out["torch_matmul_rel_err_default"] = rel((at @ bt).cpu().numpy())
            xt = torch.from_numpy(xc).permute(0, 3, 1, 2).contiguous().cuda()
            kt = torch.from_numpy(kc).permute(3, 2, 0, 1).contiguous().cuda()
            ct = torch.nn.functional.conv2d(xt, kt, padding=1).permute(0, 2, 3, 1)
            out["torch_conv_rel_err_default_vs_jax_highest"] = float(
                np.abs(ct.cpu().numpy().astype(np.float64) - c_hi).max()
                / np.abs(c_hi).max())
    return out
