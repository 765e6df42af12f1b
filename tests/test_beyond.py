"""experiments.beyond end to end at toy size (a tiny random DDPM, the shipped designed
purifier): beyond.json's schema and ranges, the designed purifier's determinism under
every protocol, the predictor's numbers re-derived from the saved critical distances,
the likelihood chain's end equal to the purifier's output, the report and figures, and a
rerun that loads every part."""

import json
import math

import numpy as np
import pytest
from conftest import config_flags, config_set, make_tiny_ddpm, quiet, run_module, tiny_study_config

from diffjax import analysis
from diffjax.study import Study, Workdir, beyond
from experiments.configs import beyond as beyond_config

# The tiny study (tests/conftest.py) plus the beyond fields at their smallest.
BEYOND = {
    "fallback.num_examples": 4, "fallback.sweep_points": "ddpm:10,ddpm:100",
    "fallback.sweep_num_examples": 4,
    "fallback.num_rate_examples": 2,
    "audit.square_queries": 5, "audit.eps": "0.5",
    "critical.steps": 3, "critical.num_rounds": 3,
    "likelihood.num_images": 2, "likelihood.num_steps": 1, "likelihood.trace": "hutchinson",
    "likelihood.num_probes": 1, "likelihood.methods": "ddpm,digits_purifier",
    "likelihood.chain_points": "0", "likelihood.score_t": "0",
}
STUDY = ("diffusion", "methods", "num_examples", "batch_size", "eval_draws",
         "purifier.num_steps", "attack.cascade", "attack.steps", "attack.targets",
         "attack.chunk", "attack.eot", "attack_undefended.steps", "attack_undefended.chunk",
         "attack_undefended.targets", "compression.methods", "compression.t_stars",
         "compression.num_examples", "compression.num_attack_examples")


def make_config(ddpm):
    c = tiny_study_config(ddpm, **{"compression.t_stars": "100"})
    c.beyond = beyond_config.get_config("quick").beyond
    for k, v in BEYOND.items():
        config_set(c.beyond, k, v)
    return c


def flags(config) -> list[str]:
    return [*config_flags(config, STUDY, "beyond.py:quick"),
            *(f"--config.beyond.{k}={v}" for k, v in BEYOND.items())]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond")
    ddpm = make_tiny_ddpm(root / "ddpm")
    config = make_config(ddpm)
    work = root / "work"
    proc = run_module("beyond", f"--workdir={work}", *flags(config))
    return config, work, json.loads((work / "beyond.json").read_text()), proc


def _interval(v, ci):
    return 0.0 <= ci[0] <= v <= ci[1] <= 1.0


