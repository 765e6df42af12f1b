"""The paper's CIFAR-10 and ImageNet configs end to end at toy size, through the main job.

`python -m experiments.reproduce --config=experiments/configs/reproduce.py:cifar10` (and
`:imagenet`) with `--config.synthetic_data=True` and small random-weight checkpoints in the
public formats, converted by `experiments.convert_checkpoint` (tests/paper_checkpoints.py:
score_sde_pytorch DDPM++ and RobustBench WRN from `../shared/reference/`; guided-diffusion
at 32x32 and a torchvision-layout ResNet for ImageNet). Every part runs (the audit
included); the overrides are the issue's command's plus what keeps a test to compile time
(2 reverse steps, 2 purifier methods, a one-method sweep, 2 probes / 2 singular values).
The job is first stopped by its test hook (`debug.fail_after_batches`), then the same
command resumes it from the saved parts to the end. Then: results.json (schema, intervals,
the matrix-free Jacobian estimates, per-part costs), report.md and the three figures;
`experiments.project_cost` reads the run's costs.

Cost: XLA compiling each config's ~12 purifier programs (the stopped run fills the
suite's persistent compilation cache, the resumed run loads its programs from there) and
the matrix-free Jacobian estimates, in the suite's unoptimised XLA (about 4 minutes per
config on 2 cores).
"""

import json
import math
import os

import pytest
from conftest import run_module

from diffjax.study import report

pytest.importorskip("torch")  # the public formats are PyTorch pickles

# The issue's command ("Done when"), as config overrides after the config and checkpoints.
ISSUE = {"synthetic_data": True, "num_examples": 4, "batch_size": 4, "eval_draws": 2,
         "purifier.num_steps": 10, "attack.steps": 2, "attack.eot": 2, "correlation.eot": 2,
         "correlation.num_examples": 4, "randomness.num_images": 2,
         "randomness.num_points": 4, "compression.num_examples": 2,
         "compression.num_attack_examples": 4, "fid_reference_examples": 64}
# What keeps the test to compile time (the programs are those of the command above).
TEST = {"purifier.num_steps": 2, "methods": "ddpm,ddim", "compression.methods": "ddpm",
        "compression.num_probes": 2, "compression.top_k": 2,
        "compression.lanczos_iterations": 3, "attack_undefended.steps": 4,
        "attack_undefended.targets": 2, "audit.eps": "0.125"}


def run_paper_config(tmp, variant, diffusion, classifier, t_stars, fail_after):
    """The whole study through the main job (python -m experiments.reproduce), killed by
    the test hook after `fail_after` saved pieces, then the same command again: it
    resumes from the saved parts and finishes. (That an interrupted run resumes to the
    numbers of an uninterrupted one is tests/test_study.py's, on the tiny U-Net: here each
    config's programs compile once per process, so the config runs once.)"""
    over = {**ISSUE, **TEST, "compression.t_stars": t_stars, "diffusion": str(diffusion),
            "classifier": str(classifier)}
    cmd = ("reproduce", f"--workdir={tmp / 'run'}",
           f"--config=experiments/configs/reproduce.py:{variant}",
           *(f"--config.{k}={v}" for k, v in over.items()),
           f"--jax_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}")
    stopped = run_module(*cmd, f"--config.debug.fail_after_batches={fail_after}",
                         check=False, timeout=1800)
    saved = sorted(p.stem for p in (tmp / "run" / "parts").glob("*.npz"))
    full = run_module(*cmd, timeout=1800)
    return {"path": tmp / "run", "stdout": full.stdout, "stopped": stopped,
            "stopped_parts": saved,
            "results": json.loads((tmp / "run" / "results.json").read_text())}


@pytest.fixture(scope="module")
def cifar10(reference_dir, tmp_path_factory):
    import paper_checkpoints

    tmp = tmp_path_factory.mktemp("cifar10")
    ddpm, wrn = paper_checkpoints.cifar10(tmp / "checkpoints", reference_dir)
    return run_paper_config(tmp, "cifar10", ddpm, wrn, "50,100", fail_after=12)


@pytest.fixture(scope="module")
def imagenet(reference_dir, tmp_path_factory):
    import paper_checkpoints

    tmp = tmp_path_factory.mktemp("imagenet")
    guided, resnet = paper_checkpoints.imagenet(tmp / "checkpoints", reference_dir)
    return run_paper_config(tmp, "imagenet", guided, resnet, "100,150", fail_after=12)


