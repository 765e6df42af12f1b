"""The GPU suite: the CIFAR-10 purifiers at full size, against the hardware and the peer.

Two models with RANDOM weights (speed does not depend on the values):

- ``ddpm``: Ho et al.'s CIFAR-10 DDPM U-Net (35.7M parameters), built in diffusers and
  converted (`models.make_pair`), so the PyTorch peer runs the identical weights;
- ``ddpmpp``: score_sde's DDPM++ deep (``ncsnpp``, 106.6M parameters), the paper's CIFAR-10
  purifier, diffjax only.

What is measured (``python -m experiments.benchmarks --settings=gpu --out=DIR``; the cases
run in priority order, and ``--time_budget_s`` skips the rest once it is spent):

- ``check_*``: diffjax and the peer agree at float32 'highest' precision on both sides
  (JAX ``jax_default_matmul_precision="highest"``; torch with TF32 off), before timing.
- ``*_purify_t100_b*``: purification throughput (100 steps, t* = 100), fp32 and bf16.
- ``*_grad_t100_b*``: one full-gradient step (summed CE of a fixed random linear classifier
  on the purified images, through all 100 steps, ``remat=True``); the peer uses
  ``torch.utils.checkpoint`` per step (without it the batch does not fit).
- ``*_eot20_grad_b*``: the EOT-20 gradient, ``vmap`` over 20 keys.
- ``ddpm_grad_memory``: diffjax's XLA buffer size (``compiled.memory_analysis()``, temp +
  output) of the gradient at 10 / 50 / 100 steps, and the peer's CUDA peak
  (``torch.cuda.max_memory_allocated``) without and with checkpointing.
- ``_flops``: FLOPs per image (XLA cost analysis of the unoptimised HLO of one U-Net call
  and of its input gradient; a multiply-add counts 2), hence achieved TFLOP/s per case.
- ``_projection``: the paper's full-gradient CIFAR-10 evaluation (PGD-200 x EOT-20 through
  100 steps, plus EOT-20 evaluation purifications) projected from the MEASURED per-image
  times, for 512 / 1000 / 10000 images, against the paper's ~10 days.

bf16 means bf16 convolutions and matmuls with float32 accumulation (XLA's and cuDNN's
default for bf16 operands): `bf16_eps_fn` casts the weights and every layer's input to
bfloat16 and eps back to float32, so the 100-step chain itself stays float32. The peer's
bf16 is ``torch.autocast(dtype=torch.bfloat16)``. Timings use each framework's default
float32 precision (recorded in ``_meta.precision``); medians after warm-up, with
``jax.block_until_ready`` / ``torch.cuda.synchronize``; compile time apart.

This module imports nothing that the GPU machine lacks (no ``diffjax.metrics``, which needs
dm-pix; diffusers is optional: without it the peer is skipped and the 35.7M model gets
random diffjax weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import diffusion, models
from experiments.bench import report, timing
from experiments.bench.models import UNetSize, cifar10_size
from experiments.bench.programs import Purifier, make_eot_grad, make_grad

__all__ = ["GpuSettings", "gpu_settings", "gpu_smoke_settings", "bf16_eps_fn",
           "random_variables", "op_dtypes", "projection", "GpuBench", "run_gpu", "PEAKS"]

# H100 SXM dense peaks (data sheet), and the lead's bf16 matmul measured on the lent machine.
PEAKS = {"bf16 989 (datasheet)": 989e12, "bf16 798 (measured matmul)": 798e12,
         "tf32 494 (datasheet)": 494e12, "fp32 67 (datasheet)": 67e12}
PAPER_DAYS = 10.0


@dataclasses.dataclass(frozen=True)
class GpuSettings:
    """Sizes of one GPU run.

    Attributes:
      name: "gpu" or "gpu_smoke" (CPU test).
      ddpm: Ho et al.'s U-Net size (`cifar10_size()` on the GPU).
      ddpmpp: DDPM++ config overrides over `ncsnpp.cifar10_deep_config()` (pairs).
      t_star, steps: the purifier (t* = 100, 100 respaced steps).
      repeats, warmup: timed calls (median) and untimed calls before them (the first of
        which gives the outputs that are compared).
      check_batch, check_grad_batch: batches of the agreement checks.
      purify_batch, grad_batch, eot_batch: the 35.7M model's batches (the EOT batch times
        `eot` equals the gradient batch: the same convolution shapes, autotuned once).
      pp_purify_batch, pp_grad_batch, pp_eot_batch: DDPM++'s.
      eot: EOT draws (20).
      mem_steps: extra step counts of the gradient-memory case.
      peer_mem_batch, peer_mem_steps: the peer's memory growth without checkpointing.
      extra_purify_batches: more batch sizes of the 35.7M purification (last priority).
      probe_n: matrix size of the matmul-throughput probe (the precision probe uses at
        most 1024: its float64 reference runs on the host).
      iterations, images: the projected evaluation (PGD iterations, test-set sizes).
    """

    name: str
    ddpm: UNetSize = dataclasses.field(default_factory=cifar10_size)
    ddpmpp: tuple = ()
    t_star: int = 100
    steps: int = 100
    repeats: int = 3
    warmup: int = 1
    check_batch: int = 4
    check_grad_batch: int = 2
    purify_batch: int = 256
    grad_batch: int = 80
    eot_batch: int = 4
    pp_purify_batch: int = 128
    pp_grad_batch: int = 40
    pp_eot_batch: int = 2
    eot: int = 20
    mem_steps: tuple[int, ...] = (10, 50)
    peer_mem_batch: int = 8
    peer_mem_steps: tuple[int, ...] = (10, 50, 100)
    extra_purify_batches: tuple[int, ...] = (64, 1024)
    probe_n: int = 16384
    iterations: int = 200
    images: tuple[int, ...] = (512, 1000, 10000)


def gpu_settings() -> GpuSettings:
    """The H100 run: fits one <= 8 minute device call (compiles included) with a budget."""
    return GpuSettings(name="gpu")


def gpu_smoke_settings() -> GpuSettings:
    """The same code path at tiny sizes, on CPU in seconds (the test)."""
    return GpuSettings(
        name="gpu_smoke", ddpm=UNetSize(resolution=8, ch=8, ch_mult=(1, 2), num_groups=4),
        ddpmpp=(("nf", 8), ("ch_mult", [1, 2]), ("num_res_blocks", 1),
                ("attn_resolutions", [4]), ("image_size", 8), ("dropout", 0.0)),
        t_star=10, steps=3, repeats=1, warmup=1, check_batch=2, check_grad_batch=2,
        purify_batch=2, grad_batch=2, eot_batch=1, pp_purify_batch=2, pp_grad_batch=2,
        pp_eot_batch=1, eot=2, mem_steps=(2,), peer_mem_batch=2, peer_mem_steps=(2, 3),
        extra_purify_batches=(), probe_n=128)


# ------------------------------------------------------------------------- models


def random_variables(kind: str, config: dict, seed: int = 0) -> dict:
    """Random weights for a model kind (host NumPy draws from the shapes alone).

    Kernels (rank >= 2) ~ N(0, 1 / fan_in) with fan_in = prod(shape[:-1]) (Flax's HWIO and
    (in, out) layouts); norm scales 1 + 0.1 N(0, 1); other vectors 0.05 N(0, 1). Unlike the
    DDPM initialisers (zero output layers), every layer then changes the output.
    """
    spec = models.get_spec(kind)
    module = spec.build(config)
    shapes = jax.eval_shape(lambda k: spec.init(module, config, k), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if len(s.shape) >= 2:
            v = rng.standard_normal(s.shape, np.float32) / math.sqrt(np.prod(s.shape[:-1]))
        elif name == "scale":
            v = 1.0 + 0.1 * rng.standard_normal(s.shape, np.float32)
        else:
            v = 0.05 * rng.standard_normal(s.shape, np.float32)
        return v.astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _cast_first_arg_bf16(next_fun, args, kwargs, context):
    del context
    if args and isinstance(args[0], jax.Array) and jnp.issubdtype(args[0].dtype, jnp.floating):
        args = (args[0].astype(jnp.bfloat16),) + tuple(args[1:])
    return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Bf16Eps:
    """``eps_fn`` body in bf16: every Flax layer's input cast to bf16 (hashable by func)."""

    func: Callable

    def __call__(self, variables, x_t, t):
        import flax.linen as nn

        with nn.intercept_methods(_cast_first_arg_bf16):
            eps = self.func(variables, x_t, t)
        return eps.astype(jnp.float32)


