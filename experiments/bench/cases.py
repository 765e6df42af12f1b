"""The benchmark cases: each runs one computation on both sides, checks that they agree,
then times them.

Every case uses the DDPM purifier of the paper's CIFAR-10 setting (`method="ddpm"`,
``t_star = 100``, x0 clipped) with `num_steps` respaced reverse steps, and, for gradients,
the summed cross-entropy of a fixed random linear classifier on the purified images (the
classifier is negligible next to the purifier, so the figures are the purifier's). Times
are per image: the median time of one call on a batch, divided by the batch size.

Cases (the issue's names; `Settings` holds the sizes):

- ``purify_t100``: purification throughput, 100 steps, no gradient (peer: a loop under
  ``torch.inference_mode``).
- ``grad_t10``, ``grad_t50``, ``grad_t100``: one full-gradient attack step (gradient of
  the loss through every step). diffjax: ``jax.grad`` of `purify` (``remat=True``: one
  ``jax.checkpoint`` per scanned step). Peer: ``torch.autograd`` through the loop, without
  (``peer_s``) and with (``peer_ckpt_s``) ``torch.utils.checkpoint`` per step.
- ``eot20_grad``: the mean of 20 full gradients under 20 noise draws. diffjax: ``vmap``
  over the 20 keys; peer: a Python loop of 20 backward passes.
- ``jacobian_exact``: the compression rate ``||J||_F / sqrt(d)`` at one image under fixed
  randomness. diffjax: `diffjax.metrics.compression_rate` (``estimator="exact"``: `d`
  Jacobian rows by `vjp`, batched); peer: ``torch.autograd.functional.jacobian``.
- ``compression_matrix_free``: the same rate by diffjax's matrix-free Hutchinson estimate
  (`num_probes` `vjp`s) against the peer's full Jacobian; ``rel_error`` against the exact
  value.
- ``purify_32``, ``grad_32``: purification and one full-gradient step at 32x32x3 (CIFAR
  size) with Ho et al.'s CIFAR-10 architecture at a quarter of its width
  (`models.cifar10_quarter_size`: 2.2M parameters, 0.80 GFLOPs per forward per image).
- ``scale_*``: how the costs grow with batch size, image size and steps.

The compiled peer: in the cases named in `Settings.compiled_peer`, the same peer loop
around ``torch.compile`` of the U-Net (`peer.CompiledPeers`) is also timed
(``peer_compiled_s``, ``ratio_compiled = peer_compiled_s / diffjax_s``), after its output
is compared with diffjax's (``peer_compiled_max_abs_diff``, ``peer_compiled_rel_diff``);
its compile time is the first call's (``peer_compiled_first_call_s``). A compiled peer
whose output differs by more than `COMPILED_RTOL` of its largest magnitude computes
something else: the U-Net is then compiled block by block and checked again
(``peer_compiled_whole_*`` keep the whole graph's difference); a peer that still
disagrees has ``peer_compiled_agrees`` False and gets no ratio. A failure is
recorded (``peer_compiled_error``), not hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from diffjax import diffusion, metrics
from experiments.bench import models, peer, timing
from experiments.bench.programs import Purifier, PurifyOne, make_eot_grad, make_grad

# The compiled peer must compute what the eager peer and diffjax compute: its output may
# differ from diffjax's by at most this fraction of the output's largest magnitude (the
# eager peer's float32 differences are below 1e-5 of it). torch 2.13.0's inductor on the
# CPU fails this on `grad_32` (BENCHMARKS.md): that case is timed but gets no ratio.
COMPILED_RTOL = 1e-3
# The remat modes a gradient case may also time (`Bench.grad_case`): remat="save_conv" and
# no remat ("noremat").
GRAD_MODES = ("save_conv", "noremat")

__all__ = ["Settings", "quick_settings", "full_settings", "tiny_settings", "Bench",
           "run_all"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run of the suite.

    Attributes:
      name: "quick", "full" or "tiny" (tests).
      size: the U-Net of the main cases.
      repeats: timed runs per measurement (the median is reported).
      t_star: the purification timestep (100: the paper's CIFAR-10 t* = 0.1).
      purify_batch: images per call for ``purify_t100``.
      grad_batch: images per call for the gradient cases.
      grad_steps: the step counts of the ``grad_t*`` cases.
      eot: EOT draws (the paper: 20).
      eot_batch: images per call for ``eot20_grad``.
      eot_steps: reverse steps in the EOT case.
      jac_steps: reverse steps of the purifier whose Jacobian is measured.
      num_probes: Hutchinson probes of the matrix-free estimate.
      jac_chunk: products per batch in diffjax's exact Jacobian.
      jac_ad_mode: ``compression_rate``'s ``ad_mode``. "reverse" (rows, `vjp`s): the U-Net's
        convolutions are a `jax.custom_vjp` (`diffjax.models.layers.conv2d`, a fast
        input-gradient layout), which forward mode cannot differentiate.
      scale_batches: batch sizes of the batch-scaling cases.
      scale_resolutions: image sizes of the image-size scaling cases.
      scale_steps: steps of the scaling cases.
      cifar_compression: also run the compression cases at 32x32x3 (CIFAR size).
      cifar_jac_steps: reverse steps of the CIFAR-size compression cases.
      rss: measure the peer's peak RSS in subprocesses (``grad_t*``).
      noremat: also time diffjax's gradient without remat and with remat="save_conv" in
        every gradient case (the compiled peer's cases time "save_conv" anyway).
      res32: run ``purify_32`` and ``grad_32`` (32x32x3, `res32_size`).
      res32_size: their U-Net (Ho et al.'s CIFAR-10 architecture at a quarter width).
      res32_steps, res32_purify_batch, res32_grad_batch: their steps and batches.
      compiled_peer: the cases that also time the compiled peer.
      compile_mode: its ``torch.compile`` mode (None: the default).
      compile_backend: its backend ("inductor"; the tests: "eager", graph capture only).
      channels_last: its memory format.
    """

    name: str
    size: models.UNetSize = models.UNetSize()
    repeats: int = 3
    t_star: int = 100
    purify_batch: int = 8
    grad_batch: int = 4
    grad_steps: tuple[int, ...] = (10, 50, 100)
    eot: int = 20
    eot_batch: int = 1
    eot_steps: int = 10
    jac_steps: int = 10
    num_probes: int = 64
    jac_chunk: int = 64
    jac_ad_mode: str = "reverse"
    scale_batches: tuple[int, ...] = ()
    scale_resolutions: tuple[int, ...] = ()
    scale_steps: int = 10
    cifar_compression: bool = False
    cifar_jac_steps: int = 2
    rss: bool = False
    noremat: bool = False
    res32: bool = True
    res32_size: models.UNetSize = dataclasses.field(default_factory=models.cifar10_quarter_size)
    res32_steps: int = 10
    res32_purify_batch: int = 4
    res32_grad_batch: int = 2
    compiled_peer: tuple[str, ...] = ("purify_t100", "grad_t10", "purify_32", "grad_32")
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    channels_last: bool = False


