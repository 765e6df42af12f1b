r"""What early exit saves: the study's fixed-randomness attacks with and without it.

    python -m experiments.early_exit --workdir=W [--config=experiments/configs/reproduce.py]

Runs the attack parts of the study that attack the realization (the undefended classifier,
every purifier of `config.methods` at the main t*, and the compression sweep's points) twice
in one process, on the same machine: once with `attack.early_exit=True` (examples fooled
under their realization leave the attack between rounds of `attack.chunk` iterations and the
rest are repacked into full batches) and once with it off, each in its own work directory
(`W/early_exit_on`, `W/early_exit_off`) after a warm-up that compiles every program, so the
two timings compare run time, not compilation. Checks that both give the same adversarial
examples (early exit changes the cost, never the result) and writes `W/early_exit.json`:
wall time and attack iterations per part, with and without.
"""

import json
import sys
import time

from absl import app, logging

from experiments import common

CONFIG, WORKDIR, DISTRIBUTED, JAX_CACHE = common.define_study_flags()


def _parts(study):
    from diffjax.study import UNDEFENDED
    from diffjax.study.context import as_list, methods_of

    c = study.config.compression
    out = [(UNDEFENDED, None, None)]
    out += [(m, None, None) for m in methods_of(study.config)]
    main = int(study.config.purifier.t_star)
    out += [(m, t, int(c.num_attack_examples)) for m in as_list(c.methods)
            for t in as_list(c.t_stars, int) if t != main]
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    with common.one_line_errors():
        import numpy as np

        from diffjax.study import Study, Workdir, robustness

        config = CONFIG.value
        base = common.open_study(config, WORKDIR.value, DISTRIBUTED.value, JAX_CACHE.value)
        rows, outs = {}, {}
        for flag in (True, False, True):  # the first pass compiles; the last one is timed
            config.attack.early_exit = flag
            config.attack_undefended.early_exit = flag
            name = "early_exit_" + ("on" if flag else "off")
            study = Study(config, Workdir(base.workdir.path / name, log=lambda _: None),
                          lambda _: None)
            for p in study.workdir.path.glob("parts/*"):  # always recompute
                if p.is_dir():
                    for f in p.glob("*"):
                        f.unlink()
                else:
                    p.unlink()
            for method, t_star, n in _parts(study):
                t0 = time.time()
                part = robustness.attack_part(study, method, t_star, "realization", n)
                key = robustness.part_name(method, t_star or int(config.purifier.t_star),
                                           "realization", n)
                rows.setdefault(key, {})[name] = {
                    "wall_s": time.time() - t0, "iterations": int(part["iterations"].sum())}
                outs.setdefault(key, {})[name] = part
        for key, by in outs.items():
            a, b = by["early_exit_on"], by["early_exit_off"]
            rows[key]["same_verdicts"] = bool(np.array_equal(a["fixed_adv_correct"],
                                                             b["fixed_adv_correct"]))
        total = {n: sum(r[n]["wall_s"] for r in rows.values())
                 for n in ("early_exit_on", "early_exit_off")}
        summary = {"parts": rows, "total_wall_s": total,
                   "saving": 1.0 - total["early_exit_on"] / total["early_exit_off"]}
        for key, r in rows.items():
            common.log(f"[{key}] {r['early_exit_off']['wall_s']:.1f} s -> "
                       f"{r['early_exit_on']['wall_s']:.1f} s, iterations "
                       f"{r['early_exit_off']['iterations']} -> "
                       f"{r['early_exit_on']['iterations']}, same verdicts {r['same_verdicts']}")
        common.log(f"total {total['early_exit_off']:.1f} s -> {total['early_exit_on']:.1f} s "
                   f"({100 * summary['saving']:.0f}% saved)")
        path = base.workdir.path / "early_exit.json"
        base.workdir.write(path, json.dumps(summary, indent=2, sort_keys=True).encode())
        common.log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