def bf16_eps_fn(kind: str, config: dict, variables: dict):
    """The model's ``eps_fn`` with bf16 weights and bf16 layer inputs, eps in float32.

    Convolutions and matmuls then take bf16 operands (float32 accumulation inside cuDNN /
    cuBLAS); the purifier's chain stays float32 (`purify` casts eps to the chain's dtype).
    The time input stays float32 (the embedding is cast at the first Dense). The U-Net's own
    ``dtype`` field is set to bfloat16 too (its layers would otherwise cast back).

    Args:
      kind: a diffusion model kind (``"ddpm_unet"``, ``"ncsnpp"``).
      config: its config.
      variables: float32 variables (cast here).

    Returns:
      A `jax.tree_util.Partial` ``eps_fn(x_t, t) -> eps`` (API.md's convention).
    """
    cfg = dict(config, dtype="bfloat16") if kind == "ddpm_unet" else config
    vb = jax.tree.map(lambda a: a.astype(jnp.bfloat16)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, variables)
    inner = models.make_fn(kind, cfg, vb)
    return jax.tree_util.Partial(_Bf16Eps(inner.func), *inner.args)


def op_dtypes(eps_fn, resolution: int, channels: int) -> dict:
    """Operand dtypes of the convolutions and matmuls of one ``eps_fn`` call (its jaxpr).

    Returns:
      ``{"conv_general_dilated": {dtype: count}, "dot_general": {dtype: count}}`` over the
      first operand of each, sub-jaxprs (custom_vjp, pjit) included.
    """
    x = jnp.zeros((1, resolution, resolution, channels), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda e, x: e(x, jnp.zeros((1,), jnp.int32)))(eps_fn, x).jaxpr
    out: dict[str, dict[str, int]] = {"conv_general_dilated": {}, "dot_general": {}}

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name in out:
                dt = str(eqn.invars[0].aval.dtype)
                out[eqn.primitive.name][dt] = out[eqn.primitive.name].get(dt, 0) + 1
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr)
    return out


def unet_flops(eps_fn, resolution: int, channels: int) -> dict:
    """FLOPs per image of one forward call and of one input-gradient call (XLA cost analysis).

    From the unoptimised HLO lowered for the CPU (``Lowered.cost_analysis``: no compile; it
    agrees with the CPU compiled count within 1%); falls back to the compiled CPU program.
    Not the GPU's own count: there XLA's cost analysis leaves out the convolutions (cuDNN
    custom calls), 1.06 instead of 11.66 GFLOPs for the 35.7M U-Net's forward (H100 run 1).
    """
    x = jax.ShapeDtypeStruct((1, resolution, resolution, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)

    def fwd(e, x, t):
        return e(x, t)

    def grad(e, x, t):
        return jax.grad(lambda x: jnp.sum(e(x, t)))(x)

    # Counted on the CPU backend: on a GPU, XLA's cost analysis does not count the
    # convolutions (they become cuDNN custom calls), which undercounts a U-Net ~11x.
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                            eps_fn)

    def flops(f):
        with jax.default_device(jax.devices("cpu")[0]):
            try:
                lowered = jax.jit(f).trace(abstract, x, t).lower(lowering_platforms=("cpu",))
            except (AttributeError, TypeError):  # an older JAX: the default device's
                lowered = jax.jit(f).lower(abstract, x, t)
            try:
                cost = lowered.cost_analysis()
            except Exception:  # noqa: BLE001 - older/newer JAX: use the compiled program's
                cost = None
            if not cost or "flops" not in (cost[0] if isinstance(cost, list) else cost):
                cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])

    return {"forward_flops": flops(fwd), "grad_flops": flops(grad)}


@dataclasses.dataclass
class Model:
    """One purifier model on the device, fp32 and bf16."""

    key: str
    label: str
    kind: str
    config: dict
    resolution: int
    channels: int
    num_params: int
    eps: dict
    flops: dict
    op_dtypes: dict
    torch_model: Any = None
    peer_error: str | None = None


