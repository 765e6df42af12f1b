"""The one purifier constructor: `make_purifier` -> `purify_fn(x, keys)` for a `Defense`.

`diffjax.diffusion.purify` purifies once; a defended model needs the purifier as a value
that attacks differentiate through and that every part of an evaluation shares. The
`jax.tree_util.Partial` returned here holds, as pytree leaves (traced under `jit`, never
baked into a program), the eps-model's weights (when `eps_fn` is a `Partial` holding them,
as `diffjax.pretrained` models are) and the chain's coefficients
(`diffjax.diffusion.make_chain`: the method, `t_star` and the schedule as arrays). Only
the shapes, the number of steps, `remat` and `resolution` are static, so purifiers that
differ in method, `t_star`, weights or `clip_gradient` (a bool leaf choosing the clips'
derivative) share one compiled attack.

`resolution`: a purifier trained at another image size (the paper's ImageNet setting:
224x224 classifier crops, the 256x256 guided diffusion). The input is resized (bilinear)
to `resolution`, purified, and resized back, inside the purifier, so an attack sees (and
differentiates through) the whole chain, as DiffPure does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from diffjax import _checks
from diffjax.diffusion import samplers

__all__ = ["ChainPurifier", "make_purifier"]


@dataclasses.dataclass(frozen=True)
class ChainPurifier:
    """The static part of a diffusion purifier (hashable: `jit` caches by value).

    Attributes:
      remat: what a gradient keeps of each reverse step, one of
        `diffjax.diffusion.REMAT_MODES` ("steps": memory flat in the step count).
      resolution: purify at this size (resize in and out), or None.

    Called as `(eps_fn, chain, straight, x, keys)`: `straight` is the bool leaf choosing
    how gradients pass the clips (True: straight-through; False: hard).
    """

    remat: str = "steps"
    resolution: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "remat", samplers.remat_mode(self.remat))

    def __call__(self, eps_fn, chain, straight, x, keys):
        if self.resolution and self.resolution != x.shape[1]:
            b, h, w, c = x.shape
            size = int(self.resolution)
            up = jnp.clip(jax.image.resize(x, (b, size, size, c), "bilinear"), 0.0, 1.0)
            out = samplers.run_chain(eps_fn, up, keys, chain, remat=self.remat,
                                     straight=straight)
            return jnp.clip(jax.image.resize(out, (b, h, w, c), "bilinear"), 0.0, 1.0)
        return samplers.run_chain(eps_fn, x, keys, chain, remat=self.remat,
                                  straight=straight)


def make_purifier(
    eps_fn: Callable,
    *,
    schedule,
    t_star: int,
    method: str = "ddpm",
    num_steps: int | None = None,
    remat: bool | str = True,
    clip_denoised: bool = True,
    length: int | None = None,
    resolution: int | None = None,
    clip_gradient: str = "hard",
) -> Partial:
    """A diffusion purifier `purify_fn(x, keys) -> x'` (DiffPure; the paper, Section 3).

    Args:
      eps_fn: `(x_t [B,H,W,C] in [-1, 1], t int32 [B]) -> eps`; a `Partial` holding weights,
        or a plain function (then its closed-over weights are constants under jit).
      schedule: the diffusion schedule (`diffjax.diffusion.linear_schedule()`).
      t_star: the purification timestep k in [1, T] (the paper's t* = 0.1 T).
      method: one of `diffjax.diffusion.METHODS` ("ddpm", "reverse_only", "ddim",
        "reverse_only_ddim", "sde").
      num_steps: reverse steps over [0, t_star) (respaced); None means `t_star` steps.
      remat: what a gradient keeps of each reverse step: True ("steps"), "save_conv" or
        False ("none") (`diffjax.diffusion.purify`).
      clip_denoised: clip the predicted x0 to [-1, 1] at every discrete step.
      length: pad the chain with identity steps to this many steps (`make_chain`), so
        that purifiers with fewer steps share the compiled program of the longest.
      resolution: purify at this square size (module docstring); None: the input's.
      clip_gradient: "hard" or "straight_through" (`diffjax.diffusion.purify`).

    Returns:
      A `Partial` `purify_fn(x [B,H,W,C] in [0, 1], keys [B]) -> [B,H,W,C] in [0, 1]`, all
      its randomness from the per-example keys.
    """
    _checks.check_choice(clip_gradient, "clip_gradient", samplers.CLIP_GRADIENTS)
    if resolution is not None:
        resolution = _checks.check_int(resolution, "resolution", lo=1)
    chain = samplers.make_chain(schedule, t_star=t_star, method=method, num_steps=num_steps,
                                clip_denoised=clip_denoised, length=length)
    if not isinstance(eps_fn, Partial):
        if not callable(eps_fn):
            _checks.fail("eps_fn", "a callable eps_fn(x_t, t)", type(eps_fn).__name__)
        eps_fn = Partial(eps_fn)
    straight = jnp.asarray(clip_gradient == "straight_through")
    return Partial(ChainPurifier(remat, resolution), eps_fn, chain, straight)
