r"""XLA:CPU's library options on one U-Net input-gradient and forward, in one process.

    python -m experiments.bench.xla_options_ab [--size=quarter|tiny] [--batch=2] \
        [--repeats=15] [--out=FILE.json]

XLA:CPU can hand parts of a program to oneDNN as well as to YNNPACK. The options are
`DebugOptions` fields, so diffjax could set them for its own programs alone
(``jax.jit(f).lower(...).compile(compiler_options=...)``) without touching the user's
``XLA_FLAGS``. This compiles the U-Net's input-gradient and its call (the forward pass
purification runs) under each set of `OPTIONS`, checks which library each compiled program
calls (``__onednn`` / ``__ynn`` in the optimised HLO) and how far its values are from the
default's, and times all the programs in alternating rounds
(`timing.interleaved_medians`). It also compiles one 3x3 convolution (8x32x32x64) under
each set, to tell whether oneDNN takes convolutions at all in this jaxlib.
"""

from __future__ import annotations

import functools
import warnings

from absl import app

# name -> compiler options (XLA `DebugOptions` fields).
OPTIONS = {
    "default": {},
    # oneDNN for every dot on its own; convolutions as by default.
    "onednn_dot": {"xla_cpu_use_onednn": True,
                   "xla_cpu_experimental_onednn_fusion_type":
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    # The same, with YNNPACK off (its fusions no longer take the dots first).
    "onednn_dot_no_ynn": {"xla_cpu_use_onednn": True,
                          "xla_cpu_experimental_onednn_fusion_type":
                              "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                          "xla_cpu_experimental_ynn_fusion_type": ""},
    # oneDNN asked for convolutions (YNNPACK off, so nothing else claims them first).
    "onednn_conv": {"xla_cpu_use_onednn": True,
                    "xla_cpu_experimental_onednn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
                    "xla_cpu_experimental_ynn_fusion_type": ""},
}


def _libraries(compiled) -> dict:
    text = compiled.as_text()
    return {"onednn": text.count("__onednn"), "ynn": text.count("__ynn")}


def compare(size: str = "quarter", batch: int = 2, repeats: int = 15) -> dict:
    """Compiles the U-Net input-gradient and call under each of `OPTIONS` and times them
    alternately.

    Returns, per option set: ``grad_ms``, ``forward_ms`` (medians), the library call
    counts of each program (``grad_calls``, ``forward_calls``), the largest differences
    from the default's gradient and output (``grad_max_abs_diff``,
    ``forward_max_abs_diff``), and ``ratio`` (default's gradient time / this one's); and
    ``lone_conv``: the library calls of one 3x3 convolution per option set."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffjax.models import layers
    from experiments.bench import timing
    from experiments.bench import unet_cpu_profile as prof

    grad, forward, x = prof.unet_programs(size, batch)
    programs = {}
    with warnings.catch_warnings():
        # XLA cannot serialise a program with oneDNN fusions; where a persistent
        # compilation cache is on, jax warns that it could not store one, and runs it.
        warnings.filterwarnings("ignore", "Error writing persistent compilation cache entry")
        for name, opts in OPTIONS.items():
            programs[name, "grad"] = grad.lower(x).compile(compiler_options=opts)
            programs[name, "forward"] = forward.lower(x).compile(compiler_options=opts)
    outs = {k: p(x).block_until_ready() for k, p in programs.items()}
    timed = timing.interleaved_medians({k: functools.partial(p, x) for k, p in programs.items()},
                                       repeats=repeats, warmup=1)
    cx = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32, 32, 64)), jnp.float32)
    ck = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 64, 64)), jnp.float32)
    conv = jax.jit(lambda a, k: layers._conv(a, k, (1, 1), ((1, 1), (1, 1))))
    out = {"size": size, "batch": batch, "repeats": repeats, "jax": jax.__version__,
           "options": OPTIONS, "results": {}, "lone_conv": {}}
    for name, opts in OPTIONS.items():
        g, f = (name, "grad"), (name, "forward")
        out["results"][name] = {
            "grad_ms": timed[g][0] * 1e3, "forward_ms": timed[f][0] * 1e3,
            "grad_calls": _libraries(programs[g]), "forward_calls": _libraries(programs[f]),
            "grad_max_abs_diff": float(jnp.max(jnp.abs(outs[g] - outs["default", "grad"]))),
            "forward_max_abs_diff": float(jnp.max(jnp.abs(outs[f]
                                                          - outs["default", "forward"]))),
            "ratio": timed["default", "grad"][0] / timed[g][0]}
        out["lone_conv"][name] = _libraries(conv.lower(cx, ck).compile(compiler_options=opts))
    out["max_abs_grad"] = float(jnp.max(jnp.abs(outs["default", "grad"])))
    return out


def _summary(r: dict) -> str:
    lines = [f"U-Net ({r['size']}, batch {r['batch']}), medians of {r['repeats']} "
             "alternating calls:"]
    for name, v in r["results"].items():
        lines.append(f"  {name:18s} gradient {v['grad_ms']:7.1f} ms ({v['ratio']:.2f}x), "
                     f"forward {v['forward_ms']:6.1f} ms; oneDNN calls "
                     f"{v['grad_calls']['onednn']}, YNNPACK {v['grad_calls']['ynn']}; max diff "
                     f"{v['grad_max_abs_diff']:.2g}; a lone 3x3 convolution: "
                     f"{r['lone_conv'][name]}")
    return "\n".join(lines)


def main(argv):
    del argv
    from experiments.bench import unet_cpu_profile

    unet_cpu_profile.run_ab(compare, _summary)


if __name__ == "__main__":
    from experiments import common
    from experiments.bench import unet_cpu_profile

    unet_cpu_profile.define_ab_flags(batch=2, repeats=15)
    app.run(main, flags_parser=common.parse_flags)