def quick_settings() -> Settings:
    """``--quick``: the named cases at small sizes, under 3 minutes on 2 idle cores."""
    return Settings(name="quick", repeats=5, purify_batch=4, grad_batch=2, eot_batch=1,
                    eot_steps=10, jac_steps=5)


def full_settings() -> Settings:
    """The full CPU suite (minutes): more repeats, EOT at 100 steps, scaling, CIFAR size."""
    return Settings(name="full", repeats=5, purify_batch=8, grad_batch=4, eot_batch=1,
                    eot_steps=100, jac_steps=10, scale_batches=(1, 4, 16),
                    scale_resolutions=(8, 16, 32), scale_steps=10, cifar_compression=True,
                    cifar_jac_steps=2, rss=True, noremat=True)


def tiny_settings() -> Settings:
    """For the smoke test: a few seconds of work per case."""
    size = models.UNetSize(resolution=8, ch=8, ch_mult=(1, 2), num_groups=4)
    return Settings(name="tiny", size=size, repeats=1, t_star=10, purify_batch=2,
                    grad_batch=2, grad_steps=(2, 5), eot=3, eot_batch=1, eot_steps=2,
                    jac_steps=2, num_probes=16, jac_chunk=64, res32=False, compiled_peer=())


# ------------------------------------------------------------------------------ diffjax


# ------------------------------------------------------------------------------ harness


def _ratio(peer_s, diffjax_s):
    if peer_s is None or diffjax_s is None or diffjax_s <= 0:
        return None
    return peer_s / diffjax_s


