"""The PyTorch peer: the purifier and its gradients written the way PyTorch users do today.

A Python loop over the respaced DDPM steps around diffusers' ``UNet2DModel`` (as DiffPure
and Lee & Kim's code do), ``torch.autograd`` through the whole loop for the full gradient,
optionally with ``torch.utils.checkpoint`` around each step (what those peers do to fit in
memory), a Python loop for EOT, and ``torch.autograd.functional.jacobian`` for the
Jacobian.

The equations, timesteps and clipping are diffjax's (`diffjax.diffusion.purify`,
``method="ddpm"``): forward noise ``x_t = sqrt(abar) x + sqrt(1 - abar) z0``, then for
``tau`` in ``respaced_timesteps(t_star, S)`` descending the ancestral step of Ho et al.
(eqs. 6-7) on the respaced schedule with x0 clipped to [-1, 1]. The noise is NOT drawn
here: `chain_noises` draws it with JAX from the documented keys (forward noise
``normal(fold_in(keys[b], 0))``, step noise ``normal(fold_in(keys[b], tau + 1))``) and the
same tensors are fed to the peer, so both sides agree up to float error.

The compiled peer (`compiled_model`) is the same loop around ``torch.compile`` of the
U-Net (inductor; ``mode="max-autotune"`` where it works), optionally ``channels_last`` and
under ``torch.autocast(bfloat16)`` (`DeviceModel`). diffusers' attention already calls
``F.scaled_dot_product_attention`` (its default ``AttnProcessor2_0``). On a GPU,
``max-autotune`` adds CUDA graphs. The device helpers (``cuda_*``, `exact_fp32`) do
nothing without CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

__all__ = ["chain_noises", "PeerPurifier", "to_nchw", "to_nhwc", "saved_tensor_mb",
           "DeviceModel", "compiled_model", "CompiledPeers", "tf32_flags", "exact_fp32",
           "cuda_sync", "cuda_reset_peak", "cuda_allocated", "cuda_peak_mb", "cuda_empty_cache"]


def chain_noises(keys, shape_hwc, taus) -> np.ndarray:
    """The noise diffjax's ddpm purifier draws, `[S + 1, B, H, W, C]` float32 (NumPy).

    Args:
      keys: `[B]` typed JAX keys (one per example).
      shape_hwc: `(H, W, C)` of one image.
      taus: the visited timesteps, ascending (`respaced_timesteps`).

    Returns:
      Index 0: the forward noise ``normal(fold_in(keys[b], 0))``; index ``k + 1``: the
      noise of the k-th reverse step (timestep ``taus[::-1][k]``),
      ``normal(fold_in(keys[b], tau + 1))``.
    """
    import jax

    def draw(data):
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, data), shape_hwc,
                                                    np.float32))(keys)

    data = [0] + [int(t) + 1 for t in np.asarray(taus)[::-1]]
    return np.stack([np.asarray(draw(d)) for d in data])


def to_nchw(x) -> torch.Tensor:
    """NHWC NumPy/JAX array -> a contiguous NCHW float32 torch tensor (a copy)."""
    return torch.from_numpy(np.array(x, np.float32)).permute(
        0, 3, 1, 2).contiguous()


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    """NCHW torch tensor -> NHWC NumPy array."""
    return x.detach().permute(0, 2, 3, 1).contiguous().numpy()


class PeerPurifier:
    """DDPM purification (t_star, S respaced steps) as a Python loop around a diffusers U-Net.

    Args:
      model: a diffusers ``UNet2DModel`` (eval mode).
      alphas_cumprod: `[T]` float32, the schedule (diffjax's `linear_schedule()`).
      t_star: the purification timestep.
      taus: the visited timesteps, ascending (`respaced_timesteps(t_star, S)`).
      clip_denoised: clip the predicted x0 to [-1, 1] at each step.
    """

    def __init__(self, model, alphas_cumprod, t_star: int, taus, clip_denoised: bool = True):
        self.model = model
        acp = torch.from_numpy(np.array(alphas_cumprod, np.float32))
        self.abar_star = acp[t_star - 1]
        self.taus = [int(t) for t in np.asarray(taus)[::-1]]  # descending, as visited
        abar = acp[torch.as_tensor(np.asarray(taus, np.int64))]
        abar_prev = torch.cat([torch.ones(1), abar[:-1]])
        self.abar = abar.flip(0)
        self.abar_prev = abar_prev.flip(0)
        self.clip = clip_denoised

    def step(self, x, k: int, noise):
        """One ancestral step (Ho et al. 2020, eqs. 6-7) at the k-th visited timestep."""
        tau = self.taus[k]
        a_t, a_prev = self.abar[k], self.abar_prev[k]
        t = torch.full((x.shape[0],), tau, dtype=torch.long)
        eps = self.model(x, t).sample
        x0 = (x - torch.sqrt(1.0 - a_t) * eps) / torch.sqrt(a_t)
        if self.clip:
            x0 = x0.clamp(-1.0, 1.0)
        alpha = a_t / a_prev
        beta = 1.0 - alpha
        mean = (torch.sqrt(a_prev) * beta / (1.0 - a_t)) * x0 + (
            torch.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)) * x
        var = beta * (1.0 - a_prev) / (1.0 - a_t)
        return mean + torch.sqrt(var) * noise

    def __call__(self, x01, noises, *, checkpoint: bool = False):
        """Purifies `[B, C, H, W]` images in [0, 1].

        Args:
          x01: images in [0, 1], NCHW.
          noises: `[S + 1, B, C, H, W]` (`chain_noises`, transposed to NCHW).
          checkpoint: wrap each step in ``torch.utils.checkpoint`` (recompute on backward).

        Returns:
          The purified images, NCHW in [0, 1].
        """
        xm = 2.0 * x01 - 1.0
        x = torch.sqrt(self.abar_star) * xm + torch.sqrt(1.0 - self.abar_star) * noises[0]
        for k in range(len(self.taus)):
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(self.step, x, k, noises[k + 1],
                                                      use_reentrant=False)
            else:
                x = self.step(x, k, noises[k + 1])
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def loss(self, x01, noises, w, labels, *, checkpoint: bool = False):
        """Summed cross-entropy of a linear classifier on the purified images.

        Args:
          x01: `[B, C, H, W]` images in [0, 1].
          noises: as in `__call__`.
          w: `[H * W * C, K]` classifier weights over the NHWC-flattened image.
          labels: `[B]` int64.
          checkpoint: as in `__call__`.
        """
        out = self(x01, noises, checkpoint=checkpoint)
        logits = out.permute(0, 2, 3, 1).reshape(out.shape[0], -1) @ w
        return F.cross_entropy(logits, labels, reduction="sum")

    def grad(self, x01, noises, w, labels, *, checkpoint: bool = False):
        """The full gradient of `loss` w.r.t. the images (backprop through every step)."""
        x = x01.detach().clone().requires_grad_(True)
        loss = self.loss(x, noises, w, labels, checkpoint=checkpoint)
        (g,) = torch.autograd.grad(loss, x)
        return g

    def eot_grad(self, x01, noise_draws, w, labels, *, checkpoint: bool = False):
        """EOT: the mean of the gradients under each draw, a Python loop over the draws.

        Args:
          noise_draws: a sequence of K noise stacks (each as `noises` of `__call__`).
        """
        total = torch.zeros_like(x01)
        for noises in noise_draws:
            total += self.grad(x01, noises, w, labels, checkpoint=checkpoint)
        return total / len(noise_draws)

    def jacobian_rate(self, x01_one, noises_one, *, vectorize: bool = False):
        """``||J||_F / sqrt(d)`` of the purifier at one image, with the full Jacobian.

        Args:
          x01_one: `[C, H, W]` one image in [0, 1].
          noises_one: `[S + 1, 1, C, H, W]` its noise.
          vectorize: ``torch.autograd.functional.jacobian``'s vmap path (False: a Python
            loop of one backward pass per output row, the default).

        Returns:
          (rate, Jacobian `[d_out, d_in]` in NCHW order).
        """
        f = lambda v: self(v[None], noises_one)[0]
        jac = torch.autograd.functional.jacobian(f, x01_one, vectorize=vectorize)
        d = x01_one.numel()
        jac = jac.reshape(d, d)
        return float(torch.linalg.matrix_norm(jac) / np.sqrt(d)), jac


def saved_tensor_mb(fn, exclude=()) -> float:
    """MB of the distinct tensors autograd saves for the backward pass while `fn()` runs.

    The activation memory a backward pass needs (what grows with the number of steps
    without checkpointing); storages are counted once (by data pointer), and those of the
    tensors in `exclude` (the model's parameters, which exist anyway) not at all.
    """
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            if key in skip:
                return t
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


# ------------------------------------------------------------------ device, compiled peer


class DeviceModel:
    """The diffusers U-Net as `PeerPurifier` calls it, on the images' device.

    The timesteps are made on the images' device (`PeerPurifier.step` passes a CPU
    ``torch.full``; a fill kernel on the device, not ``t.to(device)``: a blocking
    host-to-device copy at every step would make the host wait for the GPU, which PyTorch
    users do not pay); optionally under ``torch.autocast(bfloat16)`` and with the input in
    ``channels_last``; eps is returned in float32.

    Args:
      model: a ``UNet2DModel`` or a ``torch.compile`` of one.
      bf16: ``torch.autocast(dtype=torch.bfloat16)`` around the call.
      channels_last: feed the input in ``torch.channels_last`` (the model's weights should
        be converted too: `compiled_model` does).
    """

    def __init__(self, model, bf16: bool = False, channels_last: bool = False):
        self.model, self.bf16, self.channels_last = model, bf16, channels_last

    def __call__(self, x, t):
        if t.device != x.device:
            t = torch.full(t.shape, int(t.reshape(-1)[0]), dtype=t.dtype, device=x.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                            enabled=self.bf16):
            eps = self.model(x, t).sample
        return types.SimpleNamespace(sample=eps.float().contiguous())

    def parameters(self):
        return self.model.parameters()


def compiled_model(model, *, mode: str | None = "max-autotune", backend: str = "inductor",
                   channels_last: bool = False, bf16: bool = False, example=None,
                   grad: bool = False, per_block: bool = False):
    """``torch.compile`` of a copy of `model`, compiled on `example` before returning.

    Args:
      model: a diffusers ``UNet2DModel`` (left unchanged: a deep copy is compiled).
      mode: ``torch.compile``'s mode (None: the default; "max-autotune": autotuned GEMM /
        convolution templates, plus CUDA graphs on a GPU).
      backend: ``"inductor"`` (generated C++ / Triton); ``"eager"`` / ``"aot_eager"``
        capture the graph (and AOTAutograd) without code generation: the tests' quick path.
      channels_last: convert the weights and the inputs to ``torch.channels_last``.
      bf16: autocast to bfloat16.
      example: ``(x, t)`` to compile on (one call, or one forward and backward with
        `grad`); None compiles lazily.
      grad: also compile the backward pass on `example`.
      per_block: compile each of the U-Net's down blocks, its mid block and its up blocks
        as its own graph (the glue between them runs eager) instead of the whole U-Net as
        one. torch 2.13.0's inductor computes the whole 32x32 CIFAR-10 U-Net's input
        gradient wrong, but every block's right (`compiled_grad_check`).

    Returns:
      ``(DeviceModel, compile_s)``: the callable for `PeerPurifier` and the seconds the
      compile on `example` took.
    """
    m = copy.deepcopy(model)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    if per_block:
        for blk in (*m.down_blocks, m.mid_block, *m.up_blocks):
            blk.compile(mode=mode, backend=backend, dynamic=False)
        cm = m
    else:
        cm = torch.compile(m, mode=mode, backend=backend, dynamic=False)
    dev = DeviceModel(cm, bf16=bf16, channels_last=channels_last)
    t0 = time.perf_counter()
    if example is not None:
        x, t = example
        with torch.inference_mode():
            dev(x, t)
        if grad:
            xg = x.detach().clone().requires_grad_(True)
            torch.autograd.grad(dev(xg, t).sample.sum(), xg)
        cuda_sync()
    return dev, time.perf_counter() - t0


class CompiledPeers:
    """Compiled copies of U-Nets (`compiled_model`), one per (model, bf16), and their timing.

    A copy is compiled lazily, on its first call for each input shape. If the first call
    fails in `mode` (e.g. "max-autotune" or its CUDA graphs), the default mode is tried
    and the failure is kept in `errors` (reported, never hidden). If the whole U-Net's
    compile computes something else (`measure`'s `rtol`), the U-Net is compiled block by
    block (`compiled_model(per_block=True)`) and that copy is checked and timed instead.

    Args:
      mode, backend, channels_last: as in `compiled_model`.
    """

    def __init__(self, *, mode: str | None = "max-autotune", backend: str = "inductor",
                 channels_last: bool = False):
        self.mode, self.backend, self.channels_last = mode, backend, channels_last
        self._models: dict = {}
        self.errors: list[dict] = []

    def get(self, model, bf16: bool, mode="unset", per_block: bool = False):
        """``(DeviceModel, mode)`` of `model`'s compiled copy (built once)."""
        key = (id(model), bf16, per_block)
        if key not in self._models or mode != "unset":
            mode = self.mode if mode == "unset" else mode
            dev, _ = compiled_model(model, mode=mode, backend=self.backend,
                                    channels_last=self.channels_last, bf16=bf16,
                                    per_block=per_block)
            self._models[key] = (dev, mode)
        return self._models[key]

    def measure(self, model, bf16: bool, run, reference, batch: int, *, repeats: int,
                warmup: int, rtol: float | None = None) -> dict:
        """Times ``run(compiled model)`` after checking its output against `reference`
        (`prepare`, then `timing.median_time`; `fields` gives the result).

        Args:
          model: the eager ``UNet2DModel``.
          bf16: autocast to bfloat16.
          run: ``run(model_like) -> tensor`` (a purification or a gradient through the
            peer's loop around the given U-Net).
          reference: NHWC NumPy output the first call is compared with.
          batch: images per call.
          repeats, warmup: as in `timing.median_time` (after the first, compiling call).
          rtol: the largest ``max|out - reference| / max|reference|`` that counts as the
            same computation (None: no judgement). A compiled peer that computes something
            else is still timed, but ``peer_compiled_agrees`` is False and no ratio is
            taken from it (`cases.Bench.record`).

        Returns:
          ``peer_compiled_s`` / ``_images_per_s`` (per image), ``_first_call_s`` (compile
          and one run), ``_max_abs_diff`` (to `reference`), ``_rel_diff`` (that over
          ``max|reference|``), ``_agrees`` (with `rtol`), ``_mode`` (", per block" when
          the whole graph disagreed and the per-block copy was timed; then also
          ``_whole_max_abs_diff`` / ``_whole_rel_diff``, the whole graph's); or
          ``peer_compiled_error`` when no mode worked.
        """
        from experiments.bench import timing

        call, fields = self.prepare(model, bf16, run, reference, rtol=rtol)
        if call is None:
            return fields
        tc, _ = timing.median_time(call, repeats=repeats, warmup=warmup, sync=lambda out: out)
        return self.fields(fields, tc, batch)

    @staticmethod
    def fields(prepared: dict, seconds: float, batch: int) -> dict:
        """`prepare`'s fields with the compiled peer's measured `seconds` per call."""
        return {"peer_compiled_s": seconds / batch, "peer_compiled_images_per_s":
                batch / seconds, **prepared}

    def prepare(self, model, bf16: bool, run, reference, *, rtol: float | None = None):
        """Compiles `model`, checks ``run(compiled)`` against `reference` (as `measure`).

        Returns ``(call, fields)``: `call()` runs the compiled peer once and waits for it
        (None when no mode compiled; then `fields` holds ``peer_compiled_error``), and
        every field of `measure`'s result but the times (`fields` adds those). So a caller
        can time the compiled peer in alternation with other programs
        (`timing.interleaved_medians`)."""
        scale = max(float(np.abs(reference).max()), 1e-30)

        def first_call(dev):  # (seconds of the first, compiling call; its max abs diff)
            t0 = time.perf_counter()
            out = run(dev)
            cuda_sync()
            first = time.perf_counter() - t0
            return first, float(np.abs(to_nhwc(out.float().cpu()) - reference).max())

        dev, mode = self.get(model, bf16)
        for attempt in range(2):
            try:
                first, diff = first_call(dev)
                break
            except Exception as e:  # noqa: BLE001 - recorded; the default mode is tried next
                err = f"{type(e).__name__}: {e}"[:1000]
                self.errors.append({"mode": mode, "bf16": bf16, "error": err})
                if attempt or mode is None:
                    return None, {"peer_compiled_error": err}
                dev, mode = self.get(model, bf16, mode=None)
        rel, how, whole = diff / scale, "", {}
        if rtol is not None and rel > rtol:  # wrong as one graph: try block by block
            whole = {"peer_compiled_whole_max_abs_diff": diff,
                     "peer_compiled_whole_rel_diff": rel}
            self.errors.append({"mode": mode, "bf16": bf16, "error": (
                f"the whole U-Net's compile disagrees (max abs diff {diff:.3g}, {rel:.3g} "
                "of the output's max); compiled per block instead")})
            try:
                dev_b, _ = self.get(model, bf16, mode=mode, per_block=True)
                first_b, diff_b = first_call(dev_b)
            except Exception as e:  # noqa: BLE001 - recorded; the whole graph is reported
                self.errors.append({"mode": mode, "bf16": bf16, "per_block": True,
                                    "error": f"{type(e).__name__}: {e}"[:1000]})
            else:
                dev, first, diff, how = dev_b, first_b, diff_b, ", per block"
                rel = diff / scale
        agrees = {} if rtol is None else {"peer_compiled_agrees": bool(rel <= rtol)}

        def call():
            out = run(dev)
            cuda_sync()
            return out

        return call, {
            "peer_compiled_first_call_s": first, "peer_compiled_max_abs_diff": diff,
            "peer_compiled_rel_diff": rel, **agrees, **whole,
            "peer_compiled_mode": f"torch.compile(mode={mode!r}, backend={self.backend!r})"
                                  f", channels_last={self.channels_last}{how}"}


def _tf32_knobs() -> list:
    """Torch's TF32 switches as (name, object, attribute, exact-fp32 value): the
    ``fp32_precision`` API where present (torch >= 2.9 refuses a mix of it and the legacy
    ``allow_tf32``), else ``allow_tf32``."""
    b = torch.backends
    conv = getattr(b.cudnn, "conv", None)
    if hasattr(b.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return [("cuda.matmul.fp32_precision", b.cuda.matmul, "fp32_precision", "ieee"),
                ("cudnn.conv.fp32_precision", conv, "fp32_precision", "ieee")]
    return [("cuda.matmul.allow_tf32", b.cuda.matmul, "allow_tf32", False),
            ("cudnn.allow_tf32", b.cudnn, "allow_tf32", False)]


def tf32_flags() -> dict:
    """The current TF32 settings of torch (matmul, cuDNN conv), for the record."""
    return {name: getattr(o, a) for name, o, a, _ in _tf32_knobs()}


@contextlib.contextmanager
def exact_fp32():
    """TF32 off in torch (matmuls and cuDNN convolutions) inside the block."""
    knobs = _tf32_knobs()
    old = [getattr(o, a) for _, o, a, _ in knobs]
    for _, o, a, v in knobs:
        setattr(o, a, v)
    try:
        yield
    finally:
        for (_, o, a, _), v in zip(knobs, old, strict=True):
            setattr(o, a, v)


def _cuda() -> bool:
    return torch.cuda.is_available()


def cuda_sync(_=None):
    """``torch.cuda.synchronize()`` where CUDA is (a `timing.median_time` ``sync``)."""
    if _cuda():
        torch.cuda.synchronize()


def cuda_reset_peak() -> None:
    """Resets torch's CUDA peak-memory counter (no-op without CUDA)."""
    if _cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_allocated() -> int:
    """Bytes torch has allocated on the GPU now (0 without CUDA)."""
    return torch.cuda.memory_allocated() if _cuda() else 0


def cuda_peak_mb(base: int) -> float | None:
    """MB of torch's CUDA peak above `base` bytes (None without CUDA)."""
    return (torch.cuda.max_memory_allocated() - base) / 2**20 if _cuda() else None


def cuda_empty_cache() -> None:
    """Returns torch's cached CUDA blocks (no-op without CUDA)."""
    if _cuda():
        torch.cuda.empty_cache()