def test_schema_ranges_report_and_figures(ran):
    _, work, res, proc = ran
    dp, pr, lk = res["designed_purifier"], res["predictor"], res["likelihood"]
    for k in ("clean_accuracy", "robust_accuracy_fixed", "robust_accuracy_fixed_ci",
              "compression_rate", "best_diffusion", "audit", "goal", "curve"):
        assert k in dp, k
    assert _interval(dp["robust_accuracy_fixed"], dp["robust_accuracy_fixed_ci"])
    assert _interval(dp["clean_accuracy"], dp["clean_accuracy_ci"])
    assert 0.0 < dp["compression_rate"] < 1.0  # the shipped purifier compresses
    assert dp["n"] == 8 and dp["best_diffusion"]["method"] in ("ddpm", "ddim")
    best = dp["best_diffusion"]
    assert best["robust_accuracy_fixed"] == max(
        r["robust_accuracy_fixed"] for r in res["diffusion"].values())
    g = dp["goal"]
    assert g["passed"] == (g["clean_ok"] and g["gain_ok"] and g["intervals_disjoint"])
    assert g["gain"] == pytest.approx(dp["robust_accuracy_fixed"]
                                      - best["robust_accuracy_fixed"])
    assert 0.0 <= g["paired_test_vs_best"]["p_value"] <= 1.0
    rows = dp["audit"]["rows"]
    assert [r["variant"] for r in rows] == ["", "strong", "bpda", "square", "eps0.5"]
    for r in rows:
        assert _interval(r["robust"], r["ci"]) and r["n"] == 8
    au = dp["audit"]  # the largest eps's accuracy with its row's interval
    assert (au["large_eps_accuracy"], au["large_eps_accuracy_ci"]) == (rows[-1]["robust"],
                                                                    rows[-1]["ci"])
    worst = dp["audit"]["worst_case"]["estimate"]
    assert worst <= min(r["robust"] for r in rows[:4]) + 1e-12
    assert dp["robust_accuracy_worst_case"] <= dp["robust_accuracy_fixed"]
    assert set(pr) >= {"mae", "r2", "points", "logistic"}
    assert len(pr["points"]) == pr["n"] == len(res["sweep"]) >= 2
    assert 0.0 <= pr["mae"] <= 1.0 and (pr["r2"] is None or pr["r2"] <= 1.0)
    for p in pr["points"]:
        assert 0.0 <= p["predicted"] <= 1.0 and 0.0 <= p["measured"] <= 1.0
    assert set(lk) >= {"clean_bpd", "adversarial_bpd", "purified_bpd", "chain", "drift"}
    assert set(lk["purified_bpd"]) == {"ddpm", "digits_purifier"}
    for v in [lk["clean_bpd"], lk["adversarial_bpd"], *lk["purified_bpd"].values()]:
        assert math.isfinite(v["mean"]) and v["ci"][0] <= v["mean"] <= v["ci"][1]
    assert lk["chain"]["end_matches_purifier_max_abs"] < 1e-5
    assert len(lk["chain"]["bpd"]) == len(lk["chain"]["points"]) == 3
    md = (work / "beyond.md").read_text()
    for section in ("### 1.", "### 2.", "### 3.", "figures/beyond_curve.png"):
        assert section in md
    for name in beyond.FIGURES:
        assert (work / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "goal" in proc.stdout and "predictor (nothing fitted)" in proc.stdout


def test_designed_purifier_is_deterministic_under_every_protocol(ran):
    _, _, res, _ = ran
    dp = res["designed_purifier"]
    det = dp["determinism"]
    assert det["max_abs_difference_other_keys"] == 0.0
    assert det["transfer_equals_fixed"] and det["transfer_draws_agree"]
    assert det["independent_draws_agree"] and det["fixed_verdict_is_the_attacks_own"]
    p = dp["protocols"]
    assert p["fixed"]["estimate"] == p["transfer"]["estimate"] == dp["robust_accuracy_fixed"]


def test_numbers_rederived_from_the_parts_and_rerun_loads_every_part(ran):
    config, work, res, _ = ran
    wd = Workdir(work, log=quiet)
    again = beyond.run(Study(config, wd, quiet))
    assert wd.computed_parts == [] and wd.loaded_parts
    for key in ("designed_purifier", "predictor", "likelihood", "sweep", "diffusion"):
        assert (json.dumps(again[key], sort_keys=True, default=float)
                == json.dumps(res[key], sort_keys=True)), key  # (NaN spelled alike)
    # The predictor from the saved critical distances, each point from its rate alone.
    (name,) = [p.name[:-4] for p in (work / "parts").glob("critical_distances_*.npz")]
    d = wd.load_arrays(name)["distance"]
    assert d.shape == (8,) and np.all(d >= 0)
    for p in res["predictor"]["points"]:
        want = analysis.predict_from_compression(
            d[:p["n"]], [p["compression_rate"]], 0.1, anchor_accuracy=[p["anchor_accuracy"]])
        assert p["predicted"] == pytest.approx(float(want[0]))
    # The sweep point at the main t* is the method's own attack part.
    main = next(p for p in res["sweep"] if p["method"] == "ddpm" and p["t_star"] == 100)
    assert main["robust_accuracy_fixed"] == res["diffusion"]["ddpm"]["robust_accuracy_fixed"]


def test_bad_beyond_config_is_one_line(tmp_path):
    proc = run_module("beyond", f"--workdir={tmp_path}",
                      "--config=experiments/configs/beyond.py:quick",
                      "--config.beyond.purifier=digits_classifier", check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert err[0].startswith("error:") and "config.beyond.purifier" in err[0]
    with pytest.raises(ValueError, match="variant"):
        beyond_config.get_config("huge")


def test_a_designed_purifier_is_a_study_method():
    from diffjax.study import validate_config
    from diffjax.study.context import is_designed_purifier

    c = beyond_config.get_config("quick")
    c.methods = "ddpm,digits_purifier"
    c.audit.methods = "digits_purifier"
    validate_config(c)
    assert is_designed_purifier("digits_purifier")
    assert not is_designed_purifier("ddpm") and not is_designed_purifier("digits_classifier")
    c.methods = "ddpm,digits_classifier"
    with pytest.raises(ValueError, match="config.methods"):
        validate_config(c)
