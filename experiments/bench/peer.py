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
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

__all__ = ["chain_noises", "PeerPurifier", "to_nchw", "to_nhwc", "saved_tensor_mb"]


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
