"""The GPU suite: the CIFAR-10 purifiers at full size, against the hardware and the peers.

Models with RANDOM weights (speed does not depend on them): ``ddpm``, Ho et al.'s CIFAR-10
U-Net (35.7M), built in diffusers and converted (`models.make_pair`) so the PyTorch peers
run identical weights; ``ddpmpp``, score_sde's DDPM++ deep (106.6M, the paper's purifier),
diffjax only. ``python -m experiments.benchmarks --settings=gpu --out=DIR`` runs, in
priority order (``--time_budget_s`` skips the rest once spent):

- ``check_*``: diffjax and the eager peer agree at float32 'highest' on both sides (TF32
  off in torch), before timing;
- ``*_purify_t100_b*`` (100 steps, t* = 100) and ``*_grad_t100_b*`` (one full-gradient
  step through all 100 steps, ``remat=True``; the peers use ``torch.utils.checkpoint`` per
  step), fp32 and bf16, ``*_eot20_grad_b*`` (``vmap`` over 20 keys), ``ddpm_grad_memory``
  (XLA buffers at 10 / 50 / 100 steps against the peer's CUDA peak);
- the compiled peer (``peer_compiled_*`` fields of the 35.7M rows, `peer.CompiledPeers`):
  the same loop around ``torch.compile`` (``mode="max-autotune"`` with CUDA graphs, the
  default mode if that fails), ``channels_last``, bf16 autocast in the bf16 rows
  (diffusers' attention already is SDPA), checked against the eager peer's output first;
- ``_flops`` (`profile.eps_flops`), achieved TFLOP/s (`profile.achieved`) and the projection
  of the paper's evaluation from the MEASURED times (`profile.measured_projection`).

bf16: bf16 convolutions and matmuls with float32 accumulation (`models.bf16_eps_fn`), the
chain in float32; the peers' is ``torch.autocast(bfloat16)``. Timings use each framework's
default float32 precision (``_meta.precision``): medians after warm-up
(`timing.median_time`), compile time apart. Imports nothing the GPU machine lacks (no
``diffjax.metrics``; without diffusers the peers are skipped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import diffusion, models
from experiments.bench import models as bench_models
from experiments.bench import profile, report, timing
from experiments.bench.models import UNetSize, cifar10_size
from experiments.bench.programs import Purifier, make_eot_grad, make_grad

try:  # the peers (torch); without torch the suite runs diffjax alone
    from experiments.bench import peer
except ImportError:  # pragma: no cover - the GPU machine has torch
    peer = None

# The compiled peer's largest difference from the eager peer, as a fraction of the output's
# largest magnitude, that still counts as the same computation (both at the timed
# precision: TF32 or bf16 over 10-100 steps). Not yet validated on a GPU: the first GPU
# run reports `peer_compiled_rel_diff` for every row, which is where to check it.
GPU_COMPILED_RTOL = 0.1

__all__ = ["GpuSettings", "gpu_settings", "gpu_smoke_settings", "projection", "GpuBench",
           "run_gpu"]


@dataclasses.dataclass(frozen=True)
class GpuSettings:
    """Sizes of one GPU run.

    Attributes:
      name: "gpu" or "gpu_smoke" (CPU test).
      ddpm: Ho et al.'s U-Net size; ddpmpp: overrides of `ncsnpp.cifar10_deep_config()`.
      t_star, steps: the purifier (t* = 100, 100 respaced steps).
      repeats, warmup: timed calls (median) and untimed calls before them (the first of
        which gives the outputs that are compared).
      check_batch, check_grad_batch: batches of the agreement checks.
      purify_batch, grad_batch, eot_batch: the 35.7M model's batches (EOT batch x `eot` =
        the gradient batch: the same convolution shapes); pp_*: DDPM++'s.
      eot: EOT draws (20).
      mem_steps, peer_mem_batch, peer_mem_steps: the memory case's step counts and batch.
      extra_purify_batches: more batch sizes of the 35.7M purification (last priority).
      probe_n: the matmul-throughput probe's size.
      iterations, images: the projected evaluation (PGD iterations, test-set sizes).
      compiled_peer, compile_mode, compile_backend, channels_last: the compiled peer
        (`peer.CompiledPeers`; the CPU smoke test: backend ``"eager"``, no codegen).
      remat: what diffjax's gradients keep of each step (`diffusion.REMAT_MODES`):
        "steps" (memory flat in the steps; the peers checkpoint each step alike) or
        "save_conv" (also the convolutions' outputs: less recomputation, memory growing
        with the steps; `--gpu_remat`).
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
    compiled_peer: bool = True
    compile_mode: str | None = "max-autotune"
    compile_backend: str = "inductor"
    channels_last: bool = True
    remat: str = "steps"


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
        extra_purify_batches=(), probe_n=128, compile_mode=None, compile_backend="eager",
        channels_last=False)


