"""Square Attack (Andriushchenko et al., ECCV 2020): the gradient-free masking check.

A gradient-based attack that fails because the gradient is masked (a saturating clip, a
shattered or stochastic gradient: Athalye et al. 2018) says nothing about robustness; a
random search that only queries the model's outputs does not use the gradient at all, so
when it beats the gradient attacks the gradient is masked (AutoAttack's rationale for
including it). This is our JAX version of the reference implementation
(`fra31/auto-attack`, `autoattack/square.py`, `attack_single_run`, as torchattacks 3.5.1
copies it), l_inf and l_2, on the engine (`diffjax.attacks.engine`), one restart per
config:

- the objective: the margin `z_y - max_{j != y} z_j` (the default) or `-CE`, to be
  *minimised*; an example is fooled when the prediction is not `y`.
- l_inf start: vertical stripes `x + eps * s`, one random sign per column and channel,
  clipped to [0, 1]. l_2 start: a grid of `eta` blocks of side `h // 5` with random signs
  per block and channel, scaled to l_2 norm eps, clipped.
- query i (i = 0 .. steps - 1): the square side from the reference's p-schedule
  (`p_selection`: `p_init` halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of
  10,000, the iteration rescaled to `steps`; side `round(sqrt(p * h * w))`, at least 1,
  l_2: at least 3 and odd). l_inf: the square of the current best point is set to
  `x -+ eps` with one random sign per channel; l_2: mass is moved from a second random
  window into the square (the reference's `eta` "ring" pattern), the total l_2 norm kept
  at eps. The candidate is accepted when it lowers the objective, or misclassifies.
- a fooled example keeps its fooling point (no further queries change it), as in the
  reference (which stops querying it).

Randomness: every draw of example k comes from its key: the start from
``protocols.start_keys(k)`` (``fold_in(., restart)`` for restart > 0), the square of query i
from ``fold_in(start, i)``; each example draws its own square (the reference draws one
position for the whole batch), so a result does not depend on the other rows. Positions
are uniform over all ``h - s + 1`` placements (the reference's `random_int(0, h - s)`
never draws the last one, so its late 1x1 squares never touch the last row and column).

The purifier randomness of query i is `protocol.attack_keys(k, i)` (i = 0: the start):
under `Fixed`/`Transfer` the example's realization, one forward pass per query, and the
stored objective of the best point is exact. Under `Independent(eot=K)` the objective is
the mean over K fresh draws, and a noisy minimum kept from an earlier query would be
biased low (the search would stall on a lucky draw), so the best point and the candidate
are compared on the SAME K draws (2K forward passes per query); "fooled" is then not
final, the search never stops, and `success` is the prediction under draw 0 of the last
query. Random search against a randomized model is known to be weak; this implementation
does not hide it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks, protocols
from diffjax.attacks import engine, gradients
from diffjax.attacks.engine import AttackResult, bcast

__all__ = ["SquareConfig", "square_attack", "p_selection", "square_sizes", "eta",
           "SQUARE_LOSSES"]

SQUARE_LOSSES = ("margin", "ce")
NORMS = ("linf", "l2")


@dataclasses.dataclass(frozen=True)
class SquareConfig:
    """A Square Attack (static structure; `eps` is traced at run time).

    Attributes:
      norm: "linf" or "l2".
      eps: the radius of the eps-ball (l_inf: in [0, 1]).
      steps: the query budget after the initial query (the reference's `n_queries`;
        AutoAttack: 5,000).
      p_init: the initial fraction of pixels in a square (AutoAttack: 0.8).
      loss: "margin" (the reference's default) or "ce" (minimises -CE).
      rescale_schedule: rescale the p-schedule (defined on 10,000 queries) to `steps`.
      restart: which random start (0, 1, ...): restart r > 0 folds r into the start key.
      return_trajectory: also return the best objective after each query `[steps, B]`
        and the purifier keys of each query `[steps, K, B, ...]`.
    """

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 5000
    p_init: float = 0.8
    loss: str = "margin"
    rescale_schedule: bool = True
    restart: int = 0
    return_trajectory: bool = False

    def __post_init__(self):
        _checks.check_choice(self.norm, "norm", NORMS)
        _checks.check_number(self.eps, "eps", lo=0.0, hi=1.0 if self.norm == "linf" else None,
                             hint="l_inf budgets are fractions of the [0, 1] pixel range")
        _checks.check_int(self.steps, "steps", lo=1)
        _checks.check_number(self.p_init, "p_init", lo=0.0, hi=1.0, lo_open=True)
        _checks.check_choice(self.loss, "loss", SQUARE_LOSSES)
        _checks.check_int(self.restart, "restart", lo=0)

    # -- helpers ---------------------------------------------------------------------

    def _base_keys(self, ctx):
        keys = protocols.start_keys(ctx.example_keys)
        if self.restart:
            keys = jax.vmap(lambda k: jax.random.fold_in(k, self.restart))(keys)
        return keys

    def _objective(self, logits, y):
        """`(margin, loss)` per example to minimise (`[..., B]`), from logits `[..., B, C]`."""
        flat = logits.reshape(-1, logits.shape[-1])
        yy = jnp.broadcast_to(y, logits.shape[:-1]).reshape(-1)
        margin = -gradients.attack_loss(flat, yy, "margin")
        loss = margin if self.loss == "margin" else -gradients.attack_loss(flat, yy, "ce")
        return margin.reshape(logits.shape[:-1]), loss.reshape(logits.shape[:-1])

    def _query(self, ctx, protocol, xq, y, it):
        """The mean objective over the K draws of query `it`, and draw 0's prediction."""
        keys = protocol.attack_keys(ctx.example_keys, it)
        if keys.shape[0] == 1:
            logits = ctx.defense.logits(xq, keys[0])[None]
        else:
            logits = jax.vmap(lambda k: ctx.defense.logits(xq, k))(keys)
        margin, loss = self._objective(logits, y)
        wrong = jnp.argmax(logits[0], axis=-1) != y
        return jnp.mean(margin, 0), jnp.mean(loss, 0), wrong, keys

    # -- the engine's interface (diffjax.attacks.engine) ----------------------------

    @property
    def total_iterations(self) -> int:
        return self.steps

    def iterations(self, ctx):
        del ctx  # the p-schedule is static: the query budget is part of the program
        return jnp.int32(self.steps)

    def init(self, ctx, protocol, x, y):
        h, w, _ = x.shape[1:]
        if self.norm == "l2" and min(h, w) < 5:
            _checks.fail("x", "images of at least 5x5 pixels for the l_2 Square Attack "
                         "(its start tiles blocks of side h // 5)", f"shape {tuple(x.shape)}")
        keys = self._base_keys(ctx)
        start = jax.vmap(_linf_start if self.norm == "linf" else _l2_start)(keys, x, ctx.eps)
        margin, loss, wrong, _ = self._query(ctx, protocol, start, y, jnp.uint32(0))
        final = protocol.attack_stream == "realization"
        return {"x": start, "margin": margin, "loss": loss, "wrong": wrong,
                "fooled": wrong if final else jnp.zeros_like(wrong)}

    def step(self, ctx, protocol, x, y, state, i):
        h, w, c = x.shape[1:]
        sizes = _sizes(self.steps, (h, w, c), self.norm, self.p_init, self.rescale_schedule)
        ii = jnp.minimum(i.astype(jnp.int32), self.steps - 1)
        s = jnp.asarray(sizes)[ii]
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(self._base_keys(ctx))
        if self.norm == "linf":
            cand = jax.vmap(lambda k, xi, bi, e: _linf_candidate(k, xi, bi, e, s))(
                step_keys, x, state["x"], ctx.eps)
        else:
            table, index = _eta_table(sizes)
            pattern = jnp.asarray(table)[jnp.asarray(index)[ii]]
            cand = jax.vmap(lambda k, xi, bi, e: _l2_candidate(k, xi, bi, e, s, pattern))(
                step_keys, x, state["x"], ctx.eps)

        if protocol.attack_stream == "realization":
            margin, loss, wrong, keys = self._query(ctx, protocol, cand, y, i + 1)
            active = ~state["fooled"]
            improved = loss < state["loss"]
            accept = active & (improved | wrong)
            new = {"x": jnp.where(bcast(accept, x), cand, state["x"]),
                   "margin": jnp.where(accept, margin, state["margin"]),
                   "loss": jnp.where(active & improved, loss, state["loss"]),
                   "fooled": state["fooled"] | (active & wrong)}
            new["wrong"] = new["fooled"]
        else:  # fresh draws: best and candidate on the same K draws (module docstring)
            b = x.shape[0]
            both = jnp.concatenate([state["x"], cand])
            keys = protocol.attack_keys(ctx.example_keys, i + 1)
            two = jnp.concatenate([keys, keys], axis=1)
            if two.shape[0] == 1:
                logits = ctx.defense.logits(both, two[0])[None]
            else:
                logits = jax.vmap(lambda k: ctx.defense.logits(both, k))(two)
            margins, losses = self._objective(logits, jnp.concatenate([y, y]))
            margins, losses = jnp.mean(margins, 0), jnp.mean(losses, 0)
            wrongs = jnp.argmax(logits[0], axis=-1) != jnp.concatenate([y, y])
            accept = losses[b:] < losses[:b]
            pick = lambda v: jnp.where(accept, v[b:], v[:b])
            new = {"x": jnp.where(bcast(accept, x), cand, state["x"]),
                   "margin": pick(margins), "loss": pick(losses), "wrong": pick(wrongs),
                   "fooled": state["fooled"]}
        record = (new["loss"], jax.random.key_data(keys)) if self.return_trajectory else None
        return new, record

    def finish(self, ctx, protocol, x, y, state, records):
        del ctx, y
        success = (state["fooled"] if protocol.attack_stream == "realization"
                   else state["wrong"])
        loss_traj, key_traj = records if records is not None else (None, None)
        return engine.result_of(x, state["x"], success, loss_traj, key_traj)

    def fooled(self, state):
        return state["fooled"]


# ---------------------------------------------------------------------- the schedule


def p_selection(it: int, steps: int, p_init: float = 0.8, rescale: bool = True) -> float:
    """The reference's fraction of pixels in the square at query `it` (0-based)."""
    if rescale:
        it = int(it / steps * 10000)
    for bound, div in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32),
                       (500, 16), (200, 8), (50, 4), (10, 2)):
        if it > bound:
            return p_init / div
    return p_init