class Bench:
    """Runs the cases of one `Settings` and collects their results.

    Args:
      settings: the sizes.
      log: called with one progress line per case.
      workdir: where the peer's ``save_pretrained`` directories go (temp if None).
    """

    def __init__(self, settings: Settings, log: Callable[[str], None] = print,
                 workdir: str | None = None):
        self.s = settings
        self.log = log
        self.workdir = workdir
        self.schedule = diffusion.linear_schedule()
        self.acp = np.asarray(self.schedule.alphas_cumprod)
        self.results: dict[str, dict] = {}
        self._pairs: dict[models.UNetSize, models.Pair] = {}
        self.meta: dict = {}
        self.compiled = peer.CompiledPeers(mode=settings.compile_mode,
                                           backend=settings.compile_backend,
                                           channels_last=settings.channels_last)

    # -- fixtures

    def pair(self, size: models.UNetSize) -> models.Pair:
        """The model pair of a size (built and converted once)."""
        if size not in self._pairs:
            self._pairs[size] = models.make_pair(size, workdir=self.workdir)
        return self._pairs[size]

    def inputs(self, size: models.UNetSize, batch: int, seed: int = 0):
        """Images in [0, 1], per-example keys, classifier weights and labels."""
        r, c = size.resolution, size.channels
        key = jax.random.key(seed)
        kx, kw = jax.random.split(jax.random.fold_in(key, 1))
        x = np.asarray(jax.random.uniform(kx, (batch, r, r, c), jnp.float32))
        keys = jax.random.split(jax.random.fold_in(key, 2), batch)
        w = np.asarray(jax.random.normal(kw, (r * r * c, 10), jnp.float32)) / math.sqrt(r * r * c)
        labels = (np.arange(batch) % 10).astype(np.int32)
        return x, keys, w, labels

    def peer_purifier(self, pair: models.Pair, num_steps: int,
                      model=None) -> peer.PeerPurifier:
        """The peer's loop around `model` (default: the eager U-Net of `pair`)."""
        taus = diffusion.respaced_timesteps(self.s.t_star, num_steps)
        return peer.PeerPurifier(model or pair.torch_model, self.acp, self.s.t_star, taus)

    def _compiled(self, name: str, pair: models.Pair, run, reference) -> tuple:
        """``(call, fields)`` of the compiled peer for case `name`: ``run(model)`` compiled
        and checked against `reference` (`peer.CompiledPeers.prepare`); `call` runs it, for
        the case to time beside diffjax (None, with no fields, unless `name` is in
        `Settings.compiled_peer`; None with ``peer_compiled_error`` if it did not compile)."""
        if name not in self.s.compiled_peer:
            return None, {}
        self.log(f"[{name}] compiling the peer (torch.compile, mode {self.s.compile_mode}) ...")
        call, fields = self.compiled.prepare(pair.torch_model, False, run, reference,
                                             rtol=COMPILED_RTOL)
        self.meta["compiled_peer_errors"] = self.compiled.errors
        return call, fields

    def _time(self, fns: dict, compiled, extra: dict, batch: int) -> dict:
        """Medians of `fns` and of the compiled peer's `compiled` call (if any), timed in
        alternation (`timing.interleaved_medians`); adds the compiled peer's time to
        `extra`."""
        if compiled is not None:
            fns = {**fns, "compiled": compiled}
        t = {k: v[0] for k, v in timing.interleaved_medians(
            fns, repeats=self.s.repeats).items()}
        if compiled is not None:
            extra.update(peer.CompiledPeers.fields({}, t["compiled"], batch))
        return t

    def noises(self, keys, size: models.UNetSize, num_steps: int) -> torch.Tensor:
        """The JAX-drawn noise of every step, as an NCHW torch stack."""
        taus = diffusion.respaced_timesteps(self.s.t_star, num_steps)
        r, c = size.resolution, size.channels
        nz = peer.chain_noises(keys, (r, r, c), taus)
        return torch.stack([peer.to_nchw(n) for n in nz])

    def record(self, name: str, what: str, **fields) -> dict:
        """Stores one case's result (adds the ratio) and prints a progress line."""
        res = {"what": what, **fields}
        res["ratio"] = _ratio(res.get("peer_s"), res.get("diffjax_s"))
        if "peer_ckpt_s" in res:
            res["ratio_ckpt"] = _ratio(res.get("peer_ckpt_s"), res.get("diffjax_s"))
        if "peer_compiled_s" in res and res.get("peer_compiled_agrees", True):
            res["ratio_compiled"] = _ratio(res.get("peer_compiled_s"), res.get("diffjax_s"))
        for mode in GRAD_MODES:  # grad_case's other remat modes
            if f"diffjax_{mode}_s" in res:
                res[f"ratio_{mode}"] = _ratio(res.get("peer_s"), res[f"diffjax_{mode}_s"])
                if "ratio_compiled" in res:
                    res[f"ratio_compiled_{mode}"] = _ratio(res.get("peer_compiled_s"),
                                                           res[f"diffjax_{mode}_s"])
        self.results[name] = res
        fmt = lambda v: "-" if v is None else f"{v:.4g}"
        compiled = "" if "peer_compiled_s" not in res else (
            f" (compiled {fmt(res['peer_compiled_s'])} s/img, ratio "
            f"{fmt(res.get('ratio_compiled'))})")
        if res.get("peer_compiled_whole_rel_diff") is not None:
            compiled += (f" [per block: the whole graph was wrong by "
                         f"{fmt(100 * res['peer_compiled_whole_rel_diff'])}% of max|out|]")
        if res.get("peer_compiled_agrees") is False:
            compiled = (f" (compiled {fmt(res['peer_compiled_s'])} s/img DISAGREES: max|diff| "
                        f"{fmt(res['peer_compiled_max_abs_diff'])}, "
                        f"{fmt(100 * res['peer_compiled_rel_diff'])}% of max|out|; no ratio)")
        if "peer_compiled_error" in res:
            compiled = f" (compiled peer FAILED: {res['peer_compiled_error'][:200]})"
        self.log(f"[{name}] diffjax {fmt(res.get('diffjax_s'))} s/img, peer "
                 f"{fmt(res.get('peer_s'))} s/img{compiled}, ratio {fmt(res['ratio'])}, "
                 f"max|diff| {fmt(res.get('max_abs_diff'))}, compile "
                 f"{fmt(res.get('compile_s'))} s")
        return res

    # -- cases

    def purify_case(self, name: str, size: models.UNetSize, batch: int, steps: int,
                    what: str | None = None) -> dict:
        """Purification (no gradient): throughput on both sides."""
        pair = self.pair(size)
        x, keys, _, _ = self.inputs(size, batch)
        pur = Purifier(self.s.t_star, steps)
        compiled, compile_s, peak = timing.compile_jax(pur, pair.eps_fn, self.schedule, x, keys)
        run_j = lambda: compiled(pair.eps_fn, self.schedule, x, keys)
        out_j = np.asarray(run_j())
        ppur = self.peer_purifier(pair, steps)
        xt, nz = peer.to_nchw(x), self.noises(keys, size, steps)

        def run_p(model=None):
            p = ppur if model is None else self.peer_purifier(pair, steps, model)
            with torch.inference_mode():
                return p(xt, nz)

        diff = float(np.abs(peer.to_nhwc(run_p()) - out_j).max())
        compiled_peer, extra = self._compiled(name, pair, run_p, out_j)
        t = self._time({"diffjax": run_j, "peer": run_p}, compiled_peer, extra, batch)
        tj, tp = t["diffjax"], t["peer"]
        return self.record(
            name, what or f"purification, {steps} steps, batch {batch}, {size.label()}",
            diffjax_s=tj / batch, peer_s=tp / batch, diffjax_images_per_s=batch / tj,
            peer_images_per_s=batch / tp, diffjax_peak_mb=peak, peer_peak_mb=None,
            max_abs_diff=diff, compile_s=compile_s, batch=batch, steps=steps,
            resolution=size.resolution, **extra)

    def grad_case(self, name: str, size: models.UNetSize, batch: int, steps: int, *,
                  memory: bool = True, what: str | None = None) -> dict:
        """One full-gradient attack step: diffjax (remat) vs the peer with/without ckpt.

        The other ways diffjax can keep the steps' activations are timed in the same
        rounds (`diffusion.REMAT_MODES`): ``remat="save_conv"`` where the case times the
        compiled peer or `Settings.noremat` is set, no remat where `Settings.noremat` is
        set. Each gets ``diffjax_<mode>_s``, its buffer size, its largest difference from
        the remat gradient, and its ratios against the eager peer (``ratio_<mode>``) and
        the compiled peer (``ratio_compiled_<mode>``). Neither peer checkpoints: each
        keeps every activation, as remat=False does (``ratio_ckpt``: remat against the
        peer's per-step checkpointing)."""
        pair = self.pair(size)
        x, keys, w, labels = self.inputs(size, batch)
        pur = Purifier(self.s.t_star, steps)
        args = (x, pair.eps_fn, self.schedule, keys, w, labels)
        compiled, compile_s, peak = timing.compile_jax(make_grad(pur), *args)
        g_j = np.asarray(compiled(*args))
        ppur = self.peer_purifier(pair, steps)
        xt, nz = peer.to_nchw(x), self.noises(keys, size, steps)
        wt, yt = torch.from_numpy(w), torch.from_numpy(labels).long()
        run_p = lambda: ppur.grad(xt, nz, wt, yt)
        run_pc = lambda: ppur.grad(xt, nz, wt, yt, checkpoint=True)
        diff = float(np.abs(peer.to_nhwc(run_p()) - g_j).max())
        diff_c = float(np.abs(peer.to_nhwc(run_pc()) - g_j).max())
        compiled_peer, extra = self._compiled(
            name, pair, lambda model: self.peer_purifier(pair, steps, model).grad(xt, nz, wt, yt),
            g_j)
        fns = {"diffjax": lambda: compiled(*args), "peer": run_p, "peer_ckpt": run_pc}
        modes = (["save_conv"] if self.s.noremat or name in self.s.compiled_peer else []) + (
            ["noremat"] if self.s.noremat else [])
        for mode in modes:
            remat = "none" if mode == "noremat" else mode
            c_m, cs_m, peak_m = timing.compile_jax(
                make_grad(Purifier(self.s.t_star, steps, remat=remat)), *args)
            extra[f"diffjax_{mode}_max_abs_diff"] = float(
                np.abs(np.asarray(c_m(*args)) - g_j).max())
            extra[f"diffjax_{mode}_peak_mb"] = peak_m
            extra[f"diffjax_{mode}_compile_s"] = cs_m
            fns[f"diffjax_{mode}"] = functools.partial(c_m, *args)
        t = self._time(fns, compiled_peer, extra, batch)
        tj, tp, tpc = t["diffjax"], t["peer"], t["peer_ckpt"]
        for mode in modes:
            extra[f"diffjax_{mode}_s"] = t[f"diffjax_{mode}"] / batch
        if memory:
            params = list(pair.torch_model.parameters())
            extra["peer_saved_mb"] = peer.saved_tensor_mb(run_p, exclude=params)
            extra["peer_ckpt_saved_mb"] = peer.saved_tensor_mb(run_pc, exclude=params)
            if self.s.rss:
                taus = diffusion.respaced_timesteps(self.s.t_star, steps)
                arrays = {"x": x, "w": w, "labels": labels, "alphas_cumprod": self.acp,
                          "taus": taus,
                          "noises": peer.chain_noises(keys, x.shape[1:], taus)}
                for ck, key in ((False, "peer_peak_mb"), (True, "peer_ckpt_peak_mb")):
                    extra[key] = timing.rss_probe(pair.model_dir, arrays, t_star=self.s.t_star,
                                                  num_steps=steps, checkpoint=ck)
        extra.setdefault("peer_peak_mb", None)
        return self.record(
            name, what or f"full gradient through {steps} steps, batch {batch}, "
            f"{size.label()}",
            diffjax_s=tj / batch, peer_s=tp / batch, peer_ckpt_s=tpc / batch,
            diffjax_peak_mb=peak, max_abs_diff=max(diff, diff_c), compile_s=compile_s,
            batch=batch, steps=steps, resolution=size.resolution, **extra)

    def eot_case(self, name: str = "eot20_grad") -> dict:
        """EOT gradient: vmap over the draws' keys vs a Python loop of backward passes."""
        s = self.s
        size, batch, steps = s.size, s.eot_batch, s.eot_steps
        pair = self.pair(size)
        x, keys, w, labels = self.inputs(size, batch)
        draw_keys = jax.vmap(lambda j: jax.vmap(lambda k: jax.random.fold_in(k, j))(keys))(
            jnp.arange(s.eot, dtype=jnp.uint32))  # [K, B]
        pur = Purifier(s.t_star, steps)
        args = (x, pair.eps_fn, self.schedule, draw_keys, w, labels)
        compiled, compile_s, peak = timing.compile_jax(make_eot_grad(pur), *args)
        g_j = np.asarray(compiled(*args))
        ppur = self.peer_purifier(pair, steps)
        xt = peer.to_nchw(x)
        draws = [self.noises(draw_keys[j], size, steps) for j in range(s.eot)]
        wt, yt = torch.from_numpy(w), torch.from_numpy(labels).long()
        run_p = lambda: ppur.eot_grad(xt, draws, wt, yt)
        diff = float(np.abs(peer.to_nhwc(run_p()) - g_j).max())
        t = self._time({"diffjax": lambda: compiled(*args), "peer": run_p}, None, {}, batch)
        tj, tp = t["diffjax"], t["peer"]
        return self.record(
            name, f"EOT-{s.eot} full gradient, {steps} steps, batch {batch}, {size.label()}",
            diffjax_s=tj / batch, peer_s=tp / batch, diffjax_peak_mb=peak, peer_peak_mb=None,
            max_abs_diff=diff, compile_s=compile_s, batch=batch, steps=steps, eot=s.eot,
            resolution=size.resolution)

    def compression_cases(self, size: models.UNetSize, steps: int, suffix: str = "",
                          peer_rows: int | None = None, repeats: int | None = None) -> None:
        """``jacobian_exact`` and ``compression_matrix_free`` at one image.

        Args:
          size: the U-Net (and image) size.
          steps: reverse steps of the purifier.
          suffix: appended to the case names.
          peer_rows: if set, the peer's full Jacobian is timed on this many rows (one
            backward pass each, the loop ``jacobian`` runs) and scaled to all `d` rows
            (``peer_extrapolated``); its rate is then not compared.
          repeats: timed runs (default `Settings.repeats`).
        """
        s = self.s
        reps = s.repeats if repeats is None else repeats
        pair = self.pair(size)
        x, keys, _, _ = self.inputs(size, 1, seed=3)
        d = int(np.prod(x.shape[1:]))
        pur = Purifier(s.t_star, steps)
        f = jax.tree_util.Partial(PurifyOne(pur), pair.eps_fn, self.schedule, keys[0])
        x0 = jnp.asarray(x)
        exact = functools.partial(metrics.compression_rate, f, x0, estimator="exact",
                                  chunk_size=s.jac_chunk, ad_mode=s.jac_ad_mode)
        hutch = functools.partial(metrics.compression_rate, f, x0, estimator="hutchinson",
                                  num_probes=s.num_probes, chunk_size=s.jac_chunk,
                                  ad_mode=s.jac_ad_mode,
                                  key=jax.random.key(7), return_stderr=True)
        t_first = timing.median_time(exact, repeats=1, warmup=0)[0]
        rate_exact = float(np.asarray(exact())[0])
        tj, _ = timing.median_time(exact, repeats=reps, warmup=0)
        t_first_h = timing.median_time(hutch, repeats=1, warmup=0)[0]
        rate_h, se_h = (float(np.asarray(v)[0]) for v in hutch())
        th, _ = timing.median_time(hutch, repeats=reps, warmup=0)

        ppur = self.peer_purifier(pair, steps)
        xt, nz = peer.to_nchw(x)[0], self.noises(keys, size, steps)
        extra = {}
        if peer_rows is None:
            rate_p, _ = ppur.jacobian_rate(xt, nz)
            tp, _ = timing.median_time(lambda: ppur.jacobian_rate(xt, nz),
                                       repeats=max(1, reps - 2), warmup=0)
            diff = abs(rate_p - rate_exact)
        else:
            tp = self._peer_rows_time(ppur, xt, nz, peer_rows) * d
            diff = None
            extra["peer_extrapolated_from_rows"] = peer_rows
        label = f"{steps}-step DDPM purifier at one {size.label()} image (d = {d})"
        self.record(f"jacobian_exact{suffix}", f"compression rate, exact Jacobian, {label}",
                    diffjax_s=tj, peer_s=tp, diffjax_peak_mb=None, peer_peak_mb=None,
                    max_abs_diff=diff, compile_s=max(t_first - tj, 0.0), rate=rate_exact,
                    d=d, steps=steps, resolution=size.resolution, batch=1, **extra)
        self.record(f"compression_matrix_free{suffix}",
                    f"compression rate, Hutchinson {s.num_probes} probes vs the peer's full "
                    f"Jacobian, {label}",
                    diffjax_s=th, peer_s=tp, diffjax_peak_mb=None, peer_peak_mb=None,
                    max_abs_diff=diff, compile_s=max(t_first_h - th, 0.0), rate=rate_h,
                    rate_stderr=se_h, rate_exact=rate_exact,
                    rel_error=abs(rate_h - rate_exact) / rate_exact,
                    speedup_vs_exact=tj / th, num_probes=s.num_probes, d=d, steps=steps,
                    resolution=size.resolution, batch=1, **extra)

    @staticmethod
    def _peer_rows_time(ppur, xt, nz, rows: int) -> float:
        """Seconds per Jacobian row of the peer's loop (one forward, `rows` backwards)."""
        import time

        x = xt.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = ppur(x[None], nz)[0].reshape(-1)
        for i in range(rows):
            torch.autograd.grad(out[i], x, retain_graph=True)
        return (time.perf_counter() - t0) / rows


