r"""GroupNorm's formulation before and after, on one U-Net input-gradient, in one process.

    python -m experiments.bench.group_norm_ab [--size=quarter|tiny] [--batch=8] \
        [--repeats=21] [--out=FILE.json]

`diffjax.layers.group_norm` normalises as ``x * m_c + a_c`` with per-example, per-channel
factors. Before, it computed ``(x - mean_c) * m_c + bias`` (`group_norm_before`, kept here
as the reference). The same function, the two ways: XLA:CPU saved ``x - mean_c`` as a
full-size tensor for the backward pass and recomputed the group-to-channel repeat of the
mean inside each elementwise loop. Timing two programs in separate runs on a shared
2-core machine moves by 10-20% between runs, more than this change; so both programs are
compiled in one process and called in alternation (``repeats`` rounds,
`timing.interleaved_medians`), and the
medians are compared. The same for the U-Net call alone (the forward pass purification
runs). Also reports the largest difference between the two gradients.
"""

from __future__ import annotations

import functools

from absl import app


def group_norm_before(x, scale, bias, num_groups: int, epsilon: float):
    """`layers.group_norm` up to 2026-12-01: ``(x - mean_c) * m_c + bias``, on the same
    statistics (`layers.group_stats`)."""
    import jax.numpy as jnp

    from diffjax.models import layers

    b, c, g = x.shape[0], x.shape[-1], num_groups
    xf, mean, inv = layers.group_stats(x, g, epsilon)
    shape = (b,) + (1,) * (x.ndim - 2) + (c,)
    mean_c = jnp.repeat(mean, c // g, axis=1).reshape(shape)
    mul_c = (jnp.repeat(inv, c // g, axis=1) * scale).reshape(shape)
    y = (xf - mean_c) * mul_c + bias
    return y.astype(jnp.result_type(x.dtype, scale.dtype, bias.dtype))


def compare(size: str = "quarter", batch: int = 8, repeats: int = 21) -> dict:
    """Compiles the U-Net input-gradient and the U-Net call (the forward pass purification
    runs) with each formulation and times the four programs alternately.

    Returns ms per call of the gradient (``before_ms``, ``after_ms``: medians;
    ``*_times_ms``: every call), ``speedup`` (before / after), ``max_abs_diff`` between the
    two gradients (against ``max_abs_grad``), and the same for the forward pass
    (``forward_before_ms``, ``forward_after_ms``, ``forward_speedup``,
    ``forward_max_abs_diff``)."""
    import jax
    import jax.numpy as jnp

    from diffjax.models import layers
    from experiments.bench import timing
    from experiments.bench import unet_cpu_profile as prof

    x = prof.unet_programs(size, batch)[2]  # the same images every call

    def build(fn, forward: bool):
        grad, call, _ = prof.unet_programs(size, batch)  # fresh functions: traced anew
        saved = layers.group_norm
        layers.group_norm = fn  # `layers.GroupNorm` looks the function up when traced
        try:
            return (call if forward else grad).lower(x).compile()
        finally:
            layers.group_norm = saved

    programs = {(k, fwd): build(fn, fwd) for fwd in (False, True)
                for k, fn in (("before", group_norm_before), ("after", layers.group_norm))}
    outs = {k: p(x).block_until_ready() for k, p in programs.items()}
    timed = timing.interleaved_medians({k: functools.partial(p, x) for k, p in programs.items()},
                                       repeats=repeats, warmup=0)
    med = {k: m * 1e3 for k, (m, _) in timed.items()}
    times = {k: [v * 1e3 for v in ts] for k, (_, ts) in timed.items()}
    b, a, fb, fa = ("before", False), ("after", False), ("before", True), ("after", True)
    return {"size": size, "batch": batch, "repeats": repeats,
            "before_ms": med[b], "after_ms": med[a], "speedup": med[b] / med[a],
            "before_times_ms": times[b], "after_times_ms": times[a],
            "max_abs_diff": float(jnp.max(jnp.abs(outs[b] - outs[a]))),
            "max_abs_grad": float(jnp.max(jnp.abs(outs[b]))),
            "forward_before_ms": med[fb], "forward_after_ms": med[fa],
            "forward_speedup": med[fb] / med[fa],
            "forward_max_abs_diff": float(jnp.max(jnp.abs(outs[fb] - outs[fa]))),
            "jax": jax.__version__}


def _summary(r: dict) -> str:
    return (f"U-Net input-gradient ({r['size']}, batch {r['batch']}), median of "
            f"{r['repeats']} alternating calls: before {r['before_ms']:.1f} ms, after "
            f"{r['after_ms']:.1f} ms ({r['speedup']:.2f}x); gradients differ by at most "
            f"{r['max_abs_diff']:.2g} (largest entry {r['max_abs_grad']:.3g}); the U-Net call "
            f"alone: before {r['forward_before_ms']:.1f} ms, after {r['forward_after_ms']:.1f} "
            f"ms ({r['forward_speedup']:.2f}x)")


def main(argv):
    del argv
    from experiments.bench import unet_cpu_profile

    unet_cpu_profile.run_ab(compare, _summary)


if __name__ == "__main__":
    from experiments import common
    from experiments.bench import unet_cpu_profile

    unet_cpu_profile.define_ab_flags(batch=8, repeats=21)
    app.run(main, flags_parser=common.parse_flags)