@functools.lru_cache(maxsize=64)
def _sizes(steps, shape, norm, p_init, rescale):
    return square_sizes(steps, shape, norm, p_init, rescale)


def square_sizes(steps: int, shape, norm: str, p_init: float = 0.8,
                 rescale: bool = True) -> np.ndarray:
    """The square side of every query `[steps]` int32 (static: from the shape and budget).

    l_inf: `max(round(sqrt(p * h * w)), 1)`; l_2: at least 3 and odd (the reference);
    both at most `min(h, w)`.
    """
    h, w, c = (int(v) for v in shape)
    n_features = h * w * c
    out = np.empty(steps, np.int32)
    for i in range(steps):
        s = int(round(math.sqrt(p_selection(i, steps, p_init, rescale) * n_features / c)))
        if norm == "linf":
            s = max(s, 1)
        else:
            s = max(s, 3)
            s += 1 - s % 2
        out[i] = min(s, h, w)
    return out


# ---------------------------------------------------------------------- the l_2 pattern


def _eta_rectangles(x: int, y: int) -> np.ndarray:
    delta = np.zeros((x, y))
    x_c, y_c = x // 2 + 1, y // 2 + 1
    c0, c1 = x_c - 1, y_c - 1
    for counter in range(max(x_c, y_c)):
        delta[max(c0, 0):min(c0 + 2 * counter + 1, x),
              max(0, c1):min(c1 + 2 * counter + 1, y)] += 1.0 / (counter + 1) ** 2
        c0 -= 1
        c1 -= 1
    norm = np.sqrt((delta ** 2).sum())
    return delta / norm if norm > 0 else delta


