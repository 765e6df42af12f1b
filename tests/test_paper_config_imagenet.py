"""The paper's ImageNet config end to end at toy size through the main job
(tests/paper_configs.py says what and why)."""

import pytest

pytest.importorskip("torch")  # the public formats are PyTorch pickles

from paper_configs import check_results, check_resumed, run_paper_config  # noqa: E402


@pytest.fixture(scope="module")
def imagenet(reference_dir, tmp_path_factory):
    import paper_checkpoints

    tmp = tmp_path_factory.mktemp("imagenet")
    guided, resnet = paper_checkpoints.imagenet(tmp / "checkpoints", reference_dir)
    # LLVM at level 1 (after the suite's 0; the later flag wins): the Jacobian estimates on
    # 150,528 dimensions ran 107 s at level 0 and 7 s at level 1, for the same compile
    # time (the whole run alone: 259 s -> 153 s). CIFAR-10's gain and loss cancel (220 s
    # both ways), so it keeps the suite's level.
    return run_paper_config(tmp, "imagenet", guided, resnet, "100,150", fail_after=12,
                            xla_flags="--xla_backend_optimization_level=1")


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
