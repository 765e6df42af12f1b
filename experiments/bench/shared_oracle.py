"""The shared gradient oracle against the in-program attacks: compile and run time.

``python -m experiments.bench.shared_oracle [--out=FILE] [--rounds=N]`` prints (and
writes) JSON for the embedded default's purifier (the shipped digits DDPM, ddpm t* = 100
with 4 steps, `remat=False`) and classifier, APGD-CE with 10 steps over 100 random 8x8
images in batches of 50, early exit off, in one chunk of all 11 iterations by default
(`--chunk=N` for rounds of N: the in-program side then also computes the masked no-op
iterations of the last round, the shared side does not), under the realization (`Fixed`)
and with EOT-2 fresh draws (`Independent`):

- ``compile_s``: the compile events (`jax.monitoring`) of the first run of each side, in
  this order: in-program fixed, in-program EOT-2, shared fixed, shared EOT-2 (the shared
  side's EOT-2 run reuses its fixed run's gradient program: what a study saves);
- ``run_s``: the median wall time of `rounds` warm runs, the four cases called in
  alternating rounds in one process (this machine's speed drifts between minutes);
- ``max_abs_diff``: the largest difference of the adversarial examples of the two sides
  (`success` equal is checked), a float32 rounding difference.

Scripts compile with XLA's LLVM at level 1 on a CPU, as the study does.
"""

from __future__ import annotations

import collections
import json
import sys
import time


def main(argv) -> dict:
    from experiments import common

    common.compile_faster_on_cpu()
    import jax
    import jax.monitoring
    import jax.numpy as jnp
    import numpy as np

    from diffjax import diffusion, pretrained, protocols, randomness
    from diffjax.attacks import APGDConfig
    from diffjax.attacks.cascade import Cascade, run_cascade
    from diffjax.defense import Defense

    args = dict(a.lstrip("-").split("=", 1) for a in argv[1:] if "=" in a)
    rounds = int(args.get("rounds", 4))
    chunk = int(args.get("chunk", 11))
    compiled = collections.defaultdict(float)
    current = [""]

    def listen(name, dur, **_):
        if "backend_compile" in name or "trace" in name or "mlir_module" in name:
            compiled[current[0]] += dur

    jax.monitoring.register_event_duration_secs_listener(listen)
    ddpm, clf = pretrained.load("digits_ddpm"), pretrained.load("digits_classifier")
    pur = diffusion.make_purifier(ddpm.eps_fn, schedule=ddpm.schedule(), t_star=100,
                                  num_steps=4, remat=False, length=4)
    defense = Defense(pur, clf.logits_fn)
    x = np.random.RandomState(0).rand(100, 8, 8, 1).astype(np.float32)
    y = np.asarray(jnp.argmax(clf.logits_fn(jnp.asarray(x)), -1)).astype(np.int32)
    keys = randomness.example_keys(jax.random.key(0), jnp.arange(100))
    attack = APGDConfig(eps=0.1, steps=10)
    cases = {}
    for shared in (False, True):
        for name, protocol in (("fixed", protocols.Fixed()),
                               ("eot2", protocols.Independent(eot=2))):
            cascade = Cascade((attack,), chunk=chunk, early_exit=False, shared_oracle=shared)
            cases[f"{'shared' if shared else 'in_program'}_{name}"] = (
                lambda p=protocol, c=cascade: run_cascade(defense, x, y, keys, protocol=p,
                                                          batch_size=50, cascade=c))
    outs = {}
    for name, fn in cases.items():
        current[0] = name
        outs[name] = fn()
    current[0] = "warm"
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    result = {"cases": {}, "rounds": rounds, "chunk": chunk, "jax": jax.__version__}
    for name in cases:
        twin = outs[name.replace("shared", "in_program")]
        np.testing.assert_array_equal(outs[name]["success"], twin["success"])
        result["cases"][name] = {
            "compile_s": round(compiled[name], 2),
            "run_s": round(float(np.median(times[name])), 3),
            "run_s_all": [round(t, 3) for t in times[name]],
            "max_abs_diff": float(np.max(np.abs(outs[name]["x_adv"] - twin["x_adv"]))),
        }
    text = json.dumps(result, indent=1)
    print(text)
    if "out" in args:
        with open(args["out"], "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv)