def eta(s: int) -> np.ndarray:
    """The reference's `[s, s]` l_2 block: nested rings, +top half, -bottom half, unit norm
    (float64; the attack transposes it at random)."""
    delta = np.zeros((s, s))
    delta[: s // 2] = _eta_rectangles(s // 2, s)
    delta[s // 2:] = -_eta_rectangles(s - s // 2, s)
    return delta / np.sqrt((delta ** 2).sum())


def _eta_table(sizes: np.ndarray):
    """`(patterns [P, smax, smax] float32, index [steps])`: each query's `eta(s)`, padded."""
    distinct = sorted(set(int(s) for s in sizes))
    smax = max(distinct)
    table = np.zeros((len(distinct), smax, smax), np.float32)
    for j, s in enumerate(distinct):
        table[j, :s, :s] = eta(s)
    index = np.searchsorted(np.asarray(distinct), sizes).astype(np.int32)
    return table, index


# ---------------------------------------------------------------------- per example


def _window(h: int, w: int, vh, vw, s):
    """`[H, W]` bool: the square of side `s` (traced) at `(vh, vw)`."""
    r = jnp.arange(h)[:, None]
    c = jnp.arange(w)[None, :]
    return (r >= vh) & (r < vh + s) & (c >= vw) & (c < vw + s)


def _place(pattern, h: int, w: int, vh, vw, s):
    """`[H, W]`: `pattern[:s, :s]` (padded `[smax, smax]`) placed at `(vh, vw)`, 0 elsewhere."""
    smax = pattern.shape[0]
    r = jnp.clip(jnp.arange(h) - vh, 0, smax - 1)
    c = jnp.clip(jnp.arange(w) - vw, 0, smax - 1)
    return jnp.where(_window(h, w, vh, vw, s), pattern[r[:, None], c[None, :]], 0.0)


def _signs(key, shape):
    return jax.random.rademacher(key, shape, jnp.float32)


def _linf_start(key, xi, e):
    """Vertical stripes: `x + eps * sign`, one sign per column and channel, in [0, 1]."""
    _, w, c = xi.shape
    return jnp.clip(xi + e * _signs(key, (1, w, c)), 0.0, 1.0)


def linf_draws(key, s, h: int, w: int, c: int):
    """The draws of one l_inf query: `(vh, vw, sign [C])` (the square's corner and signs)."""
    kh, kw, ks = jax.random.split(key, 3)
    vh = jax.random.randint(kh, (), 0, h - s + 1)
    vw = jax.random.randint(kw, (), 0, w - s + 1)
    return vh, vw, _signs(ks, (c,))


def _linf_candidate(key, xi, bi, e, s):
    h, w, c = xi.shape
    vh, vw, sign = linf_draws(key, s, h, w, c)
    m = _window(h, w, vh, vw, s)[:, :, None]
    new = bi + jnp.where(m, 2.0 * e * sign, 0.0)
    # The reference's order: into the ball with min/max, then into [0, 1].
    return jnp.clip(jnp.minimum(jnp.maximum(new, xi - e), xi + e), 0.0, 1.0)


def _l2_normalize(d):
    return d / (jnp.sqrt(jnp.sum(d * d)) + 1e-12)


def _l2_grid(h: int, w: int):
    """The start's blocks: side `h // 5` from `(h - 5 s) // 2`, those that fit: `(s, [(r, c)])`."""
    s = h // 5
    sp = (h - s * 5) // 2
    corners = [(sp + a * s, sp + b * s) for a in range(h // s) for b in range(w // s)
               if sp + a * s + s <= h and sp + b * s + s <= w]
    return s, corners


def _l2_start(key, xi, e):
    h, w, c = xi.shape
    s, corners = _l2_grid(h, w)
    base = np.zeros((len(corners), 2, h, w), np.float32)
    pat = eta(s)
    for q, (r0, c0) in enumerate(corners):
        base[q, 0, r0:r0 + s, c0:c0 + s] = pat
        base[q, 1, r0:r0 + s, c0:c0 + s] = pat.T
    kt, ks = jax.random.split(key)
    transpose = jax.random.bernoulli(kt, 0.5, (len(corners),)).astype(jnp.int32)
    blocks = jnp.asarray(base)[jnp.arange(len(corners)), transpose]  # [Q, H, W]
    delta = jnp.einsum("qhw,qc->hwc", blocks, _signs(ks, (len(corners), c)))
    return jnp.clip(xi + _l2_normalize(delta) * e, 0.0, 1.0)


def l2_draws(key, s, h: int, w: int, c: int):
    """The draws of one l_2 query: `(vh, vw, vh2, vw2, sign [C], transpose)`."""
    k = jax.random.split(key, 6)
    vh = jax.random.randint(k[0], (), 0, h - s + 1)
    vw = jax.random.randint(k[1], (), 0, w - s + 1)
    vh2 = jax.random.randint(k[2], (), 0, h - s + 1)
    vw2 = jax.random.randint(k[3], (), 0, w - s + 1)
    return vh, vw, vh2, vw2, _signs(k[4], (c,)), jax.random.bernoulli(k[5], 0.5)


def _l2_candidate(key, xi, bi, e, s, pattern):
    h, w, c = xi.shape
    vh, vw, vh2, vw2, sign, transpose = l2_draws(key, s, h, w, c)
    pattern = jnp.where(transpose, pattern.T, pattern)
    delta = bi - xi
    m1 = _window(h, w, vh, vw, s)[:, :, None]
    m2 = _window(h, w, vh2, vw2, s)[:, :, None]
    norm_window_1 = jnp.sqrt(jnp.sum(jnp.where(m1, delta, 0.0) ** 2, axis=(0, 1)))  # [C]
    norm_image = jnp.sqrt(jnp.sum(delta * delta))
    norm_windows = jnp.sqrt(jnp.sum(jnp.where(m1 | m2, delta, 0.0) ** 2))
    new = _place(pattern, h, w, vh, vw, s)[:, :, None] * sign
    new = new + jnp.where(m1, delta, 0.0) / (1e-12 + norm_window_1)
    new_norm = jnp.sqrt(jnp.sum(new * new, axis=(0, 1)))  # [C], zero outside the window
    scale = jnp.sqrt(jnp.maximum(e * e - norm_image ** 2, 0.0) / c + norm_windows ** 2)
    new = new / (1e-12 + new_norm) * scale
    delta = jnp.where(m2, 0.0, delta)
    delta = jnp.where(m1, new, delta)
    return jnp.clip(xi + _l2_normalize(delta) * e, 0.0, 1.0)


def square_attack(defense, x, y, example_keys, *, config: SquareConfig, protocol="fixed",
                  eps=None) -> AttackResult:
    """Runs the Square Attack (one restart) against `defense` under a randomness protocol.

    Args:
      defense: a `diffjax.defense.Defense` (only its outputs are used: no gradient).
      x: `[B,H,W,C]` float32 clean images in [0, 1] (l_2: H, W >= 5).
      y: `[B]` int32 labels.
      example_keys: `[B]` typed per-example keys.
      config: a `SquareConfig`.
      protocol: a `diffjax.protocols.Protocol` or its name (module docstring).
      eps: overrides `config.eps`: a number or one budget per example `[B]` (traced).

    Returns:
      An `AttackResult`; under a protocol that attacks the realization, `success` is True
      where the returned point is misclassified under the realization.
    """
    if not isinstance(config, SquareConfig):
        _checks.fail("config", "a SquareConfig", type(config).__name__)
    return engine.run(config, defense, x, y, example_keys, protocol, eps=eps)
