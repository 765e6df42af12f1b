"""The main job: the whole study end to end on a tiny purifier (every part, the audit),
one realization per example, results.json -> report, resume, a bucket URL, bad flags."""

import json
import math
import re

import jax
import numpy as np
import pytest
from conftest import config_flags, make_tiny_ddpm, quiet, run_module, tiny_study_config

from diffjax import protocols, randomness
from diffjax.study import Interrupted, Study, Workdir, report, robustness, run_study
from diffjax.study.workdir import compile_seconds

NUMBER_KEYS = ("clean_accuracy", "distances", "robust_accuracy", "gradient_correlation",
               "compression", "sigmoid_fit", "randomness_correlation", "fid", "audit")


def flat_numbers(tree, prefix="") -> dict:
    """{"a/b/0": number} for every number in a nested dict/list (NaN as None)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items()
                for k, v in flat_numbers(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree)
                for k, v in flat_numbers(sub, f"{prefix}{i}/").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("/"): None if isinstance(tree, float) and math.isnan(tree)
                else tree}
    return {}


def numbers(res: dict) -> dict:
    return flat_numbers({k: res[k] for k in NUMBER_KEYS if k in res})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The whole study on a tiny random DDPM, run once for the module."""
    root = tmp_path_factory.mktemp("study")
    ddpm = make_tiny_ddpm(root / "ddpm")
    path = root / "run"
    res = run_study(tiny_study_config(ddpm), Workdir(path, log=quiet), log=quiet)
    paths = report.write_all(res, path)
    return ddpm, path, res, paths


def test_results_schema_intervals_tests_and_figures(tiny):
    _, path, _, paths = tiny
    out = json.loads((path / "results.json").read_text())
    for key in report.SCHEMA_KEYS:
        assert key in out, key
    methods = ["ddpm", "ddim"]
    assert out["dataset"] == "digits" and out["num_examples"] == 8
    ca, ra = out["clean_accuracy"], out["robust_accuracy"]
    for name in ("undefended", *methods):
        lo, hi = ca[f"{name}_ci"]
        assert 0.0 <= lo <= ca[name] <= hi <= 1.0
    lo, hi = ra["undefended_ci"]
    assert lo <= ra["undefended"] <= hi
    for m in methods:
        r = ra[m]
        for p in ("fixed", "transfer", "independent_eot"):
            assert r[f"{p}_ci"][0] <= r[p] <= r[f"{p}_ci"][1]
        # Every accuracy has its interval, the means over draws (bootstrap) included.
        accuracies = [k for k, v in r.items() if isinstance(v, float) and not k.endswith("_ci")]
        assert {"transfer_mean_over_draws", "independent_mean_over_draws"} <= set(accuracies)
        for k in accuracies:
            lo, hi = r[f"{k}_ci"]
            assert 0.0 <= lo <= r[k] <= hi <= 1.0, k
        for test in ("test_fixed_vs_transfer", "test_fixed_vs_independent"):
            assert 0.0 <= r[test]["p_value"] <= 1.0 and r[test]["n"] == 8
        d = out["distances"][m]
        assert set(d) >= {"l2_adv_input", "l2_purified", "linf_purified", "ssim_adv_input",
                          "ssim_purified"}
        assert d["linf_adv_input"] <= 0.1 + 1e-6  # the attack's budget bounds the input
        assert 0.0 <= d["test_purified_farther"]["p_value"] <= 1.0
        assert -1.0 <= out["gradient_correlation"][m] <= 1.0
    assert len(out["compression"]) == 2
    for p in out["compression"]:
        assert p["compression_rate"] > 0
        assert p["robust_accuracy_fixed_ci"][0] <= p["robust_accuracy_fixed"]
        assert len(p["top_singular_values"]) == 8
    assert set(out["sigmoid_fit"]) >= {"params", "r2"}
    audit = out["audit"]["ddpm"]
    assert {r["check"] for r in audit["rows"]} == {"iterations", "clips", "gradient",
                                                   "gradient-free", "budget"}
    assert isinstance(audit["verdict"]["converged"], bool)
    # Convergence per protocol, from the plateau rows (the largest step count of each), and
    # the sentence names each protocol's verdict.
    tol, v = audit["tolerance"], audit["verdict"]
    steps = [r for r in audit["rows"] if r["check"] == "iterations"]
    fixed_rows = [r for r in steps if "(fixed)" in r["attack"]]
    indep_rows = [r for r in steps if "(independent" in r["attack"]]
    for key, plateau in (("converged_fixed", fixed_rows[-1]),
                         ("converged_independent", indep_rows[-1])):
        assert v[key] == (plateau["delta_vs_study"] >= -tol
                          and plateau["p_value_lower"] >= 0.05), key
    assert v["converged"] == (v["converged_fixed"] and v["converged_independent"])
    assert v["sentence"].startswith("fixed randomness: ")
    assert "; independent randomness (EOT): " + ("converged" if v["converged_independent"]
                                                 else "NOT converged") in v["sentence"]
    assert audit["verdict"]["sentence"]
    # its accuracies with their intervals too
    for k in ("worst_case_fixed", "large_eps_accuracy", "study_fixed"):
        lo, hi = v[f"{k}_ci"]
        assert 0.0 <= lo <= v[k] <= hi <= 1.0, k
    assert v["large_eps_accuracy_ci"] == audit["rows"][-1]["ci"]  # the largest eps's row
    assert v["study_fixed"] == audit["rows"][0]["robust"]  # the study's attack on these
    assert v["study_fixed_ci"] == audit["rows"][0]["ci"]
    assert re.search(r"\d+\.\d% \[\d+\.\d, \d+\.\d\]", v["sentence"])  # with its interval
    claims = out["claims"]
    assert list(claims) == ["claim1", "claim2", "claim3", "claim4"]
    text = paths["report"].read_text()
    assert "## Claims" in text and text.count("eproduced.**") == 4 and "p = " in text
    assert "## Gradient-masking audit" in text and "## Cost per part" in text
    for name in ("compression_robustness", "distances", "examples"):
        assert len(paths[name].read_bytes()) > 1000
    costs = out["costs"]["parts"]
    assert robustness.part_name("ddpm", 100, "realization") in costs
    for c in costs.values():
        assert c["wall_s"] >= c["compile_s"] >= 0 and c["run_s"] >= 0


