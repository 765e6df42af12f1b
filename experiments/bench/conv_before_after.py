"""Before/after of `diffjax.models.layers.Conv` on diffjax's full-gradient step.

``python -m experiments.bench.conv_before_after before|after`` prints, as JSON, the seconds
per image of the quick suite's ``grad_t10`` and ``grad_t100`` (diffjax side only), with the
U-Net's convolutions as `flax.linen.Conv` ("before": what the U-Net used before commit
5c7d7cd) or as `diffjax.models.layers.Conv` ("after": the input-gradient kept in the fast
kernel layout inside loops). Run each variant in its own process; the gradients must agree.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(variant: str) -> dict:
    """Measures one variant ("before" or "after"); returns its JSON-able result."""
    import flax.linen as nn

    import diffjax.models.layers as layers

    if variant == "before":
        layers.Conv = nn.Conv  # the U-Net looks layers.Conv up when it is built
    elif variant != "after":
        raise ValueError(f"variant: expected 'before' or 'after'; got {variant!r}")
    from experiments.bench import cases, programs, timing

    s = cases.quick_settings()
    b = cases.Bench(s, log=lambda m: None)
    pair = b.pair(s.size)
    out = {}
    for steps in (10, 100):
        x, keys, w, labels = b.inputs(s.size, s.grad_batch)
        args = (x, pair.eps_fn, b.schedule, keys, w, labels)
        grad = programs.make_grad(programs.Purifier(s.t_star, steps))
        comp, compile_s, peak = timing.compile_jax(grad, *args)
        t, _ = timing.median_time(lambda c=comp, a=args: c(*a), repeats=3)
        out[f"grad_t{steps}"] = {"s_per_img": t / s.grad_batch, "compile_s": compile_s,
                                 "peak_mb": peak,
                                 "grad_abs_max": float(np.abs(np.asarray(comp(*args))).max())}
    out["loadavg"] = timing.loadavg()
    return {variant: out}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
