"""The per-piece scripts (eval_robustness, distances, compression): thin mains over the
study's parts. They write their summaries from the same parts the study uses (a second
script reuses the first one's attack part), and bad input ends with one `error:` line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, config_flags, make_tiny_ddpm, run_module, tiny_study_config

from diffjax.study import UNDEFENDED, Study, Workdir, robustness, validate_config
from experiments.configs import reproduce

KEYS = ("methods", "num_examples", "batch_size", "eval_draws", "purifier.num_steps",
        "attack.cascade", "attack.steps", "attack.targets", "attack.chunk", "attack.eot",
        "attack_undefended.steps", "attack_undefended.chunk", "attack_undefended.targets",
        "compression.methods", "compression.t_stars", "compression.num_examples",
        "compression.num_attack_examples", "fid_reference_examples")


def flags_of(config) -> list[str]:
    return config_flags(config, ("diffusion", *KEYS))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    ddpm = make_tiny_ddpm(root / "ddpm")
    config = tiny_study_config(ddpm, methods="ddpm", **{"compression.t_stars": "100"})
    return config, root / "work"


@pytest.fixture(scope="module")
def evaluated(setup):
    config, workdir = setup
    proc = run_module("eval_robustness", f"--workdir={workdir}", *flags_of(config))
    return config, workdir, proc


def test_eval_robustness_writes_the_parts_summaries(evaluated):
    config, workdir, proc = evaluated
    summary = json.loads((workdir / "robustness" / "summary.json").read_text())
    assert set(summary) == {UNDEFENDED, "ddpm"}
    assert set(summary["ddpm"]) == {"fixed", "transfer", "independent"}
    study = Study(config, Workdir(workdir, log=lambda _: None), lambda _: None)
    fixed = robustness.attack_part(study, "ddpm")  # loaded: the script computed it
    fresh = robustness.attack_part(study, "ddpm", stream="fresh")
    assert study.workdir.computed_parts == []
    s = summary["ddpm"]
    assert s["fixed"]["robust"] == pytest.approx(fixed["fixed_adv_correct"].mean())
    assert s["transfer"]["robust"] == pytest.approx(fixed["transfer_adv_correct"].mean())
    assert s["independent"]["robust"] == pytest.approx(fresh["independent_adv_correct"].mean())
    lo, hi = s["fixed"]["robust_ci"]
    assert lo <= s["fixed"]["robust"] <= hi and s["fixed"]["n"] == 8
    assert "[ddpm/fixed] robust" in proc.stdout


def test_distances_and_compression_reuse_the_attack_part(evaluated):
    config, workdir, _ = evaluated
    proc = run_module("distances", f"--workdir={workdir}", *flags_of(config))
    assert "loaded from" in proc.stdout and "[attack_ddpm_t100_realization] computing" \
        not in proc.stdout
    d = json.loads((workdir / "distances" / "summary.json").read_text())["ddpm"]
    study = Study(config, Workdir(workdir, log=lambda _: None), lambda _: None)
    part = robustness.attack_part(study, "ddpm")
    # The distances are the attack part's own, measured on the realization's purifications.
    assert d["l2_adv_input"] == pytest.approx(part["l2"].mean(), rel=1e-4)
    assert d["l2_purified"] == pytest.approx(part["dist_l2_purified"].mean(), rel=1e-5)
    assert d["linf_adv_input"] <= 0.1 + 1e-5 and np.isfinite(d["fid_purified"])
    run_module("compression", f"--workdir={workdir}", *flags_of(config))
    c = json.loads((workdir / "compression" / "summary.json").read_text())
    (p,) = c["points"]
    assert (p["method"], p["t_star"], p["num_rate_examples"]) == ("ddpm", 100, 2)
    assert p["robust_accuracy_fixed"] == pytest.approx(part["fixed_adv_correct"].mean())
    assert 0.0 <= p["fraction_sv_below_0.25"] <= 1.0 and p["compression_rate"] > 0


@pytest.mark.parametrize("script,extra,needle", [
    ("eval_robustness", ["--config.methods=ddpm,magic"], "config.methods"),
    ("eval_robustness", ["--config.protocols=fixed,aligned"], "config.protocols"),
    ("distances", ["--config.diffusion=/nonexistent/ddpm_dir"], "no such checkpoint"),
    ("compression", ["--config.compression.t_stars=10,x"], "config.compression.t_stars"),
    ("compression", ["--config.compression.spectrum=full"], "config.compression.spectrum"),
    ("compression", ["--config.nonexistent_field=1"], "nonexistent_field"),
])
def test_bad_flags_exit_with_one_line(script, extra, needle, tmp_path):
    proc = run_module(script, f"--workdir={tmp_path}", *extra, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("variant,needle", [("cifar10", "wrn_28_10_standard"),
                                            ("imagenet", "resnet50")])
def test_paper_configs_without_checkpoints_fail_in_one_line(variant, needle, tmp_path):
    proc = run_module("eval_robustness", f"--workdir={tmp_path}",
                      f"--config=experiments/configs/reproduce.py:{variant}", check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert err[0].startswith("error:") and needle in err[0] and "no such checkpoint" in err[0]


@pytest.mark.parametrize("variant", ["", "quick", "cifar10", "imagenet"])
def test_every_config_variant_is_valid(variant):
    validate_config(reproduce.get_config(variant))
    with pytest.raises(ValueError, match="variant"):
        reproduce.get_config("huge")


def test_a_config_with_a_bad_remat_is_refused_by_name():
    c = reproduce.get_config("quick")
    with c.unlocked():
        c.purifier.remat = "save_conv"
    validate_config(c)  # a mode of diffusion.REMAT_MODES is a valid config value
    with c.unlocked():
        c.purifier.remat = "conv"
    with pytest.raises(ValueError, match=r"config.purifier.remat: expected True, False or one"):
        validate_config(c)


def test_study_scripts_keep_freed_memory_only_on_a_cpu_only_and_unless_told(tmp_path):
    """In a fresh process (mallopt changes the process): on this CPU-only Linux it applies;
    glibc's own MALLOC_* variables or an accelerator platform leave malloc alone."""
    code = ("from experiments import common; "
            "print(common.keep_freed_memory_on_cpu())")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for extra, want in (({"JAX_PLATFORMS": "cpu"}, "True"),
                        ({"JAX_PLATFORMS": "cpu", "MALLOC_MMAP_MAX_": "65536"}, "False"),
                        ({"JAX_PLATFORMS": "cuda"}, "False")):
        out = subprocess.run([sys.executable, "-c", code], env={**base, **extra}, check=True,
                             capture_output=True, text=True, cwd=ROOT)
        assert out.stdout.strip() == want, (extra, out.stdout, out.stderr)


def test_study_scripts_compile_at_llvm_level_1_on_a_cpu_only(monkeypatch):
    from experiments import common

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert common.compile_faster_on_cpu()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                       "--xla_backend_optimization_level=1")
    assert not common.compile_faster_on_cpu()  # a level already set wins
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not common.compile_faster_on_cpu() and os.environ["XLA_FLAGS"] == ""