# ------------------------------------------------------------------------- diffjax side


@contextlib.contextmanager
def _jax_precision(value):
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", value)
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", old)


def _time(fn, sync, repeats: int, warmup: int) -> float:
    """Median seconds of ``sync(fn())`` after `warmup` untimed calls (the cases make one
    call for their outputs first, so they pass ``Settings.warmup - 1``)."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------- the peer


class _OnDevice:
    """The diffusers U-Net as `peer.PeerPurifier` calls it: the timesteps made on the images'
    device, optionally under ``torch.autocast(bfloat16)``, eps returned in float32."""

    def __init__(self, model, bf16: bool):
        self.model, self.bf16 = model, bf16

    def __call__(self, x, t):
        import torch

        if t.device != x.device:
            # `PeerPurifier.step` passes a CPU ``torch.full`` of one timestep. A fill kernel on
            # the device, not ``t.to(device)``: a blocking host-to-device copy would make
            # the host wait for the GPU at every step, which PyTorch users do not pay.
            t = torch.full(t.shape, int(t.reshape(-1)[0]), dtype=t.dtype, device=x.device)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                            enabled=self.bf16):
            eps = self.model(x, t).sample
        return types.SimpleNamespace(sample=eps.float())

    def parameters(self):
        return self.model.parameters()


def _tf32_knobs() -> list:
    """Torch's TF32 switches as (name, object, attribute, exact-fp32 value): the
    ``fp32_precision`` API where present (torch >= 2.9 refuses a mix of it and the legacy
    ``allow_tf32``), else ``allow_tf32``."""
    import torch

    b = torch.backends
    conv = getattr(b.cudnn, "conv", None)
    if hasattr(b.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return [("cuda.matmul.fp32_precision", b.cuda.matmul, "fp32_precision", "ieee"),
                ("cudnn.conv.fp32_precision", conv, "fp32_precision", "ieee")]
    return [("cuda.matmul.allow_tf32", b.cuda.matmul, "allow_tf32", False),
            ("cudnn.allow_tf32", b.cudnn, "allow_tf32", False)]


def torch_tf32_flags() -> dict:
    """The current TF32 settings of torch (matmul, cuDNN conv), for the record."""
    return {name: getattr(o, a) for name, o, a, _ in _tf32_knobs()}


@contextlib.contextmanager
def _torch_exact_fp32():
    knobs = _tf32_knobs()
    old = [getattr(o, a) for _, o, a, _ in knobs]
    for _, o, a, v in knobs:
        setattr(o, a, v)
    try:
        yield
    finally:
        for (_, o, a, _), v in zip(knobs, old, strict=True):
            setattr(o, a, v)


def _torch_sync(_=None):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------- projection


def projection(results: dict, s: GpuSettings) -> dict:
    """Projected days of the paper's evaluation from the measured per-image times.

    Per image: ``iterations`` EOT-``eot`` gradients through ``steps`` steps (the measured
    ``*_eot20_grad`` time, else ``eot`` x the measured ``*_grad_t100`` time) plus ``eot``
    evaluation purifications (the measured purification time per image at the largest batch).
    The classifier's cost (a WRN-28-10 gradient is under 1% of one purifier gradient) is left
    out. One GPU; `images` test-set sizes.
    """
    cases = report.cases_of(results)
    out = {}
    sides = [("diffjax", "diffjax_s")] + [("peer", "peer_s")]
    for model in ("ddpm", "ddpmpp"):
        for dt in ("fp32", "bf16"):
            for side, field in sides:
                def pick(prefix, _dt=dt, _field=field, _model=model):
                    c = [(r.get("batch", 0), r[_field]) for n, r in cases.items()
                         if n.startswith(f"{_model}_{prefix}") and n.endswith(_dt)
                         and r.get(_field)]
                    return max(c)[1] if c else None

                pur, grad, eot = pick("purify"), pick("grad_t"), pick("eot")
                if side == "peer":
                    eot = None  # never timed: a Python loop of `eot` checkpointed gradients
                if pur is None or (grad is None and eot is None):
                    continue
                src = f"measured {model}_eot{s.eot}_grad" if eot else \
                    f"{s.eot} x measured {model}_grad_t{s.steps}"
                eot_s = eot if eot else s.eot * grad
                per_image = s.iterations * eot_s + s.eot * pur
                days = {str(n): n * per_image / 86400 for n in s.images}
                out[f"{model}_{dt}_{side}"] = {
                    "eot_grad_s_per_image": eot_s, "eot_source": src,
                    "purify_s_per_image": pur, "s_per_image": per_image, "days": days,
                    "vs_paper_10_days": {n: d / PAPER_DAYS for n, d in days.items()},
                    "within_1_day": {n: d <= 1.0 for n, d in days.items()}}
    return {"assumptions": {"iterations": s.iterations, "eot": s.eot, "steps": s.steps,
                            "t_star": s.t_star, "gpus": 1, "paper_days": PAPER_DAYS},
            "by_model": out}


# ------------------------------------------------------------------------- the suite


class GpuBench:
    """Runs the GPU cases in priority order, writing the results after every case.

    Args:
      settings: the sizes.
      out_dir: where ``benchmarks.json`` / ``benchmarks.md`` go.
      log: one progress line per event.
      time_budget_s: skip every case that would start after this many seconds (None: no
        budget).
      workdir: where the peer's ``save_pretrained`` directory goes (temp if None).
      command: the command line, for the record.
    """

    def __init__(self, settings: GpuSettings, out_dir, log: Callable[[str], None] = print,
                 time_budget_s: float | None = None, workdir: str | None = None,
                 command: str = ""):
        self.s = settings
        self.out = pathlib.Path(out_dir)
        self._log = log
        self.budget = time_budget_s
        self.workdir = workdir
        self.t0 = time.perf_counter()
        self.results: dict[str, dict] = {}
        self.meta: dict = {"command": command, "settings": dataclasses.asdict(settings),
                           "time_unit": "seconds per image (median over repeats)",
                           "fields": "max_abs_diff: the fp32 'highest' agreement check of the "
                           "same computation (check_*), also on bf16 rows; "
                           "default_precision_max_abs_diff: |peer - diffjax| as timed (each "
                           "framework's default precision / dtype); peer_peak_mb: CUDA peak "
                           "growth (torch.cuda.max_memory_allocated); diffjax_peak_mb: XLA "
                           "memory_analysis temp + output; fraction_of_peak: achieved / peak",
                           "skipped": []}
        self.schedule = jax.device_put(diffusion.linear_schedule())
        self.acp = np.asarray(diffusion.linear_schedule().alphas_cumprod)
        self.models: dict[str, Model] = {}
        self._outputs: dict = {}
        self.agree: dict = {}
        self.dev = jax.devices()[0]

    # -- bookkeeping

    def log(self, msg: str) -> None:
        self._log(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}")

    def write(self) -> None:
        """Writes benchmarks.json and benchmarks.md (after every case: a kill loses little)."""
        self.meta["elapsed_s"] = time.perf_counter() - self.t0
        self.meta["device_peak_mb_process"] = _device_peak_mb(self.dev)
        data = {"_meta": self.meta, "_flops": {k: {"params": m.num_params, **m.flops,
                                                    "op_dtypes": m.op_dtypes}
                                               for k, m in self.models.items()},
                "_projection": projection(self.results, self.s),
                **report.cases_of(self.results)}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "benchmarks.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (self.out / "benchmarks.md").write_text(markdown(data))

    def run(self, name: str, fn: Callable, *args, **kwargs) -> None:
        """Runs one case unless the budget is spent; records a failure and goes on."""
        if self.budget is not None and time.perf_counter() - self.t0 > self.budget:
            self.meta["skipped"].append(name)
            self.log(f"[{name}] skipped: time budget {self.budget:.0f} s spent")
            self.write()
            return
        t0 = time.perf_counter()
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - recorded in the results, the suite goes on
            self.log(f"[{name}] FAILED: {type(e).__name__}: {e}")
            self._log(traceback.format_exc()[-3000:])
            self.results[name] = {"what": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
        self.log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
        self.write()

    def record(self, name: str, what: str, **fields) -> dict:
        res = {f: None for f in report.REQUIRED_FIELDS}
        res.update(what=what, **fields)
        if res.get("peer_s") and res.get("diffjax_s"):
            res["ratio"] = res["peer_s"] / res["diffjax_s"]
        self.results[name] = res
        fmt = lambda v: "-" if v is None else f"{v:.4g}"
        self.log(f"[{name}] diffjax {fmt(res.get('diffjax_images_per_s'))} img/s "
                 f"({fmt(res.get('diffjax_tflops'))} TFLOP/s), peer "
                 f"{fmt(res.get('peer_images_per_s'))} img/s, ratio {fmt(res['ratio'])}, "
                 f"compile {fmt(res.get('compile_s'))} s, XLA MB "
                 f"{fmt(res.get('diffjax_peak_mb'))}, max|diff| {fmt(res.get('max_abs_diff'))}")
        return res

    # -- fixtures

    def setup_ddpm(self) -> None:
        """The 35.7M U-Net in both frameworks (identical weights) or diffjax alone."""
        size, peer_error, torch_model = self.s.ddpm, None, None
        try:
            import torch
            from diffusers import UNet2DModel  # noqa: F401 - the peer's model
        except Exception as e:  # noqa: BLE001 - diffusers missing or broken: diffjax alone
            peer_error = f"peer unavailable: {type(e).__name__}: {e}"[:1000]
        if peer_error is None:
            from experiments.bench import models as bench_models

            pair = bench_models.make_pair(size, workdir=self.workdir)
            config, variables = pair.config, pair.eps_fn.args[0]
            num_params = pair.num_params
            device = "cuda" if torch.cuda.is_available() else "cpu"
            torch_model = pair.torch_model.to(device)
        else:  # random diffjax weights of the same architecture
            self.log(peer_error)
            config = dict(models.get_spec("ddpm_unet").default_config(),
                          resolution=size.resolution, ch=size.ch, ch_mult=list(size.ch_mult),
                          num_res_blocks=size.num_res_blocks, num_groups=size.num_groups,
                          attn_resolutions=[size.resolution // 2 ** i
                                            for i in size.attn_levels], dropout=0.0)
            variables = random_variables("ddpm_unet", config)
            num_params = models.param_count(variables)
        self._add_model("ddpm", f"Ho et al. DDPM U-Net ({size.label()})", "ddpm_unet",
                        config, variables, num_params, size.resolution, size.channels,
                        torch_model, peer_error)

    def setup_ddpmpp(self) -> None:
        """DDPM++ deep (score_sde's ``ncsnpp``), random weights, diffjax only."""
        from diffjax.models import ncsnpp

        config = dict(ncsnpp.cifar10_deep_config(), **dict(self.s.ddpmpp))
        variables = random_variables("ncsnpp", config, seed=1)
        self._add_model("ddpmpp", f"DDPM++ deep (nf {config['nf']}, "
                        f"{config['num_res_blocks']} blocks, {config['image_size']}px)",
                        "ncsnpp", config, variables, models.param_count(variables),
                        config["image_size"], config["num_channels"], None,
                        "no peer for DDPM++ (diffjax only)")

    def _add_model(self, key, label, kind, config, variables, num_params, res, ch,
                   torch_model, peer_error):
        variables = jax.device_put(variables, self.dev)
        eps = {"fp32": jax.device_put(models.make_fn(kind, config, variables), self.dev),
               "bf16": jax.device_put(bf16_eps_fn(kind, config, variables), self.dev)}
        flops = unet_flops(eps["fp32"], res, ch)
        try:
            dts = {k: op_dtypes(e, res, ch) for k, e in eps.items()}
        except Exception as e:  # noqa: BLE001 - a diagnostic only (jaxpr internals move)
            dts = {k: {"conv_general_dilated": f"unknown: {type(e).__name__}: {e}"[:300]}
                   for k in eps}
        self.models[key] = Model(key, label, kind, config, res, ch, num_params, eps, flops,
                                 dts, torch_model, peer_error)
        self.log(f"{key}: {label}, {num_params:,} parameters, "
                 f"{flops['forward_flops'] / 1e9:.3g} GFLOPs forward / image, "
                 f"{flops['grad_flops'] / 1e9:.3g} input-gradient; bf16 convs {dts['bf16']}")

    def inputs(self, m: Model, batch: int, seed: int = 0):
        """Device arrays: images in [0, 1], per-example keys, classifier weights, labels."""
        r, c = m.resolution, m.channels
        key = jax.random.key(seed)
        kx, kw = jax.random.split(jax.random.fold_in(key, 1))
        x = jax.random.uniform(kx, (batch, r, r, c), jnp.float32)
        keys = jax.random.split(jax.random.fold_in(key, 2), batch)
        w = jax.random.normal(kw, (r * r * c, 10), jnp.float32) / math.sqrt(r * r * c)
        labels = jnp.arange(batch, dtype=jnp.int32) % 10
        return jax.device_put((x, keys, w, labels), self.dev)

    def peer_purifier(self, m: Model, steps: int, bf16: bool):
        from experiments.bench import peer

        taus = diffusion.respaced_timesteps(self.s.t_star, steps)
        return peer.PeerPurifier(_OnDevice(m.torch_model, bf16), self.acp, self.s.t_star, taus)

    def peer_inputs(self, m: Model, x, keys, w, labels, steps: int):
        """The same images, the JAX-drawn noise of every step, classifier, on the device."""
        import torch

        from experiments.bench import peer

        dev = next(m.torch_model.parameters()).device
        taus = diffusion.respaced_timesteps(self.s.t_star, steps)
        nz = peer.chain_noises(keys, (m.resolution, m.resolution, m.channels), taus)
        nz = torch.from_numpy(nz).permute(0, 1, 4, 2, 3).contiguous().to(dev)
        return (peer.to_nchw(x).to(dev), nz, torch.from_numpy(np.array(w)).to(dev),
                torch.from_numpy(np.array(labels)).long().to(dev))

    def _achieved(self, m: Model, s_per_image: float, per_step_flops: float, mult: int = 1):
        flops = per_step_flops * self.s.steps * mult
        tf = flops / s_per_image / 1e12
        return {"flops_per_image": flops, "diffjax_tflops": tf,
                "fraction_of_peak": {k: tf * 1e12 / v for k, v in self._peaks().items()}}

    def _peaks(self) -> dict:
        peaks = dict(PEAKS)
        probe = self.meta.get("precision", {}).get("jax_bf16_matmul_tflops")
        if probe:
            peaks["bf16 matmul probe (this run)"] = probe * 1e12
        return peaks

    # -- cases

    def probe(self) -> None:
        """JAX's and torch's default float32 precision (TF32?) and matmul throughput."""
        n = min(self.s.probe_n, 1024)  # the float64 reference is computed on the host
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), np.float32)
        b = rng.standard_normal((n, n), np.float32)
        ref = a.astype(np.float64) @ b.astype(np.float64)
        rel = lambda c: float(np.abs(np.asarray(c, np.float64) - ref).max() / np.abs(ref).max())
        ad, bd = jax.device_put((a, b), self.dev)
        mm = lambda a, b: a @ b
        out = {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
               "jax_matmul_rel_err_default": rel(jax.jit(mm)(ad, bd))}
        with _jax_precision("highest"):
            out["jax_matmul_rel_err_highest"] = rel(jax.jit(mm)(ad, bd))
        out["jax_default_f32_matmul_is_tf32_like"] = out["jax_matmul_rel_err_default"] > 1e-5
        # A 3x3 convolution, 128 -> 128 channels, the U-Net's typical layer.
        xc = rng.standard_normal((8, 32, 32, 128), np.float32)
        kc = rng.standard_normal((3, 3, 128, 128), np.float32) / math.sqrt(9 * 128)
        conv = lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        with _jax_precision("highest"):
            c_hi = np.asarray(jax.jit(conv)(xc, kc), np.float64)
        c_def = np.asarray(jax.jit(conv)(xc, kc), np.float64)
        out["jax_conv_rel_err_default_vs_highest"] = float(
            np.abs(c_def - c_hi).max() / np.abs(c_hi).max())
        big = self.s.probe_n
        ab = jax.random.normal(jax.random.key(0), (2, big, big), jnp.float32)
        for dt, key in ((jnp.bfloat16, "jax_bf16_matmul_tflops"),
                        (jnp.float32, "jax_f32_default_matmul_tflops")):
            f = functools.partial(jax.jit(mm), ab[0].astype(dt), ab[1].astype(dt))
            t = _time(f, jax.block_until_ready, repeats=10, warmup=2)
            out[key] = 2 * big ** 3 / t / 1e12
        out["matmul_probe_n"] = big
        del ab
        try:
            import torch

            out["torch_tf32_flags"] = torch_tf32_flags()
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
        except ImportError as e:
            out["torch"] = f"unavailable: {e}"
        self.meta["precision"] = out
        self.log(f"precision: {out}")

    def check(self, key: str) -> None:
        """Agreement at float32 'highest' on both sides (TF32 off in torch), before timing."""
        s, m = self.s, self.models[key]
        if m.torch_model is None:
            raise RuntimeError(m.peer_error or "no peer")
        pur = Purifier(s.t_star, s.steps)
        x, keys, w, labels = self.inputs(m, s.check_batch)
        with _jax_precision("highest"):
            c, cs, _ = timing.compile_jax(pur, m.eps["fp32"], self.schedule, x, keys)
        out_j = np.asarray(c(m.eps["fp32"], self.schedule, x, keys))
        xt, nz, _, _ = self.peer_inputs(m, x, keys, w, labels, s.steps)
        ppur = self.peer_purifier(m, s.steps, bf16=False)
        import torch

        from experiments.bench import peer

        with _torch_exact_fp32(), torch.inference_mode():
            out_p = peer.to_nhwc(ppur(xt, nz).cpu())
        diff = float(np.abs(out_p - out_j).max())
        self.agree["purify"] = diff
        self.record(f"check_{m.key}_purify_t{s.steps}",
                    f"agreement, purification, {s.steps} steps, batch {s.check_batch}, fp32 "
                    "'highest' (JAX) vs TF32 off (torch)", max_abs_diff=diff,
                    compile_s=cs, batch=s.check_batch, steps=s.steps)
        x, keys, w, labels = self.inputs(m, s.check_grad_batch)
        args = (x, m.eps["fp32"], self.schedule, keys, w, labels)
        with _jax_precision("highest"):
            c, cs, _ = timing.compile_jax(make_grad(pur), *args)
        g_j = np.asarray(c(*args))
        xt, nz, wt, yt = self.peer_inputs(m, x, keys, w, labels, s.steps)
        with _torch_exact_fp32():
            g_p = peer.to_nhwc(ppur.grad(xt, nz, wt, yt, checkpoint=True).cpu())
        diff = float(np.abs(g_p - g_j).max())
        self.agree["grad"] = diff
        self.record(f"check_{m.key}_grad_t{s.steps}",
                    f"agreement, full gradient through {s.steps} steps (peer with "
                    f"checkpointing), batch {s.check_grad_batch}, fp32 'highest' vs TF32 off",
                    max_abs_diff=diff, max_abs_grad=float(np.abs(g_j).max()), compile_s=cs,
                    batch=s.check_grad_batch, steps=s.steps)

    def purify_case(self, key: str, dt: str, batch: int, peer: bool = True) -> None:
        """Purification throughput, diffjax (and the peer at the same batch and dtype)."""
        s, m = self.s, self.models[key]
        x, keys, w, labels = self.inputs(m, batch)
        pur, eps = Purifier(s.t_star, s.steps), m.eps[dt]
        c, cs, peak = timing.compile_jax(pur, eps, self.schedule, x, keys)
        run = lambda: c(eps, self.schedule, x, keys)
        out = np.asarray(run())
        tj = _time(run, jax.block_until_ready, s.repeats, s.warmup - 1)
        rec = dict(diffjax_s=tj / batch, diffjax_images_per_s=batch / tj, compile_s=cs,
                   diffjax_peak_mb=peak, batch=batch, steps=s.steps, dtype=dt, model=key,
                   **self._achieved(m, tj / batch, m.flops["forward_flops"]))
        self._vs_fp32(rec, ("diffjax", key, "purify", batch), dt, out)
        what = f"{m.label}: purification, t* {s.t_star}, {s.steps} steps, batch {batch}, {dt}"
        if peer and m.torch_model is not None:
            import torch

            from experiments.bench import peer as peer_mod

            xt, nz, _, _ = self.peer_inputs(m, x, keys, w, labels, s.steps)
            ppur = self.peer_purifier(m, s.steps, bf16=dt == "bf16")

            def run_p():
                with torch.inference_mode():
                    return ppur(xt, nz)

            out_p = peer_mod.to_nhwc(run_p().float().cpu())
            _torch_reset_peak()
            base = _torch_allocated()
            tp = _time(run_p, _torch_sync, s.repeats, s.warmup - 1)
            rec.update(peer_s=tp / batch, peer_images_per_s=batch / tp,
                       peer_peak_mb=_torch_peak_mb(base),
                       max_abs_diff=self.agree.get("purify"),
                       default_precision_max_abs_diff=float(np.abs(out_p - out).max()))
            self._vs_fp32(rec, ("peer", key, "purify", batch), dt, out_p, prefix="peer_")
            what += "; peer: diffusers + Python loop, torch.inference_mode" + (
                ", autocast bf16" if dt == "bf16" else "")
        self.record(f"{key}_purify_t{s.steps}_b{batch}_{dt}", what, **rec)

    def grad_case(self, key: str, dt: str, batch: int, peer: bool = True) -> None:
        """One full-gradient step through all steps (remat), diffjax vs the peer (ckpt)."""
        s, m = self.s, self.models[key]
        x, keys, w, labels = self.inputs(m, batch)
        args = (x, m.eps[dt], self.schedule, keys, w, labels)
        c, cs, peak = timing.compile_jax(make_grad(Purifier(s.t_star, s.steps)), *args)
        g = np.asarray(c(*args))
        tj = _time(lambda: c(*args), jax.block_until_ready, s.repeats, s.warmup - 1)
        rec = dict(diffjax_s=tj / batch, diffjax_images_per_s=batch / tj, compile_s=cs,
                   diffjax_peak_mb=peak, batch=batch, steps=s.steps, dtype=dt, model=key,
                   **self._achieved(m, tj / batch, m.flops["forward_flops"]
                                    + m.flops["grad_flops"]))
        self._vs_fp32(rec, ("diffjax", key, "grad", batch), dt, g)
        what = (f"{m.label}: full gradient through {s.steps} steps (remat), batch {batch}, "
                f"{dt}")
        if peer and m.torch_model is not None:
            from experiments.bench import peer as peer_mod

            xt, nz, wt, yt = self.peer_inputs(m, x, keys, w, labels, s.steps)
            ppur = self.peer_purifier(m, s.steps, bf16=dt == "bf16")
            run_p = lambda: ppur.grad(xt, nz, wt, yt, checkpoint=True)
            g_p = peer_mod.to_nhwc(run_p().cpu())
            _torch_reset_peak()
            base = _torch_allocated()
            tp = _time(run_p, _torch_sync, s.repeats, s.warmup - 1)
            rec.update(peer_s=tp / batch, peer_images_per_s=batch / tp, peer_ckpt_s=tp / batch,
                       peer_mode="torch.utils.checkpoint per step",
                       peer_peak_mb=_torch_peak_mb(base), max_abs_diff=self.agree.get("grad"),
                       default_precision_max_abs_diff=float(np.abs(g_p - g).max()),
                       max_abs_grad=float(np.abs(g).max()))
            what += "; peer: autograd through the loop, torch.utils.checkpoint per step" + (
                ", autocast bf16" if dt == "bf16" else "")
        self.record(f"{key}_grad_t{s.steps}_b{batch}_{dt}", what, **rec)

    def eot_case(self, key: str, dt: str, batch: int) -> None:
        """EOT gradient (mean over `eot` draws, vmap over their keys), diffjax."""
        s, m = self.s, self.models[key]
        x, keys, w, labels = self.inputs(m, batch)
        draw_keys = jax.vmap(lambda j: jax.vmap(lambda k: jax.random.fold_in(k, j))(keys))(
            jnp.arange(s.eot, dtype=jnp.uint32))  # [K, B]
        args = (x, m.eps[dt], self.schedule, draw_keys, w, labels)
        c, cs, peak = timing.compile_jax(make_eot_grad(Purifier(s.t_star, s.steps)), *args)
        jax.block_until_ready(c(*args))
        tj = _time(lambda: c(*args), jax.block_until_ready, s.repeats, s.warmup - 1)
        self.record(
            f"{key}_eot{s.eot}_grad_b{batch}_{dt}",
            f"{m.label}: EOT-{s.eot} full gradient (vmap over keys), {s.steps} steps, "
            f"batch {batch}, {dt}", diffjax_s=tj / batch, diffjax_images_per_s=batch / tj,
            compile_s=cs, diffjax_peak_mb=peak, batch=batch, steps=s.steps, eot=s.eot,
            dtype=dt, model=key, **self._achieved(
                m, tj / batch, m.flops["forward_flops"] + m.flops["grad_flops"], s.eot))

    def memory_case(self, key: str = "ddpm") -> None:
        """Gradient memory against the step count: diffjax (XLA buffers) and the peer."""
        s, m = self.s, self.models[key]
        _torch_empty_cache()  # the peer's earlier cases' cached blocks
        x, keys, w, labels = self.inputs(m, s.grad_batch)
        args = (x, m.eps["fp32"], self.schedule, keys, w, labels)
        by_steps = {}
        for steps in sorted(set(s.mem_steps) | {s.steps}):
            done = self.results.get(f"{key}_grad_t{s.steps}_b{s.grad_batch}_fp32", {})
            if steps == s.steps and done.get("diffjax_peak_mb") is not None:
                by_steps[str(steps)] = done["diffjax_peak_mb"]
                continue
            _, _, peak = timing.compile_jax(make_grad(Purifier(s.t_star, steps)), *args)
            by_steps[str(steps)] = peak
        rec = dict(diffjax_peak_mb_by_steps=by_steps, batch=s.grad_batch, model=key,
                   dtype="fp32", diffjax_peak_mb=by_steps.get(str(s.steps)),
                   memory="diffjax: XLA compiled.memory_analysis() temp + output bytes (no "
                          "run needed); peer: torch.cuda.max_memory_allocated growth")
        if m.torch_model is not None:
            b = s.peer_mem_batch
            x, keys, w, labels = self.inputs(m, b)
            peer_mb, peer_ckpt_mb = {}, {}
            for steps in s.peer_mem_steps:
                xt, nz, wt, yt = self.peer_inputs(m, x, keys, w, labels, steps)
                ppur = self.peer_purifier(m, steps, bf16=False)
                for ck, dst in ((False, peer_mb), (True, peer_ckpt_mb)):
                    _torch_reset_peak()
                    base = _torch_allocated()
                    ppur.grad(xt, nz, wt, yt, checkpoint=ck)
                    _torch_sync()
                    dst[str(steps)] = _torch_peak_mb(base)
            tp = _time(lambda: ppur.grad(xt, nz, wt, yt), _torch_sync, s.repeats, s.warmup)
            tpc = _time(lambda: ppur.grad(xt, nz, wt, yt, checkpoint=True), _torch_sync,
                        s.repeats, s.warmup)
            rec.update(peer_batch=b, peer_peak_mb_by_steps=peer_mb,
                       peer_ckpt_peak_mb_by_steps=peer_ckpt_mb,
                       peer_peak_mb=peer_mb.get(str(max(s.peer_mem_steps))),
                       peer_ckpt_peak_mb=peer_ckpt_mb.get(str(max(s.peer_mem_steps))),
                       peer_nockpt_s_at_peer_batch=tp / b, peer_ckpt_s_at_peer_batch=tpc / b)
            _torch_empty_cache()
        self.record(f"{key}_grad_memory",
                    f"{m.label}: gradient memory vs steps (diffjax batch {s.grad_batch}, "
                    f"peer batch {s.peer_mem_batch} without / with checkpointing)", **rec)

    def _vs_fp32(self, rec, ident, dt, out, prefix=""):
        """Stores fp32 outputs; for bf16 records the difference to them."""
        if dt == "fp32":
            self._outputs[ident] = out
        elif ident in self._outputs:
            ref = self._outputs[ident]
            rec[f"{prefix}bf16_vs_fp32_max_abs_diff"] = float(np.abs(out - ref).max())
            rec[f"{prefix}bf16_vs_fp32_mean_abs_diff"] = float(np.abs(out - ref).mean())