def run_all(settings: Settings, log: Callable[[str], None] = print,
            workdir: str | None = None, torch_threads: int = 2) -> tuple[dict, dict]:
    """Runs every case of `settings` (the peer with `torch_threads` threads).

    Returns:
      (results, info): ``{case name: fields}`` and facts about the models (parameter
      counts, FLOPs per U-Net call).
    """
    torch.set_num_threads(torch_threads)
    b = Bench(settings, log=log, workdir=workdir)
    s = settings
    pair = b.pair(s.size)
    info = {"size": dataclasses.asdict(s.size), "num_params": pair.num_params,
            "torch_threads": torch.get_num_threads(),
            "unet_flops_per_image": timing.unet_flops(pair.eps_fn, 1, s.size.resolution,
                                                       s.size.channels)}
    def guarded(name, fn, *args, **kw):
        # One failing case (e.g. a subprocess) is recorded and the suite goes on.
        try:
            fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - reported in the results, never hidden
            log(f"[{name}] FAILED: {type(e).__name__}: {e}")
            b.results[name] = {"what": "failed", "error": f"{type(e).__name__}: {e}"}

    guarded("purify", b.purify_case, f"purify_t{s.t_star}", s.size, s.purify_batch, s.t_star)
    for steps in s.grad_steps:
        guarded(f"grad_t{steps}", b.grad_case, f"grad_t{steps}", s.size, s.grad_batch, steps)
    if s.res32:
        size32 = s.res32_size
        guarded("purify_32", b.purify_case, "purify_32", size32, s.res32_purify_batch,
                s.res32_steps)
        guarded("grad_32", b.grad_case, "grad_32", size32, s.res32_grad_batch, s.res32_steps,
                memory=False)
        info["res32"] = {"size": dataclasses.asdict(size32),
                         "num_params": b.pair(size32).num_params,
                         "unet_flops_per_image": timing.unet_flops(
                             b.pair(size32).eps_fn, 1, size32.resolution, size32.channels)}
    guarded("eot", b.eot_case, f"eot{s.eot}_grad")
    guarded("compression", b.compression_cases, s.size, s.jac_steps)
    for batch in s.scale_batches:
        guarded(f"scale_batch{batch}_purify", b.purify_case, f"scale_batch{batch}_purify",
                s.size, batch, s.scale_steps)
        guarded(f"scale_batch{batch}_grad", b.grad_case, f"scale_batch{batch}_grad", s.size,
                batch, s.scale_steps, memory=False)
    for res in s.scale_resolutions:
        size = dataclasses.replace(s.size, resolution=res)
        guarded(f"scale_res{res}_purify", b.purify_case, f"scale_res{res}_purify", size,
                s.purify_batch, s.scale_steps)
        guarded(f"scale_res{res}_grad", b.grad_case, f"scale_res{res}_grad", size,
                s.grad_batch, s.scale_steps, memory=False)
        if res != s.size.resolution:
            p = b.pair(size)
            info[f"unet_flops_per_image_res{res}"] = timing.unet_flops(p.eps_fn, 1, res,
                                                                       size.channels)
    if s.cifar_compression:
        size = dataclasses.replace(s.size, resolution=32)
        guarded("compression_32", b.compression_cases, size, s.cifar_jac_steps, suffix="_32",
                peer_rows=16, repeats=1)
    if b.compiled.errors:
        info["compiled_peer_errors"] = b.compiled.errors
    return b.results, info
