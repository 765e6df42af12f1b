"""The paper's CIFAR-10 and ImageNet configs end to end at toy size, through the main job
(shared by tests/test_paper_config_cifar10.py and tests/test_paper_config_imagenet.py).

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
the matrix-free Jacobian estimates, in the suite's unoptimised XLA (ImageNet's at LLVM
level 1: its Jacobian estimates run 15x faster there); about 2.5-3.5 minutes per config
alone on 2 cores.
"""

import json
import math
import os

import pytest
from conftest import run_module

from diffjax.study import report

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
        "attack_undefended.targets": 2, "audit.eps": "0.125",
        # Rounds of 2 iterations: the audit's 2x-steps attack (4 steps) then runs the
        # attack's own programs (the configs' 25 would give rounds of 2 and of 4: two
        # more programs to compile, 27 s for CIFAR-10 in the suite's XLA).
        "attack.chunk": 2}


def run_paper_config(tmp, variant, diffusion, classifier, t_stars, fail_after,
                     xla_flags=None):
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
    env = {"XLA_FLAGS": xla_flags} if xla_flags else None
    stopped = run_module(*cmd, f"--config.debug.fail_after_batches={fail_after}",
                         check=False, timeout=1800, env=env)
    saved = sorted(p.stem for p in (tmp / "run" / "parts").glob("*.npz"))
    full = run_module(*cmd, timeout=1800, env=env)
    return {"path": tmp / "run", "stdout": full.stdout, "stopped": stopped,
            "stopped_parts": saved,
            "results": json.loads((tmp / "run" / "results.json").read_text())}


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