def _device_peak_mb(dev) -> float | None:
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices have none
        return None
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats \
        else None


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _torch_reset_peak():
    if (torch := _torch_cuda()) is not None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _torch_allocated() -> int:
    torch = _torch_cuda()
    return torch.cuda.memory_allocated() if torch is not None else 0


def _torch_peak_mb(base: int) -> float | None:
    torch = _torch_cuda()
    return (torch.cuda.max_memory_allocated() - base) / 2**20 if torch is not None else None


def _torch_empty_cache():
    if (torch := _torch_cuda()) is not None:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- the run


def versions() -> dict:
    """Device and library versions (whatever is importable)."""
    import importlib

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
    torch = _torch_cuda()
    if torch is not None:
        out.update(torch_device=torch.cuda.get_device_name(), torch_cuda=torch.version.cuda,
                   torch_cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return out


def run_gpu(settings: GpuSettings, out_dir, *, log: Callable[[str], None] = print,
            time_budget_s: float | None = None, workdir: str | None = None,
            command: str = "", only: list[str] | None = None) -> GpuBench:
    """Runs the GPU suite in priority order; returns the `GpuBench` (results written).

    Order (most wanted first; a spent `time_budget_s` skips the rest): the precision probe,
    the 35.7M model's agreement checks, its fp32 purification and gradient (with the peer),
    DDPM++'s bf16 gradient and purification (the paper's purifier: the projection's
    headline), the 35.7M model's bf16 purification and gradient (with the peer), the EOT
    gradients in bf16, the fp32 DDPM++ cases, the memory case, the 35.7M model's EOT in
    fp32, extra batch sizes, DDPM++'s fp32 EOT.
    """
    b = GpuBench(settings, out_dir, log=log, time_budget_s=time_budget_s, workdir=workdir,
                 command=command)
    b.meta["versions"] = versions()
    b.log(f"devices {b.meta['versions']['jax_devices']}; budget {time_budget_s} s")
    s = settings
    plan: list[tuple] = [("precision_probe", b.probe, ()), ("setup_ddpm", b.setup_ddpm, ()),
                         ("check_ddpm", b.check, ("ddpm",)),
                         ("ddpm_purify_fp32", b.purify_case, ("ddpm", "fp32", s.purify_batch)),
                         ("ddpm_grad_fp32", b.grad_case, ("ddpm", "fp32", s.grad_batch)),
                         ("setup_ddpmpp", b.setup_ddpmpp, ()),
                         ("ddpmpp_grad_bf16", b.grad_case, ("ddpmpp", "bf16", s.pp_grad_batch)),
                         ("ddpmpp_purify_bf16", b.purify_case,
                          ("ddpmpp", "bf16", s.pp_purify_batch)),
                         ("ddpm_purify_bf16", b.purify_case, ("ddpm", "bf16", s.purify_batch)),
                         ("ddpm_grad_bf16", b.grad_case, ("ddpm", "bf16", s.grad_batch)),
                         ("ddpmpp_eot_bf16", b.eot_case, ("ddpmpp", "bf16", s.pp_eot_batch)),
                         ("ddpm_eot_bf16", b.eot_case, ("ddpm", "bf16", s.eot_batch)),
                         ("ddpmpp_purify_fp32", b.purify_case,
                          ("ddpmpp", "fp32", s.pp_purify_batch)),
                         ("ddpmpp_grad_fp32", b.grad_case, ("ddpmpp", "fp32", s.pp_grad_batch)),
                         ("ddpm_grad_memory", b.memory_case, ("ddpm",)),
                         ("ddpm_eot_fp32", b.eot_case, ("ddpm", "fp32", s.eot_batch))]
    plan += [(f"ddpm_purify_b{n}_{dt}", b.purify_case, ("ddpm", dt, n, False))
             for n in s.extra_purify_batches for dt in ("bf16", "fp32")]
    plan.append(("ddpmpp_eot_fp32", b.eot_case, ("ddpmpp", "fp32", s.pp_eot_batch)))
    if only:
        by_name = {p[0]: p for p in plan}
        unknown = [n for n in only if n not in by_name]
        if unknown:
            raise ValueError(f"gpu_cases: unknown {unknown}; expected names of {list(by_name)}")
        models = {by_name[n][2][0] for n in only if by_name[n][2]} & {"ddpm", "ddpmpp"}
        plan = ([by_name["precision_probe"]] if "precision_probe" in only else []) + [
            by_name[f"setup_{m}"] for m in ("ddpm", "ddpmpp") if m in models] + [
            by_name[n] for n in only if n != "precision_probe" and not n.startswith("setup_")]
    for name, fn, args in plan:
        if args and args[0] in ("ddpm", "ddpmpp") and args[0] not in b.models:
            continue  # its model's setup failed (recorded)
        b.run(name, fn, *args)
    b.meta["total_s"] = time.perf_counter() - b.t0
    b.write()
    b.log(f"wrote {b.out / 'benchmarks.json'} and benchmarks.md; skipped: "
          f"{b.meta['skipped'] or 'none'}")
    return b


# ------------------------------------------------------------------------- markdown


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2e}" if v and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.{digits}g}"
    return str(v)