def check_results(run, *, dataset, shape, d_in, square_queries, methods=("ddpm", "ddim")):
    out, path = run["results"], run["path"]
    for key in report.SCHEMA_KEYS:
        assert key in out, key
    assert out["dataset"] == dataset and out["num_examples"] == 4 and out["synthetic_data"]
    ca, ra = out["clean_accuracy"], out["robust_accuracy"]
    for name in ("undefended", *methods):
        lo, hi = ca[f"{name}_ci"]
        assert 0.0 <= lo <= ca[name] <= hi <= 1.0, name
    lo, hi = ra["undefended_ci"]
    assert 0.0 <= lo <= ra["undefended"] <= hi <= 1.0
    for m in methods:
        for p in ("fixed", "transfer", "independent_eot"):
            lo, hi = ra[m][f"{p}_ci"]
            assert 0.0 <= lo <= ra[m][p] <= hi <= 1.0, (m, p)
        assert -1.0 <= out["gradient_correlation"][m] <= 1.0
        assert out["consistency"][m]["fixed_verdict_is_the_attacks_own"]
    # The compression sweep: matrix-free (Hutchinson rate with its standard error, top-k
    # Lanczos spectrum) on the classifier's input, d = H*W*C.
    cfg = out["config"]["compression"]
    assert cfg["estimator"] == "hutchinson" and cfg["spectrum"] == "top_k"
    assert len(out["compression"]) == 2
    for p in out["compression"]:
        assert p["spectrum"] == "top_k" and len(p["top_singular_values"]) == 2
        assert p["compression_rate"] > 0 and p["compression_rate_stderr"] > 0
        assert p["num_rate_examples"] == 2
        lo, hi = p["robust_accuracy_fixed_ci"]
        assert lo <= p["robust_accuracy_fixed"] <= hi
    assert math.prod(shape) == d_in
    assert set(out["sigmoid_fit"]) >= {"params", "r2"}
    audit = out["audit"]["ddpm"]
    assert {r["check"] for r in audit["rows"]} == {"iterations", "clips", "gradient",
                                                   "gradient-free", "budget"}
    square = next(r for r in audit["rows"] if r["check"] == "gradient-free")
    assert square["attack"] == f"Square, {square_queries} queries"  # follows attack.steps
    assert list(out["claims"]) == ["claim1", "claim2", "claim3", "claim4"]
    # Every part computed once, with its cost; the report's cost table lists them.
    costs = out["costs"]
    # Every part has its cost, those finished before the interruption included.
    assert set(costs["parts"]) == set(out["parts"]["computed"]) | set(out["parts"]["loaded"])
    for c in costs["parts"].values():
        assert c["wall_s"] >= c["compile_s"] >= 0 and c["run_s"] >= 0
    total = sum(c["wall_s"] for c in costs["parts"].values())
    assert costs["total"]["wall_s"] == pytest.approx(total)
    text = (path / "report.md").read_text()
    assert "## Cost per part" in text and "## Gradient-masking audit" in text
    assert text.count("eproduced.**") == 4 and "(synthetic data)" in text
    for name in costs["parts"]:
        assert f"| {name} |" in text
    for name in ("compression_robustness", "distances", "examples"):
        assert (path / f"{name}.png").stat().st_size > 1000
    assert "claim 4:" in run["stdout"]


def check_resumed(run):
    """The interrupted run stopped with the hook's message, having saved some parts; the
    rerun loaded every one of them and computed only the rest."""
    stopped = run["stopped"]
    assert stopped.returncode != 0 and "test hook: stopped after" in stopped.stderr
    assert run["stopped_parts"]
    parts = run["results"]["parts"]
    assert set(parts["loaded"]) >= set(run["stopped_parts"])
    assert not set(parts["computed"]) & set(run["stopped_parts"])
    for name in run["stopped_parts"]:
        assert f"[{name}] loaded from" in run["stdout"]


def test_cifar10_config_end_to_end(cifar10):
    check_results(cifar10, dataset="cifar10", shape=(32, 32, 3), d_in=3072,
                  square_queries=10)  # 5 x the 2 attack steps
    cfg = cifar10["results"]["config"]
    assert cfg["purifier"]["remat"] and cfg["attack"]["gradient"] == "full"


def test_cifar10_config_resumes_after_an_interruption(cifar10):
    check_resumed(cifar10)


def test_imagenet_config_end_to_end(imagenet):
    """224x224 for the classifier; the guided-diffusion U-Net purifies at its 32x32
    (resize in and out inside the purifier); BPDA-EOT attack; Jacobians on 150,528 dims."""
    check_results(imagenet, dataset="imagenet2012", shape=(224, 224, 3), d_in=150_528,
                  square_queries=20)  # 10 x the 2 attack steps
    out = imagenet["results"]
    assert out["split"] == "validation"
    assert out["config"]["attack"]["gradient"] == "bpda"
    assert out["clean_accuracy"]["undefended"] == 1.0  # the fitted last layer


def test_imagenet_config_resumes_after_an_interruption(imagenet):
    check_resumed(imagenet)


def test_project_cost_reads_the_runs_costs(cifar10, tmp_path):
    """The projection script on the run's results.json: every group of parts, and the
    total equals compile + run for each target."""
    proc = run_module("project_cost", f"--results={cifar10['path'] / 'results.json'}",
                      "--config=experiments/configs/reproduce.py:cifar10",
                      "--num_examples=512,10000", "--devices=1,8")
    text = proc.stdout
    assert "| 512 images, 1 device (h) |" in text and "10,000 images, 8 devices (h)" in text
    for group in ("undefended attack", "attacks, fixed + transfer (main t*)",
                  "attacks, independent EOT (main t*)", "compression: Jacobian estimates",
                  "compression: attacks at other t*", "audit", "randomness"):
        assert f"| {group} |" in text, group
