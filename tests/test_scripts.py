"""Smoke tests of the per-piece scripts (eval_robustness, distances, compression).

Each script runs as `python -m experiments.<name>` on the embedded default (digits, the
shipped classifier) with a tiny random DDPM U-Net written by `pretrained.save`, so the
tests do not depend on a trained diffusion model and compile small programs. They check
real properties: the script's per-example records equal the library's
`attacks.evaluate_dataset` on the same settings; an interrupted run resumes to the same
records; the distances of the adversarial inputs agree with the attack's own l2/l_inf;
the compression rate is the RMS of the saved singular values; bad flags end with one
`error:` line and exit status 1.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT

QUICK = "experiments/configs/eval_digits.py:quick"
TINY_UNET = {"resolution": 8, "in_channels": 1, "out_channels": 1, "ch": 8, "ch_mult": [1],
             "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
             "resamp_with_conv": True, "num_groups": 4, "dtype": "float32"}
SCHEDULE = {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 2e-2}


def make_tiny_ddpm(path) -> pathlib.Path:
    """A tiny random DDPM U-Net for 8x8x1 digits, as a model directory."""
    from diffjax import models, pretrained

    _, variables = models.init("ddpm_unet", TINY_UNET, jax.random.key(0))
    return pretrained.save(path, kind="ddpm_unet", config=TINY_UNET, variables=variables,
                           schedule=SCHEDULE)


def run_script(name, *args, env=None, check=True):
    """Runs `python -m experiments.<name> args...` from the repo root."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
                **(env or {})}
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=ROOT,
                          capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def small_flags(ddpm, workdir, *extra):
    """Six examples in batches of four (the second batch: two real rows, two masked)."""
    return (f"--config={QUICK}", f"--config.diffusion={ddpm}", f"--workdir={workdir}",
            "--config.methods=ddpm", "--config.protocols=fixed", "--config.num_examples=6",
            "--config.batch_size=4", "--config.distances.protocol=fixed", *extra)


