"""Where the time goes, and what the paper's evaluation would cost on a GPU (a projection).

- `model_flops`: FLOPs of one U-Net call (forward) and of one gradient step through it,
  from XLA's ``cost_analysis()`` of the compiled programs (a multiply-add counts 2 FLOPs),
  for Ho et al.'s CIFAR-10 model (35.7M) and score_sde's DDPM++ deep (106.6M, the paper's
  CIFAR-10 purifier), no weights needed (shapes only: ``jax.eval_shape`` of the init).
- `peer_top_ops`: ``torch.profiler`` of the peer's purification loop, the top operators
  by self CPU time and how many operators one step dispatches.
- `xla_achieved`: achieved FLOP/s of diffjax's timed cases from the FLOPs of one call.
- `projection`: the paper's full-gradient CIFAR-10 evaluation (PGD-200, EOT-20, 100 steps)
  projected from FLOPs and an ASSUMED sustained fraction of a GPU's peak. It is arithmetic,
  not a measurement: there is no GPU in this task.
"""

from __future__ import annotations

import math

__all__ = ["model_flops", "peer_top_ops", "xla_achieved", "projection", "GPU_PEAKS"]

# Dense peak FLOP/s from the vendors' data sheets (SXM parts, no sparsity).
GPU_PEAKS = {
    "A100 bf16 tensor": 312e12,
    "A100 tf32 tensor": 156e12,
    "A100 fp32": 19.5e12,
    "H100 bf16 tensor": 989e12,
    "H100 tf32 tensor": 494e12,
    "H100 fp32": 67e12,
}


def _cost(fn, *args) -> dict:
    import jax

    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return {"flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan")))}


def model_flops(kind: str, config: dict, batch: int = 1) -> dict:
    """FLOPs per image of one forward call and of one input-gradient call.

    Args:
      kind: ``"ddpm_unet"`` or ``"ncsnpp"``.
      config: the model config.
      batch: the batch the programs are compiled for (FLOPs are divided by it).

    Returns:
      ``{"params", "forward_flops", "forward_bytes", "grad_flops"}`` per image; the grad
      is ``d sum(eps) / d x`` (one forward + one backward, no remat).
    """
    import jax
    import jax.numpy as jnp

    from diffjax import models

    module = models.build(kind, config)
    res = config.get("resolution", config.get("image_size", 32))
    ch = config.get("in_channels", config.get("num_channels", 3))
    x = jax.ShapeDtypeStruct((batch, res, res, ch), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    spec = models.get_spec(kind)
    variables = jax.eval_shape(lambda k: spec.init(module, config, k), jax.random.key(0))
    params = int(sum(math.prod(v.shape) for v in jax.tree.leaves(variables["params"])))

    def fwd(v, x, t):
        return spec.make_fn(module, config, v)(x, t)

    def grad(v, x, t):
        return jax.grad(lambda x: jnp.sum(fwd(v, x, t)))(x)

    f = _cost(fwd, variables, x, t)
    g = _cost(grad, variables, x, t)
    return {"params": params, "forward_flops": f["flops"] / batch,
            "forward_bytes": f["bytes_accessed"] / batch, "grad_flops": g["flops"] / batch}


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
