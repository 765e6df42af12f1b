"""`python -m experiments.project_cost` on a hand-written results.json (numbers checked by
hand below); tests/test_paper_config_cifar10.py runs it on a real run's results.json."""

import json

from conftest import run_module

MEASURED = {  # a 4-example run in one batch of 4 on 1 device
    "dataset": "cifar10", "num_examples": 4,
    "devices": {"count": 1, "processes": 1, "platform": "cpu"},
    "config": {"batch_size": 4, "purifier": {"t_star": 100},
               "correlation": {"num_examples": 4},
               "randomness": {"num_images": 2, "num_points": 4},
               "compression": {"num_examples": 2, "num_attack_examples": 4},
               "audit": {"num_examples": 4}, "fid_reference_examples": 64},
    "costs": {"parts": {
        "attack_reverse_only_t100_realization": {"wall_s": 15.0, "compile_s": 5.0,
                                                 "run_s": 10.0},
        "compression_ddpm_t50": {"wall_s": 30.0, "compile_s": 20.0, "run_s": 10.0},
        "randomness_correlation_ddpm": {"wall_s": 2.0, "compile_s": 1.0, "run_s": 1.0},
        "attack_ddpm_t100_realization_square": {"wall_s": 3.0, "compile_s": 1.0,
                                                "run_s": 2.0}},
        "total": {"wall_s": 50.0, "compile_s": 27.0, "run_s": 23.0}},
}


def _row(text, first_cell):
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_hand_checked_projection(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(MEASURED))
    # The target: the paper's CIFAR-10 config (global batch 64, correlation on 64 examples,
    # compression Jacobians of 8, randomness 16 images x 100 points, audit on 64).
    proc = run_module("project_cost", f"--results={path}",
                      "--config=experiments/configs/reproduce.py:cifar10",
                      "--num_examples=512,10000", "--devices=1,8", "--per_part")
    text = proc.stdout
    # Main attack part: 10 s over 4 rows = 2.5 s per row; 512 rows -> 1,280 s = 0.356 h
    # (8 devices: 160 s = 0.0444 h); 10,000 -> 157 batches of 64 = 10,048 rows -> 25,120 s
    # = 6.98 h (8 devices: 0.872 h).
    assert _row(text, "attack_reverse_only_t100_realization") == [
        "attack_reverse_only_t100_realization", "10.0 (4)", "0.356", "0.0444", "6.98", "0.872"]
    # Jacobians: 2 examples padded to one batch of 4 (2.5 s per row); the target's 8
    # examples pad to one batch of 64: 160 s = 0.0444 h at every test-set size.
    assert _row(text, "compression_ddpm_t50")[2:] == ["0.0444", "0.00556", "0.0444",
                                                      "0.00556"]
    # Randomness: 2 images x 2 x 4 points = 16 rows, 1/16 s each; target 16 x 2 x 100 =
    # 3,200 rows -> 200 s. Audit (Square): 4 rows at 0.5 s; 64 rows -> 32 s.
    assert _row(text, "randomness_correlation_ddpm")[2] == "0.0556"
    assert _row(text, "attack_ddpm_t100_realization_square")[2] == "0.00889"
    # Compile once (27 s) + 1,280 + 160 + 200 + 32 s = 1,699 s = 0.472 h.
    assert _row(text, "**total**")[2] == "0.472"
    assert _row(text, "**compiling (once)**")[2:] == ["0.0075"] * 4

    grouped = run_module("project_cost", f"--results={path}", "--num_examples=8",
                         "--devices=1").stdout
    # Default target: the run's own config, 8 examples: the main attack 2 batches of 4.
    assert _row(grouped, "attacks, fixed + transfer (main t*)")[2] == f"{20 / 3600:.3g}"
    assert _row(grouped, "audit")[1] == "2.0 (4)"


def test_bad_input_is_one_line(tmp_path):
    proc = run_module("project_cost", f"--results={tmp_path / 'none.json'}", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: --results:")
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"dataset": "cifar10"}))
    proc = run_module("project_cost", f"--results={path}", check=False)
    assert proc.returncode == 1 and "no per-part costs" in proc.stderr