def projection(results: dict, s: GpuSettings) -> dict:
    """`profile.measured_projection` of a run's results under its settings."""
    return profile.measured_projection(results, iterations=s.iterations, eot=s.eot,
                                       steps=s.steps, t_star=s.t_star, images=s.images)


@dataclasses.dataclass
class Model:
    """One purifier model on the device: ``eps`` by dtype ("fp32", "bf16"), FLOPs."""

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


def _time(fn, sync, s: GpuSettings) -> float:
    # The cases make one call for their outputs first, hence ``warmup - 1``.
    return timing.median_time(fn, repeats=s.repeats, warmup=s.warmup - 1, sync=sync)[0]


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
                           "fields": "max_abs_diff: fp32 'highest' agreement (check_*); "
                           "default_precision_max_abs_diff: |peer - diffjax| as timed; "
                           "peer_compiled_max_abs_diff: |compiled - eager peer| as timed; "
                           "peer_peak_mb: CUDA peak growth; diffjax_peak_mb: XLA temp + "
                           "output; fraction_of_peak: achieved / peak",
                           "skipped": []}
        self.schedule = jax.device_put(diffusion.linear_schedule())
        self.acp = np.asarray(diffusion.linear_schedule().alphas_cumprod)
        self.models: dict[str, Model] = {}
        self._outputs: dict = {}
        self.compiled = peer.CompiledPeers(
            mode=settings.compile_mode, backend=settings.compile_backend,
            channels_last=settings.channels_last) if settings.compiled_peer and peer else None
        self.agree: dict = {}
        self.dev = jax.devices()[0]

    # -- bookkeeping

    def log(self, msg: str) -> None:
        self._log(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}")

    def write(self) -> None:
        """Writes benchmarks.json and benchmarks.md (after every case: a kill loses little)."""
        self.meta["elapsed_s"] = time.perf_counter() - self.t0
        self.meta["device_peak_mb_process"] = report.device_peak_mb(self.dev)
        data = {"_meta": self.meta, "_flops": {k: {"params": m.num_params, **m.flops,
                                                    "op_dtypes": m.op_dtypes}
                                               for k, m in self.models.items()},
                "_projection": projection(self.results, self.s),
                **report.cases_of(self.results)}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "benchmarks.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (self.out / "benchmarks.md").write_text(report.gpu_markdown(data))

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
        if (res.get("peer_compiled_s") and res.get("diffjax_s")  # compiled peer / diffjax
                and res.get("peer_compiled_agrees", True)):
            res["ratio_compiled"] = res["peer_compiled_s"] / res["diffjax_s"]
        self.results[name] = res
        fmt = lambda v: "-" if v is None else f"{v:.4g}"
        self.log(f"[{name}] diffjax {fmt(res.get('diffjax_images_per_s'))} img/s "
                 f"({fmt(res.get('diffjax_tflops'))} TFLOP/s), peer "
                 f"{fmt(res.get('peer_images_per_s'))} img/s, ratio {fmt(res['ratio'])}, "
                 f"compiled peer ratio {fmt(res.get('ratio_compiled'))}, "
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
            variables = bench_models.random_variables("ddpm_unet", config)
            num_params = models.param_count(variables)
        self._add_model("ddpm", f"Ho et al. DDPM U-Net ({size.label()})", "ddpm_unet",
                        config, variables, num_params, size.resolution, size.channels,
                        torch_model, peer_error)

    def setup_ddpmpp(self) -> None:
        """DDPM++ deep (score_sde's ``ncsnpp``), random weights, diffjax only."""
        from diffjax.models import ncsnpp

        config = dict(ncsnpp.cifar10_deep_config(), **dict(self.s.ddpmpp))
        variables = bench_models.random_variables("ncsnpp", config, seed=1)
        self._add_model("ddpmpp", f"DDPM++ deep (nf {config['nf']}, "
                        f"{config['num_res_blocks']} blocks, {config['image_size']}px)",
                        "ncsnpp", config, variables, models.param_count(variables),
                        config["image_size"], config["num_channels"], None,
                        "no peer for DDPM++ (diffjax only)")

    def _add_model(self, key, label, kind, config, variables, num_params, res, ch,
                   torch_model, peer_error):
        variables = jax.device_put(variables, self.dev)
        eps = {"fp32": jax.device_put(models.make_fn(kind, config, variables), self.dev),
               "bf16": jax.device_put(bench_models.bf16_eps_fn(kind, config, variables),
                                      self.dev)}
        flops = profile.eps_flops(eps["fp32"], res, ch)
        try:
            dts = {k: bench_models.op_dtypes(e, res, ch) for k, e in eps.items()}
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

    def peer_purifier(self, m: Model, steps: int, bf16: bool, model=None):
        """The peer's loop around `model` (default: the eager U-Net in `bf16` or fp32)."""
        taus = diffusion.respaced_timesteps(self.s.t_star, steps)
        model = model or peer.DeviceModel(m.torch_model, bf16=bf16)
        return peer.PeerPurifier(model, self.acp, self.s.t_star, taus)

    def peer_inputs(self, m: Model, x, keys, w, labels, steps: int):
        """The same images, the JAX-drawn noise of every step, classifier, on the device."""
        import torch

        dev = next(m.torch_model.parameters()).device
        taus = diffusion.respaced_timesteps(self.s.t_star, steps)
        nz = peer.chain_noises(keys, (m.resolution, m.resolution, m.channels), taus)
        nz = torch.from_numpy(nz).permute(0, 1, 4, 2, 3).contiguous().to(dev)
        return (peer.to_nchw(x).to(dev), nz, torch.from_numpy(np.array(w)).to(dev),
                torch.from_numpy(np.array(labels)).long().to(dev))

    def _grad_purifier(self) -> Purifier:
        """The purifier every gradient case (and the gradient agreement check) runs."""
        return Purifier(self.s.t_star, self.s.steps, remat=self.s.remat)

    def _achieved(self, s_per_image: float, per_step_flops: float, mult: int = 1):
        peaks = dict(profile.H100_PEAKS)
        probe = self.meta.get("precision", {}).get("jax_bf16_matmul_tflops")
        if probe:
            peaks["bf16 matmul probe (this run)"] = probe * 1e12
        return profile.achieved(per_step_flops * self.s.steps * mult, s_per_image, peaks)

    def _compiled(self, m: Model, dt: str, batch: int, run, out_eager) -> dict:
        # The compiled peer, checked against the eager peer's output as timed (the same
        # precision): TF32 or bf16 rounding over the steps stays within GPU_COMPILED_RTOL;
        # a wrong program (torch 2.13.0's inductor gave the CPU suite's 32x32 gradient 34%
        # of its max off) does not, and gets no ratio.
        rec = self.compiled.measure(m.torch_model, dt == "bf16", run, out_eager, batch,
                                    repeats=self.s.repeats, warmup=self.s.warmup - 1,
                                    rtol=GPU_COMPILED_RTOL)
        self.meta["compiled_peer_errors"] = self.compiled.errors
        return rec

    # -- cases

    def probe(self) -> None:
        """JAX's and torch's default float32 precision (TF32?) and matmul throughput."""
        self.meta["precision"] = out = profile.precision_probe(self.dev, self.s.probe_n)
        self.log(f"precision: {out}")

    def check(self, key: str) -> None:
        """Agreement at float32 'highest' on both sides (TF32 off in torch), before timing."""
        s, m = self.s, self.models[key]
        if m.torch_model is None:
            raise RuntimeError(m.peer_error or "no peer")
        import torch

        pur = Purifier(s.t_star, s.steps)
        x, keys, w, labels = self.inputs(m, s.check_batch)
        with profile.jax_precision("highest"):
            c, cs, _ = timing.compile_jax(pur, m.eps["fp32"], self.schedule, x, keys)
        out_j = np.asarray(c(m.eps["fp32"], self.schedule, x, keys))
        xt, nz, _, _ = self.peer_inputs(m, x, keys, w, labels, s.steps)
        ppur = self.peer_purifier(m, s.steps, bf16=False)
        with peer.exact_fp32(), torch.inference_mode():
            out_p = peer.to_nhwc(ppur(xt, nz).cpu())
        diff = float(np.abs(out_p - out_j).max())
        self.agree["purify"] = diff
        self.record(f"check_{m.key}_purify_t{s.steps}",
                    f"agreement, purification, {s.steps} steps, batch {s.check_batch}, fp32 "
                    "'highest' (JAX) vs TF32 off (torch)", max_abs_diff=diff,
                    compile_s=cs, batch=s.check_batch, steps=s.steps)
        x, keys, w, labels = self.inputs(m, s.check_grad_batch)
        args = (x, m.eps["fp32"], self.schedule, keys, w, labels)
        with profile.jax_precision("highest"):  # the timed cases' gradient program
            c, cs, _ = timing.compile_jax(make_grad(self._grad_purifier()), *args)
        g_j = np.asarray(c(*args))
        xt, nz, wt, yt = self.peer_inputs(m, x, keys, w, labels, s.steps)
        with peer.exact_fp32():
            g_p = peer.to_nhwc(ppur.grad(xt, nz, wt, yt, checkpoint=True).cpu())
        diff = float(np.abs(g_p - g_j).max())
        self.agree["grad"] = diff
        self.record(f"check_{m.key}_grad_t{s.steps}",
                    f"agreement, full gradient through {s.steps} steps (peer with "
                    f"checkpointing), batch {s.check_grad_batch}, fp32 'highest' vs TF32 off",
                    max_abs_diff=diff, max_abs_grad=float(np.abs(g_j).max()), compile_s=cs,
                    batch=s.check_grad_batch, steps=s.steps)

    def purify_case(self, key: str, dt: str, batch: int, peer_too: bool = True) -> None:
        """Purification throughput, diffjax (and the peers at the same batch and dtype)."""
        s, m = self.s, self.models[key]
        x, keys, w, labels = self.inputs(m, batch)
        pur, eps = Purifier(s.t_star, s.steps), m.eps[dt]
        c, cs, peak = timing.compile_jax(pur, eps, self.schedule, x, keys)
        run = lambda: c(eps, self.schedule, x, keys)
        out = np.asarray(run())
        tj = _time(run, jax.block_until_ready, s)
        rec = dict(diffjax_s=tj / batch, diffjax_images_per_s=batch / tj, compile_s=cs,
                   diffjax_peak_mb=peak, batch=batch, steps=s.steps, dtype=dt, model=key,
                   **self._achieved(tj / batch, m.flops["forward_flops"]))
        self._vs_fp32(rec, ("diffjax", key, "purify", batch), dt, out)
        what = f"{m.label}: purification, t* {s.t_star}, {s.steps} steps, batch {batch}, {dt}"
        if peer_too and m.torch_model is not None:
            import torch

            xt, nz, _, _ = self.peer_inputs(m, x, keys, w, labels, s.steps)

            def run_p(model=None):
                with torch.inference_mode():
                    return self.peer_purifier(m, s.steps, dt == "bf16", model)(xt, nz)

            out_p = peer.to_nhwc(run_p().float().cpu())
            peer.cuda_reset_peak()
            base = peer.cuda_allocated()
            tp = _time(run_p, peer.cuda_sync, s)
            rec.update(peer_s=tp / batch, peer_images_per_s=batch / tp,
                       peer_peak_mb=peer.cuda_peak_mb(base),
                       max_abs_diff=self.agree.get("purify"),
                       default_precision_max_abs_diff=float(np.abs(out_p - out).max()))
            self._vs_fp32(rec, ("peer", key, "purify", batch), dt, out_p, prefix="peer_")
            what += "; peer: diffusers + Python loop, torch.inference_mode" + (
                ", autocast bf16" if dt == "bf16" else "")
            if self.compiled is not None:
                rec.update(self._compiled(m, dt, batch, run_p, out_p))
        self.record(f"{key}_purify_t{s.steps}_b{batch}_{dt}", what, **rec)

    def grad_case(self, key: str, dt: str, batch: int, peer_too: bool = True) -> None:
        """One full-gradient step through all steps (remat), diffjax vs the peers (ckpt)."""
        s, m = self.s, self.models[key]
        x, keys, w, labels = self.inputs(m, batch)
        args = (x, m.eps[dt], self.schedule, keys, w, labels)
        c, cs, peak = timing.compile_jax(make_grad(self._grad_purifier()), *args)
        g = np.asarray(c(*args))
        tj = _time(lambda: c(*args), jax.block_until_ready, s)
        rec = dict(diffjax_s=tj / batch, diffjax_images_per_s=batch / tj, compile_s=cs,
                   diffjax_peak_mb=peak, batch=batch, steps=s.steps, dtype=dt, model=key,
                   remat=s.remat,
                   **self._achieved(tj / batch, profile.grad_step_flops(m.flops, s.remat)))
        self._vs_fp32(rec, ("diffjax", key, "grad", batch), dt, g)
        what = (f"{m.label}: full gradient through {s.steps} steps (remat "
                f"{s.remat!r}), batch {batch}, {dt}")
        if peer_too and m.torch_model is not None:
            xt, nz, wt, yt = self.peer_inputs(m, x, keys, w, labels, s.steps)

            def run_p(model=None):
                ppur = self.peer_purifier(m, s.steps, dt == "bf16", model)
                return ppur.grad(xt, nz, wt, yt, checkpoint=True)

            g_p = peer.to_nhwc(run_p().cpu())
            peer.cuda_reset_peak()
            base = peer.cuda_allocated()
            tp = _time(run_p, peer.cuda_sync, s)
            rec.update(peer_s=tp / batch, peer_images_per_s=batch / tp, peer_ckpt_s=tp / batch,
                       peer_mode="torch.utils.checkpoint per step",
                       peer_peak_mb=peer.cuda_peak_mb(base), max_abs_diff=self.agree.get("grad"),
                       default_precision_max_abs_diff=float(np.abs(g_p - g).max()),
                       max_abs_grad=float(np.abs(g).max()))
            what += "; peer: autograd through the loop, torch.utils.checkpoint per step" + (
                ", autocast bf16" if dt == "bf16" else "")
            if self.compiled is not None:
                rec.update(self._compiled(m, dt, batch, run_p, g_p))
        self.record(f"{key}_grad_t{s.steps}_b{batch}_{dt}", what, **rec)

    def eot_case(self, key: str, dt: str, batch: int) -> None:
        """EOT gradient (mean over `eot` draws, vmap over their keys), diffjax."""
        s, m = self.s, self.models[key]
        x, keys, w, labels = self.inputs(m, batch)
        draw_keys = jax.vmap(lambda j: jax.vmap(lambda k: jax.random.fold_in(k, j))(keys))(
            jnp.arange(s.eot, dtype=jnp.uint32))  # [K, B]
        args = (x, m.eps[dt], self.schedule, draw_keys, w, labels)
        c, cs, peak = timing.compile_jax(make_eot_grad(self._grad_purifier()), *args)
        jax.block_until_ready(c(*args))
        tj = _time(lambda: c(*args), jax.block_until_ready, s)
        self.record(
            f"{key}_eot{s.eot}_grad_b{batch}_{dt}",
            f"{m.label}: EOT-{s.eot} full gradient (vmap over keys), {s.steps} steps, "
            f"batch {batch}, {dt}", diffjax_s=tj / batch, diffjax_images_per_s=batch / tj,
            compile_s=cs, diffjax_peak_mb=peak, batch=batch, steps=s.steps, eot=s.eot,
            remat=s.remat,
            dtype=dt, model=key, **self._achieved(
                tj / batch, profile.grad_step_flops(m.flops, s.remat), s.eot))

    def memory_case(self, key: str = "ddpm") -> None:
        """Gradient memory against the step count: diffjax (XLA buffers) and the peer."""
        s, m = self.s, self.models[key]
        if peer is not None:
            peer.cuda_empty_cache()  # the peer's earlier cases' cached blocks
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
                    peer.cuda_reset_peak()
                    base = peer.cuda_allocated()
                    ppur.grad(xt, nz, wt, yt, checkpoint=ck)
                    peer.cuda_sync()
                    dst[str(steps)] = peer.cuda_peak_mb(base)
            tp, tpc = (timing.median_time(lambda ck=ck: ppur.grad(xt, nz, wt, yt, checkpoint=ck),
                                          repeats=s.repeats, warmup=s.warmup,
                                          sync=peer.cuda_sync)[0] for ck in (False, True))
            rec.update(peer_batch=b, peer_peak_mb_by_steps=peer_mb,
                       peer_ckpt_peak_mb_by_steps=peer_ckpt_mb,
                       peer_peak_mb=peer_mb.get(str(max(s.peer_mem_steps))),
                       peer_ckpt_peak_mb=peer_ckpt_mb.get(str(max(s.peer_mem_steps))),
                       peer_nockpt_s_at_peer_batch=tp / b, peer_ckpt_s_at_peer_batch=tpc / b)
            peer.cuda_empty_cache()
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


def run_gpu(settings: GpuSettings, out_dir, *, log: Callable[[str], None] = print,
            time_budget_s: float | None = None, workdir: str | None = None,
            command: str = "", only: list[str] | None = None) -> GpuBench:
    """Runs the GPU suite in priority order; returns the `GpuBench` (results written).

    Order (most wanted first; a spent `time_budget_s` skips the rest): the precision probe,
    the 35.7M model's agreement checks, its fp32 purification and gradient (with the peers),
    DDPM++'s bf16 gradient and purification (the paper's purifier: the projection's
    headline), the 35.7M model's bf16 purification and gradient (with the peers), the EOT
    gradients in bf16, the fp32 DDPM++ cases, the memory case, the 35.7M model's EOT in
    fp32, extra batch sizes, DDPM++'s fp32 EOT.
    """
    b = GpuBench(settings, out_dir, log=log, time_budget_s=time_budget_s, workdir=workdir,
                 command=command)
    b.meta["versions"] = report.gpu_versions()
    b.log(f"devices {b.meta['versions']['jax_devices']}; budget {time_budget_s} s")
    s = settings
    pur, grad, eot, pp = b.purify_case, b.grad_case, b.eot_case, "ddpmpp"
    plan: list[tuple] = [
        ("precision_probe", b.probe, ()), ("setup_ddpm", b.setup_ddpm, ()),
        ("check_ddpm", b.check, ("ddpm",)),
        ("ddpm_purify_fp32", pur, ("ddpm", "fp32", s.purify_batch)),
        ("ddpm_grad_fp32", grad, ("ddpm", "fp32", s.grad_batch)),
        ("setup_ddpmpp", b.setup_ddpmpp, ()),
        ("ddpmpp_grad_bf16", grad, (pp, "bf16", s.pp_grad_batch)),
        ("ddpmpp_purify_bf16", pur, (pp, "bf16", s.pp_purify_batch)),
        ("ddpm_purify_bf16", pur, ("ddpm", "bf16", s.purify_batch)),
        ("ddpm_grad_bf16", grad, ("ddpm", "bf16", s.grad_batch)),
        ("ddpmpp_eot_bf16", eot, (pp, "bf16", s.pp_eot_batch)),
        ("ddpm_eot_bf16", eot, ("ddpm", "bf16", s.eot_batch)),
        ("ddpmpp_purify_fp32", pur, (pp, "fp32", s.pp_purify_batch)),
        ("ddpmpp_grad_fp32", grad, (pp, "fp32", s.pp_grad_batch)),
        ("ddpm_grad_memory", b.memory_case, ("ddpm",)),
        ("ddpm_eot_fp32", eot, ("ddpm", "fp32", s.eot_batch))]
    plan += [(f"ddpm_purify_b{n}_{dt}", pur, ("ddpm", dt, n, False))
             for n in s.extra_purify_batches for dt in ("bf16", "fp32")]
    plan.append(("ddpmpp_eot_fp32", eot, (pp, "fp32", s.pp_eot_batch)))
    if only:
        by_name = {p[0]: p for p in plan}
        unknown = [n for n in only if n not in by_name]
        if unknown:
            raise ValueError(f"gpu_cases: unknown {unknown}; expected names of {list(by_name)}")
        wanted = {by_name[n][2][0] for n in only if by_name[n][2]} & {"ddpm", "ddpmpp"}
        plan = ([by_name["precision_probe"]] if "precision_probe" in only else []) + [
            by_name[f"setup_{m}"] for m in ("ddpm", "ddpmpp") if m in wanted] + [
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