def markdown(data: dict) -> str:
    """``benchmarks.md`` of a GPU run: setup, the case table, throughput, memory, projection."""
    meta, cases = data["_meta"], report.cases_of(data)
    v, p = meta.get("versions", {}), meta.get("precision", {})
    lines = [f"# diffjax GPU benchmarks ({meta.get('settings', {}).get('name')})", "",
             f"Device: {v.get('device_kind')} ({v.get('torch_device', '-')}, "
             f"{_f(v.get('gpu_memory_gb'))} GB); jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
             f"flax {v.get('flax')}, torch {v.get('torch')} (CUDA {v.get('torch_cuda', '-')}, "
             f"cuDNN {v.get('torch_cudnn', '-')}), diffusers {v.get('diffusers')}.", "",
             f"Command: `{meta.get('command')}`; elapsed {_f(meta.get('elapsed_s'))} s; "
             f"skipped (time budget): {', '.join(meta.get('skipped', [])) or 'none'}.", "",
             f"Precision: `jax_default_matmul_precision` = "
             f"{p.get('jax_default_matmul_precision')!r}; f32 matmul relative error, JAX "
             f"default {_f(p.get('jax_matmul_rel_err_default'))} vs 'highest' "
             f"{_f(p.get('jax_matmul_rel_err_highest'))} (TF32-like: "
             f"{p.get('jax_default_f32_matmul_is_tf32_like')}); conv default vs highest "
             f"{_f(p.get('jax_conv_rel_err_default_vs_highest'))}; torch TF32 flags "
             f"{p.get('torch_tf32_flags')}, torch matmul relative error "
             f"{_f(p.get('torch_matmul_rel_err_default'))}, conv vs JAX highest "
             f"{_f(p.get('torch_conv_rel_err_default_vs_jax_highest'))}. "
             f"Matmul probe: bf16 {_f(p.get('jax_bf16_matmul_tflops'))} TFLOP/s, f32 default "
             f"{_f(p.get('jax_f32_default_matmul_tflops'))} TFLOP/s.", "",
             "## All cases (seconds per image)", "", report.markdown_table(data), "",
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
            f"{_f(r.get('diffjax_images_per_s'))} | {_f(r.get('peer_images_per_s'))} | "
            f"{_f(r.get('ratio'))} | {_f(r.get('diffjax_tflops'))} | "
            f"{_f(fr.get('bf16 989 (datasheet)'))} | {_f(fr.get('tf32 494 (datasheet)'))} | "
            f"{_f(r.get('compile_s'))} | {_f(r.get('diffjax_peak_mb'))} | "
            f"{_f(r.get('peer_peak_mb'))} | {_f(r.get('bf16_vs_fp32_max_abs_diff'))}; "
            f"{_f(r.get('peer_bf16_vs_fp32_max_abs_diff'))} |")
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
            lines.append(f"| {k} | {_f(r['eot_grad_s_per_image'])} ({r['eot_source']}) | "
                         f"{_f(r['purify_s_per_image'])} | {_f(d.get('512'))} | "
                         f"{_f(d.get('1000'))} | {_f(d.get('10000'))} | "
                         f"{_f(r['vs_paper_10_days'].get('10000'))}x |")
    return "\n".join(lines) + "\n"
