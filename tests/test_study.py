"""The main job: the quick study end to end, resume after an interruption, bad flags, devices."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from diffjax.study import Interrupted, Workdir, report, run_study
from experiments.configs import reproduce as reproduce_config

NUMBER_KEYS = ("clean_accuracy", "distances", "robust_accuracy", "gradient_correlation",
               "compression", "sigmoid_fit", "randomness_correlation", "fid")


def tiny_config():
    """The quick config, shrunk further so that several runs fit in a test."""
    c = reproduce_config.get_config("quick")
    c.methods = "ddpm,ddim"
    c.num_examples = 8
    c.batch_size = 4  # two batches: per-batch keys and resume are exercised
    c.eval_draws = 2
    c.purifier.num_steps = 2
    c.attack.steps = 2
    c.attack.eot = 2
    c.correlation.eot = 2
    c.correlation.num_examples = 8
    c.randomness.num_images = 1
    c.randomness.num_points = 4
    c.compression.methods = "ddpm"
    c.compression.t_stars = "10,100,300"
    c.compression.num_examples = 2
    c.compression.num_attack_examples = 8
    c.fid_reference_examples = 64
    return c


def numbers(res: dict) -> dict:
    """The result numbers, flattened, with NaN (e.g. an undetermined fit interval) as None
    so that equal results compare equal."""
    flat = flat_numbers({k: res[k] for k in NUMBER_KEYS})
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in flat.items()}


def flat_numbers(tree, prefix="") -> dict:
    """{"a/b/0": number} for every number in a nested dict/list."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items()
                for k, v in flat_numbers(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree)
                for k, v in flat_numbers(sub, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): tree} if isinstance(tree, (int, float)) else {}


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The real quick config, run once for the module."""
    path = tmp_path_factory.mktemp("quick")
    res = run_study(reproduce_config.get_config("quick"), Workdir(path, log=quiet), log=quiet)
    paths = report.write_all(res, path)
    return path, res, paths


def test_quick_study_writes_schema_and_figures(quick_run):
    path, res, paths = quick_run
    out = json.loads((path / "results.json").read_text())
    for key in report.SCHEMA_KEYS:
        assert key in out, key
    methods = ["ddpm", "reverse_only", "ddim", "sde"]
    assert out["dataset"] == "digits" and out["num_examples"] == 24
    assert set(out["clean_accuracy"]) == {"undefended", *methods}
    for m in methods:
        d = out["distances"][m]
        assert set(d) >= {"l2_adv_input", "l2_purified", "linf_purified", "ssim_adv_input",
                          "ssim_purified"}
        r = out["robust_accuracy"][m]
        for protocol in ("independent_eot", "transfer", "fixed"):
            assert 0.0 <= r[protocol] <= 1.0
        assert -1.0 <= out["gradient_correlation"][m] <= 1.0
        # The attack's l_inf budget bounds the adversarial input's distance.
        assert d["linf_adv_input"] <= 0.1 + 1e-6
    assert 0.0 <= out["robust_accuracy"]["undefended"] <= 1.0
    assert len(out["compression"]) == 6
    for p in out["compression"]:
        assert set(p) >= {"method", "t_star", "compression_rate", "robust_accuracy_fixed",
                          "clean_accuracy"}
        assert p["compression_rate"] > 0
    assert set(out["sigmoid_fit"]) >= {"params", "r2"}
    text = paths["report"].read_text()
    assert "## Claims" in text and text.count("eproduced.**") == 4
    for name in ("compression_robustness", "distances", "examples"):
        assert paths[name].stat().st_size > 1000


def test_compression_rate_grows_weaker_with_less_noise(quick_run):
    # More diffusion (larger t*) compresses more: the rate falls with t* for each method.
    _, res, _ = quick_run
    for m in ("ddpm", "reverse_only"):
        pts = sorted((p for p in res["compression"] if p["method"] == m),
                     key=lambda p: p["t_star"])
        rates = [p["compression_rate"] for p in pts]
        assert rates[0] > rates[-1], (m, rates)


def test_rerun_loads_finished_parts(quick_run):
    path, res, _ = quick_run
    again = run_study(reproduce_config.get_config("quick"), Workdir(path, log=quiet), log=quiet)
    assert again["parts"]["computed"] == []
    assert numbers(again) == numbers(res)


def test_interrupted_run_resumes_to_the_same_results(tmp_path):
    whole = run_study(tiny_config(), Workdir(tmp_path / "whole", log=quiet), log=quiet)
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        run_study(tiny_config(), Workdir(cut, fail_after_batches=3, log=quiet), log=quiet)
    saved = sorted(p.name for p in (cut / "parts").rglob("batch_*.npz"))
    assert len(saved) == 3
    resumed = run_study(tiny_config(), Workdir(cut, log=quiet), log=quiet)
    assert numbers(resumed) == numbers(whole)


def run_cli(args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


@pytest.mark.parametrize("flags,message", [
    (["--config.methods=ddpm,ddpm++"], "config.methods: expected one of"),
    (["--config.attack.eps=-0.1"], "config.attack.eps: expected a number in [0, 1]"),
    (["--config.diffusion=/nonexistent/ckpt"], "'/nonexistent/ckpt': no such checkpoint"),
    (["--config.compression.t_stars=10,x"], "config.compression.t_stars"),
    (["--config.attack.nosuch=1"], "--config.attack.nosuch: no such config field 'nosuch'"),
])
def test_bad_flags_exit_with_one_line(tmp_path, flags, message):
    proc = run_cli([f"--workdir={tmp_path / 'w'}", *flags])
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_unwritable_workdir_and_missing_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli([f"--workdir={blocker / 'sub'}"])
    assert proc.returncode == 1 and "error: workdir: cannot write to" in proc.stderr
    proc = run_cli([])
    assert proc.returncode == 1 and "error: --workdir: required" in proc.stderr


def test_eight_devices_give_the_same_numbers(tmp_path):
    """The tiny study on 8 simulated CPU devices equals the single-device run."""
    overrides = [f"--config.{k}={v}" for k, v in (
        ("methods", "ddpm"), ("num_examples", 12), ("batch_size", 12), ("eval_draws", 2),
        ("purifier.num_steps", 2), ("attack.steps", 2), ("attack.eot", 2),
        ("correlation.eot", 2), ("correlation.num_examples", 12),
        ("randomness.num_images", 1), ("randomness.num_points", 4),
        ("compression.methods", "ddpm"), ("compression.t_stars", "100"),
        ("compression.num_examples", 1), ("compression.num_attack_examples", 12),
        ("fid_reference_examples", 64))]
    base = ["--config=experiments/configs/reproduce.py:quick", *overrides]
    one = run_cli([f"--workdir={tmp_path / 'one'}", *base])
    assert one.returncode == 0, one.stderr[-3000:]
    eight = run_cli([f"--workdir={tmp_path / 'eight'}", *base],
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert eight.returncode == 0, eight.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r8 = json.loads((tmp_path / "eight" / "results.json").read_text())
    assert r1["devices"]["count"] == 1 and r8["devices"]["count"] == 8
    for key in ("clean_accuracy", "robust_accuracy", "gradient_correlation"):
        f1, f8 = flat_numbers(r1[key]), flat_numbers(r8[key])
        assert f1.keys() == f8.keys(), key
        for name in f1:
            assert f8[name] == pytest.approx(f1[name], abs=1e-4), (key, name)
    for p1, p8 in zip(r1["compression"], r8["compression"], strict=True):
        assert p8["compression_rate"] == pytest.approx(p1["compression_rate"], rel=1e-4)
        assert p8["robust_accuracy_fixed"] == p1["robust_accuracy_fixed"]
    d1, d8 = r1["distances"]["ddpm"], r8["distances"]["ddpm"]
    assert d8["l2_purified"] == pytest.approx(d1["l2_purified"], rel=1e-4)