def records(path):
    from diffjax import attacks

    meta, recs = attacks.read_results(path)
    return meta, sorted(recs, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    return make_tiny_ddpm(tmp_path_factory.mktemp("models") / "tiny_ddpm")


@pytest.fixture(scope="module")
def evaluated(ddpm, tmp_path_factory):
    """One eval_robustness run (module-scoped: the later tests read its workdir)."""
    workdir = tmp_path_factory.mktemp("eval")
    proc = run_script("eval_robustness", *small_flags(ddpm, workdir))
    return workdir, proc


def test_eval_robustness_matches_library_and_writes_outputs(ddpm, evaluated):
    from diffjax import attacks, data, pretrained
    from diffjax.defense import Defense, make_purifier
    from experiments.configs import eval_digits

    workdir, proc = evaluated
    run = workdir / "robustness"
    meta, recs = records(run / "ddpm_fixed.jsonl")
    assert [r["id"] for r in recs] == list(range(6))  # every example once, padding dropped
    assert meta["protocol"] == "fixed" and meta["method"] == "ddpm"
    summary = json.loads((run / "summary.json").read_text())["ddpm"]["fixed"]
    assert summary["n"] == 6
    assert summary["robust_accuracy"] == pytest.approx(np.mean([r["adv_correct"] for r in recs]))
    assert "robust" in proc.stdout  # progress / result lines

    saved = sorted((run / "ddpm_fixed").glob("batch_*.npz"))
    assert len(saved) == 2
    with np.load(saved[1]) as z:
        assert z["ids"].tolist() == [4, 5] and z["x_adv"].shape == (2, 8, 8, 1)

    # The library's evaluate_dataset on the same defense, attack and keys agrees.
    c = eval_digits.get_config("quick")
    model = pretrained.load(ddpm)
    purifier = make_purifier(model.eps_fn, schedule=model.schedule(),
                             t_star=c.purifier.t_star, method="ddpm",
                             num_steps=c.purifier.num_steps)
    defense = Defense(purifier, pretrained.load("digits_classifier").logits_fn)
    cfg = attacks.PGDConfig(norm="linf", eps=c.attack.eps, step_size=c.attack.step_size,
                            steps=c.attack.steps, random_start=True, loss="ce",
                            gradient=attacks.Gradient("full", 1))
    lib_path = workdir / "library.jsonl"
    attacks.evaluate_dataset(defense, data.batches("digits", "test", 6, num_examples=6),
                             config=cfg, protocol="fixed", key=jax.random.key(c.seed),
                             out_path=lib_path, eval_draws=c.eval_draws, progress=False)
    _, lib = records(lib_path)
    assert [r["id"] for r in lib] == [r["id"] for r in recs]
    for a, b in zip(recs, lib, strict=True):
        for k in ("label", "clean_correct", "adv_correct", "adv_correct_worst", "success"):
            assert a[k] == b[k], (k, a, b)
        for k in ("adv_correct_mean", "linf", "l2"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)


def test_eval_robustness_resumes_after_interruption(ddpm, evaluated, tmp_path):
    workdir, _ = evaluated
    src = workdir / "robustness"
    dst = tmp_path / "robustness"
    (dst / "ddpm_fixed").mkdir(parents=True)
    # An interrupted run: batch 0 finished, batch 1 died in the middle of its first line.
    lines = (src / "ddpm_fixed.jsonl").read_text().splitlines(keepends=True)
    (dst / "ddpm_fixed.jsonl").write_text("".join(lines[:5]) + lines[5][:17])
    (dst / "ddpm_fixed" / "batch_00000.npz").write_bytes(
        (src / "ddpm_fixed" / "batch_00000.npz").read_bytes())
    proc = run_script("eval_robustness", *small_flags(ddpm, tmp_path))
    assert "resuming: 1/2 batches done" in proc.stdout
    assert records(dst / "ddpm_fixed.jsonl") == records(src / "ddpm_fixed.jsonl")
    with np.load(dst / "ddpm_fixed" / "batch_00001.npz") as a, \
            np.load(src / "ddpm_fixed" / "batch_00001.npz") as b:
        np.testing.assert_allclose(a["x_adv"], b["x_adv"], atol=1e-6)


def test_distances_and_compression(ddpm, evaluated):
    workdir, _ = evaluated
    run_script("distances", *small_flags(ddpm, workdir))
    s = json.loads((workdir / "distances" / "summary.json").read_text())["ddpm"]
    _, recs = records(workdir / "robustness" / "ddpm_fixed.jsonl")
    # The adversarial inputs it measured are the attack's: same l2 and l_inf to the clean.
    assert s["n"] == 6
    assert s["l2_adv_input"] == pytest.approx(np.mean([r["l2"] for r in recs]), rel=1e-4)
    assert s["linf_adv_input"] == pytest.approx(np.mean([r["linf"] for r in recs]), rel=1e-4)
    assert s["linf_adv_input"] <= 0.1 + 1e-5
    for k in ("ssim_adv_input", "ssim_purified", "ssim_purified_clean"):
        assert -1.0 <= s[k] <= 1.0
    assert s["l2_purified"] > 0 and np.isfinite(s["fid_purified"]) and s["fid_purified"] >= 0

    run_script("compression", *small_flags(ddpm, workdir, "--config.compression.t_stars=10",
                                           "--config.compression.num_examples=3"))
    points = json.loads((workdir / "compression" / "summary.json").read_text())
    assert [(p["method"], p["t_star"], p["n"]) for p in points] == [("ddpm", 10, 3)]
    batches = sorted((workdir / "compression" / "ddpm_t10").glob("batch_*.npz"))
    assert len(batches) == 1
    with np.load(batches[0]) as z:
        assert z["ids"].tolist() == [0, 1, 2] and z["sv"].shape == (3, 64)
        assert np.all(np.diff(z["sv"], axis=1) <= 1e-6)  # descending spectrum
        # The exact rate is ||J||_F / sqrt(d): the RMS of the singular values.
        np.testing.assert_allclose(z["rate"], np.sqrt(np.mean(z["sv"] ** 2, axis=1)),
                                   rtol=1e-4)
        frac, rate = float(np.mean(z["sv"] < 0.25)), float(np.mean(z["rate"]))
    assert points[0]["fraction_sv_below_0.25"] == pytest.approx(frac)
    assert points[0]["compression_rate"] == pytest.approx(rate)


@pytest.mark.parametrize("script,extra,needle", [
    ("eval_robustness", ["--config.methods=ddpm,magic"], "config.methods"),
    ("eval_robustness", ["--config.attack.eps=-0.1"], "config.attack.eps"),
    ("distances", ["--config.diffusion=/nonexistent/ddpm_dir"], "no such checkpoint"),
    ("compression", ["--config.compression.t_stars=10,x"], "config.compression.t_stars"),
    ("compression", ["--config.nonexistent_field=1"], "nonexistent_field"),
])
def test_bad_flags_exit_with_one_line(script, extra, needle, tmp_path, ddpm):
    args = [f"--config={QUICK}", f"--config.diffusion={ddpm}", f"--workdir={tmp_path}", *extra]
    proc = run_script(script, *args, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_workdir_and_missing_workdir(tmp_path, ddpm):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for workdir in ([f"--workdir={blocker}/sub"], []):
        proc = run_script("eval_robustness", f"--config={QUICK}",
                          f"--config.diffusion={ddpm}", *workdir, check=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(err) == 1, proc.stderr
        assert err[0].startswith("error:") and "workdir" in err[0], proc.stderr


@pytest.mark.parametrize("name", ["eval_digits", "eval_cifar10", "eval_imagenet"])
def test_configs_are_valid_and_document_their_command(name):
    import importlib

    from experiments import compression, eval_robustness

    module = importlib.import_module(f"experiments.configs.{name}")
    for variant in ("", "quick"):
        config = module.get_config(variant)
        eval_robustness.validate(config)
        compression.validate(config)
    assert f"--config=experiments/configs/{name}.py" in module.__doc__
    assert "Expected" in module.__doc__
    with pytest.raises(ValueError, match="variant"):
        module.get_config("huge")


@pytest.mark.parametrize("script,config,needle", [
    ("eval_robustness", "eval_cifar10", "checkpoints/wrn_28_10_standard"),
    ("compression", "eval_imagenet", "checkpoints/resnet50"),
])
def test_paper_configs_without_checkpoints_fail_in_one_line(script, config, needle, tmp_path):
    # The paper's checkpoints are converted by hand; a missing directory says so in one line.
    proc = run_script(script, f"--config=experiments/configs/{config}.py:quick",
                      f"--workdir={tmp_path}", check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert err[0].startswith("error:") and needle in err[0], proc.stderr
    assert "no such checkpoint" in err[0]