def test_one_realization_per_example(tiny):
    """Every number under fixed randomness comes from the same random map: the sweep point
    at the main t* IS the accuracy table's, every fixed verdict is the attack's own success
    under the realization, and the stored purified clean images are the realization's."""
    ddpm, path, res, _ = tiny
    for m in ("ddpm", "ddim"):
        c = res["consistency"][m]
        assert c["fixed_verdict_is_the_attacks_own"]
    point = next(p for p in res["compression"] if p["t_star"] == 100)
    assert point["clean_accuracy"] == res["clean_accuracy"]["ddpm"]
    assert point["robust_accuracy_fixed"] == res["robust_accuracy"]["ddpm"]["fixed"]
    assert res["consistency"]["ddpm"]["sweep_point_at_main_t_star"] == {
        "clean_accuracy_equal": True, "robust_accuracy_fixed_equal": True}
    study = Study(tiny_study_config(ddpm), Workdir(path, log=quiet), quiet)
    part = robustness.attack_part(study, "ddpm")  # loaded
    keys = randomness.example_keys(jax.random.key(0), np.arange(6))
    pur = study.defense("ddpm").purify(study.x[:6], protocols.realization(keys))
    np.testing.assert_allclose(part["img_purified_clean"], pur, atol=1e-6)
    clean = np.argmax(study.classifier.logits_fn(pur), -1) == study.y[:6]
    np.testing.assert_array_equal(part["clean_correct_fixed"][:6], clean)


def test_gradient_paths_and_protocols_share_programs(tiny):
    """Hard and straight-through clips are one attack program (the choice is data), and
    every part's evaluation is one program whatever protocols it reports: Transfer's and
    Independent's draws are the same evaluation draws."""
    from diffjax import attacks
    from diffjax.attacks import engine
    from diffjax.study import distances

    ddpm, path, _, _ = tiny
    study = Study(tiny_study_config(ddpm), Workdir(path, log=quiet), quiet)
    x, y, kd = study.x[:3], study.y[:3], study.keys[:3]
    keys = jax.random.wrap_key_data(kd)
    cfg = attacks.PGDConfig(norm="linf", eps=0.1, step_size=0.05, steps=3, loss="ce")
    hard, st = study.defense("ddpm"), study.defense("ddpm", clip_gradient="straight_through")
    before = engine.run_program._cache_size()
    for d in (hard, st):
        res = attacks.pgd_attack(d, x, y, keys, config=cfg)
        assert np.all(np.asarray(res.linf) <= 0.1 + 1e-6)
    assert engine.run_program._cache_size() == before + 1
    np.testing.assert_array_equal(hard.purify(x, keys), st.purify(x, keys))

    ps = study.protocols()
    m = int(study.config.eval_draws)
    before = robustness._evaluate_program._cache_size()
    out = {name: robustness._evaluate_batch(
        hard, x, y, kd, x, evals=evals, ssim=distances.ssim_window(x.shape), draws=m)
        for name, evals in (("realization", (ps["fixed"], ps["transfer"])),
                            ("fresh", (ps["independent"],)), ("sweep", (ps["fixed"],)))}
    assert robustness._evaluate_program._cache_size() == before + 1
    for k in ("adv_correct", "adv_correct_mean", "adv_correct_worst", "clean_correct",
              "adv_draws"):
        np.testing.assert_array_equal(out["realization"][f"transfer_{k}"],
                                      out["fresh"][f"independent_{k}"])
    assert not any(k.startswith(("transfer_", "independent_")) for k in out["sweep"])
    np.testing.assert_array_equal(out["sweep"]["fixed_adv_correct"],
                                  out["realization"]["fixed_adv_correct"])
    assert out["fresh"]["independent_adv_draws"].shape == (3, m)


