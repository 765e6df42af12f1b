"""The paper's CIFAR-10 config end to end at toy size through the main job, and
`experiments.project_cost` on its run (tests/paper_configs.py says what and why)."""

import pytest

pytest.importorskip("torch")  # the public formats are PyTorch pickles

from conftest import run_module  # noqa: E402
from paper_configs import check_results, check_resumed, run_paper_config  # noqa: E402


@pytest.fixture(scope="module")
def cifar10(reference_dir, tmp_path_factory):
    import paper_checkpoints

    tmp = tmp_path_factory.mktemp("cifar10")
    ddpm, wrn = paper_checkpoints.cifar10(tmp / "checkpoints", reference_dir)
    return run_paper_config(tmp, "cifar10", ddpm, wrn, "50,100", fail_after=12)


def test_cifar10_config_end_to_end(cifar10):
    check_results(cifar10, dataset="cifar10", shape=(32, 32, 3), d_in=3072,
                  square_queries=10)  # 5 x the 2 attack steps
    cfg = cifar10["results"]["config"]
    assert cfg["purifier"]["remat"] and cfg["attack"]["gradient"] == "full"


def test_cifar10_config_resumes_after_an_interruption(cifar10):
    check_resumed(cifar10)


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