def test_jacobians_from_the_shared_oracle_equal_the_metrics(tiny):
    """`config.shared_oracle`: the sweep's exact Jacobians come from the attacks' gradient
    program, row by row; rate and spectrum equal `metrics`' own (`_measure`)."""
    from diffjax.study import compression

    ddpm, path, _, _ = tiny
    study = Study(tiny_study_config(ddpm), Workdir(path, log=quiet), quiet)
    assert study.shared_oracle
    d = study.defense("ddpm", 10)
    rows = study.rows(3)  # 3 examples x 64 rows: 48 batches of 4, the last one padded
    got = compression._measure_shared(study, d, rows, "exact")
    want = compression._measure(d.purify_fn, study.x[rows], study.keys[rows],
                                estimator="exact", spectrum="exact", top_k=1, num_probes=2,
                                chunk_size=64, ad_mode="reverse")
    np.testing.assert_allclose(got["rate"], want["rate"], rtol=1e-5)
    np.testing.assert_allclose(got["sv"], want["sv"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got["stderr"], 0.0)


def test_report_is_rendered_from_results_json(tiny):
    _, path, _, paths = tiny
    before = paths["report"].read_text()
    paths["report"].unlink()
    again = report.render(path)
    assert again["report"].read_text() == before


def test_rerun_loads_every_part(tiny):
    ddpm, path, res, _ = tiny
    again = run_study(tiny_study_config(ddpm), Workdir(path, log=quiet), log=quiet)
    assert again["parts"]["computed"] == []
    assert numbers(again) == numbers(res)


def test_a_workdir_refuses_parts_of_another_setting(tiny):
    # The part names carry method, t*, stream and size, not the purifier's or the attack's
    # settings: a rerun with other settings in the same workdir must not load the parts.
    ddpm, path, _, _ = tiny
    other = tiny_study_config(ddpm)
    other.purifier.num_steps = 3
    other.attack.steps = 5
    with pytest.raises(ValueError, match=r"another setting \(attack.steps: 2 -> 5; "
                                         r"purifier.num_steps: 2 -> 3\).*new --workdir"):
        Study(other, Workdir(path, log=quiet), log=quiet)
    Study(tiny_study_config(ddpm), Workdir(path, log=quiet), log=quiet)  # same: accepted


def test_interrupted_run_resumes_to_the_same_results(tiny, tmp_path):
    ddpm, _, res, _ = tiny
    with pytest.raises(Interrupted):
        run_study(tiny_study_config(ddpm), Workdir(tmp_path, fail_after_batches=4, log=quiet),
                  log=quiet)
    assert list((tmp_path / "parts").rglob("*.npz"))
    resumed = run_study(tiny_study_config(ddpm), Workdir(tmp_path, log=quiet), log=quiet)
    assert numbers(resumed) == numbers(res)


def test_threads_asking_for_one_part_compute_it_once(tmp_path):
    """`run_study`'s concurrent start: a part asked for by several threads at once is
    computed by one and loaded by the others; each thread's compile time is its own."""
    import threading
    import time

    wd = Workdir(tmp_path, log=quiet)
    calls, gate = [], threading.Barrier(4)

    def compute():
        calls.append(threading.get_ident())
        jax.jit(lambda a: a * 3 + 1)(np.ones(7, np.float32)).block_until_ready()  # compiles
        time.sleep(0.2)  # the others arrive while it runs
        return {"v": np.arange(3)}

    got = []
    main_compile = compile_seconds()

    def ask():
        gate.wait()
        got.append(wd.arrays("p", compute)["v"].tolist())

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got == [[0, 1, 2]] * 4
    assert wd.computed_parts == ["p"] and wd.loaded_parts == []
    assert wd.costs["p"]["compile_s"] > 0  # the worker's compile is the part's ...
    assert compile_seconds() == main_compile  # ... and not this thread's


def test_a_bucket_workdir_stays_a_url(tmp_path):
    """gs:// paths go through etils.epath to the filesystem (a fake GCS here): nothing is
    written to a local folder named 'gs:'."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, **kwargs)

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    wd = Workdir("gs://bucket/run", log=quiet)
    assert str(wd.path) == "gs://bucket/run"
    assert wd.part("p", lambda: {"a": 1}) == {"a": 1}
    arrays = wd.arrays("q", lambda: {"x": np.arange(3)})
    np.testing.assert_array_equal(arrays["x"], np.arange(3))
    store = wd.store("q")
    store.save("state", {"s": np.ones(2)})
    np.testing.assert_array_equal(store.load("state")["s"], np.ones(2))
    files = set(FakeGCS.store)
    assert {"gs://bucket/run/parts/p.json", "gs://bucket/run/parts/q.npz",
            "gs://bucket/run/parts/q/state.npz"} <= {f if f.startswith("gs://") else
                                                   f"gs://{f.lstrip('/')}" for f in files}
    again = Workdir("gs://bucket/run", log=quiet)
    assert again.part("p", lambda: {"a": 2}) == {"a": 1}  # loaded, not recomputed
    assert not (tmp_path / "gs:").exists()


def _flags(ddpm, **overrides) -> list[str]:
    c = tiny_study_config(ddpm, **overrides)
    keys = ("methods", "num_examples", "batch_size", "eval_draws", "purifier.num_steps",
            "attack.cascade", "attack.steps", "attack.targets", "attack.chunk", "attack.eot",
            "attack_undefended.steps", "attack_undefended.chunk", "attack_undefended.targets",
            "correlation.eot", "correlation.num_examples", "randomness.num_images",
            "randomness.num_points", "compression.methods", "compression.t_stars",
            "compression.num_examples", "compression.num_attack_examples",
            "audit.enabled", "audit.num_examples", "audit.step_multipliers", "audit.eps",
            "audit.square_queries", "fid_reference_examples")
    return config_flags(c, ("diffusion", *keys))


def test_eight_devices_give_the_same_numbers(tiny, tmp_path):
    """The study on 8 simulated CPU devices, its parts computed one at a time, equals the
    module's single-device run, whose first parts were computed two at a time
    (`config.concurrent_parts`), to float rounding (programs running at once on XLA:CPU are
    not bit-reproducible: `diffjax.study.run`): no number depends on the device count or
    the order."""
    ddpm, _, res, _ = tiny
    assert tiny_study_config(ddpm).concurrent_parts == 2
    eight = run_module("reproduce", f"--workdir={tmp_path}",
                       *_flags(ddpm, **{"audit.enabled": False, "concurrent_parts": 1}),
                       env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert "claim 1:" in eight.stdout and "claim 4:" in eight.stdout
    r8 = json.loads((tmp_path / "results.json").read_text())
    assert r8["devices"]["count"] == 8
    f1 = {k: v for k, v in numbers(res).items() if not k.startswith("audit/")}
    f8 = numbers(r8)
    assert f1.keys() == f8.keys()
    for name in f1:
        if f1[name] is None or f8[name] is None:
            assert f1[name] == f8[name], name
        else:
            assert f8[name] == pytest.approx(f1[name], rel=1e-3, abs=1e-4), name


@pytest.mark.parametrize("flags,message", [
    (["--config.methods=ddpm,ddpm++"], "config.methods: expected one of"),
    (["--config.attack.eps=-0.1"], "config.attack.eps: expected a number in [0, 1]"),
    (["--config.attack.cascade=apgd-ce,fgsm"], "config.attack.cascade: expected one of"),
    (["--config.diffusion=/nonexistent/ckpt"], "'/nonexistent/ckpt': no such checkpoint"),
    (["--config.compression.t_stars=10,x"], "config.compression.t_stars"),
    (["--config.attack.nosuch=1"], "--config.attack.nosuch: no such config field 'nosuch'"),
    (["--config=/nonexistent/study.py"], "No such file or directory: '/nonexistent/study.py'"),
])
def test_bad_flags_exit_with_one_line(tmp_path, flags, message):
    proc = run_module("reproduce", f"--workdir={tmp_path / 'w'}", *flags, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_unwritable_workdir_and_missing_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_module("reproduce", f"--workdir={blocker / 'sub'}", check=False)
    assert proc.returncode == 1 and "error: workdir: cannot write to" in proc.stderr
    proc = run_module("reproduce", check=False)
    assert proc.returncode == 1 and "error: --workdir: required" in proc.stderr
